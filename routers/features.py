"""Confidence features of an answer, from its token logprobs.

The same features are computed offline (evals: outcome collection) and live (the gateway's
cascade, on the small model's answer), so they live here, next to the models that use them.
Entropy is taken over the returned top alternatives plus one bucket for the rest of the
probability mass: a lower bound of the true entropy that needs only `top_logprobs`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

FEATURES = ("lp_mean", "lp_min", "lp_first", "lp_last", "entropy_mean", "entropy_first")
# Signals beyond the answer's own logprobs, each costing extra calls: the share of k samples
# agreeing on the final answer (routers/agreement.py), and the model's own P(yes) when asked
# whether its answer is correct (routers/selfcheck.py).
# What a judge that decides on a stream's first token reads: the rest of the answer streams
# live to the client once it is kept (gateway/green.py), so its time to first token is the
# stage's own.
FIRST_TOKEN = ("lp_first", "entropy_first")
AGREEMENT = "agreement"
SELF_CHECK = "self_check"
SIGNALS = (AGREEMENT, SELF_CHECK)
TAIL = 5  # tokens at the end of an answer: where a reasoned answer states its result


def logprob_features(content: Sequence[Mapping[str, Any]]) -> dict[str, float] | None:
    """Features of OpenAI chat `logprobs.content`; None for an empty answer."""
    logprobs = [float(t["logprob"]) for t in content]
    if not logprobs:
        return None
    entropies = [_entropy(t.get("top_logprobs") or ()) for t in content]
    return {
        "lp_mean": sum(logprobs) / len(logprobs),
        "lp_min": min(logprobs),
        "lp_first": logprobs[0],
        "lp_last": sum(logprobs[-TAIL:]) / len(logprobs[-TAIL:]),
        "entropy_mean": sum(entropies) / len(entropies),
        "entropy_first": entropies[0],
    }


def _entropy(top: Sequence[Mapping[str, Any]]) -> float:
    probabilities = [math.exp(float(t["logprob"])) for t in top]
    rest = max(0.0, 1.0 - sum(probabilities))
    return -sum(p * math.log(p) for p in (*probabilities, rest) if p > 0)
