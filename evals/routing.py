"""Evaluating trained routers with the harness: router kinds under cross-validation, the whole
policy (routers, cascade, calibration) at quality targets, and saved artifacts.

Kept apart from evals/evaluate.py so that the harness itself needs no router code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from greenroute.evals import metrics
from greenroute.evals.encoding import Embed
from greenroute.evals.evaluate import PolicyResult, group_folds
from greenroute.evals.outcomes import OutcomeTable
from greenroute.evals.training import (
    Calibration,
    Replay,
    TierData,
    TrainConfig,
    fit_policy,
    replay,
    tier_data,
)
from greenroute.routers.artifact import Router
from greenroute.routers.features import FIRST_TOKEN, SIGNALS
from greenroute.routers.models import Scheme, Target, make
from greenroute.routers.policy import RoutingPolicy, simulate

# fit_policy's shape: (embeddings, prompts, tier data, config) -> fitted, calibrated policy
FitPolicy = Callable[[np.ndarray, Sequence[str], TierData, TrainConfig],
                     tuple[RoutingPolicy, Calibration]]


class RouterKindPolicy:
    """A router kind as a harness policy: fitted on a fold's training prompts, scoring the
    held-out ones (prompt-only: no cascade, no calibration)."""

    def __init__(self, kind: str, embed: Embed, *, scheme: Scheme = "gap",
                 tolerance: float = 0.0, name: str | None = None) -> None:
        self.kind, self.embed, self.scheme, self.tolerance = kind, embed, scheme, tolerance
        self.name = name or kind
        self.router = make(kind)

    def fit(self, table: OutcomeTable, small: str, large: str) -> None:
        self.router.fit(self.embed(table.prompts), Target(
            table.quality[small], table.quality[large], self.tolerance, self.scheme))

    def scores(self, table: OutcomeTable) -> np.ndarray:
        return self.router.predict(self.embed(table.prompts))


@dataclass
class TargetResult:
    """How a calibrated policy did at one quality target on held-out prompts."""

    policy: str
    target: float
    quality_ratio: list[float] = field(default_factory=list)  # per fold: Q / Q_largest
    energy_saved: list[float] = field(default_factory=list)  # per fold: 1 - E / E_largest
    largest_share: list[float] = field(default_factory=list)
    # per fold: the saving of the best threshold chosen on the held-out prompts themselves
    # (the cheapest that meets the target there): what a policy without a guarantee could
    # at best have saved
    ideal_saved: list[float] = field(default_factory=list)

    @property
    def met(self) -> int:
        return sum(q >= self.target - 1e-9 for q in self.quality_ratio)

    @property
    def price(self) -> float | None:
        """The price of the guarantee: mean ideal saving minus mean calibrated saving."""
        if not self.ideal_saved:
            return None
        return float(np.mean(self.ideal_saved) - np.mean(self.energy_saved))


def cross_validate_policy(table: OutcomeTable, tiers: Sequence[str], embed: Embed,
                          config: TrainConfig, *, folds: int = 5, seed: int = 0,
                          profile: dict[str, float] | None = None, name: str | None = None,
                          fit: FitPolicy = fit_policy) -> tuple[PolicyResult, list[TargetResult]]:
    """Train the whole policy (`greenroute train`) on k-1 folds; measure it on the k-th: its
    curve over every threshold, and what its calibrated thresholds did at each target."""
    data = tier_data(table, tiers, profile, config.signals, config.first_token)
    x = embed(table.prompts)
    label = name or f"{config.kind}+{'cascade' if _has_cascade(data, config) else 'router'}"
    result = PolicyResult(label, whole_policy=True)
    per_target = {t: TargetResult(label, t) for t in config.targets}
    # Each prompt's outcomes as its fold's plan runs them (plain calls unless it cascades)
    seen_quality, seen_energy = data.quality.copy(), data.energy.copy()
    pooled = np.zeros((3, 0))
    for test in group_folds(table.prompts, folds, seed):
        train = np.setdiff1d(np.arange(len(table)), test)
        policy, _ = fit(x[train], [table.prompts[i] for i in train], data.subset(train), config)
        held = data.subset(test).for_plan(cascades(policy))
        seen_quality[test], seen_energy[test] = held.quality, held.energy
        outcomes = replay(policy, x[test], held)
        curve = outcomes.curve()
        result.folds.append(metrics.summarize(_pair(held), curve))
        points = len(test) * np.stack([curve.share, curve.quality, curve.energy])
        pooled = points if not pooled.size else pooled + points
        p = policy.scores(x[test])
        for target, row in per_target.items():
            outcome = simulate(policy, p, held.features, held.quality, held.energy,
                               policy.candidate_for(target), held.stopped)
            row.quality_ratio.append(float(outcome.quality.mean() / held.quality[:, -1].mean()))
            row.energy_saved.append(float(1 - outcome.energy.mean() / held.energy[:, -1].mean()))
            row.largest_share.append(float((outcome.answered_by == len(tiers) - 1).mean()))
            row.ideal_saved.append(ideal_saving(outcomes, held, target))
    share, quality, energy = pooled / len(table)  # candidates line up across folds
    result.curve = metrics.Curve(share=share, quality=quality, energy=energy)
    result.whole = metrics.summarize(_pair_of(seen_quality, seen_energy), result.curve)
    return result, list(per_target.values())


def evaluate_artifact(router: Router, table: OutcomeTable, embed: Embed,
                      profile: dict[str, float] | None = None
                      ) -> tuple[PolicyResult, list[TargetResult]]:
    """A saved artifact on a table (no training: use prompts it was not trained on)."""
    policy = router.policy
    inputs = next((s.confidence.inputs for s in policy.steps if s.confidence), None)
    signals = tuple(name for name in SIGNALS if inputs is not None and name in inputs)
    data = tier_data(table, policy.tiers, profile, signals)
    if inputs is not None and set(inputs) <= set(FIRST_TOKEN):
        data = tier_data(table, policy.tiers, profile, first_token=True)
    elif inputs is not None:
        data = data.select(inputs)
    x = embed(table.prompts)
    result = PolicyResult(f"artifact:{router.manifest.get('kind')}", whole_policy=True)
    outcomes = replay(policy, x, data)
    result.curve = outcomes.curve()
    result.whole = metrics.summarize(_pair(data), result.curve)
    result.folds = [result.whole]
    p = policy.scores(x)
    rows = []
    for target in sorted(policy.thresholds):
        outcome = simulate(policy, p, data.features, data.quality, data.energy,
                           policy.candidate_for(target), data.stopped)
        rows.append(TargetResult(result.name, target,
                                 [float(outcome.quality.mean() / data.quality[:, -1].mean())],
                                 [float(1 - outcome.energy.mean() / data.energy[:, -1].mean())],
                                 [float((outcome.answered_by == len(policy.tiers) - 1).mean())],
                                 [ideal_saving(outcomes, data, target)]))
    return result, rows


def ideal_saving(outcomes: Replay, data: TierData, target: float) -> float:
    """The saving of the cheapest candidate threshold that meets `target` on these very prompts
    (candidate 0, everything to the largest tier, always does)."""
    ratio = outcomes.quality.mean(axis=1) / max(float(data.quality[:, -1].mean()), 1e-12)
    saved = 1 - outcomes.energy.mean(axis=1) / float(data.energy[:, -1].mean())
    return float(saved[ratio >= target - 1e-9].max())


def _pair(data: TierData) -> metrics.Pair:
    return _pair_of(data.quality, data.energy)


def _pair_of(quality: np.ndarray, energy: np.ndarray) -> metrics.Pair:
    """The smallest and the largest tier's quality and energy, per prompt."""
    return metrics.Pair(quality[:, 0], quality[:, -1], energy[:, 0], energy[:, -1])


def cascades(policy: RoutingPolicy) -> bool:
    """Whether a stage of `policy` judges its answer (else it routes on the prompt alone)."""
    return any(step.confidence is not None for step in policy.steps)


def _has_cascade(data: TierData, config: TrainConfig) -> bool:
    return config.cascade and any(f is not None for f in data.features[:-1])
