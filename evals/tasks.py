"""Question sets with gold answers: the shared datasets' formats, and any JSONL/CSV by field
mapping.

Every dataset becomes a list of `Item`s of one answer kind, which decides both the prompt
(evals/prompts.py) and the grader (evals/graders.py):

  choice  a letter among labelled options (MMLU, ARC, CommonsenseQA, AQuA)
  number  a number (GSM8K, SVAMP)
  yesno   yes or no, about a passage (BoolQ)
  short   a short text matching one of several aliases (TriviaQA)
  open    open-ended, no gold answer: graded by an LLM judge (MT-Bench, first turn)

An item's id is `<task>:<line>` (the 0-based line in its file), so ids are stable across runs and
a resumed collection finds the rows it already has.
"""

from __future__ import annotations

import ast
import csv
import json
import os
import random
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from greenroute.routers.answers import LETTERS as ANSWER_LETTERS

Kind = Literal["choice", "number", "yesno", "short", "open"]
KINDS: tuple[Kind, ...] = ("choice", "number", "yesno", "short", "open")
LETTERS = ANSWER_LETTERS  # option letters, shared with the answer extraction

TASKS_ENV = "GREENROUTE_TASKS_DIR"
# The shared datasets sit beside a checkout of this repository (../shared/data/tasks).
_BESIDE_REPO = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "tasks"


class TaskError(ValueError):
    """A task name, file or field mapping that cannot be loaded."""


@dataclass(frozen=True, slots=True)
class Item:
    """One question, ready to be rendered into a prompt and graded."""

    id: str
    task: str
    kind: Kind
    question: str
    choices: tuple[str, ...] = ()
    passage: str = ""
    gold: tuple[str, ...] = ()  # choice: the letter; number: the value; yesno: "yes"/"no";
    # short: the accepted aliases; open: nothing


def _mmlu(r: Mapping[str, Any]) -> dict[str, Any]:
    return {"question": r["question"], "choices": tuple(r["choices"]),
            "gold": (LETTERS[int(r["answer"])],)}


def _arc(r: Mapping[str, Any]) -> dict[str, Any]:
    labels = list(r["labels"])
    return {"question": r["question"], "choices": tuple(r["choices"]),
            "gold": (LETTERS[labels.index(r["answerKey"])],)}


def _commonsense_qa(r: Mapping[str, Any]) -> dict[str, Any]:
    labels = list(r["choices"]["label"])
    return {"question": r["question"], "choices": tuple(r["choices"]["text"]),
            "gold": (LETTERS[labels.index(r["answerKey"])],)}


_OPTION_LABEL = re.compile(r"^\s*[A-Ja-j]\s*\)\s*")


def _aqua(r: Mapping[str, Any]) -> dict[str, Any]:
    options = r["options"] if isinstance(r["options"], list) else ast.literal_eval(r["options"])
    # Options arrive as "A)5(√3 + 1)": the label goes, the prompt adds its own.
    choices = tuple(_OPTION_LABEL.sub("", o, count=1) for o in options)
    return {"question": r["question"], "choices": choices, "gold": (r["correct"].strip(),)}


def _gsm8k(r: Mapping[str, Any]) -> dict[str, Any]:
    return {"question": r["question"],
            "gold": (r["answer"].rsplit("####", 1)[1].strip().replace(",", ""),)}


def _svamp(r: Mapping[str, Any]) -> dict[str, Any]:
    body = r["Body"].strip()
    body = body if body.endswith((".", "?", "!")) else body + "."
    return {"question": f"{body} {r['Question'].strip()}", "gold": (_number_text(r["Answer"]),)}


def _boolq(r: Mapping[str, Any]) -> dict[str, Any]:
    question = r["question"].strip()
    question = question[0].upper() + question[1:] + ("" if question.endswith("?") else "?")
    return {"question": question, "passage": r["passage"],
            "gold": ("yes" if r["answer"] else "no",)}


def _triviaqa(r: Mapping[str, Any]) -> dict[str, Any]:
    aliases = r.get("aliases") or [r["answer"]]
    if isinstance(aliases, str):
        aliases = ast.literal_eval(aliases)
    return {"question": r["question"], "gold": tuple(dict.fromkeys([r["answer"], *aliases]))}


def _mt_bench(r: Mapping[str, Any]) -> dict[str, Any]:
    return {"question": r["turns"][0]}


@dataclass(frozen=True, slots=True)
class TaskSpec:
    file: str
    kind: Kind
    parse: Callable[[Mapping[str, Any]], dict[str, Any]]


