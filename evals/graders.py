"""Graders: find the answer in what a model actually wrote, and score it against the gold.

Small models rarely answer in exactly the requested form: "B", "B.", "(B) Paris", "The answer is
B", "**B**", the option's text instead of its letter; "$1,250.00", "Answer: 42 apples", a
"\\boxed{42}"; "Yes, ...", "No." or "The answer is yes". Each extractor tries the explicit forms
first and falls back to looser ones, and returns None (graded 0) rather than guess when the
text names several answers. Open-ended answers are scored by an LLM judge (`judge_messages`,
`parse_judgement`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from greenroute.evals.tasks import Item
from greenroute.routers.answers import (
    MARKUP,
    close_to,
    extract_choice,
    extract_number,
    extract_yes_no,
    format_number,
    normalize,
    parse_number,
)


@dataclass(frozen=True, slots=True)
class Grade:
    quality: float  # 0 or 1, or a judge's 0-1 score
    answer: str | None  # what was extracted; None when nothing recognisable was found


def grade(item: Item, output: str) -> Grade:
    """Grade a rule-graded item (every kind except `open`)."""
    if item.kind == "choice":
        letter = extract_choice(output, item.choices)
        return Grade(float(letter is not None and letter == item.gold[0]), letter)
    if item.kind == "number":
        value = extract_number(output)
        gold = parse_number(item.gold[0])
        ok = value is not None and gold is not None and close_to(value, gold)
        return Grade(float(ok), None if value is None else format_number(value))
    if item.kind == "yesno":
        answer = extract_yes_no(output)
        return Grade(float(answer is not None and answer == item.gold[0]), answer)
    if item.kind == "short":
        answer = _first_line(output)
        return Grade(float(matches_alias(answer, item.gold, item.question)), answer or None)
    raise ValueError("open-ended items are graded by a judge, not by rules")


# -- short answers ----------------------------------------------------------------------------

def _first_line(output: str) -> str:
    line = next((ln for ln in MARKUP.sub("", output).strip().splitlines() if ln.strip()), "")
    return re.sub(r"^\s*(?:the\s+)?answer\s*(?:is)?\s*[:\-]?\s*", "", line,
                  flags=re.IGNORECASE).strip()


def matches_alias(answer: str, aliases: tuple[str, ...], question: str = "") -> bool:
    """True when the answer is an alias, or names one as a whole phrase ("It is Paris."),
    unless the question itself holds that phrase: a small model that restates the question
    ("The ancient counting frame is ...") has not answered it."""
    answer, question = normalize(answer), normalize(question)
    if not answer:
        return False
    for alias in aliases:
        alias = normalize(alias)
        if not alias:
            continue
        if answer == alias:
            return True
        if _has_phrase(answer, alias) and not _has_phrase(question, alias):
            return True
    return False


def _has_phrase(text: str, phrase: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", text) is not None


# -- LLM judge for open-ended answers ---------------------------------------------------------

JUDGE_PROMPT = """You are grading an AI assistant's answer to a user's question. Judge \
helpfulness, relevance, accuracy, depth and level of detail. Be strict and objective. First \
explain your judgement in at most three sentences, then give a rating from 1 to 10 in exactly \
this form: "Rating: [[5]]".

[Question]
{question}

[Assistant's answer]
{answer}"""

_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]|rating\s*:?\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


def judge_messages(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": JUDGE_PROMPT.format(question=question, answer=answer)}]


def parse_judgement(text: str) -> float | None:
    """A judge's 1-10 rating as a 0-1 quality, or None when it gave no rating."""
    for match in _RATING.finditer(text):
        rating = float(match.group(1) or match.group(2))
        if 1 <= rating <= 10:
            return rating / 10
    return None
