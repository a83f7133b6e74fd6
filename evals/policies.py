"""Routing policies to evaluate: each scores prompts, higher meaning "the small model will do".

A policy may learn from the training part of a table (`fit`) before scoring held-out prompts;
the simple ones below ignore it. Trained routers (routers/) plug in through the same interface.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import numpy as np

from greenroute.evals.outcomes import OutcomeTable


class Policy(Protocol):
    name: str

    def fit(self, table: OutcomeTable, small: str, large: str) -> None: ...

    def scores(self, table: OutcomeTable) -> np.ndarray: ...


class LengthPolicy:
    """Short prompts to the small model: a trivial baseline that needs no training."""

    name = "length"

    def fit(self, table: OutcomeTable, small: str, large: str) -> None:
        return None

    def scores(self, table: OutcomeTable) -> np.ndarray:
        return -np.asarray([len(p) for p in table.prompts], dtype=float)


class ScoresFilePolicy:
    """Scores (or fixed 0/1 decisions: 1 = small) computed elsewhere: JSONL of {"id", "score"}."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.name = self.path.stem
        self._scores: dict[str, float] = {}
        for line in self.path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                self._scores[str(record["id"])] = float(record["score"])

    def fit(self, table: OutcomeTable, small: str, large: str) -> None:
        return None

    def scores(self, table: OutcomeTable) -> np.ndarray:
        missing = [i for i in table.ids if i not in self._scores]
        if missing:
            raise ValueError(f"{self.path}: no score for {len(missing)} prompt(s), e.g. "
                             f"{missing[0]!r}")
        return np.asarray([self._scores[i] for i in table.ids])


BUILTIN = {"length": LengthPolicy}
