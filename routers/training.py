"""Training a routing policy from an outcome table: routers, cascade confidence, calibration.

1. Split the prompts (grouped: identical prompts stay together) into a training part and a
   calibration part (30% by default).
2. For each tier but the largest, on the training part: fit the router; score every training
   prompt *out of fold* (a router's scores on its own training prompts are overconfident);
   where the table has logprob features, fit the cascade confidence model on those features and
   the out-of-fold scores, and tabulate how often answers are kept per threshold and score bin
   (the skip rule's k).
3. On the calibration part, replay the policy under every candidate threshold and choose, per
   quality target, the cheapest threshold whose lower confidence bound meets the target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from greenroute.evals.energy import prompt_energy
from greenroute.evals.evaluate import group_folds
from greenroute.evals.metrics import Curve
from greenroute.evals.outcomes import OutcomeTable
from greenroute.routers import calibration
from greenroute.routers.confidence import ConfidenceModel
from greenroute.routers.models import Scheme, Target, make
from greenroute.routers.policy import CANDIDATES, RoutingPolicy, Step, simulate

KEEP_BINS = 10


@dataclass(frozen=True)
class TrainConfig:
    kind: str = "logistic"
    tolerance: float = 0.0
    scheme: Scheme = "gap"
    delta: float = calibration.DEFAULT_DELTA
    targets: tuple[float, ...] = calibration.DEFAULT_TARGETS
    calibration_share: float = 0.3
    inner_folds: int = 5
    cascade: bool = True  # use the answers' confidence where the table has logprob features
    seed: int = 0


@dataclass(frozen=True)
class TierData:
    """Every tier's recorded outcome per prompt, aligned with the table's rows."""

    tiers: list[str]
    quality: np.ndarray  # (prompts, tiers)
    energy: np.ndarray  # (prompts, tiers), joules
    features: list[np.ndarray | None]  # per tier: (prompts, features) or None
    energy_source: dict[str, str]

    def subset(self, index: np.ndarray) -> TierData:
        return TierData(self.tiers, self.quality[index], self.energy[index],
                        [None if f is None else f[index] for f in self.features],
                        self.energy_source)


def tier_data(table: OutcomeTable, tiers: Sequence[str],
              profile: dict[str, float] | None = None) -> TierData:
    roles = ["small"] * (len(tiers) - 1) + ["large"]
    energies, sources = [], {}
    for tier, role in zip(tiers, roles):
        joules, source = prompt_energy(table, tier, role, profile)
        energies.append(joules)
        sources[tier] = source
    return TierData(list(tiers), np.column_stack([table.quality[t] for t in tiers]),
                    np.column_stack(energies), [table.features.get(t) for t in tiers], sources)


def grouped_split(prompts: Sequence[str], share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices, about `share` held out; identical prompts stay together."""
    folds = group_folds(prompts, 10, seed)
    held = np.sort(np.concatenate(folds[:max(1, round(share * 10))]))
    return np.setdiff1d(np.arange(len(prompts)), held), held


def out_of_fold(x: np.ndarray, target: Target, prompts: Sequence[str], config: TrainConfig
                ) -> np.ndarray:
    """Each training prompt's score from a router that did not see it."""
    scores = np.zeros(len(x))
    for held in group_folds(prompts, config.inner_folds, config.seed):
        train = np.setdiff1d(np.arange(len(x)), held)
        router = make(config.kind)
        router.fit(x[train], _subset(target, train))
        scores[held] = router.predict(x[held])
    return scores


def _subset(target: Target, index: np.ndarray) -> Target:
    return Target(target.quality_small[index], target.quality_large[index], target.tolerance,
                  target.scheme)


@dataclass
class Calibration:
    choices: dict[float, calibration.Choice] = field(default_factory=dict)
    held: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))  # prompt indices

    @property
    def prompts(self) -> int:
        return len(self.held)


def fit_policy(x: np.ndarray, prompts: Sequence[str], data: TierData,
               config: TrainConfig) -> tuple[RoutingPolicy, Calibration]:
    """Train on part of the prompts and calibrate on the rest (see the module docstring)."""
    train, held = grouped_split(prompts, config.calibration_share, config.seed)
    policy = fit_steps(x[train], [prompts[i] for i in train], data.subset(train), config)
    result = calibrate(policy, x[held], data.subset(held), config)
    result.held = held
    return policy, result


def fit_steps(x: np.ndarray, prompts: Sequence[str], data: TierData,
              config: TrainConfig) -> RoutingPolicy:
    """Routers (and confidence models) for every tier but the largest; no thresholds yet."""
    largest = data.quality[:, -1]
    steps = []
    for j, tier in enumerate(data.tiers[:-1]):
        target = Target(data.quality[:, j], largest, config.tolerance, config.scheme)
        router = make(config.kind)
        router.fit(x, target)
        step = Step(tier=tier, router=router)
        features = data.features[j]
        if config.cascade and features is not None:
            scores = out_of_fold(x, target, prompts, config)
            step.confidence = ConfidenceModel()
            step.confidence.fit(features, scores, target)
            step.keep_edges, step.keep_rates = _keep_table(
                scores, step.confidence.predict(features, scores))
        steps.append(step)
    return RoutingPolicy(tiers=list(data.tiers), steps=steps,
                         energy=data.energy.mean(axis=0), thresholds={})


def _keep_table(scores: np.ndarray, confidence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per candidate threshold and router-score bin, the share of answers that were kept."""
    edges = np.unique(np.quantile(scores, np.linspace(0, 1, KEEP_BINS + 1)[:-1]))
    bins = np.clip(np.searchsorted(edges, scores, side="right") - 1, 0, len(edges) - 1)
    rates = np.zeros((len(CANDIDATES), len(edges)))
    for b in range(len(edges)):
        inside = confidence[bins == b]
        if inside.size:
            rates[:, b] = (inside[None, :] >= CANDIDATES[:, None]).mean(axis=1)
    return edges, rates


def calibrate(policy: RoutingPolicy, x: np.ndarray, data: TierData,
              config: TrainConfig) -> Calibration:
    """Choose each target's threshold on held-out prompts; store them in the policy."""
    p = policy.scores(x)
    outcomes = [simulate(policy, p, data.features, data.quality, data.energy, c)
                for c in range(len(CANDIDATES))]
    result = Calibration()
    for target in config.targets:
        choice = calibration.choose([o.quality for o in outcomes], [o.energy for o in outcomes],
                                    data.quality[:, -1], data.energy[:, -1], target,
                                    config.delta)
        result.choices[target] = choice
        policy.thresholds[target] = choice.index
    return result


def policy_curve(policy: RoutingPolicy, x: np.ndarray, data: TierData) -> Curve:
    """The policy's operating points over every candidate threshold (for APGR, AIQ, plots)."""
    p = policy.scores(x)
    points = []
    for c in range(len(CANDIDATES)):
        outcome = simulate(policy, p, data.features, data.quality, data.energy, c)
        points.append(((outcome.answered_by == len(data.tiers) - 1).mean(),
                       outcome.quality.mean(), outcome.energy.mean()))
    share, quality, energy = (np.array(v) for v in zip(*points))
    return Curve(share=share, quality=quality, energy=energy)  # one point per candidate
