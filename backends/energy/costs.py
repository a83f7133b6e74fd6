"""What a token of each tier costs on one device, for splitting an interval between tiers.

Two tiers on one device (both embedded models on this CPU, two vLLM servers on one GPU) do not
pay the same for a token: a 1.5B model's token costs several times a 0.5B one's, and a prompt
token (computed in a batch during prefill) much less than a generated one. So within an interval
a request's weight is `prompt x c_p(tier) + generated x c_g(tier)`, not its token count.

The costs are learned from the device's own *solo* intervals, those in which only one tier
processed tokens: each is one observation `E = c_p x P + c_g x G`, fitted per tier by least
squares. Before a tier has any, and to keep a fit from running away on few observations, its
costs start from a prior: `c_g = energy_hint x scale` and `c_p = PROMPT_PRIOR x c_g`, where
`energy_hint` is the tier's config value (its relative energy per token, e.g. from parameter
counts), `scale` is the device's joules per hint-weighted token over all solo intervals seen (1
before any), and the prior counts as one solo interval of `PRIOR_TOKENS` prompt tokens and
one of as many generated tokens.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass

# A prompt token's cost relative to a generated one before any is learned: prefill processes
# the prompt in one batched pass, roughly 5-10x cheaper per token than decoding on a CPU and
# more on a GPU; 0.2 errs towards charging the prompt more.
PROMPT_PRIOR = 0.2
PRIOR_TOKENS = 4.0  # the prior weighs as one interval of this many tokens, per kind


@dataclass(slots=True)
class _Sums:
    pp: float = 0.0
    pg: float = 0.0
    gg: float = 0.0
    pe: float = 0.0
    ge: float = 0.0
    intervals: int = 0


class TokenCosts:
    """Joules per prompt and per generated token for the tiers on one device."""

    def __init__(self, hints: Mapping[str, float] | None = None,
                 prompt_prior: float = PROMPT_PRIOR, prior_tokens: float = PRIOR_TOKENS) -> None:
        self.hints = dict(hints or {})
        self.prompt_prior = prompt_prior
        self.prior_tokens = prior_tokens
        self._lock = threading.Lock()
        self._sums: dict[str, _Sums] = {}
        self._energy = 0.0  # over all solo intervals
        self._hinted = 0.0  # hint-weighted tokens over them

    def _hint(self, tier: str) -> float:
        return self.hints.get(tier, 1.0)

    def observe(self, tier: str, prompt: float, generated: float, joules: float) -> None:
        """One solo interval: `tier` alone processed these tokens, with this energy."""
        if joules <= 0 or prompt + generated <= 0:
            return
        with self._lock:
            s = self._sums.setdefault(tier, _Sums())
            s.pp += prompt * prompt
            s.pg += prompt * generated
            s.gg += generated * generated
            s.pe += prompt * joules
            s.ge += generated * joules
            s.intervals += 1
            self._energy += joules
            self._hinted += self._hint(tier) * (self.prompt_prior * prompt + generated)

    def solo_intervals(self, tier: str) -> int:
        with self._lock:
            s = self._sums.get(tier)
            return s.intervals if s is not None else 0

    def cost(self, tier: str) -> tuple[float, float]:
        """(joules per prompt token, joules per generated token) of `tier`, as known now."""
        with self._lock:
            scale = self._energy / self._hinted if self._hinted > 0 else 1.0
            g0 = self._hint(tier) * scale
            p0 = self.prompt_prior * g0
            s = self._sums.get(tier)
            if s is None:
                return p0, g0
            n2 = self.prior_tokens * self.prior_tokens  # the prior as two pseudo-intervals
            a, b, d = s.pp + n2, s.pg, s.gg + n2
            e, f = s.pe + p0 * n2, s.ge + g0 * n2
            det = a * d - b * b
            if det <= 0:
                return p0, g0
            prompt, generated = (e * d - b * f) / det, (a * f - b * e) / det
            # A noisy fit may go negative for the kind it has seen little of: keep it positive.
            return max(prompt, 0.05 * p0), max(generated, 0.05 * g0)
