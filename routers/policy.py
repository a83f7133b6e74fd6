"""The routing policy: from router scores (and, in a cascade, answers' confidence) to which
tiers answer a prompt, for k tiers ordered by energy.

Every tier but the largest has a *step*: a router model scoring the prompt (p = probability
that this tier answers as well as the largest), and, when outcome tables carried logprobs, a
confidence model that judges the tier's answer once it exists. One threshold b, chosen per
quality target by calibration (routers/calibration.py), decides everything:

- a step without a confidence model answers the prompt itself when p >= b (the cheapest such
  tier wins), before anything is generated; where it has a saving priority
  (routers/priority.py), that priority stands in for p, so prompts are admitted in the order
  of joules saved per quality lost;
- a step with one is a cascade stage: the tier answers first, and its answer is kept when its
  confidence c >= b, else the prompt goes up to the next tier of the plan. A stage is tried
  only when it lowers the expected energy: with e the stage's energy, V the expected energy of
  the rest of the plan and k the chance, at this p, that the answer will be kept, trying costs
  e + (1 - k) x V against V for skipping it. So a prompt the router expects the small tier to
  fail skips the small call instead of wasting it. A stage judged on its first token stops
  there when it is not kept, at a cost s (its prefill and one token) instead of e: trying costs
  k x e + (1 - k) x (s + V).

The same code plans live requests (one prompt) and simulates policies offline (arrays of
prompts with every tier's recorded outcome), so what is calibrated is what is served.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from greenroute.routers.confidence import ConfidenceModel
from greenroute.routers.models import RouterModel
from greenroute.routers.priority import SavingPriority

# Thresholds from "never keep" (everything to the largest tier) down to "always keep".
CANDIDATES = np.concatenate([[np.inf], np.round(np.linspace(1.0, 0.0, 1001), 4)])


@dataclass
class Step:
    """A tier below the largest: its router, its optional confidence model, and how often its
    answers were kept, per threshold, as a function of the router score (for the skip rule).
    A step without a confidence model may rank prompts by joules saved per quality lost
    (`priority`) instead of by the router's score alone."""

    tier: str
    router: RouterModel
    confidence: ConfidenceModel | None = None
    keep_edges: np.ndarray | None = None  # router-score bin edges
    keep_rates: np.ndarray | None = None  # (len(CANDIDATES), bins)
    priority: SavingPriority | None = None

    def score(self, x: np.ndarray) -> np.ndarray:
        """What the threshold applies to: the router's score, or the saving priority."""
        p = self.router.predict(x)
        return p if self.priority is None else self.priority.score(x, p)

    def keep_rate(self, candidate: int, p: np.ndarray) -> np.ndarray:
        if self.keep_edges is None or self.keep_rates is None:
            return np.zeros_like(p)
        bins = np.clip(np.searchsorted(self.keep_edges, p, side="right") - 1, 0,
                       self.keep_rates.shape[1] - 1)
        return np.asarray(self.keep_rates[candidate, bins], dtype=float)


@dataclass
class RoutingPolicy:
    tiers: list[str]  # cheapest first; the last is the largest
    steps: list[Step]  # one per tier but the largest
    energy: np.ndarray  # mean joules per prompt of each tier (the skip rule's costs)
    thresholds: dict[float, int | None]  # quality target -> index into CANDIDATES
    # Every calibration's thresholds by its risk delta (`thresholds` is the one served); empty
    # until calibrated.
    by_delta: dict[float, dict[float, int | None]] = field(default_factory=dict)
    # Mean joules of each tier's stage when judged on its first token and not kept (it stops
    # there); None where a stage not kept has cost its whole answer.
    stop_energy: np.ndarray | None = None

    def use_delta(self, delta: float) -> None:
        """Serve the thresholds calibrated at `delta` (KeyError if there are none)."""
        known = next((d for d in self.by_delta if abs(d - delta) < 1e-9), None)
        if known is None:
            raise KeyError(delta)
        self.thresholds = dict(self.by_delta[known])

    def candidate_for(self, target: float) -> int | None:
        """The calibrated threshold for a target; a target between calibrated ones uses the
        next stricter (higher) one, and a target above all of them sends everything to the
        largest tier (None)."""
        stricter = [t for t in self.thresholds if t >= target - 1e-9]
        return self.thresholds[min(stricter)] if stricter else None

    def scores(self, x: np.ndarray) -> np.ndarray:
        """(prompts, steps) scores for embeddings x: each step's router score, or its saving
        priority where it has one."""
        return np.column_stack([step.score(x) for step in self.steps]) if self.steps \
            else np.zeros((len(x), 0))

    def plans(self, p: np.ndarray, candidate: int | None) -> np.ndarray:
        """(prompts, tiers) booleans: the tiers each prompt will try, cheapest first. The last
        tier tried answers whatever happens."""
        n, k = len(p), len(self.tiers)
        tried = np.zeros((n, k), dtype=bool)
        tried[:, -1] = True
        if candidate is None:
            return tried
        b = CANDIDATES[candidate]
        value = np.full(n, self.energy[-1], dtype=float)
        for j in reversed(range(k - 1)):
            step = self.steps[j]
            if step.confidence is None:
                direct = p[:, j] >= b
                tried[direct] = False
                tried[direct, j] = True
                value[direct] = self.energy[j]
            else:
                keep = step.keep_rate(candidate, p[:, j])
                stop = self.energy[j] if self.stop_energy is None else self.stop_energy[j]
                cost = keep * self.energy[j] + (1.0 - keep) * (stop + value)
                better = cost < value
                tried[better, j] = True
                value[better] = cost[better]
        return tried

    def keep(self, j: int, p: np.ndarray, features: np.ndarray | None,
             candidate: int | None) -> np.ndarray:
        """Whether tier j's answers are kept (cascade stages only; a router-only step is
        planned alone and always answers)."""
        step = self.steps[j]
        if candidate is None:
            return np.zeros(len(p), dtype=bool)
        if step.confidence is None or features is None:
            return np.ones(len(p), dtype=bool)
        return np.asarray(step.confidence.predict(features, p) >= CANDIDATES[candidate])


@dataclass(frozen=True)
class Outcome:
    """What a policy did on prompts whose every tier's outcome is known."""

    quality: np.ndarray  # of the answer returned
    energy: np.ndarray  # of every tier tried
    answered_by: np.ndarray  # tier index; the largest tier ran exactly when it answered


def simulate(policy: RoutingPolicy, p: np.ndarray, features: list[np.ndarray | None],
             quality: np.ndarray, energy: np.ndarray, candidate: int | None,
             stopped: np.ndarray | None = None) -> Outcome:
    """Replay the policy on recorded outcomes: `quality` and `energy` are (prompts, tiers),
    `features[j]` tier j's logprob features (None where the table has none); `stopped`, what
    each tier's stage costs when it stops after its first token (None: its whole answer)."""
    n, k = quality.shape
    tried = policy.plans(p, candidate)
    answered = np.full(n, -1)
    spent = np.zeros(n)
    for j in range(k):
        active = tried[:, j] & (answered < 0)
        spent[active] += energy[active, j]
        if j == k - 1:
            answered[active] = j
            break
        last = ~tried[:, j + 1:].any(axis=1)
        kept = policy.keep(j, p[:, j], features[j], candidate)
        answered[active & (last | kept)] = j
        if stopped is not None:  # a stage not kept stopped at its first token
            cut = active & ~(last | kept)
            spent[cut] += stopped[cut, j] - energy[cut, j]
    return Outcome(quality=quality[np.arange(n), answered], energy=spent, answered_by=answered)
