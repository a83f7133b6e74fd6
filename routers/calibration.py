"""Calibration: turn a quality target into a threshold that keeps it on new traffic.

A target tau asks that answers keep tau of the largest tier's quality: mean(q_routed) >=
tau x mean(q_large). On calibration prompts (every training prompt's cross-fitted outcome,
evals/training.py) every candidate threshold has a known per-prompt margin
d_i = q_routed,i - tau x q_large,i, and the target holds in expectation exactly when
E[d] >= 0. The mean of d is noisy, so a threshold is accepted only when a *lower confidence
bound* of E[d] at level delta is >= 0:

- The bound is Waudby-Smith & Ramdas' betting confidence bound for bounded variables
  ("Estimating means of bounded random variables by betting", JRSS-B 2024, predictable
  plug-in bets): valid for any sample size, with no normality assumption, and adapted to the
  variance, which is small here (most prompts route the same way under neighbouring
  thresholds); its half-width is about 2 standard errors where a CLT interval's is 1.3.
- Candidates are tested in a fixed order, from the most conservative (everything to the
  largest tier) to the cheapest, stopping at the first that fails (fixed-sequence testing,
  as in Learn-then-Test, Angelopoulos et al. 2021). The chance that any accepted threshold
  misses its target on the traffic the calibration prompts represent is then at most delta,
  with no union bound over thresholds.
- Of the accepted thresholds, the one with the least energy is chosen.

Default delta = 0.1: each target holds with 90% confidence. The guarantee is about the traffic
the calibration prompts were drawn from; new kinds of prompts need new outcomes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_DELTA = 0.1
DEFAULT_TARGETS = (0.80, 0.85, 0.90, 0.95, 0.97, 0.99, 1.00)


def betting_lower_bound(values: np.ndarray, low: float, high: float,
                        delta: float = DEFAULT_DELTA, seed: int = 0) -> float:
    """A (1 - delta) lower confidence bound on the mean of i.i.d. values in [low, high]."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    if n == 0:
        return low
    x = (np.clip(values, low, high) - low) / (high - low)
    x = x[np.random.default_rng(seed).permutation(n)]  # the bets are predictable: fix an order
    index = np.arange(1, n + 1)
    running_mean = (0.5 + np.concatenate([[0.0], np.cumsum(x)[:-1]])) / index
    running_var = (0.25 + np.concatenate([[0.0], np.cumsum((x - running_mean) ** 2)[:-1]])) / index
    bets = np.sqrt(2 * math.log(1 / delta) / (n * running_var))
    threshold = math.log(1 / delta)

    def rejected(m: float) -> bool:
        """Betting that the mean exceeds m multiplied the capital by 1/delta or more."""
        lam = np.minimum(bets, 0.75 / m)
        return float(np.log1p(lam * (x - m)).sum()) >= threshold

    # The capital falls as m grows, so the rejected means are an interval [0, bound): bisect.
    lo, hi = 0.0, 1.0
    if not rejected(1e-9):
        return low
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rejected(mid) else (lo, mid)
    return low + lo * (high - low)


@dataclass(frozen=True)
class Choice:
    """The threshold chosen for one target, and what it did on the calibration prompts."""

    target: float
    index: int | None  # into the candidate sequence; None: no candidate passed (use largest)
    quality_ratio: float  # mean(q_routed) / mean(q_large) on calibration prompts
    energy_ratio: float  # mean energy / mean energy of the largest tier alone
    bound: float  # the lower confidence bound of E[q_routed - target x q_large]


def choose(quality: Sequence[np.ndarray] | np.ndarray, energy: Sequence[np.ndarray] | np.ndarray,
           quality_large: np.ndarray, energy_large: np.ndarray, target: float,
           delta: float = DEFAULT_DELTA) -> Choice:
    """Pick among candidates (ordered from most conservative to cheapest): `quality[c]` and
    `energy[c]` are per-prompt outcomes on the calibration prompts under candidate c."""
    accepted: list[tuple[float, int, float]] = []
    for index, (q, e) in enumerate(zip(quality, energy, strict=True)):
        margin = q - target * quality_large
        bound = betting_lower_bound(margin, -1.0, 1.0, delta)
        if bound < 0.0:
            break
        accepted.append((float(e.mean()), index, bound))
    large_quality = max(float(quality_large.mean()), 1e-12)
    if not accepted:
        return Choice(target, None, 1.0, 1.0, float("nan"))
    _, index, bound = min(accepted)
    return Choice(target, index, float(quality[index].mean()) / large_quality,
                  float(energy[index].mean()) / float(energy_large.mean()), bound)
