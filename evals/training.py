"""Training a routing policy from an outcome table: routers, cascade confidence, calibration.

1. Cross-fit: split the prompts into `inner_folds` folds (grouped: identical prompts stay
   together); for each fold, fit the policy's routers (and confidence models) on the other folds
   and replay the fold's prompts under every candidate threshold. Every prompt then has an
   out-of-fold outcome per candidate, from a policy that never saw it.
2. Calibrate on all of them: per quality target, the cheapest candidate whose lower confidence
   bound meets the target under fixed-sequence testing (routers/calibration.py).
3. Fit the served policy's routers on every prompt and give it those thresholds.

For each tier but the largest, fitting means: fit the router; where the table has logprob
features, score the training prompts *out of fold* (a router's scores on its own training
prompts are overconfident), fit the cascade confidence model on those features and scores, and
tabulate how often answers are kept per threshold and score bin (the skip rule's k). A step
without one ranks prompts by joules saved per quality lost (routers/priority.py), fitted on the
same out-of-fold scores, unless `rank_by_saving` is off or every prompt costs the same.
Why calibrating on cross-fitted outcomes keeps the bound meaningful: docs/routing.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from greenroute.evals.energy import first_token_energy, prompt_energy
from greenroute.evals.evaluate import group_folds
from greenroute.evals.metrics import Curve
from greenroute.evals.outcomes import OutcomeTable
from greenroute.routers import calibration
from greenroute.routers.confidence import ConfidenceModel
from greenroute.routers.features import AGREEMENT, FEATURES, FIRST_TOKEN, SELF_CHECK
from greenroute.routers.models import Scheme, Target, make
from greenroute.routers.policy import CANDIDATES, RoutingPolicy, Step, simulate
from greenroute.routers.priority import SavingPriority

KEEP_BINS = 10


@dataclass(frozen=True)
class TrainConfig:
    kind: str = "logistic"
    tolerance: float = 0.0
    scheme: Scheme = "gap"
    delta: float = calibration.DEFAULT_DELTA  # the guarantee's risk served by default
    also_deltas: tuple[float, ...] = ()  # other risks to calibrate for (`[router] delta`)
    targets: tuple[float, ...] = calibration.DEFAULT_TARGETS
    inner_folds: int = 5  # cross-fitting folds, and the confidence models' out-of-fold scores
    cascade: bool = True  # use the answers' confidence where the table has logprob features
    cascade_only: bool = False  # serve the cascade family without weighing prompt-only
    # Cascade signals beyond logprobs that the confidence models read (routers/features.py:
    # SIGNALS); the table must carry them for every tier but the largest (evals/signals.py).
    signals: tuple[str, ...] = ()
    # Judge a stage on its first token only (FIRST_TOKEN): served, a kept answer streams live.
    first_token: bool = False
    # A prompt-only step admits prompts by joules saved per quality lost (routers/priority.py),
    # not by its router's score alone.
    rank_by_saving: bool = True
    seed: int = 0


@dataclass(frozen=True)
class TierData:
    """Every tier's recorded outcome per prompt, aligned with the table's rows."""

    tiers: list[str]
    quality: np.ndarray  # (prompts, tiers)
    energy: np.ndarray  # (prompts, tiers), joules
    features: list[np.ndarray | None]  # per tier: (prompts, inputs) or None
    energy_source: dict[str, str]
    inputs: tuple[str, ...] = FEATURES  # the columns of `features`: logprobs, then signals
    # With signals: the same prompts as one plain call to each tier, which is what a plan
    # without a cascade runs (its small tiers neither sample k answers nor check themselves).
    plain: TierData | None = None
    # (prompts, tiers): a stage judged on its first token, stopped there (not kept); None when
    # stages are judged on their whole answer
    stopped: np.ndarray | None = None

    def subset(self, index: np.ndarray) -> TierData:
        return TierData(self.tiers, self.quality[index], self.energy[index],
                        [None if f is None else f[index] for f in self.features],
                        self.energy_source, self.inputs,
                        None if self.plain is None else self.plain.subset(index),
                        None if self.stopped is None else self.stopped[index])

    def select(self, inputs: tuple[str, ...]) -> TierData:
        """The same outcomes with the confidence inputs cut to `inputs` (ValueError names one
        the table lacks). Plain calls stay as they are: no plan reads their features."""
        if inputs == self.inputs:
            return self
        missing = [name for name in inputs if name not in self.inputs]
        if missing:
            raise ValueError(f"the table lacks the confidence inputs {', '.join(missing)}")
        columns = [self.inputs.index(name) for name in inputs]
        return TierData(self.tiers, self.quality, self.energy,
                        [None if f is None else f[:, columns] for f in self.features],
                        self.energy_source, inputs, self.plain, self.stopped)

    def for_plan(self, cascade: bool) -> TierData:
        """The outcomes a plan runs into: the signals' stages for a cascade, else plain calls."""
        return self if cascade or self.plain is None else self.plain


