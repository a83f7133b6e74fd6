"""The ledger writer and store on real SQLite files: batches, a database locked or removed
mid-run, a full buffer, shutdown with the database away, and migrations."""

from __future__ import annotations

import logging
import shutil
import sqlite3
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Connection, Engine, inspect, text
from waiting import wait_until

from greenroute.gateway.ledger import schema, store
from greenroute.gateway.ledger.writer import LedgerWriter


def _row(i: int) -> dict[str, object]:
    return {"id": f"req-{i}", "created": datetime.now(UTC), "endpoint": "chat/completions",
            "status": 200, "latency_ms": 1.0, "joules": 0.5, "energy_source": "estimate"}


def _ids(db: Path) -> set[str]:
    if not db.exists():
        return set()
    with sqlite3.connect(db) as connection:
        if not connection.execute("SELECT 1 FROM sqlite_master WHERE name = 'requests'").fetchall():
            return set()  # a database the writer has opened but not yet migrated
        return {r[0] for r in connection.execute("SELECT id FROM requests")}


def _writer(db: Path, **options: object) -> LedgerWriter:
    settings = {"batch_size": 10, "flush_interval_s": 0.05, "retry_s": 0.05, **options}
    writer = LedgerWriter(store.database_url(db), **settings)  # type: ignore[arg-type]
    writer.start()
    return writer


