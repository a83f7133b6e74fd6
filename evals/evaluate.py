"""`greenroute eval`: score routing policies on an outcome table with grouped k-fold
cross-validation, beside the random and oracle references.

Each fold's policy is fitted on the other folds and measured on its own prompts only; the
reported figure is the mean over folds. The same metrics on the whole table (the out-of-fold
scores ranked together) are reported too: for policies that learn nothing (length, oracle,
random) they are exactly the direct computation from the table.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from greenroute.evals import metrics
from greenroute.evals.energy import prompt_energy
from greenroute.evals.metrics import Curve, Pair
from greenroute.evals.outcomes import OutcomeTable
from greenroute.evals.policies import Policy

RANDOM = "random"
ORACLE = "oracle"


@dataclass
class PolicyResult:
    name: str
    folds: list[dict[str, float | None]] = field(default_factory=list)
    whole: dict[str, float | None] = field(default_factory=dict)
    curve: Curve | None = None  # on the whole table, for plots
    whole_policy: bool = False  # a calibrated policy (router, maybe cascade), not scores alone

    def mean(self, key: str) -> float | None:
        values = self._values(key)
        return float(np.mean(values)) if values else None

    def std(self, key: str) -> float | None:
        values = self._values(key)
        return float(np.std(values)) if values else None

    def _values(self, key: str) -> list[float]:
        """`key` in every fold, or nothing when a fold lacks it."""
        values = [v for f in self.folds if (v := f.get(key)) is not None]
        return values if len(values) == len(self.folds) else []


@dataclass
class Evaluation:
    small: str
    large: str
    prompts: int
    folds: int
    target: float
    energy_source: dict[str, str]
    reference: dict[str, float]  # mean quality and energy of each model alone
    results: list[PolicyResult]
    targets: list[Any] = field(default_factory=list)  # evals.routing.TargetResult rows


def pair_of(table: OutcomeTable, small: str, large: str,
            profile: dict[str, float] | None = None) -> tuple[Pair, dict[str, str]]:
    energy_small, source_small = prompt_energy(table, small, "small", profile)
    energy_large, source_large = prompt_energy(table, large, "large", profile)
    pair = Pair(table.quality[small], table.quality[large], energy_small, energy_large)
    return pair, {small: source_small, large: source_large}


def group_folds(prompts: Sequence[str], k: int, seed: int = 0) -> list[np.ndarray]:
    """k folds of prompt indices; identical prompt texts always share a fold."""
    if not 2 <= k <= len(prompts):
        raise ValueError(f"need 2 <= folds <= prompts ({len(prompts)})")
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(hashlib.sha256(prompt.encode()).hexdigest(), []).append(i)
    keys = sorted(groups)
    np.random.default_rng(seed).shuffle(keys)
    folds: list[list[int]] = [[] for _ in range(k)]
    for key in sorted(keys, key=lambda g: -len(groups[g])):  # big groups first, then balance
        min(folds, key=len).extend(groups[key])
    return [np.asarray(sorted(f)) for f in folds]


def evaluate(table: OutcomeTable, small: str, large: str,
             policies: Sequence[Callable[[], Policy]], *, folds: int = 5, seed: int = 0,
             target: float = metrics.DEFAULT_TARGET,
             profile: dict[str, float] | None = None) -> Evaluation:
    """Cross-validate every policy (a factory: one fresh policy per fold) against the
    random and oracle references."""
    pair, sources = pair_of(table, small, large, profile)
    splits = group_folds(table.prompts, folds, seed)
    results = []
    for make in policies:
        result = PolicyResult(make().name)
        out_of_fold = np.zeros(len(table))
        for test in splits:
            train = np.setdiff1d(np.arange(len(table)), test)
            policy = make()
            policy.fit(table.subset(train), small, large)
            scores = policy.scores(table.subset(test))
            out_of_fold[test] = scores
            result.folds.append(metrics.summarize(pair.subset(test),
                                                  metrics.ranking_curve(pair.subset(test), scores),
                                                  target))
        result.curve = metrics.ranking_curve(pair, out_of_fold)
        result.whole = metrics.summarize(pair, result.curve, target)
        results.append(result)
    for name, curve_of in ((RANDOM, metrics.random_curve),
                           (ORACLE, lambda p: metrics.ranking_curve(p, metrics.oracle_scores(p)))):
        result = PolicyResult(name)
        result.folds = [metrics.summarize(pair.subset(t), curve_of(pair.subset(t)), target)
                        for t in splits]
        result.curve = curve_of(pair)
        result.whole = metrics.summarize(pair, result.curve, target)
        results.append(result)
    reference = {
        f"quality_{small}": float(pair.quality_small.mean()),
        f"quality_{large}": float(pair.quality_large.mean()),
        f"joules_{small}": float(pair.energy_small.mean()),
        f"joules_{large}": float(pair.energy_large.mean()),
        "only_large_right": int(((pair.quality_large > pair.quality_small)).sum()),
        "only_small_right": int(((pair.quality_small > pair.quality_large)).sum()),
    }
    return Evaluation(small=small, large=large, prompts=len(table), folds=folds, target=target,
                      energy_source=sources, reference=reference, results=results)
