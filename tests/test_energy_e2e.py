"""End to end: real requests through a real gateway on the embedded SmolLM2 model, an energy
ledger in a real SQLite file, and `greenroute report` reading it.

One gateway run serves the whole module: a non-streamed and a streamed request alone (their
energy as the client sees it), then 50 concurrent requests; then the gateway is stopped, which
flushes the ledger, and the tests read the database it left.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import GREENROUTE, REPO, start_gateway, stop_gateway

from greenroute.gateway.cli import main

CONCURRENT = 50
TIER = ('[[tiers]]\nname = "tiny"\nbackend = "llamacpp"\nweights = "tiny"\ncontext = 512\n'
        'max_queue = 64\nthreads = 1\nenergy_hint = 1.0\n')


def _ask(client: openai.OpenAI, index: int) -> str:
    """One request of a mix: chat, streamed chat, text completion. Returns its request id."""
    kind = index % 3
    if kind == 0:
        raw = client.chat.completions.with_raw_response.create(
            model="tiny", messages=[{"role": "user", "content": f"Say {index}."}],
            max_tokens=3, temperature=0)
        return raw.headers["x-request-id"]
    if kind == 1:
        with client.chat.completions.with_streaming_response.create(
                model="tiny", messages=[{"role": "user", "content": f"Count to {index}."}],
                max_tokens=3, temperature=0, stream=True) as response:
            for _ in response.iter_lines():
                pass
            return response.headers["x-request-id"]
    raw = client.completions.with_raw_response.create(
        model="tiny", prompt=f"{index} plus one is", max_tokens=3, temperature=0)
    return raw.headers["x-request-id"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("energy")
    db = tmp / "ledger.db"
    config = (f'[ledger]\npath = "{db}"\n\n[energy]\ninterval_ms = 50\nperiod_s = 1.0\n\n'
              f'{TIER}')
    gateway = start_gateway(config, tmp)
    result: dict[str, Any] = {"db": db, "tmp": tmp, "config": tmp / "gateway.toml"}
    try:
        client = openai.OpenAI(base_url=gateway.url, api_key="x", max_retries=0, timeout=120)
        raw = client.chat.completions.with_raw_response.create(
            model="tiny", messages=[{"role": "user", "content": "What is 2 + 2?"}],
            max_tokens=6, temperature=0)
        result["plain"] = {"headers": dict(raw.headers), "completion": raw.parse()}
        chunks = list(client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Name a color."}],
            max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True}))
        result["stream"] = chunks
        with ThreadPoolExecutor(CONCURRENT) as pool:
            result["ids"] = list(pool.map(lambda i: _ask(client, i), range(CONCURRENT)))
    finally:
        stop_gateway(gateway)
    result["log"] = gateway.log.read_text()
    return result


def _rows(db: Path, query: str, *args: Any) -> list[sqlite3.Row]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
        connection.row_factory = sqlite3.Row
        return connection.execute(query, args).fetchall()


def test_a_non_streamed_answer_carries_its_energy(run: dict[str, Any]) -> None:
    headers, completion = run["plain"]["headers"], run["plain"]["completion"]
    joules = float(headers["x-greenroute-energy-joules"])
    assert joules > 0
    assert headers["x-greenroute-energy-source"] == "estimate"
    assert completion.usage.model_extra["energy_joules"] == pytest.approx(joules, abs=1e-6)
    # Alone on the device, its energy is final when it is answered: the ledger agrees.
    row, = _rows(run["db"], "SELECT * FROM requests WHERE id = ?", headers["x-request-id"])
    assert row["joules"] == pytest.approx(joules, abs=1e-6)


def test_a_stream_reports_energy_in_its_final_usage_chunk(run: dict[str, Any]) -> None:
    usage = run["stream"][-1].usage
    assert run["stream"][-1].choices == []
    assert usage.model_extra["energy_joules"] > 0
    assert all(c.usage is None for c in run["stream"][:-1])


def test_fifty_concurrent_requests_make_fifty_rows_with_tokens_and_joules(
        run: dict[str, Any]) -> None:
    ids = run["ids"]
    assert len(set(ids)) == CONCURRENT
    marks = ",".join("?" * len(ids))
    rows = _rows(run["db"], f"SELECT * FROM requests WHERE id IN ({marks})", *ids)
    assert len(rows) == CONCURRENT
    for row in rows:
        assert row["status"] == 200 and row["error"] is None
        assert row["answered_by"] == "tiny" and row["route"] == "direct"
        assert row["prompt_tokens"] > 0 and 0 < row["completion_tokens"] <= 3
        assert row["joules"] > 0
        assert row["joules_per_token"] == pytest.approx(row["joules"] / row["completion_tokens"])
        assert row["energy_source"] == "estimate"
        assert row["latency_ms"] > 0 and row["ttft_ms"] is not None
        assert row["prompt_text"] is None and row["answer_text"] is None  # privacy by default
    streamed = [r for r in rows if r["stream"]]
    assert len(streamed) == len(range(1, CONCURRENT, 3))
    attempts = _rows(run["db"], f"SELECT * FROM request_models WHERE request_id IN ({marks})",
                     *ids)
    assert len(attempts) == CONCURRENT
    by_id = {r["id"]: r for r in rows}
    for attempt in attempts:
        assert attempt["tier"] == "tiny" and attempt["answered"] == 1
        assert attempt["joules"] == pytest.approx(by_id[attempt["request_id"]]["joules"])
        assert attempt["device"] == "cpu:process"


def test_attributed_plus_idle_equals_the_meters_delta(run: dict[str, Any]) -> None:
    requests = _rows(run["db"], "SELECT sum(joules) AS j, count(*) AS n FROM requests")[0]
    assert requests["n"] == CONCURRENT + 2
    periods = _rows(run["db"], "SELECT * FROM device_energy ORDER BY started")
    assert len(periods) >= 2  # 1 s periods over a run of several seconds
    delta = periods[-1]["counter_end_j"] - periods[0]["counter_start_j"]
    idle = sum(p["idle_j"] for p in periods)
    assert sum(p["measured_j"] for p in periods) == pytest.approx(delta, rel=1e-9)
    for previous, period in itertools.pairwise(periods):  # contiguous: nothing left out
        assert period["counter_start_j"] == pytest.approx(previous["counter_end_j"])
    assert requests["j"] + idle == pytest.approx(delta, rel=0.01)
    assert sum(p["attributed_j"] for p in periods) == pytest.approx(requests["j"], rel=1e-6)


def _report(run: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    """`greenroute report` as a user runs it: its own process."""
    return subprocess.run([GREENROUTE, "report", "--db", str(run["db"]), *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def _report_here(run: dict[str, Any], capsys: pytest.CaptureFixture[str], *args: str
                 ) -> subprocess.CompletedProcess[str]:
    """The same command line through the CLI's entry point in this process (no interpreter
    start and imports per call); the real process is tested above and below."""
    capsys.readouterr()
    code = main(["report", "--db", str(run["db"]), *args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["greenroute", "report"], code, out, err)


def test_report_prints_the_table(run: dict[str, Any]) -> None:
    done = _report(run, "--config", str(run["config"]))
    assert done.returncode == 0, done.stderr
    assert "GreenRoute energy report" in done.stdout
    assert "by model" in done.stdout and "tiny" in done.stdout
    assert "estimate" in done.stdout
    assert "savings vs always 'tiny'" in done.stdout


def test_report_json_matches_the_rows(run: dict[str, Any],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    done = _report_here(run, capsys, "--format", "json", "--by", "model,route,hour",
                        "--grid-intensity", "500")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    rows = _rows(run["db"], "SELECT * FROM requests")
    totals = report["totals"]
    assert totals["requests"] == len(rows)
    assert totals["prompt_tokens"] == sum(r["prompt_tokens"] for r in rows)
    assert totals["completion_tokens"] == sum(r["completion_tokens"] for r in rows)
    joules = sum(r["joules"] for r in rows)
    assert totals["joules"] == pytest.approx(joules)
    assert totals["joules_per_token"] == pytest.approx(
        joules / sum(r["completion_tokens"] for r in rows))
    assert totals["wh_per_1k_requests"] == pytest.approx(joules / 3600 / len(rows) * 1000)
    assert totals["gco2"] == pytest.approx(joules / 3.6e6 * 500)
    assert totals["energy_sources"] == ["estimate"]
    periods = _rows(run["db"], "SELECT sum(idle_j) AS idle, sum(measured_j) AS m "
                               "FROM device_energy")[0]
    assert totals["idle_joules"] == pytest.approx(periods["idle"])
    assert totals["efficiency_ratio"] == pytest.approx((periods["m"] - periods["idle"])
                                                       / periods["m"])
    model, = report["breakdowns"]["model"]
    assert model["model"] == "tiny" and model["requests"] == len(rows)
    assert sum(h["requests"] for h in report["breakdowns"]["hour"]) == len(rows)
    # No config: no tier is known to be the largest, and the report says so.
    assert report["savings"]["largest_tier"] is None


def test_report_window_excludes_rows_outside_it(run: dict[str, Any],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    done = _report_here(run, capsys, "--format", "json", "--from", "2001-01-01",
                        "--to", "2001-01-02")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["totals"]["requests"] == 0


def test_report_csv_and_plot(run: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    png = run["tmp"] / "energy.png"
    done = _report_here(run, capsys, "--format", "csv", "--plot", str(png))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("dimension,group,requests")
    assert lines[1].startswith(f"total,,{CONCURRENT + 2},")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (1200, 450)
        assert len(image.getcolors(1 << 20) or []) > 10  # drawn, not blank


def test_report_never_writes_to_the_database(run: dict[str, Any],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    db = run["db"]
    before = db.read_bytes()
    db.chmod(0o444)
    try:
        done = _report_here(run, capsys, "--format", "json")
    finally:
        db.chmod(0o644)
    assert done.returncode == 0, done.stderr
    assert db.read_bytes() == before


def test_report_on_a_missing_database_is_a_clear_error(tmp_path: Path) -> None:
    done = subprocess.run([GREENROUTE, "report", "--db", str(tmp_path / "none.db")],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 2
    assert "no ledger at" in done.stderr
    assert not (tmp_path / "none.db").exists()
