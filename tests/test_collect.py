"""`greenroute collect` end to end on the embedded small model (Qwen2.5-Coder-0.5B): three task
kinds, an interruption and a resume, and a prompt its backend refuses."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from shared_data import SHARED_TASKS
from waiting import wait_until

from greenroute.backends import weights
from greenroute.evals.outcomes import read_rows

GREENROUTE = str(Path(sys.executable).parent / "greenroute")


# Started in the background by a shell without job control (CI scripts, `pytest &`), this test
# run has SIGINT ignored, and an ignored signal stays ignored across fork and exec: Python then
# installs no KeyboardInterrupt handler, nor asyncio.run its own, and the child never sees the
# Ctrl-C sent below (it used to finish all 10 prompts and exit 0). So the child gets SIGINT's
# default back before it execs, the way a terminal would hand it over.
_WITH_SIGINT = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                "os.execv(sys.argv[1], sys.argv[1:])")


def _interruptible(command: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _WITH_SIGINT, *command],
                            stderr=subprocess.PIPE, text=True)


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _head(name: str, count: int) -> list[dict[str, Any]]:
    with (SHARED_TASKS / name).open() as f:
        return [json.loads(next(f)) for _ in range(count)]


@pytest.fixture(scope="module")
def small_weights() -> Path:
    return weights.ensure("small")


@pytest.fixture
def task_dir(tmp_path: Path) -> Path:
    """4 multiple-choice, 3 arithmetic and 3 yes/no questions; the last passage is too long
    for the tier's context, so the backend refuses that one prompt."""
    data = tmp_path / "tasks"
    data.mkdir()
    boolq = _head("boolq_validation.jsonl", 3)
    boolq[2]["passage"] = " ".join([boolq[2]["passage"]] * 40)
    for name, records in (("arc_easy_test.jsonl", _head("arc_easy_test.jsonl", 4)),
                          ("svamp.jsonl", _head("svamp.jsonl", 3)),
                          ("boolq_validation.jsonl", boolq)):
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return data


# Three collections on the real model (15 s on 2 idle cores): each step below has its own
# bound (240 + 60 + 420 + 120 s), and on busy cores they add up to more than the suite's 300 s.
@pytest.mark.timeout(900)
def test_collect_resumes_after_interruption_and_records_a_failed_row(
        small_weights: Path, task_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "tiers.toml"
    config.write_text('[[tiers]]\nname = "small"\nbackend = "llamacpp"\nweights = "small"\n'
                      'context = 1024\n')
    out = tmp_path / "outcomes.jsonl"
    command = [GREENROUTE, "collect", "--config", str(config), "--data-dir", str(task_dir),
               "--task", "arc_easy", "--task", "svamp", "--task", "boolq", "--out", str(out)]

    first = _interruptible(command)
    wait_until(lambda: _lines(out) >= 3 or first.poll() is not None, timeout=240)
    assert first.poll() is None, "collect finished before the test could interrupt it"
    answered = _lines(out)
    first.send_signal(signal.SIGINT)
    signalled = time.monotonic()
    _, log = first.communicate(timeout=60)  # the generation in flight stops at its next token
    stopped_s = time.monotonic() - signalled
    assert first.returncode == 130, log
    assert "rerun the same command to resume" in log
    done_before = len(read_rows(out))
    # The prompt in flight is dropped, or recorded whole if it finished before the signal landed.
    assert answered <= done_before <= answered + 1 < 10, (answered, done_before, stopped_s)

    second = subprocess.run(command, capture_output=True, text=True, timeout=420)
    assert second.returncode == 0, second.stderr
    assert f"small: {10 - done_before}/{10 - done_before} (100%)" in second.stderr
    assert "ETA" in second.stderr

    rows = read_rows(out)
    assert len(out.read_text().splitlines()) == len(rows) == 10  # compacted, one per prompt
    assert {row["kind"] for row in rows.values()} == {"choice", "number", "yesno"}
    results = {row_id: row["models"]["small"] for row_id, row in rows.items()}
    failed = {row_id for row_id, r in results.items() if r.get("error")}
    assert failed == {"boolq:2"}
    assert results["boolq:2"]["quality"] is None and "context" in results["boolq:2"]["error"]
    for row_id, result in results.items():
        if row_id in failed:
            continue
        assert result["quality"] in (0.0, 1.0) and result["graded_by"] == "rule"
        assert result["model_id"] == "qwen2.5-coder-0.5b-instruct-q4_k_m"
        assert result["prompt_tokens"] > 10 and result["completion_tokens"] >= 1
        assert result["latency_s"] > 0 and result["joules"] > 0
        assert result["energy_source"] == "estimate"
        if result["latency_s"] >= 1.0:  # long enough for /proc's 10 ms ticks (evals/load.py)
            assert set(result["load"]) == {"others_cores", "steal_cores"}
            assert min(result["load"].values()) >= 0
        assert set(result["features"]) >= {"lp_mean", "lp_min", "lp_first", "entropy_mean"}
        assert result["features"]["lp_min"] <= result["features"]["lp_mean"] <= 0

    third = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert third.returncode == 0  # only the refused prompt is tried again
    assert "small: 1/1 (100%)" in third.stderr
