"""`greenroute serve --workers N` as real processes: one port, one SQLite ledger written by
every worker, /metrics summed over them, and configs that would count a device N times
refused. The upstream is the fake OpenAI server in its own process; the tiers' energy is the
`estimate` meter, which reads each worker's own CPU time, so it is right per process."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from conftest import GREENROUTE, REPO
from prometheus_client.mmap_dict import MmapedDict
from waiting import wait_until

from greenroute.backends.fake_openai import free_port
from greenroute.gateway.config import GatewayConfig
from greenroute.gateway.workers import shared_device_tiers

REQUESTS = 2000
CONCURRENCY = 32


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[str]:
    """The fake vLLM-like server, in a process of its own (the gateway's workers are too)."""
    port = free_port()
    log = (tmp_path / "upstream.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "greenroute.backends.fake_openai",
                                "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    _wait_for(url + "/v1/models", process)
    yield url + "/v1"
    process.terminate()
    process.wait(timeout=10)


def _wait_for(url: str, process: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer in {timeout_s} s")


def _config(tmp_path: Path, upstream: str, db: Path, meter: str = 'kind = "estimate"') -> Path:
    port = free_port()
    path = tmp_path / "gateway.toml"
    path.write_text(f"""
[server]
port = {port}
log_level = "warning"
[router]
enabled = false
[ledger]
path = "{db}"
batch_size = 50
flush_interval_s = 0.1
[[tiers]]
name = "fake"
backend = "openai"
url = "{upstream}"
model = "echo"
meter = {{ {meter} }}
""")
    return path


async def _load(url: str, count: int) -> list[int]:
    statuses: list[int] = []
    queue = iter(range(count))
    async with httpx.AsyncClient(base_url=url, timeout=30,
                                 limits=httpx.Limits(max_connections=CONCURRENCY)) as client:
        async def one_after_another() -> None:
            for i in queue:
                response = await client.post("/v1/chat/completions", json={
                    "model": "fake", "messages": [{"role": "user", "content": f"hi {i}"}]})
                statuses.append(response.status_code)

        await asyncio.gather(*(one_after_another() for _ in range(CONCURRENCY)))
    return statuses


def _sample(metrics: str, name: str) -> float:
    """The sum of a metric's samples over all label sets."""
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", re.MULTILINE)
    return sum(float(value) for value in pattern.findall(metrics))


def test_two_workers_one_ledger_row_per_request_and_metrics_count_them_all(
        tmp_path: Path, upstream: str) -> None:
    db = tmp_path / "ledger.db"
    config = _config(tmp_path, upstream, db)
    config.write_text(config.read_text().replace('log_level = "warning"', 'log_level = "info"'))
    port = int(re.search(r"port = (\d+)", config.read_text()).group(1))  # type: ignore[union-attr]
    log = tmp_path / "gateway.log"
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")}
    gateway = subprocess.Popen([GREENROUTE, "serve", "--config", str(config), "--workers", "2"],
                               stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=REPO,
                               env=env)
    root = f"http://127.0.0.1:{port}"
    try:
        _wait_for(root + "/v1/models", gateway)
        # Both workers accepting before the load opens its keep-alive connections (the first
        # worker up answers /v1/models alone)
        wait_until(lambda: "2 workers serving" in log.read_text(), timeout=60)
        started = time.monotonic()
        statuses = asyncio.run(_load(root, REQUESTS))
        elapsed = time.monotonic() - started
        assert statuses.count(200) == REQUESTS, log.read_text()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # rows are counted once their energy is final
            metrics = httpx.get(root + "/metrics", timeout=5).text
            if _sample(metrics, "greenroute_requests_total") >= REQUESTS:
                break
            time.sleep(0.2)
        assert _sample(metrics, "greenroute_requests_total") == REQUESTS
        assert _sample(metrics, "greenroute_request_duration_seconds_count") == REQUESTS
        assert _sample(metrics, "greenroute_tokens_total") > 0
        # what each worker reads at scrape time, published for the others' scrapes too
        assert _sample(metrics, "greenroute_energy_measured_joules_total") > 0
        assert "greenroute_tier_breaker_state{tier=\"fake\"} " in metrics
        for _ in range(10):  # whichever worker answers a scrape, it has the same sums
            scrape = httpx.get(root + "/metrics", timeout=5).text
            assert _sample(scrape, "greenroute_requests_total") == REQUESTS
        time.sleep(1.5)  # each worker publishes its ledger writer's counts every second
        scrape = httpx.get(root + "/metrics", timeout=5).text
        failures = _sample(scrape, "greenroute_ledger_write_failures_total")
        print(f"{REQUESTS} requests through 2 workers in {elapsed:.1f} s "
              f"({REQUESTS / elapsed:.0f} requests/s); ledger rows written so far "
              f"{_sample(scrape, 'greenroute_ledger_rows_written_total'):.0f}, failed batch "
              f"writes (retried) {failures:.0f}")
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(timeout=60)
    assert gateway.returncode == 0, log.read_text()
    with sqlite3.connect(db) as connection:
        ids = [r[0] for r in connection.execute("SELECT id FROM requests")]
        metered = connection.execute(
            "SELECT count(*), sum(joules > 0), count(DISTINCT energy_source) FROM requests"
        ).fetchone()
        attempts = connection.execute("SELECT count(*) FROM request_models").fetchone()[0]
        devices = connection.execute("SELECT sum(measured_j), sum(attributed_j + idle_j + "
                                     "other_j) FROM device_energy").fetchone()
    assert len(ids) == len(set(ids)) == REQUESTS
    assert attempts == REQUESTS
    assert metered[0] == REQUESTS and metered[2] == 1
    assert devices[0] == pytest.approx(devices[1], rel=1e-6)  # both workers' devices
    assert not list(tmp_path.glob("ledger-unwritten-*.jsonl"))
    served = _requests_by_worker(tmp_path / "metrics")
    assert sum(served.values()) == REQUESTS  # each request counted once, by its worker
    # How the load splits is the kernel's: one shared socket wakes whichever worker is
    # waiting, and on a busy machine one worker took all 64 keep-alive connections (in 3 of
    # 9 runs on 2026-12-02). Printed, not asserted (README, Configuration).
    print(f"requests served by each worker: {sorted(served.values())}")


def _requests_by_worker(directory: Path) -> dict[str, float]:
    """greenroute_requests_total in each worker's own multiprocess file (counter_<pid>.db)."""
    served = {}
    for path in directory.glob("counter_*.db"):
        served[path.stem] = sum(
            value for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path))
            if orjson.loads(key)[0] == "greenroute_requests")
    return {pid: count for pid, count in served.items() if count}


def _workers_of(supervisor: int) -> set[int]:
    """The worker processes of a supervisor (not multiprocessing's resource tracker)."""
    out = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(supervisor)],
                         capture_output=True, text=True, check=False).stdout
    return {int(line.split()[0]) for line in out.splitlines() if "spawn_main" in line}


