"""Outcome tables: per prompt, how each model did and what it cost. The routers' training data.

On disk: JSON lines, schema `v: 1` (docs/evals.md has every field). One line per prompt:

    {"v": 1, "id": "gsm8k:17", "task": "gsm8k", "kind": "number", "prompt": "...",
     "gold": ["72"], "models": {"small": {"quality": 1.0, "completion_tokens": 96, ...},
                                "large": {...}}}

Collection appends one line per (prompt, model) as it goes, each carrying only that model;
lines with the same id merge on reading (later lines win per model). So a killed collection
loses at most the line being written, a resume skips what is already there, and the file is
compacted to one line per prompt when a collection finishes.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from greenroute.evals import load
from greenroute.routers.features import FEATURES

log = logging.getLogger("greenroute.evals")

SCHEMA_VERSION = 1


class OutcomeError(ValueError):
    """An outcome file that cannot be read as this schema."""


def read_rows(path: str | Path) -> dict[str, dict[str, Any]]:
    """Every prompt's merged row, in first-seen order. A truncated last line (a collection
    killed mid-write) is skipped with a warning; any other bad line is an error."""
    path = Path(path)
    rows: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return rows
    with path.open(encoding="utf-8", newline="\n") as f:
        lines = f.read().split("\n")  # not splitlines(): U+2028 and kin may sit in prompts
    while lines and not lines[-1].strip():
        lines.pop()
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            if number == len(lines):
                log.warning("%s: ignoring a truncated last line", path)
                continue
            raise OutcomeError(f"{path}:{number}: not JSON") from None
        if line.get("v") != SCHEMA_VERSION:
            raise OutcomeError(f"{path}:{number}: schema version {line.get('v')!r}, this "
                               f"GreenRoute reads version {SCHEMA_VERSION}")
        row = rows.setdefault(line["id"], {**line, "models": {}})
        row["models"].update(line.get("models") or {})
    return rows


def write_rows(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write a whole table, atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(_dumps(row))
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def compact(path: str | Path) -> int:
    """Rewrite an appended-to table as one line per prompt; return the number of prompts."""
    rows = read_rows(path)
    write_rows(path, rows.values())
    return len(rows)


class OutcomeWriter:
    """Appends one model's result for one prompt per line, flushed at once."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO = self.path.open("a", encoding="utf-8")

    def append(self, row: Mapping[str, Any]) -> None:
        self._file.write(_dumps(row))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _dumps(row: Mapping[str, Any]) -> str:
    return json.dumps({"v": SCHEMA_VERSION, **row}, ensure_ascii=False) + "\n"


def regrade(path: str | Path, items: Mapping[str, Any]) -> int:
    """Grade the stored outputs again with today's graders (rule-graded kinds only), and
    rewrite the table; return how many results changed. `items` maps ids to evals.tasks.Item."""
    from greenroute.evals.graders import grade

    rows = read_rows(path)
    changed = 0
    for row_id, row in rows.items():
        item = items.get(row_id)
        if item is None or item.kind == "open":
            continue
        for result in row["models"].values():
            if result.get("error") or result.get("graded_by") != "rule":
                continue
            new = grade(item, result.get("output") or "")
            if (new.quality, new.answer) != (result.get("quality"), result.get("answer")):
                result.update(quality=new.quality, answer=new.answer)
                changed += 1
    write_rows(path, rows.values())
    return changed


