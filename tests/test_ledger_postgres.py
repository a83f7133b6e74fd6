"""The ledger on a real PostgreSQL server, as several gateway replicas share it: a throwaway
cluster on loopback (Debian's PostgreSQL, which this project's machines carry), two writers
migrating and writing at once, a server restart mid-run, and `greenroute report` reading it."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from waiting import wait_until

from greenroute.backends.fake_openai import free_port
from greenroute.gateway.ledger.writer import LedgerWriter

GREENROUTE = str(Path(sys.executable).parent / "greenroute")


def _server_binaries() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(versions[-1]).parent if versions else None


class Cluster:
    """One PostgreSQL cluster in a temporary directory, run as the `postgres` user when the
    tests run as root (PostgreSQL refuses to run as root)."""

    def __init__(self, binaries: Path) -> None:
        self.binaries = binaries
        self.root = Path(tempfile.mkdtemp(prefix="greenroute-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.prefix:
            shutil.chown(self.root, "postgres")

    def run(self, tool: str, *args: str) -> None:
        subprocess.run([*self.prefix, str(self.binaries / tool), *args], check=True,
                       capture_output=True, timeout=60)

    def init(self) -> None:
        self.run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres")

    def start(self) -> None:
        self.run("pg_ctl", "-D", str(self.data), "-w", "-l", str(self.root / "log"), "-o",
                 f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1", "start")

    def stop(self) -> None:
        self.run("pg_ctl", "-D", str(self.data), "-w", "-m", "fast", "stop")

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    binaries = _server_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL's server programs (initdb, pg_ctl) are not installed")
    server = Cluster(binaries)
    server.init()
    server.start()
    try:
        yield server
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture
def database(cluster: Cluster, request: pytest.FixtureRequest) -> str:
    name = request.node.name.lower()[:40]
    admin = create_engine(cluster.url("postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return cluster.url(name)


def _row(replica: int, i: int) -> dict:
    return {"id": f"r{replica}-{i}", "created": datetime.now(UTC), "endpoint": "chat/completions",
            "status": 200, "latency_ms": 1.0, "joules": 0.5, "energy_source": "estimate",
            "answered_by": "small", "completion_tokens": 4}


def _writer(url: str) -> LedgerWriter:
    return LedgerWriter(url, batch_size=20, flush_interval_s=0.05, retry_s=0.05)


def _count(url: str, sql: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return int(connection.execute(text(sql)).scalar() or 0)
    finally:
        engine.dispose()


def test_two_replicas_migrate_and_write_one_ledger_at_once(database: str) -> None:
    writers = [_writer(database), _writer(database)]
    for replica, writer in enumerate(writers):
        for i in range(300):
            writer.put("requests", _row(replica, i))
    barrier = threading.Barrier(2)

    def start(writer: LedgerWriter) -> None:
        barrier.wait()  # both create the schema of an empty database at the same moment
        writer.start()

    threads = [threading.Thread(target=start, args=(w,)) for w in writers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wait_until(lambda: all(w.written == 300 for w in writers), timeout=30)
    for writer in writers:
        writer.close()
    assert [w.failures for w in writers] == [0, 0]  # the second waited; it did not fail
    assert _count(database, "SELECT count(*) FROM requests") == 600
    assert _count(database, "SELECT count(DISTINCT version) FROM ledger_version") == \
        _count(database, "SELECT count(*) FROM ledger_version")  # each version recorded once


def test_rows_written_while_the_server_restarts_are_not_lost(cluster: Cluster,
                                                             database: str) -> None:
    writer = _writer(database)
    writer.start()
    for i in range(50):
        writer.put("requests", _row(0, i))
    wait_until(lambda: writer.written == 50, timeout=30)
    cluster.stop()
    try:
        for i in range(50, 120):
            writer.put("requests", _row(0, i))
        wait_until(lambda: writer.failures > 0, timeout=30)
        assert writer.buffered == 70
    finally:
        cluster.start()
    wait_until(lambda: writer.written == 120, timeout=30)
    writer.close()
    assert _count(database, "SELECT count(*) FROM requests") == 120


def test_report_reads_a_postgres_ledger(database: str) -> None:
    writer = _writer(database)
    writer.start()
    for i in range(40):
        writer.put("requests", _row(1, i))
    writer.close()
    done = subprocess.run([GREENROUTE, "report", "--db", database, "--format", "json",
                           "--by", "model"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["totals"]["requests"] == 40
    assert report["totals"]["joules"] == pytest.approx(20.0)