def test_a_worker_that_dies_is_replaced(tmp_path: Path, upstream: str) -> None:
    config = _config(tmp_path, upstream, tmp_path / "ledger.db")
    config.write_text(config.read_text().replace('log_level = "warning"', 'log_level = "info"'))
    port = int(re.search(r"port = (\d+)", config.read_text()).group(1))  # type: ignore[union-attr]
    log = tmp_path / "gateway.log"
    gateway = subprocess.Popen([GREENROUTE, "serve", "--config", str(config), "--workers", "2"],
                               stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=REPO)
    root = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120  # both serving (one killed while starting stops all)
        while "2 workers serving" not in log.read_text() and time.monotonic() < deadline:
            assert gateway.poll() is None, log.read_text()
            time.sleep(0.1)
        first = _workers_of(gateway.pid)
        assert len(first) == 2
        os.kill(min(first), signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            now = _workers_of(gateway.pid)
            if len(now) == 2 and now != first:
                break
            time.sleep(0.2)
        assert len(now) == 2 and min(first) not in now, log.read_text()
        assert gateway.poll() is None
        for _ in range(20):  # both workers answer
            assert httpx.post(root + "/v1/completions", timeout=10, json={
                "model": "fake", "prompt": "hi"}).status_code == 200
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(timeout=60)
    assert gateway.returncode == 0
    assert "while serving; starting another" in log.read_text()


def test_a_worker_that_cannot_start_stops_the_server(tmp_path: Path, upstream: str) -> None:
    db = tmp_path / "ledger.db"
    config = _config(tmp_path, upstream, db)
    config.write_text(config.read_text() + '[[tiers]]\nname = "bad"\nbackend = "openai"\n'
                      'url = "http://127.0.0.1:9/v1"\nmodel = "x"\n'
                      'meter = { kind = "prometheus", url = "http://127.0.0.1:9/metrics" }\n')
    result = subprocess.run([GREENROUTE, "serve", "--config", str(config), "--workers", "2"],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 1, result.stderr
    assert "worker" in result.stderr


def test_meters_that_every_worker_sees_are_refused(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    config = _config(tmp_path, "http://127.0.0.1:9/v1", db, meter='kind = "rapl"')
    result = subprocess.run([GREENROUTE, "serve", "--config", str(config), "--workers", "2"],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 2
    assert "fake (rapl)" in result.stderr and "Several workers" in result.stderr


def test_which_meters_are_right_per_worker() -> None:
    def tiers(*meters: dict[str, object], backend: str = "openai") -> GatewayConfig:
        return GatewayConfig.model_validate({"tiers": [
            {"name": f"t{i}", "backend": backend, "url": "http://h:8000/v1", "model": "m",
             "meter": meter} for i, meter in enumerate(meters)]})

    dcgm = {"kind": "prometheus", "url": "http://h:9400/metrics"}
    assert shared_device_tiers(tiers({"kind": "estimate"}, {"kind": "none"}, dcgm)) == []
    assert shared_device_tiers(tiers({**dcgm, "server_metrics": "off"},
                                     {"kind": "nvml", "gpus": [0]})) == [
        "t0 (prometheus)", "t1 (nvml)"]


def test_an_open_non_loopback_host_is_refused_before_any_worker_starts(tmp_path: Path) -> None:
    config = _config(tmp_path, "http://127.0.0.1:9/v1", tmp_path / "ledger.db")
    result = subprocess.run([GREENROUTE, "serve", "--config", str(config), "--workers", "2",
                             "--host", "0.0.0.0"],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 2
    assert "refusing to serve 0.0.0.0 with no API key" in result.stderr
    assert "worker" not in result.stderr
