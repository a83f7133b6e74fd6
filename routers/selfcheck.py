"""The self-check signal: the stage's own model, asked in one short extra call whether its
answer is correct, read from the probabilities of "Yes" and "No" (AutoMix's verifier,
Madaan et al. 2023, without its POMDP).

The same prompt is used by `collect` (offline) and by the gateway (live), so what is trained
is what is served. The call asks for one token with its top logprobs; P(yes) is the
probability mass on yes-tokens over that on yes- and no-tokens, so a model that spreads mass
over other tokens ("The", "I") still gives a reading.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

TOP_LOGPROBS = 10
PROMPT = """Question:
{question}

Proposed answer:
{answer}

Is the proposed answer correct? Reply with Yes or No only."""


def messages(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": PROMPT.format(question=question, answer=answer)}]


def request(model: str, question: str, answer: str) -> dict[str, Any]:
    """The chat body of the self-check call: greedy, one token, with its alternatives."""
    return {"model": model, "messages": messages(question, answer), "max_tokens": 1,
            "temperature": 0, "logprobs": True, "top_logprobs": TOP_LOGPROBS}


def p_yes(content: Sequence[Mapping[str, Any]] | None) -> float | None:
    """P(yes | yes or no) from the first token's top logprobs; 0.5 when neither appears among
    them, None when the answer has no logprobs at all."""
    if not content:
        return None
    first = content[0]
    top = list(first.get("top_logprobs") or ()) or [first]
    yes = no = 0.0
    for entry in top:
        word = str(entry.get("token", "")).strip().lower()
        probability = math.exp(float(entry["logprob"]))
        if word in ("yes", "true"):
            yes += probability
        elif word in ("no", "false"):
            no += probability
    return 0.5 if yes + no == 0 else yes / (yes + no)
