"""`greenroute outcomes import` and `greenroute eval`, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image
from routing_fixtures import WORDS, static_encoder
from shared_data import SHARED_MMLU

from greenroute.evals.outcomes import OutcomeError, OutcomeWriter, compact, import_table, read_rows

GREENROUTE = str(Path(sys.executable).parent / "greenroute")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GREENROUTE, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def mmlu_table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mmlu") / "mmlu.jsonl"
    done = _run("outcomes", "import", str(SHARED_MMLU), "--prompt-field", "question,choices",
                "--model", "mixtral=mixtral_8x7b_correct", "--model", "gpt4=gpt4_1106_correct",
                "--id-field", "mmlu_test_line", "--task-field", "subject", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "14042 prompts" in done.stdout
    return out


def test_eval_on_shared_mmlu_prints_every_metric_and_writes_files(mmlu_table: Path,
                                                                   tmp_path: Path) -> None:
    done = _run("eval", "--outcomes", str(mmlu_table), "--policy", "length", "--out",
                str(tmp_path / "eval"))
    assert done.returncode == 0, done.stderr
    for word in ("APGR", "CPT(50%)", "AIQ", "saved @95%", "length", "random", "oracle",
                 "only large right 2497", "only small right 742"):
        assert word in done.stdout
    result = json.loads((tmp_path / "eval/metrics.json").read_text())
    policies = result["policies"]
    assert policies["oracle"]["whole"]["cpt50"] == pytest.approx(878 / 14042)
    assert policies["random"]["whole"]["apgr"] == pytest.approx(0.5)
    assert len(policies["length"]["folds"]) == 5
    assert 0.4 < policies["length"]["mean"]["apgr"] < 0.8  # better than random, below oracle
    assert result["energy_source"] == {"mixtral": "profile", "gpt4": "profile"}
    summary = (tmp_path / "eval/summary.md").read_text()
    assert "| oracle |" in summary and "quality_energy.png" in summary
    for name in ("quality_energy.png", "quality_share.png"):
        height, width, _ = image.imread(tmp_path / "eval" / name).shape
        assert (width, height) == (1020, 540)


def test_import_reads_routellm_csv_strings_and_eval_names_the_pair(tmp_path: Path) -> None:
    source = tmp_path / "routellm.csv"
    lines = ["prompt,gpt-4-1106-preview,mixtral-8x7b-instruct-v0.1"]
    lines += [f'"question {i}",{"True" if i % 8 else "False"},{"True" if i % 2 else "False"}'
              for i in range(40)]
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    count = import_table(source, out, prompt_field="prompt",
                         model_fields={"weak": "mixtral-8x7b-instruct-v0.1",
                                       "strong": "gpt-4-1106-preview"})
    assert count == 40
    rows = read_rows(out)
    assert rows["routellm:1"]["models"] == {"weak": {"quality": 1.0, "graded_by": "import"},
                                            "strong": {"quality": 1.0, "graded_by": "import"}}
    assert rows["routellm:8"]["models"]["strong"]["quality"] == 0.0
    done = _run("eval", "--outcomes", str(out), "--folds", "4")
    assert done.returncode == 0, done.stderr
    assert "small = weak" in done.stdout and "large = strong" in done.stdout


def test_import_refuses_values_that_are_not_outcomes(tmp_path: Path) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_text(json.dumps({"q": "x", "a": "maybe"}) + "\n")
    with pytest.raises(OutcomeError, match="record 1"):
        import_table(source, tmp_path / "o.jsonl", prompt_field="q", model_fields={"m": "a"})
    done = _run("eval", "--outcomes", str(tmp_path / "missing.jsonl"))
    assert done.returncode == 2 and "greenroute eval:" in done.stderr


def test_appended_lines_merge_and_a_truncated_last_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "o.jsonl"
    writer = OutcomeWriter(path)
    writer.append({"id": "t:1", "task": "t", "prompt": "line\u2028break",
                   "models": {"a": {"quality": 1}}})
    writer.append({"id": "t:2", "task": "t", "prompt": "p", "models": {"a": {"quality": 0}}})
    writer.append({"id": "t:1", "task": "t", "prompt": "line\u2028break",
                   "models": {"b": {"quality": 0}}})
    writer.close()
    with path.open("a") as f:
        f.write('{"v": 1, "id": "t:3", "mod')  # killed mid-write
    rows = read_rows(path)
    assert list(rows) == ["t:1", "t:2"]
    assert rows["t:1"]["models"] == {"a": {"quality": 1}, "b": {"quality": 0}}
    assert rows["t:1"]["prompt"] == "line\u2028break"
    assert compact(path) == 2
    assert len(path.read_text().split("\n")) == 3  # two lines and the final newline
    path.write_text('{"v": 2, "id": "x"}\n')
    with pytest.raises(OutcomeError, match="schema version 2"):
        read_rows(path)


def test_regrade_applies_todays_graders_to_stored_answers(tmp_path: Path) -> None:
    path = tmp_path / "o.jsonl"
    stale = {"quality": 0.0, "answer": None, "graded_by": "rule", "output": "Answer: 72"}
    judged = {"quality": 0.6, "graded_by": "judge:large", "output": "whatever"}
    writer = OutcomeWriter(path)
    writer.append({"id": "gsm8k:0", "task": "gsm8k", "kind": "number", "prompt": "p",
                   "models": {"small": stale, "large": {**stale, "quality": 1.0,
                                                        "answer": "72"}}})
    writer.append({"id": "mt_bench:0", "task": "mt_bench", "kind": "open", "prompt": "q",
                   "models": {"small": judged}})
    writer.close()
    done = _run("outcomes", "regrade", str(path))
    assert done.returncode == 0, done.stderr
    assert "1 result(s) graded differently" in done.stdout
    rows = read_rows(path)
    assert rows["gsm8k:0"]["models"]["small"]["quality"] == 1.0  # gold of gsm8k:0 is 72
    assert rows["gsm8k:0"]["models"]["small"]["answer"] == "72"
    assert rows["mt_bench:0"]["models"]["small"] == judged  # judge grades are left alone


def test_summary_counts_per_task(tmp_path: Path) -> None:
    path = tmp_path / "o.jsonl"
    writer = OutcomeWriter(path)
    for i, (small, large) in enumerate([(1, 1), (0, 1), (0, 1), (1, 0)]):
        writer.append({"id": f"t:{i}", "task": "arith" if i < 2 else "quiz", "prompt": "p",
                       "models": {"small": {"quality": small, "joules": 1.0},
                                  "large": {"quality": large, "joules": 3.0}}})
    writer.close()
    done = _run("outcomes", "summary", str(path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("| task | prompts | small quality | large quality |")
    assert "| arith | 2 | 0.500 | 1.000 | 1.0 | 3.0 | 1 | 0 |" in lines
    assert "| quiz | 2 | 0.500 | 0.500 | 1.0 | 3.0 | 1 | 1 |" in lines
    assert "| **all** | 4 | 0.500 | 0.750 | 1.0 | 3.0 | 2 | 1 |" in lines


def _planted_table(tmp_path: Path, n: int = 800) -> Path:
    """An outcome table whose prompts tell which tier is needed: the small tier is right on
    prompts with the word w1 (and a few others), the large one nearly always."""
    rng = np.random.default_rng(0)
    lines = ["prompt,small_right,large_right"]
    for i in range(n):
        words = list(rng.choice(WORDS[1:], 5))
        easy = i % 2 == 0
        if easy:
            words[rng.integers(5)] = "w1"
        small = easy or rng.random() < 0.1
        large = rng.random() < 0.95
        lines.append(f"p{i} {' '.join(words)},{small},{large}")
    source = tmp_path / "planted.csv"
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "planted.jsonl"
    import_table(source, out, prompt_field="prompt",
                 model_fields={"small": "small_right", "large": "large_right"})
    return out


def test_train_calibrates_every_prompt_out_of_fold_and_eval_prices_the_guarantee(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the embedding cache
    table = _planted_table(tmp_path)
    encoder = static_encoder(tmp_path / "encoder")
    done = _run("train", "--outcomes", str(table), "--kind", "logistic", "--encoder",
                str(encoder.directory), "--targets", "0.9,0.95", "--delta", "0.1,0.3",
                "--out", str(tmp_path / "router"))
    assert done.returncode == 0, done.stderr
    assert "calibrated on 800 prompts' out-of-fold outcomes" in done.stdout
    manifest = json.loads((tmp_path / "router/manifest.json").read_text())
    assert manifest["delta"] == 0.1
    assert manifest["training"]["calibration_prompts"] == 800
    assert manifest["training"]["calibration"] == "cross-fitted, 5 folds"
    assert set(manifest["thresholds_by_delta"]) == {"0.1", "0.3"}
    assert manifest["thresholds"] == manifest["thresholds_by_delta"]["0.1"]
    assert manifest["thresholds"]["0.90"] is not None  # the signal is strong: it routes

    done = _run("eval", "--outcomes", str(table), "--kind", "logistic", "--encoder",
                str(encoder.directory), "--targets", "0.9,0.95", "--no-cascade", "--out",
                str(tmp_path / "eval"))
    assert done.returncode == 0, done.stderr
    assert "ideal saved" in done.stdout and "price of the guarantee" in done.stdout
    rows = json.loads((tmp_path / "eval/metrics.json").read_text())["targets"]
    assert [row["target"] for row in rows] == [0.9, 0.95]
    for row in rows:
        assert len(row["ideal_saved"]) == 5
        # the best threshold on the held-out fold itself saves at least what a threshold
        # chosen beforehand does, whenever that one met the target there too
        for ideal, saved, quality in zip(row["ideal_saved"], row["energy_saved"],
                                         row["quality_ratio"], strict=True):
            assert ideal >= saved - 1e-9 or quality < row["target"]
        assert row["price"] == pytest.approx(np.mean(row["ideal_saved"])
                                             - np.mean(row["energy_saved"]))
    done = _run("train", "--outcomes", str(table), "--encoder", str(encoder.directory),
                "--delta", "1.5", "--out", str(tmp_path / "bad"))
    assert done.returncode == 2 and "delta" in done.stderr