def test_rows_are_written_in_batches_and_flushed_on_close(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    writer = _writer(db, batch_size=100, flush_interval_s=5.0)
    for i in range(250):
        writer.put("requests", _row(i))
    wait_until(lambda: writer.written >= 200)  # two full batches without waiting for the interval
    writer.close()
    assert len(_ids(db)) == 250 and writer.buffered == 0
    with sqlite3.connect(db) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_locked_database_loses_no_rows(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    writer = _writer(db)
    writer.put("requests", _row(0))
    wait_until(lambda: writer.written == 1)
    locker = sqlite3.connect(db, timeout=0)
    locker.execute("BEGIN EXCLUSIVE")  # another process holds the database
    for i in range(1, 31):
        writer.put("requests", _row(i))
    wait_until(lambda: writer.failures >= 1)
    assert writer.written == 1 and writer.buffered == 30
    assert "locked" in (writer.last_error or "")
    locker.rollback()
    locker.close()
    wait_until(lambda: writer.written == 31)
    writer.close()
    assert _ids(db) == {f"req-{i}" for i in range(31)}
    assert writer.dropped == 0 and writer.last_error is None


def test_a_database_removed_mid_run_loses_no_rows(tmp_path: Path) -> None:
    directory = tmp_path / "data"
    db = directory / "ledger.db"
    writer = _writer(db)
    for i in range(10):
        writer.put("requests", _row(i))
    wait_until(lambda: writer.written == 10)
    shutil.move(directory, tmp_path / "moved")  # the whole directory goes away
    for i in range(10, 25):
        writer.put("requests", _row(i))
    wait_until(lambda: len(_ids(db)) == 15)  # a new database, with every row written since
    writer.close()
    before = _ids(tmp_path / "moved" / "ledger.db")
    assert before | _ids(db) == {f"req-{i}" for i in range(25)}
    assert _ids(db) >= {f"req-{i}" for i in range(10, 25)}


def test_a_full_buffer_is_loud_and_counted(tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "ledger.db"
    writer = _writer(db, max_buffer=5)
    locker = sqlite3.connect(db, timeout=0)
    locker.execute("CREATE TABLE IF NOT EXISTS x (a)")
    locker.execute("BEGIN EXCLUSIVE")
    with caplog.at_level(logging.ERROR, logger="greenroute.ledger"):
        accepted = [writer.put("requests", _row(i)) for i in range(8)]
    assert accepted == [True] * 5 + [False] * 3
    assert writer.dropped == 3 and writer.stats()["dropped"] == 3
    assert "LEDGER BUFFER FULL" in caplog.text
    locker.rollback()
    locker.close()
    writer.close()
    assert len(_ids(db)) == 5


def test_rows_that_cannot_be_written_at_shutdown_are_kept_for_the_next_start(
        tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    writer = _writer(db)
    writer.put("requests", _row(0))
    wait_until(lambda: writer.written == 1)
    locker = sqlite3.connect(db, timeout=0)
    locker.execute("BEGIN EXCLUSIVE")
    for i in range(1, 4):
        writer.put("requests", _row(i))
    wait_until(lambda: writer.failures >= 1)
    writer.close()
    spills = list(tmp_path.glob("ledger-unwritten-*.jsonl"))
    assert len(spills) == 1 and len(spills[0].read_text().splitlines()) == 3
    locker.rollback()
    locker.close()
    again = _writer(db)
    wait_until(lambda: again.written == 3)
    again.close()
    assert _ids(db) == {f"req-{i}" for i in range(4)}
    assert not list(tmp_path.glob("ledger-unwritten-*.jsonl"))


PASSWORD = "s3cret-Pw"
POSTGRES_URL = f"postgresql+psycopg://greenroute:{PASSWORD}@127.0.0.1:9/ledger"


def test_a_missing_driver_does_not_kill_the_writer_thread_nor_print_the_password(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """psycopg not installed: the import fails inside the thread with ModuleNotFoundError,
    which used to end the thread silently (write_failures: 0, rows piling up)."""
    monkeypatch.setitem(sys.modules, "psycopg", None)  # `import psycopg` now fails
    caplog.set_level(logging.INFO, logger="greenroute.ledger")
    writer = LedgerWriter(POSTGRES_URL, flush_interval_s=0.02, retry_s=0.01,
                          spill_dir=tmp_path)
    writer.start()
    writer.put("requests", _row(0))
    wait_until(lambda: writer.failures >= 3, timeout=10)  # it keeps retrying
    assert writer._thread.is_alive()
    stats = writer.stats()
    assert stats["buffered"] == 1 and stats["write_failures"] >= 3
    assert stats["last_error"].startswith("ModuleNotFoundError")
    writer.close(timeout_s=2)
    (spill,) = tmp_path.glob("ledger-unwritten-*.jsonl")  # kept for the next start
    assert b"req-0" in spill.read_bytes()
    assert "cannot write to postgresql+psycopg://greenroute:***@127.0.0.1:9/ledger" in caplog.text
    assert "saved to" in caplog.text
    assert PASSWORD not in caplog.text and PASSWORD not in str(stats)


def test_a_driver_error_quoting_the_password_is_scrubbed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    writer = LedgerWriter(POSTGRES_URL, spill_dir=tmp_path)

    def refuse(url: str) -> object:
        raise RuntimeError(f"cannot connect with {url} (password {PASSWORD})")

    monkeypatch.setattr(store, "open_engine", refuse)
    writer.put("requests", _row(0))
    writer.start()
    wait_until(lambda: writer.failures >= 1, timeout=10)
    writer.close(timeout_s=1)
    assert writer.last_error is not None and PASSWORD not in writer.last_error
    assert "greenroute:***@" in writer.last_error
    assert PASSWORD not in caplog.text
    assert writer.shown_url == "postgresql+psycopg://greenroute:***@127.0.0.1:9/ledger"


# The ledger as the first release (schema version 1) created it on SQLite, frozen here: the
# migrations must bring a database of this shape, with its rows, to what the models create now.
VERSION_1 = """
CREATE TABLE requests (
    id VARCHAR(64) NOT NULL, created DATETIME NOT NULL, key_id VARCHAR(128),
    endpoint VARCHAR(32) NOT NULL, stream BOOLEAN NOT NULL, requested_model VARCHAR(256),
    route VARCHAR(32), quality_target FLOAT, answered_by VARCHAR(128),
    upstream_model VARCHAR(256), models_tried INTEGER NOT NULL, status INTEGER NOT NULL,
    error VARCHAR(64), prompt_tokens INTEGER, completion_tokens INTEGER,
    latency_ms FLOAT NOT NULL, ttft_ms FLOAT, joules FLOAT, joules_per_token FLOAT,
    energy_source VARCHAR(64), prompt_text VARCHAR, answer_text VARCHAR, PRIMARY KEY (id));
CREATE INDEX ix_requests_answered_by ON requests (answered_by);
CREATE INDEX ix_requests_key_id ON requests (key_id);
CREATE INDEX ix_requests_created ON requests (created);
CREATE TABLE device_energy (
    device VARCHAR(256) NOT NULL, started DATETIME NOT NULL, ended DATETIME NOT NULL,
    source VARCHAR(32) NOT NULL, counter_start_j FLOAT NOT NULL, counter_end_j FLOAT NOT NULL,
    measured_j FLOAT NOT NULL, attributed_j FLOAT NOT NULL, idle_j FLOAT NOT NULL,
    intervals INTEGER NOT NULL, PRIMARY KEY (device, started));
CREATE INDEX ix_device_energy_started ON device_energy (started);
CREATE TABLE request_models (
    request_id VARCHAR(64) NOT NULL, position INTEGER NOT NULL, tier VARCHAR(128) NOT NULL,
    upstream_model VARCHAR(256), prompt_tokens INTEGER, completion_tokens INTEGER,
    joules FLOAT, energy_source VARCHAR(32), device VARCHAR(256), answered BOOLEAN NOT NULL,
    PRIMARY KEY (request_id, position), FOREIGN KEY(request_id) REFERENCES requests (id));
CREATE INDEX ix_request_models_tier ON request_models (tier);
CREATE TABLE ledger_version (version INTEGER NOT NULL);
INSERT INTO ledger_version VALUES (1);
INSERT INTO requests (id, created, endpoint, stream, models_tried, status, latency_ms, joules,
                      answered_by)
    VALUES ('req-old', '2026-01-02 03:04:05.000000', 'chat/completions', 0, 2, 200, 12.5, 3.25,
            'large');
INSERT INTO request_models (request_id, position, tier, joules, answered)
    VALUES ('req-old', 0, 'small', 0.75, 0), ('req-old', 1, 'large', 2.5, 1);
INSERT INTO device_energy VALUES ('cpu:host', '2026-01-02 03:04:00.000000',
    '2026-01-02 03:04:10.000000', 'estimate', 100.0, 110.0, 10.0, 3.25, 6.75, 4);
"""


def _shape(engine: Engine) -> dict[str, object]:
    """Every ledger table's columns (type, nullability), key, foreign keys and indices, in an
    order-free form (a migration appends the columns it adds)."""
    inspector = inspect(engine)
    return {name: {
        "columns": {c["name"]: (str(c["type"]), c["nullable"])
                    for c in inspector.get_columns(name)},
        "primary_key": inspector.get_pk_constraint(name)["constrained_columns"],
        "foreign_keys": sorted((tuple(f["constrained_columns"]), f["referred_table"],
                                tuple(f["referred_columns"]))
                               for f in inspector.get_foreign_keys(name)),
        "indices": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]))
                          for i in inspector.get_indexes(name)),
    } for name in sorted(inspector.get_table_names())}


def test_a_version_1_ledger_migrates_to_the_models_schema_and_keeps_its_rows(
        tmp_path: Path) -> None:
    old = tmp_path / "old.db"
    with sqlite3.connect(old) as connection:
        connection.executescript(VERSION_1)
    engine = store.open_engine(store.database_url(old))
    assert store.migrate(engine) == store.latest_version() > store.BASE_VERSION
    assert store.migrate(engine) == store.latest_version()  # idempotent

    fresh = store.open_engine(store.database_url(tmp_path / "fresh.db"))
    assert store.migrate(fresh) == store.latest_version()
    assert _shape(engine) == _shape(fresh)
    assert set(_shape(fresh)) == {*schema.TABLES, "ledger_version"}
    fresh.dispose()

    with engine.connect() as connection:
        assert connection.execute(text(
            "SELECT id, answered_by, joules, router_score FROM requests")).all() == \
            [("req-old", "large", 3.25, None)]
        assert connection.execute(text(
            "SELECT tier, joules, answered FROM request_models ORDER BY position")).all() == \
            [("small", 0.75, 0), ("large", 2.5, 1)]
        assert connection.execute(text(
            "SELECT measured_j, attributed_j, idle_j FROM device_energy")).all() == \
            [(10.0, 3.25, 6.75)]
        assert connection.execute(text("SELECT version FROM ledger_version ORDER BY version")
                                  ).scalars().all() == \
            list(range(store.BASE_VERSION, store.latest_version() + 1))
    engine.dispose()

    writer = _writer(old)  # today's writer, every column of the models, on the migrated file
    writer.put("requests", {**_row(1), "router_score": 0.625, "route": "routed"})
    writer.close()
    assert writer.written == 1 and writer.last_error is None
    with sqlite3.connect(old) as connection:
        assert connection.execute("SELECT router_score FROM requests WHERE id = 'req-1'"
                                  ).fetchone() == (0.625,)


def test_a_ledger_stamped_1_that_has_router_score_migrates_too(tmp_path: Path) -> None:
    """The column reached the models before its migration: such ledgers are stamped 1."""
    db = tmp_path / "l.db"
    with sqlite3.connect(db) as connection:
        connection.executescript(VERSION_1)
        connection.execute("ALTER TABLE requests ADD COLUMN router_score FLOAT")
    engine = store.open_engine(store.database_url(db))
    assert store.migrate(engine) == store.latest_version()
    assert "router_score" in {c["name"] for c in inspect(engine).get_columns("requests")}
    engine.dispose()


def test_migrations_upgrade_in_place_and_keep_rows(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "l.db"
    writer = _writer(db)
    writer.put("requests", _row(1))
    writer.close()
    current = store.latest_version()

    def add_region(connection: Connection) -> None:
        connection.execute(text("ALTER TABLE requests ADD COLUMN region VARCHAR(32)"))

    monkeypatch.setattr(store, "MIGRATIONS", [*store.MIGRATIONS, add_region])
    engine = store.open_engine(store.database_url(db))
    assert store.migrate(engine) == current + 1
    with engine.connect() as connection:
        assert connection.execute(text("SELECT id, region FROM requests")).all() == \
            [("req-1", None)]
        assert store.current_version(connection) == current + 1
    monkeypatch.setattr(store, "MIGRATIONS", [])
    with pytest.raises(store.LedgerError, match="newer than this GreenRoute"):
        store.migrate(engine)
    engine.dispose()
