"""The ledger writer and store on real SQLite files: batches, a database locked or removed
mid-run, a full buffer, shutdown with the database away, and migrations."""

from __future__ import annotations

import logging
import shutil
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import inspect, text
from waiting import wait_until

from greenroute.gateway.ledger import schema, store
from greenroute.gateway.ledger.writer import LedgerWriter


def _row(i: int) -> dict:
    return {"id": f"req-{i}", "created": datetime.now(UTC), "endpoint": "chat/completions",
            "status": 200, "latency_ms": 1.0, "joules": 0.5, "energy_source": "estimate"}


def _ids(db: Path) -> set[str]:
    if not db.exists():
        return set()
    with sqlite3.connect(db) as connection:
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


def test_a_fresh_database_matches_the_models(tmp_path: Path) -> None:
    engine = store.open_engine(store.database_url(tmp_path / "l.db"))
    assert store.migrate(engine) == store.latest_version()
    assert store.migrate(engine) == store.latest_version()  # idempotent
    inspector = inspect(engine)
    for name, model in schema.TABLES.items():
        columns = {c["name"] for c in inspector.get_columns(name)}
        assert columns == set(model.model_fields), name
    engine.dispose()


def test_migrations_upgrade_in_place_and_keep_rows(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "l.db"
    writer = _writer(db)
    writer.put("requests", _row(1))
    writer.close()

    def add_region(connection: object) -> None:
        connection.execute(text("ALTER TABLE requests ADD COLUMN region VARCHAR(32)"))  # type: ignore

    monkeypatch.setattr(store, "MIGRATIONS", [add_region])
    engine = store.open_engine(store.database_url(db))
    assert store.migrate(engine) == 2
    with engine.connect() as connection:
        assert connection.execute(text("SELECT id, region FROM requests")).all() == \
            [("req-1", None)]
        assert store.current_version(connection) == 2
    monkeypatch.setattr(store, "MIGRATIONS", [])
    with pytest.raises(store.LedgerError, match="newer than this GreenRoute"):
        store.migrate(engine)
    engine.dispose()
