"""What a token of each tier costs on one device, for splitting an interval between tiers.

Two tiers on one device (both embedded models on this CPU, two vLLM servers on one GPU) do not
pay the same for a token: a 1.5B model's token costs several times a 0.5B one's, and a prompt
token (computed in a batch during prefill) much less than a generated one. A prefill pass also
costs something whatever its length (the output layer over the whole vocabulary, the graph's
set-up; on llama.cpp's CPU path, a short batch without the faster kernels of long ones), so a
cached prompt's 8-token remainder is not 8 x the per-token cost of a 300-token prompt. So within
an interval a request's weight is `prompt x c_p + generated x c_g + prefills x c_f` (per tier;
`prefills` is the share of its prefill passes that fell in the interval), not its token count.

The costs are learned from the device's own *solo* intervals, those in which only one tier
processed tokens: each is one observation `E = c_p x P + c_g x G + c_f x F`, fitted per tier by
least squares pulled towards a prior (ridge), which stands alone before a tier has any
interval and keeps a fit on few observations from running away: `c_g = energy_hint x scale`,
`c_p = PROMPT_PRIOR x c_g`, `c_f = PREFILL_PRIOR x c_g`, where `energy_hint` is the tier's config
value (its relative energy per token, e.g. from parameter counts) and `scale` the device's
joules per hint-weighted token over all solo intervals seen (1 before any). The prior weighs as
one interval of `PRIOR_TOKENS` prompt tokens, one of as many generated tokens and one prefill.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

# A prompt token's cost relative to a generated one before any is learned: prefill processes
# the prompt in one batched pass, roughly 5-10x cheaper per token than decoding on a CPU and
# more on a GPU; 0.2 errs towards charging the prompt more.
PROMPT_PRIOR = 0.2
# A prefill pass's fixed cost relative to a generated token: it computes the output layer for
# its last position, as a decoding step does.
PREFILL_PRIOR = 1.0
PRIOR_TOKENS = 4.0  # the prior weighs as one interval of this many tokens, per kind
PRIOR_PREFILLS = 0.5  # and one prefill pass spread over four intervals (0.5² = 4 x (1/4)²)


class TierCost(NamedTuple):
    """Joules per prompt token, per generated token and per prefill pass of one tier."""

    prompt: float
    generated: float
    prefill: float


class _Sums:
    """Least-squares sums of one tier's solo intervals: X'X and X'E over (P, G, F)."""

    __slots__ = ("xx", "xe", "intervals")

    def __init__(self) -> None:
        self.xx = np.zeros((3, 3))
        self.xe = np.zeros(3)
        self.intervals = 0


class TokenCosts:
    """Joules per prompt token, generated token and prefill pass for the tiers on one device."""

    def __init__(self, hints: Mapping[str, float] | None = None,
                 prompt_prior: float = PROMPT_PRIOR, prior_tokens: float = PRIOR_TOKENS,
                 prefill_prior: float = PREFILL_PRIOR) -> None:
        self.hints = dict(hints or {})
        self.prompt_prior = prompt_prior
        self.prefill_prior = prefill_prior
        self._ridge = np.diag([prior_tokens ** 2, prior_tokens ** 2, PRIOR_PREFILLS ** 2])
        self._lock = threading.Lock()
        self._sums: dict[str, _Sums] = {}
        self._fitted: dict[str, TierCost] = {}  # cleared by each observation
        self._energy = 0.0  # over all solo intervals
        self._hinted = 0.0  # hint-weighted tokens over them

    def _hint(self, tier: str) -> float:
        return self.hints.get(tier, 1.0)

    def observe(self, tier: str, prompt: float, generated: float, joules: float,
                prefills: float = 0.0) -> None:
        """One solo interval: `tier` alone processed these tokens (and this share of prefill
        passes), with this energy."""
        if joules <= 0 or prompt + generated <= 0:
            return
        x = np.array([prompt, generated, prefills])
        with self._lock:
            s = self._sums.get(tier)
            if s is None:
                s = self._sums[tier] = _Sums()
            s.xx += np.outer(x, x)
            s.xe += x * joules
            s.intervals += 1
            self._energy += joules
            self._hinted += self._hint(tier) * (
                self.prompt_prior * prompt + generated + self.prefill_prior * prefills)
            self._fitted.clear()  # the scale moved: every tier's prior with it

    def solo_intervals(self, tier: str) -> int:
        with self._lock:
            s = self._sums.get(tier)
            return s.intervals if s is not None else 0

    def cost(self, tier: str) -> TierCost:
        """What a prompt token, a generated token and a prefill pass of `tier` cost, as known
        now."""
        with self._lock:
            known = self._fitted.get(tier)
            if known is None:
                known = self._fitted[tier] = self._fit(tier)
            return known

    def _fit(self, tier: str) -> TierCost:
        scale = self._energy / self._hinted if self._hinted > 0 else 1.0
        g0 = self._hint(tier) * scale
        prior = np.array([self.prompt_prior * g0, g0, self.prefill_prior * g0])
        s = self._sums.get(tier)
        if s is None:
            return TierCost(*(float(c) for c in prior))
        try:
            fit = np.linalg.solve(s.xx + self._ridge, s.xe + self._ridge @ prior)
        except np.linalg.LinAlgError:
            return TierCost(*(float(c) for c in prior))
        # A noisy fit may go negative for the kind it has seen little of: keep it positive.
        return TierCost(*(max(float(c), 0.05 * float(p)) for c, p in zip(fit, prior, strict=True)))
