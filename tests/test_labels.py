"""Energy labels (`greenroute report --labels`) from a real ledger.

A real gateway (`greenroute serve`) in front of the fake OpenAI upstream, with three tiers on
three kinds of meter: `small` on the CPU-time estimate, `large` on a Prometheus meter reading a
fake DCGM exporter whose counter climbs at a constant 300 W, and `dark` on none. Requests go
to each, the gateway is stopped (which flushes the ledger to its SQLite file), and the report's
cards are checked against figures computed here from the rows with sqlite3.
"""

from __future__ import annotations

import json
import math
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import GREENROUTE, REPO, start_gateway, stop_gateway
from fake_dcgm import FakeDcgm

from greenroute.backends.fake_openai import FakeUpstream
from greenroute.gateway.cli import main
from greenroute.gateway.labels import rating, tier_labels
from greenroute.gateway.ledger.schema import AttemptRow

WATTS = 300.0
SENT = {"small": 12, "large": 8, "dark": 4}


def _outcomes(path: Path) -> Path:
    """A small outcome table: `small` by name; `echo-model` is the upstream model `echo`, so
    it scores the tiers that serve `echo` (large and dark). On `q3` small failed: left out."""
    rows = [("q0", 1.0, 1.0), ("q1", 0.0, 1.0), ("q2", 1.0, 0.0), ("q3", None, 1.0),
            ("q4", 0.0, 1.0)]
    with path.open("w") as f:
        for row_id, small, echo in rows:
            small_result = ({"error": "timeout"} if small is None
                            else {"model_id": "small-upstream", "quality": small})
            f.write(json.dumps({"v": 1, "id": row_id, "task": "t", "kind": "number",
                                "prompt": row_id, "gold": ["1"],
                                "models": {"small": small_result, "echo-model":
                                           {"model_id": "echo", "quality": echo}}}) + "\n")
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("labels")
    db = tmp / "ledger.db"
    with FakeDcgm(lambda: WATTS) as exporter, FakeUpstream() as upstream:
        tiers = {"small": 'meter = { kind = "estimate" }',
                 "large": f'meter = {{ kind = "prometheus", url = "{exporter.url}" }}',
                 "dark": ""}
        config = (f'[ledger]\npath = "{db}"\nflush_interval_s = 0.1\n\n'
                  '[energy]\ninterval_ms = 20\nperiod_s = 0.5\n\n'
                  + "".join(f'[[tiers]]\nname = "{name}"\nbackend = "openai"\n'
                            f'url = "{upstream.url}"\nmodel = "echo"\n{meter}\n\n'
                            for name, meter in tiers.items()))
        gateway = start_gateway(config, tmp)
        try:
            client = openai.OpenAI(base_url=gateway.url, api_key="x", max_retries=0,
                                   timeout=30)
            for tier, count in SENT.items():
                for index in range(count):
                    words = " ".join(["word"] * (3 + index % 5))
                    client.chat.completions.create(
                        model=tier, messages=[{"role": "user", "content": words}],
                        max_tokens=16)
        finally:
            stop_gateway(gateway)
    yield {"db": db, "tmp": tmp, "outcomes": _outcomes(tmp / "outcomes.jsonl")}