TASKS: dict[str, TaskSpec] = {
    "mmlu": TaskSpec("mmlu_validation.jsonl", "choice", _mmlu),
    "mmlu_dev": TaskSpec("mmlu_dev.jsonl", "choice", _mmlu),
    "arc_easy": TaskSpec("arc_easy_test.jsonl", "choice", _arc),
    "arc_challenge": TaskSpec("arc_challenge_test.jsonl", "choice", _arc),
    "commonsense_qa": TaskSpec("commonsense_qa_validation.jsonl", "choice", _commonsense_qa),
    "aqua": TaskSpec("aqua_rat_test.jsonl", "choice", _aqua),
    "gsm8k": TaskSpec("gsm8k_train.jsonl", "number", _gsm8k),
    "svamp": TaskSpec("svamp.jsonl", "number", _svamp),
    "boolq": TaskSpec("boolq_validation.jsonl", "yesno", _boolq),
    "triviaqa": TaskSpec("triviaqa_validation.jsonl", "short", _triviaqa),
    "mt_bench": TaskSpec("mt_bench_questions.jsonl", "open", _mt_bench),
}


def data_dir(explicit: str | Path | None = None) -> Path:
    """Where the task files are: the argument, else $GREENROUTE_TASKS_DIR, else ../shared."""
    path = Path(explicit or os.environ.get(TASKS_ENV) or _BESIDE_REPO)
    if not path.is_dir():
        raise TaskError(f"task data directory not found: {path} (set --data-dir or ${TASKS_ENV})")
    return path


def load_task(name: str, directory: str | Path | None = None) -> list[Item]:
    """Every item of a known task, in file order."""
    spec = TASKS.get(name)
    if spec is None:
        raise TaskError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    path = data_dir(directory) / spec.file
    items = []
    for line, record in _records(path):
        try:
            fields = spec.parse(record)
        except (KeyError, ValueError, IndexError, TypeError, SyntaxError) as exc:
            raise TaskError(f"{path}:{line + 1}: not a {name} record ({exc!r})") from None
        items.append(Item(id=f"{name}:{line}", task=name, kind=spec.kind, **fields))
    return items


def load_file(path: str | Path, kind: Kind, fields: Mapping[str, str],
              task: str | None = None) -> list[Item]:
    """Items from any JSONL or CSV file, naming which field holds what.

    `fields` maps `question` (required), `choices` (a list field, or several fields joined by
    commas: "A,B,C,D"), `gold` (a letter or 0-based index for choice; the value otherwise;
    several aliases separated by "|" for short), `passage` and `id` to the file's field names.
    """
    if kind not in KINDS:
        raise TaskError(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")
    if "question" not in fields:
        raise TaskError("a field mapping needs question=<field>")
    path = Path(path)
    task = task or path.stem
    items = []
    for line, record in _records(path):
        try:
            items.append(_mapped_item(record, line, kind, fields, task))
        except (KeyError, ValueError, IndexError) as exc:
            raise TaskError(f"{path}:{line + 1}: {exc!r} (fields: {dict(fields)})") from None
    return items


def sample(items: list[Item], limit: int | None, seed: int) -> list[Item]:
    """A seeded random subset (all items when limit is None), in file order."""
    if limit is None or limit >= len(items):
        return list(items)
    chosen = set(random.Random(seed).sample(range(len(items)), limit))
    return [item for i, item in enumerate(items) if i in chosen]


def _mapped_item(record: Mapping[str, Any], line: int, kind: Kind, fields: Mapping[str, str],
                 task: str) -> Item:
    question = str(record[fields["question"]])
    choices: tuple[str, ...] = ()
    if "choices" in fields:
        names = fields["choices"].split(",")
        value = record[names[0]] if len(names) == 1 else [record[n] for n in names]
        if isinstance(value, str):
            value = json.loads(value) if value.lstrip().startswith("[") else value.split("|")
        choices = tuple(str(v) for v in value)
    gold: tuple[str, ...] = ()
    if "gold" in fields:
        raw = record[fields["gold"]]
        if kind == "choice":
            text = str(raw).strip()
            gold = (LETTERS[int(text)] if text.isdigit() else text.upper(),)
        elif kind == "yesno":
            gold = ("yes" if str(raw).strip().lower() in ("yes", "true", "1") else "no",)
        elif kind == "number":
            gold = (_number_text(raw),)
        else:
            gold = tuple(str(raw).split("|"))
    if kind == "choice" and (not choices or not gold):
        raise ValueError("a choice item needs choices and gold")
    item_id = str(record[fields["id"]]) if "id" in fields else str(line)
    return Item(id=f"{task}:{item_id}", task=task, kind=kind, question=question, choices=choices,
                passage=str(record[fields["passage"]]) if "passage" in fields else "", gold=gold)


def _records(path: Path) -> Iterator[tuple[int, Mapping[str, Any]]]:
    if not path.is_file():
        raise TaskError(f"file not found: {path}")
    with path.open(newline="", encoding="utf-8") as f:
        if path.suffix.lower() == ".csv":
            yield from enumerate(csv.DictReader(f))
            return
        for line, text in enumerate(f):
            if text.strip():
                yield line, json.loads(text)


def _number_text(value: Any) -> str:
    """1.0 -> "1", 2.5 -> "2.5", "1,000" -> "1000"."""
    number = float(str(value).replace(",", ""))
    return str(int(number)) if number.is_integer() else repr(number)
