"""Carbon over time: grid-intensity files (Electricity Maps' CSV, Ember's long CSV, plain and
vendor JSON), each ledger row's intensity and gCO2 at its time, `report` summing them, and the
carbon-aware default target of model `green`, in headers and rows."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from fake_backends import FakeBackend, Reply, gateway_config, serve, tier
from routing_fixtures import handmade_artifact

from greenroute.gateway import cli
from greenroute.gateway.carbon import (
    G_PER_KWH_PER_LB_PER_MWH,
    CarbonAwareTarget,
    CarbonError,
    GridIntensity,
    load,
)

# real: Electricity Maps, Great Britain, first week of 2022 (tests/data/*.md says where from)
SAMPLE = Path(__file__).parent / "data" / "grid_intensity_gb_2022w1_electricitymaps.csv"
ESTIMATE = {"kind": "estimate"}  # joules from this process's CPU time: every row is metered


def _utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_a_real_electricity_maps_export_reads_as_a_step_per_hour() -> None:
    series = load(SAMPLE)
    assert len(series.times) == 168
    windy, still = _utc("2022-01-01 10:30:00"), _utc("2022-01-05 20:10:00")
    assert series.at(windy) == pytest.approx(37.95)  # the direct column, not the LCA one
    assert series.at(_utc("2022-01-01 10:00:00")) == series.at(windy)  # the hour's value
    assert series.at(still) == pytest.approx(194.77)  # the week's highest hour: 5.1x the lowest
    assert series.at(_utc("2020-01-01 00:00:00")) == pytest.approx(53.62)  # before: the first
    assert series.at(_utc("2030-01-01 00:00:00")) == series.values[-1]  # after: the last
    joules = 3.6e6  # one kWh
    assert series.gco2(joules, still) == pytest.approx(194.77)


def test_json_lists_and_vendor_answers(tmp_path: Path) -> None:
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps([{"timestamp": "2024-01-01T01:00:00Z", "gco2_per_kwh": 300},
                                 {"timestamp": "2024-01-01T00:00:00+00:00",
                                  "gco2_per_kwh": 100}]))
    series = load(plain)  # sorted by time
    assert series.at(_utc("2024-01-01 00:59:00")) == 100
    assert series.at(_utc("2024-01-01 01:00:00")) == 300
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([[1_700_000_000, 50.5], [1_700_003_600, 60]]))
    assert load(pairs).at(datetime.fromtimestamp(1_700_003_601, UTC)) == 60
    electricity_maps = tmp_path / "em.json"
    electricity_maps.write_text(json.dumps({"zone": "DE", "history": [
        {"zone": "DE", "carbonIntensity": 420, "datetime": "2024-01-01T00:00:00.000Z"},
        {"zone": "DE", "carbonIntensity": None, "datetime": "2024-01-01T01:00:00.000Z"}]}))
    assert load(electricity_maps).values == [420]  # a gap is skipped, not read as zero
    watttime = tmp_path / "wt.json"
    watttime.write_text(json.dumps({"data": [{"point_time": "2024-01-01T00:00:00+00:00",
                                              "value": 1000.0}],
                                    "meta": {"units": "lbs_co2_per_mwh"}}))
    assert load(watttime).values == [pytest.approx(1000 * G_PER_KWH_PER_LB_PER_MWH)]


def test_embers_long_csv_keeps_only_the_gco2_per_kwh_rows(tmp_path: Path) -> None:
    ember = tmp_path / "ember.csv"
    ember.write_text("Area,Date,Category,Variable,Unit,Value\n"
                     "Germany,2024-01-01,Power sector emissions,CO2 intensity,gCO2/kWh,380.5\n"
                     "Germany,2024-01-01,Electricity generation,Total Generation,TWh,42.1\n"
                     "Germany,2024-02-01,Power sector emissions,CO2 intensity,gCO2/kWh,350\n")
    assert load(ember).values == [380.5, 350.0]


@pytest.mark.parametrize(("name", "text", "message"), [
    ("none.csv", "Datetime (UTC),Zone Id\n2024-01-01 00:00:00,DE\n", "intensity column"),
    ("bad.csv", "timestamp,gco2_per_kwh\n2024-01-01T00:00:00Z,12\nyesterday,3\n", "bad.csv:3"),
    ("negative.csv", "timestamp,gco2_per_kwh\n2024-01-01T00:00:00Z,-1\n", "non-negative"),
    ("empty.json", "[]", "no grid-intensity readings"),
    ("units.json", '{"data": [], "meta": {"units": "kg_per_mwh"}}', "units"),
])
def test_a_file_that_is_no_series_fails_with_where(tmp_path: Path, name: str, text: str,
                                                   message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(CarbonError, match=message):
        load(path)


def _series_file(tmp_path: Path, now_value: float) -> Path:
    """An hourly series whose reading for the current hour is `now_value` (others differ)."""
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    rows = [(hour - timedelta(hours=1), 111.0), (hour, now_value),
            (hour + timedelta(hours=1), 999.0)]
    path = tmp_path / "grid.json"
    path.write_text(json.dumps([{"datetime": t.isoformat(), "carbonIntensity": v}
                                for t, v in rows]))
    return path


def _rows(db: Path) -> list[sqlite3.Row]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
        connection.row_factory = sqlite3.Row
        return connection.execute("SELECT * FROM requests").fetchall()


def _report_json(db: Path, config: Path, capsys: pytest.CaptureFixture[str],
                 *extra: str) -> Any:
    assert cli.main(["report", "--db", str(db), "--config", str(config), "--format", "json",
                     *extra]) == 0
    return orjson.loads(capsys.readouterr().out)


def test_a_grid_file_sets_each_rows_gco2_and_the_report_sums_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grid = _series_file(tmp_path, now_value=800.0)
    db = tmp_path / "ledger.db"
    energy = {"grid_intensity": str(grid), "grid_gco2_per_kwh": 436.0}
    config = gateway_config(tier("a", meter=ESTIMATE), ledger={"path": str(db)},
                            energy=energy)
    with serve(config, FakeBackend("a")) as http:
        for _ in range(5):
            assert http.post("/v1/chat/completions", json={
                "model": "a", "messages": [{"role": "user", "content": "hi"}]}).status_code == 200
    rows = _rows(db)
    assert len(rows) == 5 and all(r["joules"] is not None for r in rows)
    for row in rows:
        assert row["grid_gco2_per_kwh"] == 800.0
        assert row["gco2"] == pytest.approx(row["joules"] / 3.6e6 * 800.0)
    config_file = tmp_path / "gateway.toml"
    config_file.write_text(f'[[tiers]]\nname = "a"\nbackend = "openai"\n'
                           f'url = "http://fake.invalid/v1"\nmodel = "a"\n'
                           f'[energy]\ngrid_intensity = "{grid}"\n')
    report = _report_json(db, config_file, capsys)
    joules = sum(r["joules"] for r in rows)
    assert report["totals"]["gco2"] == pytest.approx(sum(r["gco2"] for r in rows))
    assert report["totals"]["gco2"] == pytest.approx(joules / 3.6e6 * 800.0)
    assert report["grid_intensity"] == str(grid)
    # --grid-intensity re-prices every row at the figure given
    repriced = _report_json(db, config_file, capsys, "--grid-intensity", "100")
    assert repriced["totals"]["gco2"] == pytest.approx(joules / 3.6e6 * 100.0)


def test_without_a_file_rows_store_the_constant(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    config = gateway_config(tier("a", meter=ESTIMATE), ledger={"path": str(db)},
                            energy={"grid_gco2_per_kwh": 250.0})
    with serve(config, FakeBackend("a")) as http:
        http.post("/v1/completions", json={"model": "a", "prompt": "hi"})
    (row,) = _rows(db)
    assert row["grid_gco2_per_kwh"] == 250.0 and row["target_rule"] is None
    assert row["gco2"] == pytest.approx(row["joules"] / 3.6e6 * 250.0)


# -- carbon-aware targets ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`small` is a cascade stage whose answers have confidence 0.5: kept at target 0.5
    (threshold 0.3), escalated to `large` at 0.9 (threshold 0.7)."""
    return handmade_artifact(tmp_path_factory.mktemp("router"),
                             steps=[("small", 0.6, 0.5)], largest="large", energy=[1.0, 5.0],
                             thresholds={0.5: 0.3, 0.9: 0.7, 1.0: None})