def tier_data(table: OutcomeTable, tiers: Sequence[str],
              profile: dict[str, float] | None = None, signals: Sequence[str] = (),
              first_token: bool = False) -> TierData:
    """The tiers' outcomes as arrays. With `signals`, every tier but the largest is what its
    cascade stage would be live: with agreement, its answer is the majority of the k samples
    (their quality) and its energy theirs (the stage runs the samples, not the greedy answer);
    a self-check adds its call's joules; and the signals join the logprob features as inputs.
    The features stay the greedy answer's (the table's), a stand-in for the majority sample's.
    `first_token`: the confidence models read only the first token's logprob and entropy."""
    if first_token:
        if signals:
            raise ValueError("a judge on the first token reads no other signal")
        data = tier_data(table, tiers, profile).select(FIRST_TOKEN)
        stopped = np.column_stack([first_token_energy(table, tier, data.energy[:, j])
                                   for j, tier in enumerate(tiers)])
        return replace(data, stopped=stopped)
    plain = tier_data(table, tiers, profile) if signals else None
    roles = ["small"] * (len(tiers) - 1) + ["large"]
    energies, sources = [], {}
    for tier, role in zip(tiers, roles, strict=True):
        joules, source = prompt_energy(table, tier, role, profile)
        energies.append(joules)
        sources[tier] = source
    quality = [table.quality[t] for t in tiers]
    features = [table.features.get(t) for t in tiers]
    for j, tier in enumerate(tiers[:-1] if signals else ()):
        columns = table.signals.get(tier, {})
        needed = [*signals, *(["majority_quality", "samples_joules"] if AGREEMENT in signals
                              else []), *(["self_check_joules"] if SELF_CHECK in signals else [])]
        missing = [name for name in needed if name not in columns]
        greedy = features[j]
        if missing or greedy is None:
            raise ValueError(f"tier {tier}: the table lacks {', '.join(missing or ['features'])} "
                             "for some prompts (greenroute collect --signals)")
        if AGREEMENT in signals:
            quality[j], energies[j] = columns["majority_quality"], columns["samples_joules"]
        if SELF_CHECK in signals:
            energies[j] = energies[j] + columns["self_check_joules"]
        features[j] = np.column_stack([greedy, *(columns[name] for name in signals)])
    return TierData(list(tiers), np.column_stack(quality), np.column_stack(energies), features,
                    sources, (*FEATURES, *signals), plain)


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


@dataclass(frozen=True)
class Replay:
    """Every prompt's outcome under every candidate threshold, from policies that did not see
    it: `quality`, `energy` and `largest` (whether the largest tier answered) are
    (len(CANDIDATES), prompts)."""

    quality: np.ndarray
    energy: np.ndarray
    largest: np.ndarray

    def curve(self) -> Curve:
        """The operating points over every candidate (for APGR, AIQ, plots)."""
        return Curve(share=self.largest.mean(axis=1), quality=self.quality.mean(axis=1),
                     energy=self.energy.mean(axis=1))


