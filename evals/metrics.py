"""Routing metrics: how much of the large model's quality a policy keeps, at what energy.

A policy's *curve* is its operating points: for each threshold, the share of prompts sent to the
large model, the mean quality, and the mean energy per prompt. A scoring policy (higher score:
the small model is more likely enough) is swept over every threshold at once by ranking: at
share k/N the k lowest-scored prompts go to the large model.

Metrics, on prompts where both models' outcomes are known:
  PGR(c)    performance gap recovered at large-call share c:
            (Q(c) - Q_small) / (Q_large - Q_small)                        (RouteLLM)
  APGR      the area under PGR over c in [0, 1]                            (RouteLLM)
  CPT(x)    the least large-call share whose PGR reaches x                 (RouteLLM)
  AIQ       the mean of the non-decreasing convex hull of quality over the energy range
            [all-small, all-large]                                         (RouterBench)
  saved(t)  1 - E / E_large at the cheapest point with quality >= t x Q_large: the energy saved,
            against sending everything to the large model, while keeping t of its quality.
The random policy's curve is its expectation (a straight line: APGR 0.5 exactly); the oracle
sends a prompt to the large model only when the large model does better on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_TARGET = 0.95
CPT_LEVELS = (0.2, 0.5, 0.8)


@dataclass(frozen=True)
class Pair:
    """Per-prompt outcomes of a small and a large model on the same prompts."""

    quality_small: np.ndarray
    quality_large: np.ndarray
    energy_small: np.ndarray  # joules per prompt
    energy_large: np.ndarray

    def __post_init__(self) -> None:
        sizes = {len(a) for a in (self.quality_small, self.quality_large, self.energy_small,
                                  self.energy_large)}
        if len(sizes) != 1 or 0 in sizes:
            raise ValueError("a pair needs equally long, non-empty outcome arrays")

    def __len__(self) -> int:
        return len(self.quality_small)

    def subset(self, index: np.ndarray) -> Pair:
        return Pair(self.quality_small[index], self.quality_large[index],
                    self.energy_small[index], self.energy_large[index])


@dataclass(frozen=True)
class Curve:
    """Operating points of a policy, in any order (every metric sorts what it needs)."""

    share: np.ndarray  # share of prompts answered by (or escalated to) the large model
    quality: np.ndarray  # mean quality per prompt
    energy: np.ndarray  # mean joules per prompt


def ranking_curve(pair: Pair, scores: np.ndarray) -> Curve:
    """Every threshold of a score at once: at share k/N the k lowest scores go large.

    Ties are broken by prompt order, the same way every time.
    """
    if len(scores) != len(pair):
        raise ValueError("one score per prompt")
    order = np.argsort(scores, kind="stable")
    n = len(pair)
    gain = np.concatenate([[0.0], np.cumsum((pair.quality_large - pair.quality_small)[order])])
    cost = np.concatenate([[0.0], np.cumsum((pair.energy_large - pair.energy_small)[order])])
    return Curve(share=np.arange(n + 1) / n,
                 quality=(pair.quality_small.sum() + gain) / n,
                 energy=(pair.energy_small.sum() + cost) / n)


def random_curve(pair: Pair) -> Curve:
    """The expected curve of routing a random share of prompts to the large model."""
    share = np.linspace(0.0, 1.0, 101)
    q_s, q_l = pair.quality_small.mean(), pair.quality_large.mean()
    e_s, e_l = pair.energy_small.mean(), pair.energy_large.mean()
    return Curve(share=share, quality=q_s + share * (q_l - q_s), energy=e_s + share * (e_l - e_s))


def oracle_scores(pair: Pair) -> np.ndarray:
    """The oracle's ranking: prompts where the large model does better go large first."""
    return np.asarray(pair.quality_small - pair.quality_large, dtype=float)


def pgr(pair: Pair, quality: np.ndarray | float) -> np.ndarray:
    q_s, q_l = pair.quality_small.mean(), pair.quality_large.mean()
    if q_l <= q_s:
        raise ValueError("the large model is not better than the small one on these prompts: "
                         "the performance gap is undefined")
    return np.asarray((np.asarray(quality) - q_s) / (q_l - q_s), dtype=float)


