"""The ledger writer: rows go from the request path into a bounded buffer, and a background
thread writes them to the database in batches.

`put` never blocks and never touches the database, so a request never waits for a write. The
thread takes up to `batch_size` rows at a time and writes them in one transaction; if the
database is unavailable (locked, gone, a Postgres restart) the batch stays at the head of the
buffer and is retried with backoff, and rows keep accumulating behind it up to `max_buffer`.
Past that a row is refused: that is logged as an error and counted (`dropped`, on /metrics and
/health), never silent. On shutdown the buffer is flushed; whatever still cannot be written is
saved to a JSONL file beside the database and loaded again by the next writer on start.

With the spool on (`[ledger] spool`, the default), each request's rows are also appended to a
local file before its answer's last byte (`spool`, gateway/ledger/spool.py), so a process
killed while rows wait here loses none: the next start replays the dead process's spool, and
inserts skip the requests already in the database. The thread never dies of an exception: any
failure is counted (`write_failures`), logged, and retried.

The database URL is logged and reported only with its password hidden (`shown_url`).

SQLite: if the database file is removed or replaced while the gateway runs, the writer notices
after a batch (the file's inode changed), reopens a new database there and writes the same batch
again, so rows written into the vanished file are not lost with it. Inserts skip rows whose key
is already present, which makes rewriting a batch harmless.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Engine, Table, insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from greenroute.gateway.ledger import schema, store
from greenroute.gateway.ledger.spool import Orphan, Spool, orphans

log = logging.getLogger("greenroute.ledger")

Item = tuple[str, dict[str, Any]]  # (table name, row)
MAX_RETRY_S = 30.0
SPILL_GLOB = "ledger-unwritten-*.jsonl"
_DATETIME_COLUMNS = {"created", "started", "ended"}


class LedgerWriter:
    """A bounded buffer of rows and the thread that writes them."""

    def __init__(self, url: str, *, batch_size: int = 500, flush_interval_s: float = 0.5,
                 max_buffer: int = 100_000, retry_s: float = 1.0,
                 spill_dir: Path | None = None, spool: bool = False) -> None:
        self.url = url
        self.shown_url = redacted(url)  # for logs, errors and /health: never the password
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.max_buffer = max_buffer
        self.retry_s = retry_s
        path = store.sqlite_path(url)
        self.spill_dir = spill_dir or (path.parent if path else store.default_path().parent)
        self.written = 0
        self.dropped = 0
        self.failures = 0
        self.last_error: str | None = None
        self._buffer: deque[Item] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._engine: Engine | None = None
        self._inode: tuple[int, int] | None = None
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._spilled: list[Path] = []
        self._spilled_rows = 0  # rows loaded from them: the files go once these are written
        self._orphans: list[Orphan] = []  # dead processes' spools being replayed
        self.spool = Spool(self.spill_dir) if spool else None
        self._spool_error: str | None = None

    # -- the request side ---------------------------------------------------------------------

    def put(self, table: str, row: dict[str, Any]) -> bool:
        """Queue one row; False (logged, counted) when the buffer is full."""
        with self._cond:
            if len(self._buffer) >= self.max_buffer:
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    log.error("LEDGER BUFFER FULL (%d rows waiting for the database: %s): "
                              "%d row(s) dropped so far", len(self._buffer), self.last_error,
                              self.dropped)
                return False
            self._buffer.append((table, row))
            if len(self._buffer) >= self.batch_size:
                self._cond.notify()
            return True

    def put_many(self, items: Iterable[Item]) -> None:
        for table, row in items:
            self.put(table, row)

    def spool_rows(self, request_id: str, rows: list[Item]) -> None:
        """Keep a request's rows as known now, past a crash (no-op with the spool off). Called
        on the request path before the answer's last byte; one write(), no fsync."""
        if self.spool is None:
            return
        try:
            self.spool.append(request_id, rows)
        except (OSError, TypeError) as exc:  # disk full, or a row orjson cannot encode
            self.failures += 1
            message = f"{type(exc).__name__}: {exc}"
            if self._spool_error is None:
                log.error("ledger: cannot append to the spool in %s (%s); rows are still "
                          "written, but a crash may lose those not written yet",
                          self.spill_dir, message)
            self._spool_error = message

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def stats(self) -> dict[str, Any]:
        return {"written": self.written, "buffered": self.buffered, "dropped": self.dropped,
                "write_failures": self.failures, "last_error": self.last_error}

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._load_spills()
        self._load_orphans()
        self._thread.start()

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush what is buffered; what cannot be written in time is saved to a file."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout_s)
        if self._buffer:
            self._spill()
        if self.spool is not None:
            self.spool.close()  # what is not in the database yet stays for the next start
        for orphan in self._orphans:  # replayed rows not written: saved in the spill file too
            orphan.release()
        self._orphans = []
        if self._engine is not None:
            self._engine.dispose()

    # -- the writer thread --------------------------------------------------------------------

    def _run(self) -> None:
        delay = self.retry_s
        while True:
            with self._cond:
                # Rows replayed from a spill or a dead process's spool are written at once,
                # not after a flush window: they are old already, and a slow flush setting
                # (flush_interval_s = 30) would keep them out of the ledger that much longer.
                backlog = bool(self._buffer) and bool(self._spilled or self._orphans)
                if not self._stopping and len(self._buffer) < self.batch_size and not backlog:
                    self._cond.wait(self.flush_interval_s)
                if not self._buffer:
                    if self._stopping:
                        return
                    continue
                batch = [self._buffer[i] for i in range(min(self.batch_size,
                                                            len(self._buffer)))]
            try:
                self._write(batch)
            except Exception as exc:  # anything: a dead writer thread would lose every row
                self._failed(exc)
                if self._stopping:
                    return  # shutting down: close() saves the rest to a file
                time.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_S)
                continue
            delay = self.retry_s
            with self._cond:
                for _ in batch:
                    self._buffer.popleft()
                self.written += len(batch)
            if self.spool is not None:
                try:
                    # the ids listed first: the spool's lock, which the request path takes
                    # to append, is held only for the bookkeeping
                    self.spool.durable([row["id"] for table, row in batch
                                        if table == "requests"])
                except OSError as exc:  # the spool's file cannot be truncated or removed
                    log.error("ledger: spool in %s: %s", self.spill_dir, exc)
            if self.last_error is not None:
                log.warning("ledger: database is writable again; %d rows waiting",
                            len(self._buffer))
                self.last_error = None
            if (self._spilled or self._orphans) and self.written >= self._spilled_rows:
                for path in self._spilled:
                    path.unlink(missing_ok=True)
                self._spilled = []
                for orphan in self._orphans:
                    orphan.remove()
                self._orphans = []

    def _connect(self) -> Engine:
        if self._engine is None:
            engine = store.open_engine(self.url)
            try:
                store.migrate(engine)
            except BaseException:
                engine.dispose()
                raise
            self._engine = engine
            self._inode = self._file_id()
        return self._engine

    def _file_id(self) -> tuple[int, int] | None:
        path = store.sqlite_path(self.url)
        if path is None:
            return None
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            return None
        return stat.st_dev, stat.st_ino

    def _write(self, batch: list[Item]) -> None:
        for _ in range(2):
            engine = self._connect()
            by_table: dict[str, list[dict[str, Any]]] = {}
            for table, row in batch:
                by_table.setdefault(table, []).append(row)
            with engine.begin() as connection:
                for name in ("requests", "request_models", "device_energy"):  # parents first
                    if name in by_table:
                        connection.execute(_insert_ignoring_duplicates(
                            engine, schema.TABLES[name].__table__),  # type: ignore[attr-defined]
                            by_table[name])
            if store.sqlite_path(self.url) is None or self._file_id() == self._inode:
                return
            # The file was removed or replaced under us: those rows went into the old one.
            log.error("ledger: %s was removed or replaced while open; reopening it and "
                      "writing the last %d rows again", self.shown_url, len(batch))
            engine.dispose()
            self._engine = None
        raise store.LedgerError(f"{self.shown_url} keeps changing under the writer")

    def _failed(self, exc: BaseException) -> None:
        text = str(exc).splitlines()[0][:300] if str(exc) else ""
        message = self._scrubbed(f"{type(exc).__name__}: {text}")
        if self.last_error is None or (self.failures + 1) % 30 == 0:
            log.error("ledger: cannot write to %s (%s); %d rows buffered, retrying",
                      self.shown_url, message, len(self._buffer))
        # The error first, then the count: whoever sees the count (stats(), /health, a test)
        # also sees what failed.
        self.last_error = message
        self.failures += 1
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def _scrubbed(self, message: str) -> str:
        """`message` without the URL's password, should a driver's error quote it."""
        message = message.replace(self.url, self.shown_url)
        try:
            password = make_url(self.url).password
        except ArgumentError:
            return message
        return message.replace(str(password), "***") if password else message

    # -- rows that outlive the process --------------------------------------------------------

    def _spill(self) -> None:
        items = list(self._buffer)
        try:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            path = self.spill_dir / f"ledger-unwritten-{time.time_ns()}.jsonl"
            with path.open("wb") as out:
                for table, row in items:
                    out.write(orjson.dumps({"table": table, "row": row}) + b"\n")
        except OSError as exc:
            log.critical("ledger: %d rows could not be written to %s nor saved to %s: %s",
                         len(items), self.shown_url, self.spill_dir, exc)
            self.dropped += len(items)
            return
        log.error("ledger: %d rows could not be written to %s; saved to %s, to be written "
                  "on the next start", len(items), self.shown_url, path)
        self._buffer.clear()

    def _load_spills(self) -> None:
        if not self.spill_dir.is_dir():
            return
        for path in sorted(self.spill_dir.glob(SPILL_GLOB)):
            count = 0
            for line in path.read_bytes().splitlines():
                if line.strip():
                    item = orjson.loads(line)
                    self._buffer.append((item["table"], _decoded(item["row"])))
                    count += 1
            self._spilled.append(path)
            self._spilled_rows += count
            log.warning("ledger: %d rows from %s queued for writing", count, path)

    def _load_orphans(self) -> None:
        """Queue the spooled rows of processes that died: after the spills, whose rows are
        final and win (inserts skip a request already written)."""
        queued = {row["id"] for table, row in self._buffer if table == "requests"}
        for orphan in orphans(self.spill_dir):
            count = requests = 0
            for rows in orphan.items():
                ids = [row.get("id") for table, row in rows if table == "requests"]
                if any(i in queued for i in ids):
                    continue
                queued.update(str(i) for i in ids)
                for table, row in rows:
                    self._buffer.append((table, _decoded(row)))
                    count += 1
                requests += 1
            self._orphans.append(orphan)
            self._spilled_rows += count
            if requests:
                log.warning("ledger: %d requests spooled by a process that stopped (%s) "
                            "queued for writing", requests, orphan.path.name)


def redacted(url: str) -> str:
    """`url` with its password hidden, for logs and errors."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<an unparseable ledger URL>"


def _decoded(row: dict[str, Any]) -> dict[str, Any]:
    """A row read back from JSON: its datetimes are ISO strings."""
    return {k: datetime.fromisoformat(v) if k in _DATETIME_COLUMNS and isinstance(v, str)
            else v for k, v in row.items()}


def _insert_ignoring_duplicates(engine: Engine, table: Table) -> Any:
    if engine.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table).on_conflict_do_nothing()
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).on_conflict_do_nothing()
    return insert(table)