@dataclass
class Calibration:
    choices: dict[float, calibration.Choice]
    replay: Replay  # the out-of-fold outcomes the thresholds were chosen on

    @property
    def prompts(self) -> int:
        return int(self.replay.quality.shape[1])


def fit_policy(x: np.ndarray, prompts: Sequence[str], data: TierData,
               config: TrainConfig) -> tuple[RoutingPolicy, Calibration]:
    """Calibrate on cross-fitted outcomes of every prompt, then fit the served policy on all of
    them (see the module docstring). A plan without a cascade is fitted on plain calls."""
    data = data.for_plan(config.cascade)
    outcomes = cross_fit(x, prompts, data, config)
    policy = fit_steps(x, prompts, data, config)
    return policy, calibrate(policy, outcomes, data, config)


def cross_fit(x: np.ndarray, prompts: Sequence[str], data: TierData,
              config: TrainConfig) -> Replay:
    """Each prompt's outcome under every candidate, replayed with a policy fitted on the other
    folds."""
    shape = (len(CANDIDATES), len(x))
    quality, energy, largest = np.zeros(shape), np.zeros(shape), np.zeros(shape, dtype=bool)
    for held in group_folds(prompts, config.inner_folds, config.seed):
        train = np.setdiff1d(np.arange(len(x)), held)
        fold = fit_steps(x[train], [prompts[i] for i in train], data.subset(train), config)
        outcomes = replay(fold, x[held], data.subset(held))
        quality[:, held] = outcomes.quality
        energy[:, held] = outcomes.energy
        largest[:, held] = outcomes.largest
    return Replay(quality, energy, largest)


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
            step.confidence = ConfidenceModel(inputs=data.inputs)
            step.confidence.fit(features, scores, target)
            step.keep_edges, step.keep_rates = _keep_table(
                scores, step.confidence.predict(features, scores))
        elif config.rank_by_saving and SavingPriority.worth_fitting(data.energy[:, j],
                                                                    data.energy[:, -1]):
            step.priority = SavingPriority.fit(x, out_of_fold(x, target, prompts, config),
                                               data.quality[:, j], largest, data.energy[:, j],
                                               data.energy[:, -1])
        steps.append(step)
    return RoutingPolicy(tiers=list(data.tiers), steps=steps,
                         energy=data.energy.mean(axis=0), thresholds={},
                         stop_energy=None if data.stopped is None else data.stopped.mean(axis=0))


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


def calibrate(policy: RoutingPolicy, outcomes: Replay, data: TierData,
              config: TrainConfig) -> Calibration:
    """Choose each target's threshold on the replayed outcomes, at every delta asked for; the
    policy serves those of `config.delta`."""
    served: dict[float, calibration.Choice] = {}
    for delta in dict.fromkeys((config.delta, *config.also_deltas)):
        choices = {target: calibration.choose(outcomes.quality, outcomes.energy,
                                              data.quality[:, -1], data.energy[:, -1], target,
                                              delta)
                   for target in config.targets}
        policy.by_delta[delta] = {target: c.index for target, c in choices.items()}
        served = served or choices
    policy.use_delta(config.delta)
    return Calibration(served, outcomes)


def replay(policy: RoutingPolicy, x: np.ndarray, data: TierData) -> Replay:
    """A fitted policy's outcome on prompts under every candidate threshold."""
    p = policy.scores(x)
    outcomes = [simulate(policy, p, data.features, data.quality, data.energy, c, data.stopped)
                for c in range(len(CANDIDATES))]
    return Replay(np.stack([o.quality for o in outcomes]), np.stack([o.energy for o in outcomes]),
                  np.stack([o.answered_by == len(data.tiers) - 1 for o in outcomes]))