def _green(router: Path, tmp_path: Path, grid_now: float, model: str = "green"
           ) -> tuple[Any, sqlite3.Row]:
    db = tmp_path / f"ledger-{grid_now:g}-{model}.db"
    config = gateway_config(
        tier("small", 1.0), tier("large", 5.0), ledger={"path": str(db)},
        energy={"grid_intensity": str(_series_file(tmp_path, grid_now))},
        router={"path": str(router), "default_target": 0.9, "cascade_max_tokens": 64,
                "carbon_aware": {"above_gco2_per_kwh": 400, "default_target": 0.5}})
    small = FakeBackend("small", reply=Reply(text="small says Paris", logprob=-0.05))
    with serve(config, small, FakeBackend("large", reply=Reply(text="large says Paris"))) \
            as http:
        response = http.post("/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "capital of France?"}]})
        assert response.status_code == 200
    (row,) = _rows(db)
    return response, row


def test_a_dirty_grid_relaxes_the_default_target_and_says_so(router: Path,
                                                             tmp_path: Path) -> None:
    response, row = _green(router, tmp_path, grid_now=600.0)
    assert response.headers["x-greenroute-target-rule"] == "carbon:0.9->0.5@600g"
    assert response.headers["x-greenroute-quality-target"] == "0.5"
    assert response.headers["x-greenroute-model"] == "small"  # kept at 0.5
    assert (row["target_rule"], row["quality_target"], row["answered_by"]) == (
        "carbon:0.9->0.5@600g", 0.5, "small")


def test_a_clean_grid_or_a_named_target_is_left_alone(router: Path, tmp_path: Path) -> None:
    response, row = _green(router, tmp_path, grid_now=300.0)
    assert "x-greenroute-target-rule" not in response.headers
    assert (row["target_rule"], row["quality_target"], row["answered_by"]) == (
        None, 0.9, "large")  # escalated: 0.5 < 0.7
    response, row = _green(router, tmp_path, grid_now=600.0, model="green-0.9")
    assert "x-greenroute-target-rule" not in response.headers
    assert (row["target_rule"], row["quality_target"]) == (None, 0.9)


def test_the_rule_never_raises_a_target() -> None:
    rule = CarbonAwareTarget(400, 0.9, GridIntensity.constant(500))
    assert rule.relax(0.8) is None
    assert rule.relax(0.95) == (0.9, "carbon:0.95->0.9@500g")
