"""Two real `greenroute serve` processes in front of one fake vLLM server whose GPU a fake DCGM
exporter meters: the server's token counters are the denominator, so the fleet attributes the
energy once, not once per process (docs/energy.md, *Across processes*)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import GREENROUTE, start_gateway, stop_gateway
from fake_dcgm import FakeDcgm

from greenroute.backends.fake_openai import FakeUpstream

LOAD_S = 3.0
# The exporter answers this long after reading its counter, as a real one on a busy node may:
# tokens reported during the scrape must go to the next interval (with 0.08 s, before the
# sampler cut its interval ahead of the scrapes, the fleet attributed only 0.65-0.72 of the
# busy energy: the rest went to "other clients")
SCRAPE_S = 0.03


def _tier(upstream: str, exporter: str, server_metrics: str) -> str:
    return (f'[[tiers]]\nname = "gpu"\nbackend = "openai"\nurl = "{upstream}"\nmodel = "paced"\n'
            f'meter = {{ kind = "prometheus", url = "{exporter}", gpus = [0], '
            f'server_metrics = "{server_metrics}" }}\n')


def _load(url: str, workers: int, until: float) -> None:
    def loop(index: int) -> None:
        with httpx.Client(timeout=30) as client:
            n = 0
            while time.monotonic() < until:
                n += 1
                response = client.post(url + "/chat/completions", json={
                    "model": "gpu", "stream": n % 2 == 0,
                    "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": " ".join(["w"] * (2 + n % 7))}]})
                assert response.status_code == 200, response.text

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(loop, range(workers)))


def _ledger(db: Path) -> dict[str, float]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
        measured, attributed, idle, other = connection.execute(
            "SELECT sum(measured_j), sum(attributed_j), sum(idle_j), sum(other_j) "
            "FROM device_energy").fetchone()
        tokens, joules, rows = connection.execute(
            "SELECT sum(prompt_tokens + completion_tokens), sum(joules), count(*) "
            "FROM requests").fetchone()
    return {"measured": measured, "attributed": attributed, "idle": idle, "other": other,
            "tokens": tokens, "request_joules": joules, "rows": rows}


def _run(tmp: Path, server_metrics: str, one_ledger: bool = False) -> dict[str, Any]:
    with FakeUpstream() as upstream:
        record = upstream.record
        with FakeDcgm(lambda: 50.0 + 20.0 * record.running, delay_s=SCRAPE_S) as exporter:
            config = _tier(upstream.url, exporter.url, server_metrics)
            gateways = []
            for name in ("a", "b"):
                db = tmp / ("shared.db" if one_ledger else f"{name}-{server_metrics}.db")
                gateways.append((db, start_gateway(
                    f'[ledger]\npath = "{db}"\n\n[energy]\ninterval_ms = 50\nperiod_s = 1\n\n'
                    f'{config}', tmp, name=f"{name}-{server_metrics}")))
            try:
                time.sleep(0.3)
                start_j, start_tokens = exporter.joules, (record.prompt_tokens
                                                          + record.generation_tokens)
                until = time.monotonic() + LOAD_S
                # process a gets 3 concurrent clients, process b 1: unequal shares
                threads = [threading.Thread(target=_load, args=(g.url, n, until))
                           for (_, g), n in zip(gateways, (3, 1), strict=True)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                time.sleep(0.3)
            finally:
                for _, gateway in gateways:
                    stop_gateway(gateway)
            server_tokens = record.prompt_tokens + record.generation_tokens - start_tokens
            if one_ledger:
                return {"db": gateways[0][0]}
            ledgers = [_ledger(db) for db, _ in gateways]
            return {"ledgers": ledgers, "load_j": exporter.joules - start_j,
                    "server_tokens": server_tokens, "dbs": [db for db, _ in gateways]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("fleet")
    yield {"auto": _run(tmp, "auto"), "off": _run(tmp, "off"),
           "one ledger": _run(tmp, "auto", one_ledger=True)}


def test_the_fleet_attributes_the_measured_energy_once(runs: dict[str, Any]) -> None:
    a, b = runs["auto"]["ledgers"]
    for ledger in (a, b):  # each process's own books balance exactly
        assert ledger["attributed"] + ledger["idle"] + ledger["other"] == pytest.approx(
            ledger["measured"], rel=1e-9)
        assert ledger["request_joules"] == pytest.approx(ledger["attributed"], rel=1e-6)
    # Both read the same counter; they started and stopped at different times, but outside
    # the load both saw only idle. So each one's busy energy (measured - idle = attributed +
    # other clients) is the same, and the fleet's attributed energy must add up to it: the
    # fleet's attributed + idle + other-than-the-fleet's = measured.
    busy = [ledger["measured"] - ledger["idle"] for ledger in (a, b)]
    fleet = a["attributed"] + b["attributed"]
    print(f"\nserver counters: busy energy {busy[0]:.1f} J (a), {busy[1]:.1f} J (b); fleet "
          f"attributed {fleet:.1f} J ({fleet / (sum(busy) / 2):.4f} of busy)")
    # The two processes' samplers open and settle their periods at different moments, so each
    # sees the busy energy over a slightly different window (1.1% apart seen once in 5 runs);
    # the acceptance bound is the fleet's total against the busy energy, within 1%.
    assert busy[0] == pytest.approx(busy[1], rel=0.02)
    assert fleet == pytest.approx(sum(busy) / 2, rel=0.01)
    print(f"a: other clients {a['other']:.1f} J, b attributed {b['attributed']:.1f} J; "
          f"b: other clients {b['other']:.1f} J, a attributed {a['attributed']:.1f} J")
    assert a["other"] == pytest.approx(b["attributed"], rel=0.1)
    assert b["other"] == pytest.approx(a["attributed"], rel=0.1)


def test_each_process_gets_its_share_of_the_servers_tokens(runs: dict[str, Any]) -> None:
    a, b = runs["auto"]["ledgers"]
    token_share = a["tokens"] / (a["tokens"] + b["tokens"])
    energy_share = a["attributed"] / (a["attributed"] + b["attributed"])
    print(f"\nprocess a: {token_share:.4f} of the tokens, {energy_share:.4f} of the energy")
    assert 0.55 < token_share < 0.9  # the load really was unequal
    assert energy_share == pytest.approx(token_share, abs=0.02)


def test_without_the_server_counters_each_process_counts_it_all(runs: dict[str, Any]) -> None:
    """The old behaviour (server_metrics = "off"): every process splits the whole counter among
    its own requests, so the fleet attributes about twice what was measured."""
    for run in ("auto", "off"):  # the fleet's attributed energy over the meter's during load
        a, b = runs[run]["ledgers"]
        factor = (a["attributed"] + b["attributed"]) / runs[run]["load_j"]
        print(f"\nserver_metrics = {run}: fleet attributed {factor:.3f} x the load's energy")
    assert a["other"] == b["other"] == 0
    # About 1.85 on a quiet machine (docs/energy.md); 1.59 in a fresh clone's CI run on a
    # machine running twice as slow (2026-12-07), where process b's single client left more
    # gaps between its requests, and b's gaps go to its idle, not to the over-count. The
    # counters' mode meets the load's energy within 1% on the same load (above).
    assert factor > 1.4


def test_the_report_shows_the_other_clients_energy(runs: dict[str, Any]) -> None:
    db = runs["auto"]["dbs"][0]
    out = subprocess.run([GREENROUTE, "report", "--db", str(db), "--format", "json"],
                         capture_output=True, text=True, check=True).stdout
    totals = json.loads(out)["totals"]
    ledger = runs["auto"]["ledgers"][0]
    assert totals["other_clients_joules"] == pytest.approx(ledger["other"])
    assert totals["efficiency_ratio"] == pytest.approx(
        ledger["attributed"] / (ledger["measured"] - ledger["other"]))
    table = subprocess.run([GREENROUTE, "report", "--db", str(db)], capture_output=True,
                           text=True, check=True).stdout
    assert "other clients" in table


def test_a_ledger_both_processes_write_counts_the_device_once(runs: dict[str, Any]) -> None:
    """Both write their device periods into one ledger; the report takes the counter's energy
    once over the union of their time, and adds up their requests' (gateway/device_totals)."""
    db = runs["one ledger"]["db"]
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
        readers = connection.execute(
            "SELECT reader, host, sum(measured_j), sum(attributed_j), sum(idle_j) "
            "FROM device_energy GROUP BY reader").fetchall()
        request_joules = connection.execute("SELECT sum(joules) FROM requests").fetchone()[0]
    assert len(readers) == 2 and all(host for _, host, *_ in readers)
    measured = [m for _, _, m, _, _ in readers]
    out = subprocess.run([GREENROUTE, "report", "--db", str(db), "--format", "json"],
                         capture_output=True, text=True, check=True).stdout
    report = json.loads(out)
    totals, (device,) = report["totals"], report["devices"]
    print(f"\nper reader measured {measured[0]:.1f} J, {measured[1]:.1f} J; the report: "
          f"{totals['device_measured_joules']:.1f} J measured, "
          f"{totals['device_attributed_joules']:.1f} J attributed, "
          f"{totals['idle_joules']:.1f} J idle, {totals['other_clients_joules']:.1f} J other")
    assert device["readers"] == 2
    # the union of two spans that overlap but for the processes' start-up and shutdown: at
    # least the longer one, far from both added up (which the report gave before)
    assert max(measured) <= totals["device_measured_joules"] <= 0.6 * sum(measured)
    assert totals["device_attributed_joules"] == pytest.approx(request_joules, rel=1e-6)
    assert totals["device_attributed_joules"] == pytest.approx(
        sum(a for _, _, _, a, _ in readers), rel=1e-9)
    # the fleet was the server's only client: almost nothing is left for others
    assert totals["other_clients_joules"] < 0.03 * totals["device_measured_joules"]