def _report(run: dict[str, Any], capsys: pytest.CaptureFixture[str],
            *args: str) -> tuple[int, str, str]:
    """`greenroute report --labels` in this process: (exit status, stdout, stderr)."""
    status = main(["report", "--db", str(run["db"]), "--labels", *args])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def cards(run: dict[str, Any]) -> dict[str, Any]:
    """The JSON report, from the installed command, with an outcome table and grid 500."""
    done = subprocess.run([GREENROUTE, "report", "--db", str(run["db"]), "--labels",
                           "--format", "json", "--grid-intensity", "500",
                           "--outcomes", str(run["outcomes"])],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def _expected(db: Path, grid: float) -> dict[str, dict[str, Any]]:
    """Each tier's card figures, straight from request_models."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
        rows = connection.execute(
            "SELECT tier, count(*), count(joules), sum(joules), "
            "sum(CASE WHEN joules IS NOT NULL THEN completion_tokens ELSE 0 END), "
            "group_concat(DISTINCT energy_source) FROM request_models GROUP BY tier").fetchall()
    expected = {}
    for tier, requests, metered, joules, tokens, sources in rows:
        expected[tier] = {"requests": requests, "metered": metered, "sources": sources}
        if metered:
            expected[tier].update(
                wh_per_1k_requests=joules / 3600 / metered * 1000,
                wh_per_1k_output_tokens=joules / 3600 / tokens * 1000,
                gco2_per_1k_requests=joules / 3.6e6 * grid / metered * 1000)
    return expected


def _by_tier(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["tier"]: c for c in report["labels"]}


def test_cards_match_the_ledger_rows(run: dict[str, Any], cards: dict[str, Any]) -> None:
    report, cards = cards, _by_tier(cards)
    expected = _expected(run["db"], 500.0)
    assert sorted(cards) == sorted(expected) == sorted(SENT)
    for tier, card in cards.items():
        assert card["requests"] == expected[tier]["requests"] == SENT[tier]
        assert card["answered"] == SENT[tier]
        assert card["metered"] == expected[tier]["metered"]
        for figure in ("wh_per_1k_requests", "wh_per_1k_output_tokens",
                       "gco2_per_1k_requests"):
            assert card[figure] == pytest.approx(expected[tier].get(figure)), (tier, figure)
    assert cards["small"]["energy_sources"] == ["estimate"] and cards["small"]["estimate"]
    assert cards["large"]["energy_sources"] == ["prometheus"] and not cards["large"]["estimate"]
    assert cards["dark"]["metered"] == 0 and cards["dark"]["energy_sources"] == []
    assert cards["dark"]["output_tokens"] > 0 and cards["dark"]["metered_output_tokens"] == 0
    assert cards["dark"]["wh_per_1k_requests"] is None and cards["dark"]["rating"] is None
    assert report["grid_gco2_per_kwh"] == 500.0
    assert any("small: energy is an estimate" in n for n in report["notes"])
    assert any("different sources" in n for n in report["notes"])


def test_ratings_follow_energy_per_output_token(run: dict[str, Any],
                                                cards: dict[str, Any]) -> None:
    report, cards = cards, _by_tier(cards)
    per_token = {t: e["wh_per_1k_output_tokens"] for t, e in _expected(run["db"], 1).items()
                 if e["metered"]}
    best = min(per_token, key=per_token.__getitem__)
    assert cards[best]["rating"] == "A" and cards[best]["relative_to_best"] == pytest.approx(1)
    for tier, value in per_token.items():
        ratio = value / per_token[best]
        assert cards[tier]["relative_to_best"] == pytest.approx(ratio)
        assert cards[tier]["rating"] == "ABCDE"[min(int(math.log2(ratio)), 4)]
    worse, better = sorted(per_token, key=per_token.__getitem__, reverse=True)
    assert cards[worse]["rating"] >= cards[better]["rating"]  # later letters: more energy
    # The cards come most efficient first, the unrated last.
    assert [c["tier"] for c in report["labels"]] == [better, worse, "dark"]


def test_rating_scale_doubles_per_letter() -> None:
    assert [rating(r) for r in (1.0, 1.99, 2.0, 3.99, 4.0, 8.0, 15.9, 16.0, 1e6)] == \
        ["A", "A", "B", "B", "C", "D", "D", "E", "E"]


def test_quality_comes_from_the_outcome_table(cards: dict[str, Any]) -> None:
    cards = _by_tier(cards)
    # Over q0, q1, q2, q4 (q3 failed for small): small 2/4, echo-model 3/4.
    assert cards["small"]["quality"] == {"model": "small", "mean": 0.5, "prompts": 4}
    assert cards["large"]["quality"] == {"model": "echo-model", "mean": 0.75, "prompts": 4}
    assert cards["dark"]["quality"] == cards["large"]["quality"]  # the same upstream model


def test_table_shows_the_source_and_plot_writes_the_cards(
        run: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    png = run["tmp"] / "labels.png"
    status, text, err = _report(run, capsys, "--plot", str(png),
                                "--outcomes", str(run["outcomes"]))
    assert status == 0, err
    assert "GreenRoute energy labels" in text
    assert "ESTIMATE: CPU time x watts per core, not a measurement" in text
    assert "measured: prometheus" in text and "not metered" in text
    assert "Wh / 1,000 output tokens" in text and "quality 0.750" in text
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (1300, 600)  # three 4-inch cards
        assert len(image.getcolors(1 << 20) or []) > 10  # drawn, not blank


def test_csv_has_one_row_per_tier(run: dict[str, Any],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = _report(run, capsys, "--format", "csv")
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("tier,rating,relative_to_best,wh_per_1k_requests")
    assert sorted(line.split(",")[0] for line in lines[1:]) == sorted(SENT)


def test_the_window_applies_to_the_cards(run: dict[str, Any],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = _report(run, capsys, "--format", "json", "--from", "2001-01-01",
                               "--to", "2001-01-02")
    assert status == 0, err
    assert json.loads(out)["labels"] == []
    status, out, err = _report(run, capsys, "--format", "json", "--since", "1h")
    assert status == 0, err
    assert len(json.loads(out)["labels"]) == len(SENT)


def test_a_bad_outcome_table_is_a_clear_error(run: dict[str, Any],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    bad = run["tmp"] / "bad.jsonl"
    bad.write_text('{"v": 9, "id": "x", "models": {}}\n{"v": 1}\n')
    status, _, err = _report(run, capsys, "--outcomes", str(bad))
    assert status == 2
    assert "schema version 9" in err


def test_an_outcome_table_that_names_no_tier_is_a_clear_error(
        run: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    other = run["tmp"] / "other.jsonl"
    other.write_text(json.dumps({"v": 1, "id": "q", "task": "t", "prompt": "q", "gold": [],
                                 "models": {"gpt": {"model_id": "gpt-x", "quality": 1.0}}}))
    status, _, err = _report(run, capsys, "--outcomes", str(other))
    assert status == 2
    assert "no tier (small, large, dark) is one of its models (gpt)" in err
    status, _, err = _report(run, capsys, "--outcomes", str(run["tmp"] / "missing.jsonl"))
    assert status == 2 and "no outcome rows in" in err


def test_each_call_is_priced_at_its_own_requests_grid_intensity() -> None:
    """A ledger written with a grid-intensity file stores each request's intensity: the cards
    price each call at it, and at the report's grid only where a request has none."""
    calls = [AttemptRow(request_id=f"r{i}", position=0, tier="small", joules=3.6e3,
                        completion_tokens=10, answered=True) for i in range(3)]
    stored = {"r0": 100.0, "r1": 800.0}  # r2 has none: the report's grid (400)
    card = tier_labels(calls, 400.0, stored)[0]
    # 3.6 kJ = 1 Wh = 0.001 kWh per call: 0.1 + 0.8 + 0.4 gCO2 over 3 requests
    assert card.gco2_per_1k_requests == pytest.approx((0.1 + 0.8 + 0.4) / 3 * 1000)
    assert tier_labels(calls, 400.0)[0].gco2_per_1k_requests == pytest.approx(400.0)
