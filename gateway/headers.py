"""The response headers the gateway adds: which model answered, by what route, at what cost."""

from __future__ import annotations

REQUEST_ID = "x-request-id"
MODEL = "x-greenroute-model"
ROUTE = "x-greenroute-route"
ENERGY = "x-greenroute-energy-joules"
ENERGY_SOURCE = "x-greenroute-energy-source"
TARGET = "x-greenroute-quality-target"
TARGET_RULE = "x-greenroute-target-rule"  # a rule changed the default target (carbon-aware)
TRIED = "x-greenroute-models-tried"
SCORE = "x-greenroute-router-score"
CONFIDENCE = "x-greenroute-confidence"
DEGRADED = "x-greenroute-degraded"