def describe(path: str | Path, models: list[str] | None = None) -> str:
    """A Markdown summary of a table: per task, each model's accuracy and mean joules, and for
    the cheapest and the strongest model how many prompts only one of them got right."""
    rows = [r for r in read_rows(path).values()]
    models = models or table_models(path)
    complete = [r for r in rows if all(_answered(r["models"].get(m)) for m in models)]
    first, last = models[0], models[-1]
    header = (["task", "prompts"] + [f"{m} quality" for m in models]
              + [f"{m} J/prompt" for m in models]
              + [f"only {last} right", f"only {first} right"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    tasks = sorted({r["task"] for r in complete}) + ["all"]
    for task in tasks:
        chosen = [r for r in complete if task in ("all", r["task"])]
        cells = [f"**{task}**" if task == "all" else task, str(len(chosen))]
        cells += [f"{np.mean([r['models'][m]['quality'] for r in chosen]):.3f}" for m in models]
        for m in models:
            joules = [r["models"][m].get("joules") for r in chosen]
            cells.append("n/a" if None in joules else f"{np.mean(joules):.1f}")
        gap = [r["models"][last]["quality"] - r["models"][first]["quality"] for r in chosen]
        cells += [str(sum(g > 0 for g in gap)), str(sum(g < 0 for g in gap))]
        lines.append("| " + " | ".join(cells) + " |")
    failed = sum(1 for r in rows for m in models if (r["models"].get(m) or {}).get("error"))
    lines.append("")
    lines.append(f"{len(rows)} prompts, {len(complete)} answered by every model; "
                 f"{failed} failed results.")
    contended = {m: sum(1 for r in rows if load.contended((r["models"].get(m) or {}).get("load")))
                 for m in models}
    if any(contended.values()):
        counts = ", ".join(f"{m} {n}" for m, n in contended.items() if n)
        lines.append(f"Collected beside other work (more than {load.BUSY_OTHERS_CORES} cores busy "
                     f"elsewhere; their joules are not comparable with the rest): {counts}.")
    return "\n".join(lines)



# -- importing external tables ----------------------------------------------------------------

def import_table(source: str | Path, destination: str | Path, *, prompt_field: str,
                 model_fields: Mapping[str, str], id_field: str | None = None,
                 task_field: str | None = None, task: str | None = None) -> int:
    """Turn a JSONL or CSV table with one correctness column per model into an outcome table.

    `prompt_field` may name several fields, comma-separated ("question,choices"): they are
    joined by newlines. `model_fields` maps the model names to use here onto the source's
    fields; values may be
    JSON booleans, "True"/"False" strings (RouteLLM's CSVs), 0/1, or scores in [0, 1].
    """
    source = Path(source)
    task = task or source.stem
    rows = []
    for number, record in enumerate(_source_records(source)):
        try:
            prompt = "\n".join(_as_text(record[name]) for name in prompt_field.split(","))
            models = {name: {"quality": _as_quality(record[column]), "graded_by": "import"}
                      for name, column in model_fields.items()}
        except (KeyError, ValueError) as exc:
            raise OutcomeError(f"{source}, record {number + 1}: {exc}") from None
        row_id = str(record[id_field]) if id_field else str(number)
        rows.append({"id": f"{task}:{row_id}", "task": str(record[task_field]) if task_field
                     else task, "kind": "imported", "prompt": prompt, "gold": [],
                     "models": models})
    if len({r["id"] for r in rows}) != len(rows):
        raise OutcomeError(f"{source}: ids are not unique (choose --id-field)")
    write_rows(destination, rows)
    return len(rows)


def _source_records(path: Path) -> Iterator[Mapping[str, Any]]:
    with path.open(newline="", encoding="utf-8") as f:
        if path.suffix.lower() == ".csv":
            yield from csv.DictReader(f)
        else:
            yield from (json.loads(line) for line in f if line.strip())


def _as_text(value: Any) -> str:
    """A prompt part: lists (answer choices) one item per line."""
    return "\n".join(map(str, value)) if isinstance(value, list) else str(value)


def _as_quality(value: Any) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("true", "false"):
            return float(lowered == "true")
        value = float(lowered)
    quality = float(value)
    if not 0.0 <= quality <= 1.0:
        raise ValueError(f"quality {value!r} is not in [0, 1]")
    return quality


def table_models(path: str | Path) -> list[str]:
    """The models of a table, in the order its first row lists them (cheapest first when it
    was imported or collected that way)."""
    rows = read_rows(path)
    if not rows:
        raise OutcomeError(f"{path}: no outcome rows")
    return list(next(iter(rows.values()))["models"])


# -- the table for analysis -------------------------------------------------------------------

@dataclass
class OutcomeTable:
    """Prompts that every named model answered (no error), as arrays aligned by prompt."""

    ids: list[str]
    tasks: list[str]
    prompts: list[str]
    models: list[str]
    quality: dict[str, np.ndarray]
    completion_tokens: dict[str, np.ndarray | None] = field(default_factory=dict)
    prompt_tokens: dict[str, np.ndarray | None] = field(default_factory=dict)
    joules: dict[str, np.ndarray | None] = field(default_factory=dict)
    energy_source: dict[str, str | None] = field(default_factory=dict)
    features: dict[str, np.ndarray | None] = field(default_factory=dict)
    # Per model, the cascade signals every kept prompt has (evals/signals.py): agreement,
    # majority_quality, samples_joules, self_check, self_check_joules; absent ones left out.
    signals: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    dropped: int = 0  # prompts left out: a model missing or failed

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: np.ndarray) -> OutcomeTable:
        """The rows at `index` (an integer or boolean array)."""
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)

        def take(arrays: dict[str, np.ndarray | None]) -> dict[str, np.ndarray | None]:
            return {k: None if v is None else v[index] for k, v in arrays.items()}

        return OutcomeTable(
            ids=[self.ids[i] for i in index], tasks=[self.tasks[i] for i in index],
            prompts=[self.prompts[i] for i in index], models=list(self.models),
            quality={k: v[index] for k, v in self.quality.items()},
            completion_tokens=take(self.completion_tokens), prompt_tokens=take(self.prompt_tokens),
            joules=take(self.joules), energy_source=dict(self.energy_source),
            features=take(self.features),
            signals={m: {k: v[index] for k, v in s.items()} for m, s in self.signals.items()},
            dropped=self.dropped)