def apgr(pair: Pair, curve: Curve) -> float:
    """Area under PGR over large-call share from 0 to 1 (trapezoids between the points)."""
    share, gap = _with_ends(curve.share, pgr(pair, curve.quality), 0.0, 1.0)
    return float(np.trapezoid(gap, share))


def cpt(pair: Pair, curve: Curve, level: float) -> float | None:
    """Call-performance threshold: the least large-call share reaching PGR >= level."""
    reached = np.flatnonzero(pgr(pair, curve.quality) >= level - 1e-12)
    return float(curve.share[reached].min()) if reached.size else None


def aiq(pair: Pair, curve: Curve) -> float:
    """RouterBench's average improvement in quality: the mean over the energy range
    [all-small, all-large] of the non-decreasing convex hull of the curve's points."""
    low, high = pair.energy_small.mean(), pair.energy_large.mean()
    if high <= low:
        raise ValueError("the large model does not use more energy than the small one")
    points = sorted(zip(curve.energy.tolist(), curve.quality.tolist(), strict=True))
    points = [(low, pair.quality_small.mean()), *points]
    hull = _upper_hull(points)
    xs = np.linspace(low, high, 2001)
    ys = np.interp(xs, [x for x, _ in hull], [y for _, y in hull])
    ys = np.maximum.accumulate(ys)  # non-decreasing: more energy never buys less quality
    return float(np.trapezoid(ys, xs) / (high - low))


@dataclass(frozen=True)
class Saving:
    target: float  # share of the large model's quality to keep
    saved: float | None  # 1 - E / E_large; None when no point reaches the target
    share: float | None  # large-call share at that point
    quality: float | None


def energy_saved(pair: Pair, curve: Curve, target: float = DEFAULT_TARGET) -> Saving:
    """The cheapest operating point keeping `target` x the large model's mean quality."""
    needed = target * pair.quality_large.mean()
    ok = np.flatnonzero(curve.quality >= needed - 1e-12)
    if not ok.size:
        return Saving(target, None, None, None)
    best = ok[np.argmin(curve.energy[ok])]
    return Saving(target, float(1.0 - curve.energy[best] / pair.energy_large.mean()),
                  float(curve.share[best]), float(curve.quality[best]))


def summarize(pair: Pair, curve: Curve, target: float = DEFAULT_TARGET) -> dict[str, float | None]:
    """Every metric of one curve, as a flat dict (the unit of metrics.json); the PGR-based
    ones are None on prompts where the large model is no better (a small fold can be so), and
    AIQ is None where the small plan does not use less energy than the large model (a stage
    that samples k answers and checks itself can cost more)."""
    saving = energy_saved(pair, curve, target)
    has_gap = pair.quality_large.mean() > pair.quality_small.mean()  # else PGR is undefined
    result: dict[str, float | None] = {"apgr": apgr(pair, curve) if has_gap else None}
    for level in CPT_LEVELS:
        result[f"cpt{round(level * 100)}"] = cpt(pair, curve, level) if has_gap else None
    has_range = pair.energy_large.mean() > pair.energy_small.mean()  # else AIQ is undefined
    result["aiq"] = aiq(pair, curve) if has_range else None
    result["energy_saved"] = saving.saved
    result["share_at_target"] = saving.share
    result["quality_at_target"] = saving.quality
    return result


def _with_ends(x: np.ndarray, y: np.ndarray, x0: float, x1: float) -> tuple[np.ndarray, np.ndarray]:
    """Sort by x and extend flat to [x0, x1], so areas are over the whole range."""
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    if x[0] > x0:
        x, y = np.concatenate([[x0], x]), np.concatenate([[y[0]], y])
    if x[-1] < x1:
        x, y = np.concatenate([x, [x1]]), np.concatenate([y, [y[-1]]])
    return x, y


def _upper_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The upper convex hull of points sorted by x (Andrew's monotone chain)."""
    hull: list[tuple[float, float]] = []
    for x, y in points:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (y - y1) - (y2 - y1) * (x - x1) >= 0:  # hull[-1] is not above the chord
                hull.pop()
            else:
                break
        if hull and hull[-1][0] == x:
            hull[-1] = (x, max(y, hull[-1][1]))
        else:
            hull.append((x, y))
    return hull
