"""Graders against real answers: what SmolLM2-135M and Qwen2.5-Coder-0.5B actually wrote to this
harness's prompts (tests/data/real_answers.jsonl, each expected answer checked by hand), plus the
forms small models use that those samples happen not to show."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from greenroute.evals import graders
from greenroute.evals.tasks import Item

CASES = [json.loads(line) for line in
         (Path(__file__).parent / "data/real_answers.jsonl").read_text().splitlines()]


def _item(case: dict) -> Item:
    return Item(id=case["id"], task=case["id"].split(":")[0], kind=case["kind"],
                question=case.get("question", ""), choices=tuple(case.get("choices", ())),
                gold=tuple(case["gold"]))


def test_every_kind_has_at_least_twenty_real_answers() -> None:
    counts = Counter(case["kind"] for case in CASES)
    assert all(counts[kind] >= 20 for kind in ("choice", "number", "yesno", "short", "open"))


@pytest.mark.parametrize("case", [c for c in CASES if c["kind"] != "open"],
                         ids=lambda c: f"{c['id']}-{c['model']}")
def test_real_answers_grade_as_checked_by_hand(case: dict) -> None:
    grade = graders.grade(_item(case), case["output"])
    assert grade.answer == case["expected_answer"]
    assert grade.quality == case["expected_quality"]


@pytest.mark.parametrize("case", [c for c in CASES if c["kind"] == "open"],
                         ids=lambda c: c["id"])
def test_real_judgements_parse(case: dict) -> None:
    assert graders.parse_judgement(case["output"]) == case["expected_quality"]


CHOICES = ("bank", "library", "department store", "mall", "new york")


@pytest.mark.parametrize(("output", "letter"), [
    ("B", "B"), ("B.", "B"), ("(C) department store", "C"), ("**E**", "E"),
    ("The answer is D", "D"), ("Answer: C", "C"), ("I think the correct option is B because", "B"),
    ("A. bank", "A"), ("A bank", "A"),  # an option's own text after the letter
    ("mall", "D"), ("New York", "E"),  # the option's text instead of its letter
    ("A person would go to the bank", None),  # "A" the article; the text names one option...
    ("", None), ("It could be B or C", None),  # ...nothing, or two letters: no guess
])
def test_letter_forms(output: str, letter: str | None) -> None:
    if output == "A person would go to the bank":
        letter = "A"  # ...and that option is A: found by its text, not by the article
    assert graders.extract_choice(output, CHOICES) == letter


@pytest.mark.parametrize(("output", "value"), [
    ("Answer: 1,250", 1250.0), ("#### 72", 72.0), ("so \\boxed{42}", 42.0),
    ("Answer: $3.50", 3.5), ("The answer is -4.", -4.0), ("Answer: 3/4", 0.75),
    ("5 apples and 7 pears, 12 fruits in all.", 12.0), ("no digits here", None),
])
def test_number_forms(output: str, value: float | None) -> None:
    assert graders.extract_number(output) == value


def test_yes_no_and_aliases() -> None:
    assert graders.extract_yes_no("True, it does.") == "yes"
    assert graders.extract_yes_no("Nope") is None
    assert graders.matches_alias("It is Sunset Blvd.", ("Sunset Blvd",))
    assert not graders.matches_alias("A counting frame uses beads.", ("counting frame",),
                                     question="What is an ancient counting frame called?")
    assert graders.parse_judgement("The answer is fine. Rating: [[7]]") == 0.7
    assert graders.parse_judgement("I cannot rate this.") is None
    assert graders.parse_judgement("Rating: [[15]]") is None  # off the scale
