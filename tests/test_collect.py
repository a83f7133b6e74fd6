"""`greenroute collect` end to end on the embedded small model (Qwen2.5-Coder-0.5B): three task
kinds, an interruption and a resume, and a prompt its backend refuses."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from shared_data import SHARED_TASKS

from greenroute.backends import weights
from greenroute.evals.outcomes import read_rows

GREENROUTE = str(Path(sys.executable).parent / "greenroute")


def _head(name: str, count: int) -> list[dict]:
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


def test_collect_resumes_after_interruption_and_records_a_failed_row(
        small_weights: Path, task_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "tiers.toml"
    config.write_text('[[tiers]]\nname = "small"\nbackend = "llamacpp"\nweights = "small"\n'
                      'context = 1024\n')
    out = tmp_path / "outcomes.jsonl"
    command = [GREENROUTE, "collect", "--config", str(config), "--data-dir", str(task_dir),
               "--task", "arc_easy", "--task", "svamp", "--task", "boolq", "--out", str(out)]

    first = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None:
        if out.exists() and len(out.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    first.send_signal(signal.SIGINT)
    _, log = first.communicate(timeout=60)
    assert first.returncode == 130, log
    assert "rerun the same command to resume" in log
    done_before = len(read_rows(out))
    assert 3 <= done_before < 10

    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
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
        assert set(result["features"]) >= {"lp_mean", "lp_min", "lp_first", "entropy_mean"}
        assert result["features"]["lp_min"] <= result["features"]["lp_mean"] <= 0

    third = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert third.returncode == 0  # only the refused prompt is tried again
    assert "small: 1/1 (100%)" in third.stderr
