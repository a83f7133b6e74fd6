"""`collect --pause-file` holds the signals pass too (agreement samples, self-checks): while
the file exists no new prompt is sent, and the pass picks up where it was once it is gone."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

from fake_backends import FakeBackend, Reply

from greenroute.evals import signals
from greenroute.evals.outcomes import OutcomeWriter
from greenroute.evals.pause import wait_while_paused
from greenroute.evals.tasks import Item

ITEMS = [Item(id=f"q{i}", task="svamp", kind="number", question=f"What is {i} + 1?",
              gold=(str(i + 1),)) for i in range(3)]


def _greedy_rows(path: Path) -> None:
    """The table as the greedy pass left it: every item answered by tier `small`."""
    with path.open("w") as f:
        for item in ITEMS:
            f.write(json.dumps({"v": 1, "id": item.id, "task": item.task, "kind": item.kind,
                                "models": {"small": {"quality": 1.0, "output": "1"}}}) + "\n")


def test_the_signals_pass_waits_while_the_pause_file_exists(tmp_path: Path) -> None:
    table, pause = tmp_path / "outcomes.jsonl", tmp_path / "pause"
    _greedy_rows(table)
    pause.touch()
    backend = FakeBackend("small", reply=Reply(text="1"))
    log = io.StringIO()

    async def run() -> None:
        writer = OutcomeWriter(table)
        task = asyncio.create_task(signals.collect(
            backend, "small", ITEMS, writer, signals.SignalPlan(("self_check",)), None, log,
            pause))
        await asyncio.sleep(1.5)
        assert not backend.calls and not task.done()  # held before its first prompt
        pause.unlink()
        await asyncio.wait_for(task, 30)
        writer.close()

    asyncio.run(run())
    assert len(backend.calls) == len(ITEMS)  # one self-check call per item, once resumed
    assert "paused while" in log.getvalue() and "resumed" in log.getvalue()


def test_no_pause_file_waits_for_nothing(tmp_path: Path) -> None:
    notes: list[str] = []
    asyncio.run(wait_while_paused(None, notes.append))
    asyncio.run(wait_while_paused(tmp_path / "absent", notes.append))
    assert notes == []
