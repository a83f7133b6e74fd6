"""The final answer in what a model wrote: an option letter, a number, yes or no.

The graders (evals/graders.py) score these against the gold; the cascade's agreement signal
(routers/agreement.py) compares them between samples of one prompt. Both must read an answer
the same way, or a signal would be measured offline on answers the gateway never sees, so the
extraction lives here, below both. Each extractor tries the explicit forms first and falls back
to looser ones, and returns None rather than guess when the text names several answers.
"""

from __future__ import annotations

import re
import string
from fractions import Fraction

LETTERS = "ABCDEFGHIJ"


# -- multiple choice --------------------------------------------------------------------------

MARKUP = re.compile(r"[*_`#]")
_EXPLICIT_LETTER = re.compile(
    r"(?:answer|option|choice)\s*(?:is|would be|:|-)?\s*[:\-]?\s*(?:option\s*)?"
    r"[(\[]?([A-J])[)\].:]?(?![A-Za-z0-9])", re.IGNORECASE)
_LEADING_LETTER = re.compile(r"^\s*[(\[]?([A-J])(?:[)\].:,]|\s*$|\s+-|\n)")
_LEADING_WITH_TEXT = re.compile(r"^\s*([A-J])\s+(.+)", re.DOTALL)
_LONE_LETTER = re.compile(r"(?<![A-Za-z0-9'])[(\[]?([A-J])[)\]]?(?![A-Za-z0-9'])")


def extract_choice(output: str, choices: tuple[str, ...]) -> str | None:
    """The option letter a model chose, or None."""
    letters = LETTERS[:len(choices)]
    text = MARKUP.sub("", output).strip()
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
        rest = normalize(match.group(2))
        if rest.startswith(normalize(choices[letters.index(match.group(1))])):
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
    answer = normalize(text)
    hits = [i for i, c in enumerate(choices) if (n := normalize(c)) and
            re.search(rf"(?<!\w){re.escape(n)}(?!\w)", answer)]
    hits = [i for i in hits if not any(i != j and normalize(choices[i]) in normalize(choices[j])
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


def close_to(value: float, gold: float) -> bool:
    return abs(value - gold) <= 1e-6 * max(1.0, abs(gold))


def format_number(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


# -- yes / no ---------------------------------------------------------------------------------

_YES_NO = re.compile(r"\b(yes|no|true|false)\b", re.IGNORECASE)


def extract_yes_no(output: str) -> str | None:
    """ "yes" or "no": the first yes/no/true/false word in the answer."""
    match = _YES_NO.search(MARKUP.sub("", output))
    if match is None:
        return None
    return "yes" if match.group(1).lower() in ("yes", "true") else "no"


# -- normalising text ---------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation + "‘’“”")


def normalize(text: str) -> str:
    """TriviaQA/SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


# -- one key per answer, for comparing samples ------------------------------------------------

def answer_key(output: str, kind: str | None = None, choices: tuple[str, ...] = ()) -> str | None:
    """The answer as a comparable key: the graders' extraction for a known kind (`choice`,
    `number`, `yesno`); for any other kind, or none known (a live request), the first form
    found of a leading option letter, a leading yes/no, the final number, else the normalised
    first line. None for an answer that states nothing."""
    if kind == "choice":
        return extract_choice(output, choices)
    if kind == "number":
        value = extract_number(output)
        return None if value is None else format_number(value)
    if kind == "yesno":
        return extract_yes_no(output)
    text = MARKUP.sub("", output).strip()
    if (match := _LEADING_LETTER.match(text)) is not None:
        return match.group(1)
    if (match := _LEADING_YES_NO.match(text)) is not None:
        return extract_yes_no(match.group(0))
    value = extract_number(text)
    if value is not None:
        return format_number(value)
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    return normalize(line) or None


_LEADING_YES_NO = re.compile(r"^\s*(yes|no|true|false)\b", re.IGNORECASE)
