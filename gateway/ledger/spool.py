"""The spool: each request's rows appended to a local file before its answer's last byte, so a
process killed with SIGKILL loses no acknowledged request's row.

The ledger writer batches rows and writes them later, and a request's final rows wait until
its energy is settled, possibly after the answer went out: a crash in that window used to lose
them. A spool line is copied into a shared memory mapping of the segment file (`mmap`,
MAP_SHARED): the page it lands in belongs to the kernel's page cache, so once the copy is done
a killed process cannot take it back, exactly as with a `write()` (a power cut can: there is no
fsync, which would cost milliseconds per request). A mapping rather than `write()` because the
copy needs no system call and keeps the GIL: a `write()` on the event loop let the ledger
writer's thread take the interpreter in the middle of every request, which cost sequential
requests 86-217 us of added latency here (docs/energy.md, *The spool*). The line carries what is
known at answer time; the writer writes the final rows as before, and tells the spool which
requests are then durable in the database.

Files are segments named `ledger-spool-<pid>-<ns>.jsonl`, made `rotate_bytes` long when
created (sparse: disk blocks are used only as lines fill them); what follows the last line is
zero bytes, which the replay skips. A segment is locked (`flock`) by the process that appends
to it for as long as it is open, and the kernel drops the lock when that process dies, so on
start a writer replays only the segments it can lock: those of dead processes, never a live
sibling worker's. The current segment is emptied whenever every request in it is durable, and
replaced by a new one when the next line does not fit; a replaced segment is deleted once its
last request is durable.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("greenroute.ledger")

SPOOL_GLOB = "ledger-spool-*.jsonl"
ROTATE_BYTES = 4 * 1024 * 1024
Item = tuple[str, dict[str, Any]]  # (table name, row)


class _Segment:
    """One spool file, mapped for appending and locked by this process."""

    __slots__ = ("path", "fd", "map", "capacity", "size", "pending")

    def __init__(self, directory: Path, capacity: int) -> None:
        name = f"ledger-spool-{os.getpid()}-{time.time_ns()}.jsonl"
        self.path = directory / name
        # Locked under a name the replay does not look at, then renamed: no other process can
        # see it unlocked, take it for a dead one's and remove it.
        hidden = directory / f".{name}.new"
        self.fd = os.open(hidden, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(self.fd, capacity)  # sparse: zeros until lines are copied in
            self.map = mmap.mmap(self.fd, capacity)
        except BaseException:
            os.close(self.fd)
            hidden.unlink(missing_ok=True)
            raise
        os.rename(hidden, self.path)
        self.capacity = capacity
        self.size = 0
        self.pending = 0  # requests appended here whose rows are not in the database yet

    def append(self, line: bytes) -> None:
        end = self.size + len(line)
        self.map[self.size:end] = line
        self.size = end

    def empty(self) -> None:
        """Every line is durable: the file becomes zeros again and appends start at 0. Its
        blocks are given back (truncated to 0, then to its length); no append can touch the
        mapping in between, the caller holds the spool's lock."""
        os.ftruncate(self.fd, 0)
        os.ftruncate(self.fd, self.capacity)
        self.size = 0

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)  # before closing: nobody else may take it meanwhile
        self.close()

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)  # unlocks it: the next start may replay it


class Spool:
    """Appends request rows to the current segment; forgets them once they are durable."""

    def __init__(self, directory: Path, rotate_bytes: int = ROTATE_BYTES) -> None:
        self.directory = directory
        self.rotate_bytes = rotate_bytes
        self.appended = 0
        self._lock = threading.Lock()
        self._current: _Segment | None = None
        self._pending: dict[str, _Segment] = {}  # request id -> the segment holding its line
        self._closed = False

    def append(self, request_id: str, rows: list[Item]) -> None:
        """One line for one request's rows, copied into the mapped segment (raises OSError if
        a new segment cannot be made)."""
        line = orjson.dumps(rows) + b"\n"
        with self._lock:
            if self._closed:
                return
            segment = self._current
            if segment is None or segment.size + len(line) > segment.capacity:
                segment = self._rotate(len(line))
            segment.append(line)
            if request_id not in self._pending:
                segment.pending += 1
                self._pending[request_id] = segment
            self.appended += 1

    def durable(self, request_ids: Iterable[str]) -> None:
        """These requests' rows are committed to the database: their lines are not needed."""
        with self._lock:
            for request_id in request_ids:
                segment = self._pending.pop(request_id, None)
                if segment is None:
                    continue
                segment.pending -= 1
                if segment.pending:
                    continue
                if segment is self._current:
                    segment.empty()
                else:
                    segment.remove()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        """Stop appending. Segments whose requests are all durable are removed; the others stay
        for the next start to replay (their rows may have been refused by a full buffer)."""
        with self._lock:
            self._closed = True
            segments = {id(s): s for s in self._pending.values()}
            if self._current is not None:
                segments.setdefault(id(self._current), self._current)
            for segment in segments.values():
                if segment.pending:
                    segment.close()
                else:
                    segment.remove()
            self._current = None
            self._pending.clear()

    def _rotate(self, line_bytes: int) -> _Segment:
        old = self._current
        self.directory.mkdir(parents=True, exist_ok=True)
        # A line longer than a segment (a ledger keeping long texts) gets one of its own size.
        self._current = _Segment(self.directory, max(self.rotate_bytes, line_bytes))
        if old is not None and not old.pending:
            old.remove()
        return self._current


class Orphan:
    """A dead process's segment, locked by this one while its rows are replayed."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    def items(self) -> Iterator[list[Item]]:
        """Each request's rows; the zeros after the last line are skipped, and so is a line cut
        short (a kill in the middle of its copy, before its answer went out; a power cut)."""
        for line in self.path.read_bytes().splitlines():
            if not line.strip(b"\0 \t\r"):
                continue
            try:
                rows = orjson.loads(line)
            except orjson.JSONDecodeError:
                log.warning("ledger: skipping a torn line in %s", self.path)
                continue
            yield [(table, row) for table, row in rows]

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        os.close(self._fd)

    def release(self) -> None:
        """Not replayed after all (the database stayed away): the next start takes it."""
        os.close(self._fd)


def orphans(directory: Path) -> list[Orphan]:
    """The segments in `directory` that no live process holds, oldest first, locked by us."""
    found: list[Orphan] = []
    if not directory.is_dir():
        return found
    for path in sorted(directory.glob(SPOOL_GLOB), key=_age):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue  # its owner removed it meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)  # a live process (a sibling worker) is appending to it
            continue
        if not path.exists():  # removed between open and lock by an owner closing cleanly
            os.close(fd)
            continue
        found.append(Orphan(path, fd))
    return found


def _age(path: Path) -> tuple[int, str]:
    """Oldest first: by the creation time in the name."""
    try:
        return int(path.stem.rsplit("-", 1)[1]), path.name
    except (IndexError, ValueError):
        return 0, path.name
