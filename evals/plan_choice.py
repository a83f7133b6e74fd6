"""Which plan family `greenroute train` serves: prompt-only, or a cascade on the answers'
confidence, chosen on the cross-fitted outcomes without weakening the guarantee.

Every family the table supports is trained and calibrated the usual way (evals/training.py), but
at delta / m for m families (Bonferroni). Each family's threshold for a target then misses on new
traffic with probability at most delta / m, so the chance that *any* family's does is at most
delta, and with it the chance that the family chosen afterwards does, whichever it is and however
it was chosen. The choice may therefore look at the very outcomes the thresholds were calibrated
on: the family whose calibrated threshold at the default target spends the least energy on them
wins, prompt-only on a tie (it streams without waiting for a stage). Why not select on one part
and calibrate on another: that would calibrate on a fraction of the prompts, and the bound's width
grows as 1/sqrt(n), while Bonferroni at m = 2 only turns ln(1/delta) into ln(2/delta) inside it
(2.30 -> 3.00 at delta = 0.1, about 14% wider). With one family (no logprobs in the table, or
`--no-cascade`) nothing is split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from greenroute.evals.training import Calibration, TierData, TrainConfig, fit_policy
from greenroute.routers.calibration import Choice
from greenroute.routers.policy import RoutingPolicy

PROMPT_ONLY = "prompt-only"
CASCADE = "cascade"
DEFAULT_TARGET = 0.95


@dataclass(frozen=True)
class Candidate:
    """One family's calibrated result at the default target, on the cross-fitted outcomes."""

    family: str
    energy_saved: float  # 1 - E / E_largest
    quality_ratio: float  # Q / Q_largest
    threshold_found: bool


@dataclass(frozen=True)
class PlanChoice:
    family: str
    target: float  # the default target the families were compared at
    delta: float  # the guarantee's risk, over all families together
    delta_each: float  # what each family was calibrated at
    candidates: list[Candidate]

    def manifest(self) -> dict[str, Any]:
        """The choice and its measured reason, for the artifact's manifest."""
        return {
            "family": self.family,
            "chosen_by": f"least energy at target {self.target:g} on every prompt's "
                         "cross-fitted outcome; each family calibrated at delta/"
                         f"{len(self.candidates)} (Bonferroni), so the chosen one holds at "
                         f"delta {self.delta:g}",
            "delta_each": self.delta_each,
            "candidates": {c.family: {"energy_saved": c.energy_saved,
                                      "quality_ratio": c.quality_ratio,
                                      "threshold_found": c.threshold_found}
                           for c in self.candidates},
        }


def families(data: TierData, config: TrainConfig) -> list[str]:
    """The plan families this table and config allow, simplest first."""
    has_features = any(f is not None for f in data.features[:-1])
    if config.cascade_only:
        if not has_features:
            raise ValueError("a cascade needs the table's logprob features")
        return [CASCADE]
    return [PROMPT_ONLY, CASCADE] if config.cascade and has_features else [PROMPT_ONLY]


def fit_chosen(x: np.ndarray, prompts: Sequence[str], data: TierData, config: TrainConfig,
               default_target: float = DEFAULT_TARGET
               ) -> tuple[RoutingPolicy, Calibration, PlanChoice]:
    """Fit and calibrate every family at delta / m; serve the cheapest at the default target.
    The returned policy's thresholds are stored under the nominal deltas (the guarantee)."""
    names = families(data, config)
    nominal = tuple(dict.fromkeys((config.delta, *config.also_deltas)))
    split = {d: d / len(names) for d in nominal}
    fitted: list[tuple[RoutingPolicy, Calibration]] = []
    candidates = []
    for name in names:
        family_config = replace(config, cascade=name == CASCADE, delta=split[config.delta],
                                also_deltas=tuple(split[d] for d in nominal[1:]))
        policy, calibrated = fit_policy(x, prompts, data, family_config)
        fitted.append((policy, calibrated))
        choice = _at(calibrated, default_target)
        candidates.append(Candidate(name, 1.0 - choice.energy_ratio, choice.quality_ratio,
                                    choice.index is not None))
    best = min(range(len(names)), key=lambda i: (-candidates[i].energy_saved, i))
    policy, calibrated = fitted[best]
    policy.by_delta = {d: policy.by_delta[split[d]] for d in nominal}
    policy.use_delta(config.delta)
    return policy, calibrated, PlanChoice(names[best], default_target, config.delta,
                                          split[config.delta], candidates)


def fit_chosen_policy(x: np.ndarray, prompts: Sequence[str], data: TierData,
                      config: TrainConfig) -> tuple[RoutingPolicy, Calibration]:
    """`fit_chosen` in `fit_policy`'s shape, for the cross-validation of whole policies."""
    policy, calibrated, _ = fit_chosen(x, prompts, data, config)
    return policy, calibrated


def _at(calibrated: Calibration, target: float) -> Choice:
    """The calibrated choice the gateway would use for `target` (the next stricter one)."""
    stricter = [t for t in calibrated.choices if t >= target - 1e-9]
    if not stricter:
        raise ValueError(f"the default target {target:g} is above every calibrated target")
    return calibrated.choices[min(stricter)]
