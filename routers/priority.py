"""Which prompts a prompt-only step sends to its tier first: those saving the most joules per
unit of quality lost.

A router's score p ranks prompts by how likely the smaller tier is to answer as well, but a
quality target is a budget of quality lost, and the energy saved by spending it differs from
prompt to prompt by an order of magnitude (a multiple-choice letter against a worked math
solution). Sending the prompts with the largest ratio of expected joules saved to expected
quality lost first is the greedy order of this knapsack, and the order in which a threshold
then admits them. The priority of a prompt with embedding x and router score p is

    (E_large(x) - E_small(x)) / (floor x log(1 + exp(L(p) / floor)))

where E is each tier's predicted joules (ridge regression of log joules on the embedding: they
follow the task's answer length, which the prompt shows), L(p) = a p + b the expected quality
lost, fitted on out-of-fold router scores (a router's scores on its own training prompts are
overconfident), and the denominator a smooth max(L, 0) that never reaches 0: `floor`, half the
mean quality lost on the training prompts, keeps a prompt the router puts near "no loss" from
being ranked on its predicted saving alone, and since the denominator still falls as p rises,
equal predicted savings rank as p does (where every prompt costs the same, the order is the
router's own). The priority
is mapped to [0, 1] through the training prompts' own priorities (their empirical distribution
function), so the calibration's grid of thresholds spans the prompts evenly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RIDGE = 1.0  # L2 penalty of the energy regressions (embeddings are unit vectors)
FLOOR_SHARE = 0.5  # `floor` as a share of the training prompts' mean quality lost


@dataclass(frozen=True)
class SavingPriority:
    energy_weights: np.ndarray  # (2, dim + 1): log-joules regression of the tier, of the largest
    loss: np.ndarray  # (a, b): expected quality lost = a * p + b
    floor: float
    reference: np.ndarray  # the training prompts' priorities, sorted

    @staticmethod
    def worth_fitting(*energies: np.ndarray) -> bool:
        """Whether the prompts' costs differ at all: where each tier costs the same on every
        prompt (a table priced per call), the priority would only repeat the router's order,
        and fitting it costs `inner_folds` more router fits."""
        return any(float(np.ptp(e)) > 1e-9 * max(float(np.abs(e).max()), 1.0) for e in energies)

    @classmethod
    def fit(cls, x: np.ndarray, scores: np.ndarray, quality: np.ndarray,
            quality_largest: np.ndarray, energy: np.ndarray,
            energy_largest: np.ndarray) -> SavingPriority | None:
        """Fitted on the training prompts; `scores` are their out-of-fold router scores.
        None where the scores carry no sign of the loss (a higher p must mean less lost)."""
        lost = np.asarray(quality_largest, dtype=float) - quality
        design = np.column_stack([scores, np.ones(len(scores))])
        loss = np.linalg.lstsq(design, lost, rcond=None)[0]
        if not loss[0] < 0.0:
            return None
        weights = np.stack([_ridge(x, np.log(np.maximum(e, 1e-9)))
                            for e in (energy, energy_largest)])
        floor = FLOOR_SHARE * max(float(np.mean(np.maximum(lost, 0.0))), 1e-3)
        unfitted = cls(weights, loss, floor, np.zeros(0))
        return cls(weights, loss, floor, np.sort(unfitted.raw(x, scores)))

    def joules(self, x: np.ndarray) -> np.ndarray:
        """(prompts, 2): each prompt's predicted joules on the step's tier and on the largest."""
        return np.asarray(np.exp(np.column_stack([x, np.ones(len(x))]) @ self.energy_weights.T),
                          dtype=float)

    def raw(self, x: np.ndarray, p: np.ndarray) -> np.ndarray:
        """Predicted joules saved per unit of quality lost, per prompt."""
        joules = self.joules(x)
        lost = self.floor * np.logaddexp(0.0, (self.loss[0] * p + self.loss[1]) / self.floor)
        return np.asarray((joules[:, 1] - joules[:, 0]) / lost, dtype=float)

    def score(self, x: np.ndarray, p: np.ndarray) -> np.ndarray:
        """The priority in [0, 1]: the share of training prompts ranked below this one."""
        ranked = np.searchsorted(self.reference, self.raw(x, p), side="right")
        return np.asarray(ranked / len(self.reference), dtype=float)

    def state(self) -> dict[str, np.ndarray]:
        return {"energy_weights": self.energy_weights, "loss": self.loss,
                "floor": np.asarray(self.floor), "reference": self.reference}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> SavingPriority:
        return cls(state["energy_weights"], state["loss"], float(state["floor"]),
                   state["reference"])


def _ridge(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    design = np.column_stack([x, np.ones(len(x))])
    penalty = RIDGE * np.eye(design.shape[1])
    penalty[-1, -1] = 0.0  # the intercept is not shrunk
    return np.asarray(np.linalg.solve(design.T @ design + penalty, design.T @ y), dtype=float)