def load_table(path: str | Path, models: list[str] | None = None) -> OutcomeTable:
    """Read a table for analysis, keeping the prompts every model in `models` answered."""
    rows = list(read_rows(path).values())
    if not rows:
        raise OutcomeError(f"{path}: no outcome rows")
    if models is None:
        models = sorted({m for row in rows for m in row["models"]})
    kept = [row for row in rows if all(_answered(row["models"].get(m)) for m in models)]
    if not kept:
        raise OutcomeError(f"{path}: no prompt has answers from all of {', '.join(models)}")

    def column(model: str, key: str) -> np.ndarray | None:
        values = [row["models"][model].get(key) for row in kept]
        return None if any(v is None for v in values) else np.asarray(values, dtype=float)

    def features(model: str) -> np.ndarray | None:
        values = [row["models"][model].get("features") for row in kept]
        if any(v is None for v in values):
            return None
        return np.asarray([[v[name] for name in FEATURES] for v in values], dtype=float)

    sources = {m: {row["models"][m].get("energy_source") for row in kept} for m in models}
    return OutcomeTable(
        ids=[row["id"] for row in kept], tasks=[row.get("task", "") for row in kept],
        prompts=[row.get("prompt", "") for row in kept], models=list(models),
        quality={m: np.asarray([row["models"][m]["quality"] for row in kept], dtype=float)
                 for m in models},
        completion_tokens={m: column(m, "completion_tokens") for m in models},
        prompt_tokens={m: column(m, "prompt_tokens") for m in models},
        joules={m: column(m, "joules") for m in models},
        energy_source={m: s.pop() if len(s) == 1 else None for m, s in sources.items()},
        features={m: features(m) for m in models},
        signals={m: _signal_columns([row["models"][m] for row in kept]) for m in models},
        dropped=len(rows) - len(kept))


# (column, result field, key): where each signal column is recorded (evals/signals.py)
SIGNAL_COLUMNS = (("agreement", "samples", "agreement"),
                  ("majority_quality", "samples", "majority_quality"),
                  ("samples_joules", "samples", "joules"),
                  ("self_check", "self_check", "p_yes"),
                  ("self_check_joules", "self_check", "joules"))


def _signal_columns(results: list[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    columns = {}
    for name, where, key in SIGNAL_COLUMNS:
        values = [(r.get(where) or {}).get(key) for r in results]
        if values and all(v is not None for v in values):
            columns[name] = np.asarray(values, dtype=float)
    return columns


def _answered(result: Mapping[str, Any] | None) -> bool:
    return result is not None and not result.get("error") and result.get("quality") is not None
