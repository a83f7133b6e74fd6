"""Cascade confidence: after a smaller tier has answered, how likely is the answer as good as
the largest tier's would be?

Inputs are the answer's own logprob features (routers/features.py), optionally the signals
that cost extra calls (agreement of k samples, the model's self-check), and the router's score
for the prompt: the answer's confidence is what prompt-only routers never see, and the router's
score adds what the prompt says. A logistic model on standardised inputs, trained with the
routers' labels (routers/models.py: Target). Which inputs a model uses is part of its state, so
the gateway knows which signals to gather before it can judge an answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from greenroute.routers.features import FEATURES, SIGNALS
from greenroute.routers.models import Target, _sigmoid, fit_logistic


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-4, 1 - 1e-4)
    return np.asarray(np.log(p / (1 - p)), dtype=float)


class ConfidenceModel:
    """P(the answer is as good as the largest tier's | its inputs, router score)."""

    def __init__(self, l2: float = 1.0, inputs: Sequence[str] = FEATURES) -> None:
        unknown = [name for name in inputs if name not in (*FEATURES, *SIGNALS)]
        if unknown:
            raise ValueError(f"unknown confidence inputs: {', '.join(unknown)}")
        self.l2 = l2
        self.inputs = tuple(inputs)  # columns of `features`, in this order
        self.mean = np.zeros(len(self.inputs) + 1)
        self.scale = np.ones(len(self.inputs) + 1)
        self.w = np.zeros(len(self.inputs) + 1)
        self.b = 0.0

    @property
    def signals(self) -> tuple[str, ...]:
        """The inputs that need extra calls (agreement, self-check), in SIGNALS order."""
        return tuple(name for name in SIGNALS if name in self.inputs)

    def row(self, values: Mapping[str, float]) -> np.ndarray:
        """One answer's inputs as a (1, inputs) row; KeyError names a missing one."""
        return np.array([[float(values[name]) for name in self.inputs]])

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
                "l2": np.array(self.l2), "inputs": np.array(self.inputs, dtype=str)}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> ConfidenceModel:
        # Artifacts written before signals existed have no `inputs`: the logprob features.
        inputs = tuple(str(n) for n in state["inputs"]) if "inputs" in state else FEATURES
        model = cls(float(state["l2"]), inputs)
        model.mean, model.scale, model.w = state["mean"], state["scale"], state["w"]
        model.b = float(state["b"])
        return model
