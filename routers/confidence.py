"""Cascade confidence: after a smaller tier has answered, how likely is the answer as good as
the largest tier's would be?

Inputs are the answer's own logprob features (routers/features.py) and the router's score for
the prompt: the answer's confidence is a strong signal that prompt-only routers never see (on
a 20-question quiz Qwen2.5-Coder-0.5B's first answer token averaged probability 0.72 when right
and 0.32 when wrong), and the router's score adds what the prompt says. A logistic model on
standardised inputs, trained with the routers' labels (routers/models.py: Target).
"""

from __future__ import annotations

import numpy as np

from greenroute.routers.features import FEATURES
from greenroute.routers.models import Target, _sigmoid, fit_logistic


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-4, 1 - 1e-4)
    return np.asarray(np.log(p / (1 - p)), dtype=float)


class ConfidenceModel:
    """P(the answer is as good as the largest tier's | its logprob features, router score)."""

    def __init__(self, l2: float = 1.0) -> None:
        self.l2 = l2
        self.mean = np.zeros(len(FEATURES) + 1)
        self.scale = np.ones(len(FEATURES) + 1)
        self.w = np.zeros(len(FEATURES) + 1)
        self.b = 0.0

    def _inputs(self, features: np.ndarray, router_score: np.ndarray) -> np.ndarray:
        return np.column_stack([features, _logit(router_score)])

    def fit(self, features: np.ndarray, router_score: np.ndarray, target: Target) -> None:
        x = self._inputs(features, router_score)
        self.mean = x.mean(axis=0)
        self.scale = np.maximum(x.std(axis=0), 1e-6)
        self.w, self.b = fit_logistic((x - self.mean) / self.scale, target.labels(), self.l2)

    def predict(self, features: np.ndarray, router_score: np.ndarray) -> np.ndarray:
        x = (self._inputs(features, router_score) - self.mean) / self.scale
        return _sigmoid(x @ self.w + self.b)

    def state(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "scale": self.scale, "w": self.w, "b": np.array(self.b),
                "l2": np.array(self.l2)}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> ConfidenceModel:
        model = cls(float(state["l2"]))
        model.mean, model.scale, model.w = state["mean"], state["scale"], state["w"]
        model.b = float(state["b"])
        return model
