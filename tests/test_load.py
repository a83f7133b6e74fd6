"""What else the machine did while a call was collected (evals/load.py): a real process kept
busy beside the sampler is seen as other work, and the outcome summary counts such results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from greenroute.evals import load
from greenroute.evals.outcomes import describe


def test_the_load_is_other_processes_busy_time_and_steal_per_second() -> None:
    before = load.Sample(wall_s=10.0, busy_s=100.0, own_s=5.0, steal_s=1.0)
    after = load.Sample(wall_s=12.0, busy_s=103.0, own_s=6.0, steal_s=1.2)
    beside = load.between(before, after)
    assert beside == load.Load(others_cores=1.0, steal_cores=0.1)  # (3 - 1) / 2, 0.2 / 2
    assert load.contended(beside.record())
    assert not load.contended({"others_cores": 0.1, "steal_cores": 0.1})
    assert not load.contended(None)
    short = load.Sample(wall_s=10.2, busy_s=100.1, own_s=5.0, steal_s=1.0)
    assert load.between(before, short) is None  # too short for 10 ms ticks to say anything
    assert load.between(None, after) is None


@pytest.mark.skipif(load.sample() is None, reason="reads /proc/stat")
def test_a_process_busy_beside_the_sampler_is_seen() -> None:
    busy = "import time\nend = time.monotonic() + 1.5\nwhile time.monotonic() < end: pass\n"
    before = load.sample()
    subprocess.run([sys.executable, "-c", busy], check=True)
    beside = load.between(before, load.sample())
    assert beside is not None
    assert beside.others_cores > 0.5  # one core for most of the interval (interpreter start)
    assert load.contended(beside.record())


def test_the_summary_counts_results_collected_beside_other_work(tmp_path: Path) -> None:
    def result(quality: float, others: float) -> dict[str, object]:
        return {"model_id": "m", "quality": quality, "joules": 1.0, "latency_s": 2.0,
                "load": {"others_cores": others, "steal_cores": 0.0}}

    rows = [{"v": 1, "id": f"t:{i}", "task": "t", "kind": "choice", "prompt": f"p{i}",
             "gold": ["A"], "models": {"small": result(0.0, 0.0),
                                       "large": result(1.0, 0.9 if i < 2 else 0.0)}}
            for i in range(5)]
    table = tmp_path / "table.jsonl"
    table.write_text("".join(json.dumps(row) + "\n" for row in rows))
    text = describe(table, ["small", "large"])
    assert "Collected beside other work" in text and "large 2." in text
    assert "small" not in text.split("Collected beside other work")[1]


def test_each_threads_cpu_time_is_its_own() -> None:
    """A thread that spins for 0.3 s of CPU shows that much under its own id; the thread that
    waited for it, far less."""
    seen: dict[str, float] = {}

    def spin() -> None:
        deadline = time.thread_time() + 0.3
        while time.thread_time() < deadline:
            pass
        seen["own"] = load.thread_cpu_s(os.getpid())[str(threading.get_native_id())]

    main = str(threading.get_native_id())
    before = load.thread_cpu_s(os.getpid())[main]
    worker = threading.Thread(target=spin)
    worker.start()
    worker.join()
    assert seen["own"] >= 0.25  # the kernel counts in 10 ms ticks
    assert load.thread_cpu_s(os.getpid())[main] - before < 0.15
