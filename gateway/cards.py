"""`GET /v1/models`: OpenAI's model objects for the tiers and for `green`, with a `greenroute`
field that says what each one is (a tier's backend and upstream model; the router's tiers and
quality targets)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from greenroute.backends.base import Backend
from greenroute.gateway.config import RESERVED_MODEL, GatewayConfig
from greenroute.gateway.green import GreenRoute


class ModelCards:
    def __init__(self, config: GatewayConfig, backends: Mapping[str, Backend],
                 green: GreenRoute | None) -> None:
        self.tiers = {tier.name: tier for tier in config.tiers}
        self.backends = backends
        self.green = green
        self.created = int(time.time())

    def card(self, name: str) -> dict[str, Any]:
        """The card of a tier, or of `green` (RESERVED_MODEL)."""
        card: dict[str, Any] = {"id": name, "object": "model", "created": self.created,
                                "owned_by": "greenroute"}
        if name == RESERVED_MODEL:
            card["greenroute"] = {"route": "router", "available": self.green is not None}
            if self.green is not None:
                router = self.green.router
                manifest = router.router.manifest
                card["greenroute"] |= {"tiers": manifest["tiers"], "kind": manifest["kind"],
                                       "default_target": self.green.default_target,
                                       "targets": sorted(router.policy.thresholds)}
            return card
        tier = self.tiers[name]
        card["greenroute"] = {"backend": tier.backend, "upstream_model":
                              self.backends[name].model_id, "energy_hint": tier.energy_hint}
        return card
