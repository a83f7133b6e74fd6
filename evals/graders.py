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
import string
from dataclasses import dataclass
from fractions import Fraction

from greenroute.evals.tasks import LETTERS, Item


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
        ok = value is not None and gold is not None and _close(value, gold)
        return Grade(float(ok), None if value is None else _format_number(value))
    if item.kind == "yesno":
        answer = extract_yes_no(output)
        return Grade(float(answer is not None and answer == item.gold[0]), answer)
    if item.kind == "short":
        answer = _first_line(output)
        return Grade(float(matches_alias(answer, item.gold, item.question)), answer or None)
    raise ValueError("open-ended items are graded by a judge, not by rules")


# -- multiple choice --------------------------------------------------------------------------

_MARKUP = re.compile(r"[*_`#]")
_EXPLICIT_LETTER = re.compile(
    r"(?:answer|option|choice)\s*(?:is|would be|:|-)?\s*[:\-]?\s*(?:option\s*)?"
    r"[(\[]?([A-J])[)\].:]?(?![A-Za-z0-9])", re.IGNORECASE)
_LEADING_LETTER = re.compile(r"^\s*[(\[]?([A-J])(?:[)\].:,]|\s*$|\s+-|\n)")
_LEADING_WITH_TEXT = re.compile(r"^\s*([A-J])\s+(.+)", re.DOTALL)
_LONE_LETTER = re.compile(r"(?<![A-Za-z0-9'])[(\[]?([A-J])[)\]]?(?![A-Za-z0-9'])")


def extract_choice(output: str, choices: tuple[str, ...]) -> str | None:
    """The option letter a model chose, or None."""
    letters = LETTERS[:len(choices)]
    text = _MARKUP.sub("", output).strip()
    if not text:
        return None
    match = _LEADING_LETTER.match(text)
    if match and match.group(1) in letters:
        return match.group(1)
    found = {m.group(1).upper() for m in _EXPLICIT_LETTER.finditer(text)} & set(letters)
    if len(found) == 1:
        return found.pop()
    match = _LEADING_WITH_TEXT.match(text)  # "B Paris"; but "A bank" may be an article
    if match and match.group(1) in letters:
        rest = _normalize(match.group(2))
        if rest.startswith(_normalize(choices[letters.index(match.group(1))])):
            return match.group(1)
    by_text = _choice_by_text(text, choices)
    if by_text is not None:
        return by_text
    alone = {m.group(1) for m in _LONE_LETTER.finditer(text)} & set(letters)
    alone.discard("A") if len(alone) > 1 else None  # "A" is most often the article
    if len(alone) == 1 and not _starts_with_article(text):
        return alone.pop()
    return None


def _choice_by_text(text: str, choices: tuple[str, ...]) -> str | None:
    """The option whose text the answer gives, when exactly one (the longest wins ties of
    containment: "New York City" over "New York")."""
    answer = _normalize(text)
    hits = [i for i, c in enumerate(choices) if (n := _normalize(c)) and
            re.search(rf"(?<!\w){re.escape(n)}(?!\w)", answer)]
    hits = [i for i in hits if not any(i != j and _normalize(choices[i]) in _normalize(choices[j])
                                       for j in hits)]
    return LETTERS[hits[0]] if len(hits) == 1 else None


def _starts_with_article(text: str) -> bool:
    return bool(re.match(r"^\s*A\s+[a-z]", text))


# -- numbers ----------------------------------------------------------------------------------

_NUMBER = r"-?\$?\s?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?"
_ANSWER_LINE = re.compile(rf"answer\s*(?:is)?\s*[:=]?\s*\**\s*[^\d\-\n]{{0,12}}({_NUMBER})",
                          re.IGNORECASE)
_HASHES = re.compile(rf"####\s*({_NUMBER})")
_BOXED = re.compile(rf"\\boxed\{{\s*\\?\$?({_NUMBER})")
_ANY_NUMBER = re.compile(_NUMBER)


def extract_number(output: str) -> float | None:
    """The final numeric answer: an "Answer:" line, "####", \\boxed{}, else the last number."""
    for pattern in (_ANSWER_LINE, _HASHES, _BOXED):
        matches = pattern.findall(output)
        if matches:
            return parse_number(matches[-1])
    numbers = _ANY_NUMBER.findall(output)
    return parse_number(numbers[-1]) if numbers else None


def parse_number(text: str) -> float | None:
    """ "$1,250.00" -> 1250.0, "3/4" -> 0.75, "-7" -> -7.0; None if it is not a number."""
    cleaned = text.replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    try:
        return float(Fraction(cleaned)) if "/" in cleaned else float(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def _close(value: float, gold: float) -> bool:
    return abs(value - gold) <= 1e-6 * max(1.0, abs(gold))


def _format_number(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


# -- yes / no ---------------------------------------------------------------------------------

_YES_NO = re.compile(r"\b(yes|no|true|false)\b", re.IGNORECASE)


def extract_yes_no(output: str) -> str | None:
    """ "yes" or "no": the first yes/no/true/false word in the answer."""
    match = _YES_NO.search(_MARKUP.sub("", output))
    if match is None:
        return None
    return "yes" if match.group(1).lower() in ("yes", "true") else "no"


# -- short answers ----------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation + "‘’“”")


def _normalize(text: str) -> str:
    """TriviaQA/SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def _first_line(output: str) -> str:
    line = next((ln for ln in _MARKUP.sub("", output).strip().splitlines() if ln.strip()), "")
    return re.sub(r"^\s*(?:the\s+)?answer\s*(?:is)?\s*[:\-]?\s*", "", line,
                  flags=re.IGNORECASE).strip()


def matches_alias(answer: str, aliases: tuple[str, ...], question: str = "") -> bool:
    """True when the answer is an alias, or names one as a whole phrase ("It is Paris."),
    unless the question itself holds that phrase: a small model that restates the question
    ("The ancient counting frame is ...") has not answered it."""
    answer, question = _normalize(answer), _normalize(question)
    if not answer:
        return False
    for alias in aliases:
        alias = _normalize(alias)
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
