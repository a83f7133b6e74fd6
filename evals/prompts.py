"""Prompt templates per answer kind: one user message, and a token budget to match.

Generations are kept as short as the task allows (a letter, a yes/no), because on a CPU every
generated token costs tens of milliseconds; only arithmetic gets room to reason, since small
models answer word problems far worse without it. The instruction always says how to give the
final answer, so that the graders can find it.
"""

from __future__ import annotations

from dataclasses import dataclass

from greenroute.evals.tasks import LETTERS, Item


@dataclass(frozen=True, slots=True)
class Prompt:
    text: str  # the user message; also the routing text a router sees
    max_tokens: int


MAX_TOKENS = {"choice": 8, "number": 320, "yesno": 3, "short": 16, "open": 512}


def render(item: Item) -> Prompt:
    kind = item.kind
    if kind == "choice":
        options = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(item.choices))
        text = ("Answer the following multiple choice question with a single letter.\n\n"
                f"Question: {item.question}\n{options}\n\nAnswer:")
    elif kind == "number":
        text = (f"{item.question}\n\nSolve this step by step in plain words, without code, "
                "briefly. Then write the final answer on its own line as \"Answer: <number>\".")
    elif kind == "yesno":
        text = f"{item.passage}\n\nQuestion: {item.question}\nAnswer with yes or no only."
    elif kind == "short":
        text = f"{item.question}\n\nAnswer with just the answer, in a few words."
    else:
        text = item.question
    return Prompt(text=text, max_tokens=MAX_TOKENS[kind])
