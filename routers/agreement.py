"""The agreement signal: sample a stage's answer k times and count how many agree.

A small model that knows the answer tends to reach the same final answer on every sample; one
that guesses scatters (self-consistency, Wang et al. 2023). The share of samples that agree with
the most common final answer is the confidence, and that majority answer is the one returned.
Answers are compared by their extracted final answer (routers/answers.py), so "42", "The answer
is 42." and "#### 42" agree, the same way the graders would score them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from greenroute.routers.answers import answer_key

SAMPLES = 5  # k: enough to tell 5/5 from 3/5, cheap next to a larger tier's call
TEMPERATURE = 0.7  # diverse enough to disagree where the model is unsure, not so hot it babbles


@dataclass(frozen=True, slots=True)
class Agreement:
    index: int  # the first sample that gives the majority answer: the one returned
    answer: str | None  # the majority's extracted answer; None when no sample stated one
    share: float  # samples agreeing with it / samples; 0 when none stated an answer


def agree(outputs: Sequence[str], kind: str | None = None, choices: tuple[str, ...] = ()
          ) -> Agreement:
    """The majority answer of k sampled outputs and the share that agree with it. Ties go to
    the answer sampled first; samples stating no answer count against every answer."""
    if not outputs:
        raise ValueError("agreement needs at least one sample")
    keys = [answer_key(output, kind, choices) for output in outputs]
    counts = Counter(key for key in keys if key is not None)
    if not counts:
        return Agreement(index=0, answer=None, share=0.0)
    best = max(counts.values())
    answer = next(key for key in keys if key is not None and counts[key] == best)
    return Agreement(index=keys.index(answer), answer=answer, share=best / len(outputs))
