"""The spool (gateway/ledger/spool.py): a request's rows appended to a local file before its
answer's last byte, so `kill -9` of the gateway loses no acknowledged request's row.

The first test is the real thing: a `greenroute serve` process under concurrent load, killed
with SIGKILL mid-run and started again on the same ledger. The others pin the spool's file
handling: truncation and rotation once rows are durable, and that a starting process replays
only the segments of dead processes, never a live sibling worker's.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from conftest import start_gateway, stop_gateway
from fake_backends import FakeBackend, build_app, gateway_config, tier
from waiting import wait_until

from greenroute.backends.base import Usage
from greenroute.backends.energy.sampler import Fleet
from greenroute.backends.fake_openai import free_port
from greenroute.gateway.accounting import Accounting
from greenroute.gateway.ledger import spool as spool_module
from greenroute.gateway.ledger.spool import SPOOL_GLOB, Orphan, Spool, orphans
from greenroute.gateway.ledger.writer import LedgerWriter

CLIENTS = 16


@pytest.fixture
def fake_upstream() -> Any:
    """The fake OpenAI upstream in its own process, so the load is not slowed by the test's
    own threads."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "greenroute.backends.fake_openai",
                                "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_until(lambda: _answers(url + "/models"), timeout=30)
        yield url
    finally:
        process.kill()
        process.wait(5)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def _load(url: str, acknowledged: list[str], stop: threading.Event, index: int) -> None:
    """Requests one after another, streamed and not, until the gateway dies: an id is kept
    only once its whole answer arrived (the body, or a stream's [DONE])."""
    stream = index % 2 == 1
    with httpx.Client(timeout=10) as client:
        while not stop.is_set():
            body = {"model": "echo", "stream": stream,
                    "messages": [{"role": "user", "content": f"hello {index}"}]}
            try:
                if stream:
                    with client.stream("POST", url + "/chat/completions",
                                       json=body) as response:
                        lines = list(response.iter_lines())
                        if response.status_code == 200 and "data: [DONE]" in lines:
                            acknowledged.append(response.headers["x-request-id"])
                else:
                    response = client.post(url + "/chat/completions", json=body)
                    if response.status_code == 200 and response.json()["choices"]:
                        acknowledged.append(response.headers["x-request-id"])
            except httpx.HTTPError:
                return  # the gateway is gone


def test_kill_9_under_load_loses_no_acknowledged_row(tmp_path: Path, fake_upstream: str) -> None:
    db = tmp_path / "ledger.db"
    # A long flush window: at the kill, (nearly) every row is still in the writer's buffer,
    # which is exactly what a crash used to lose (87 of 2,334 with the defaults).
    config = (f'[[tiers]]\nname = "echo"\nbackend = "openai"\nurl = "{fake_upstream}"\n'
              f'model = "echo"\n\n[router]\nenabled = false\n\n'
              f'[ledger]\npath = "{db}"\nflush_interval_s = 30\nbatch_size = 100000\n')
    gateway = start_gateway(config, tmp_path, ledger=db)
    acknowledged: list[str] = []
    stop = threading.Event()
    clients = [threading.Thread(target=_load, args=(gateway.url, acknowledged, stop, i))
               for i in range(CLIENTS)]
    try:
        for thread in clients:
            thread.start()
        wait_until(lambda: len(acknowledged) >= 400, timeout=60)
        gateway.process.send_signal(signal.SIGKILL)
        assert gateway.process.wait(10) == -signal.SIGKILL
    finally:
        stop.set()
        if gateway.process.poll() is None:
            gateway.process.kill()
        for thread in clients:
            thread.join(15)
    seen = set(acknowledged)
    assert len(seen) == len(acknowledged) >= 400
    assert list(tmp_path.glob(SPOOL_GLOB)), "the dead process's spool is left for replay"

    again = start_gateway(config, tmp_path, name="again", ledger=db)
    try:
        def stored() -> set[str]:
            with sqlite3.connect(db) as ledger:
                return {row[0] for row in ledger.execute("SELECT id FROM requests")}

        deadline = time.monotonic() + 30  # the replayed rows are written by the writer thread
        while not seen <= stored() and time.monotonic() < deadline:
            time.sleep(0.1)
        with sqlite3.connect(db) as ledger:
            rows = {row[0]: row[1:] for row in ledger.execute(
                "SELECT id, status, answered_by, completion_tokens FROM requests")}
            tried = {row[0] for row in ledger.execute("SELECT request_id FROM request_models")}
        lost = seen - rows.keys()
        assert not lost, f"{len(lost)} of {len(seen)} acknowledged rows lost"
        for request_id in seen:
            status, answered_by, tokens = rows[request_id]
            assert (status, answered_by) == (200, "echo")
            assert tokens is not None and tokens > 0
        assert seen <= tried  # the attempt rows came back too
        # Replayed, the dead process's segments go; the new process's own one stays open.
        wait_until(lambda: all(_locked(p) for p in tmp_path.glob(SPOOL_GLOB)), timeout=10)
    finally:
        stop_gateway(again)


@pytest.mark.parametrize("stream", [False, True])
def test_the_row_is_spooled_before_the_answers_last_byte(tmp_path: Path, stream: bool) -> None:
    """At the moment the app hands the last byte (the JSON body's end, or a stream's [DONE])
    to the server, the request's line is already in the spool file."""
    config = gateway_config(tier("echo"), ledger={"path": str(tmp_path / "l.db"),
                                                  "flush_interval_s": 30})
    app = build_app(config, FakeBackend("echo"))
    body = (b'{"model": "echo", "stream": %s, "messages": [{"role": "user", "content": "hi"}]}'
            % (b"true" if stream else b"false"))
    seen: dict[str, Any] = {}

    def spooled(request_id: str) -> bool:
        return any(request_id.encode() in p.read_bytes() for p in tmp_path.glob(SPOOL_GLOB))

    async def receive() -> dict[str, Any]:
        if not seen.get("sent"):
            seen["sent"] = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client stays
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            seen["id"] = dict(message["headers"])[b"x-request-id"].decode()
            seen["status"] = message["status"]
        elif message["type"] == "http.response.body":
            chunk = message.get("body", b"")
            last = b"[DONE]" in chunk if stream else not message.get("more_body", False)
            if last and chunk:
                seen["spooled_at_last_byte"] = spooled(seen["id"])

    async def main() -> None:
        async with app.router.lifespan_context(app):
            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                     "method": "POST", "scheme": "http", "path": "/v1/chat/completions",
                     "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
                     "server": ("testserver", 80), "client": ("127.0.0.1", 1),
                     "headers": [(b"content-type", b"application/json"),
                                 (b"content-length", str(len(body)).encode())]}
            await app(scope, receive, send)

    asyncio.run(main())
    assert seen["status"] == 200
    assert seen["spooled_at_last_byte"] is True


def _locked(path: Path) -> bool:
    """Whether a live process holds this segment."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _rows(request_id: str) -> list[tuple[str, dict[str, Any]]]:
    return [("requests", {"id": request_id, "created": datetime.now(UTC),
                          "endpoint": "chat/completions", "status": 200, "latency_ms": 1.0})]


def _lines(segment: Path) -> list[bytes]:
    """A segment's lines: what comes before the zeros that fill the rest of it."""
    return segment.read_bytes().rstrip(b"\0").splitlines()


def test_the_segment_is_truncated_once_its_requests_are_durable(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append("a", _rows("a"))
    spool.append("b", _rows("b"))
    (segment,) = tmp_path.glob(SPOOL_GLOB)
    assert len(_lines(segment)) == 2
    spool.durable(["a"])
    assert len(_lines(segment)) == 2  # b is not in the database yet
    spool.durable(["b"])
    assert _lines(segment) == [] and not segment.read_bytes().strip(b"\0")
    spool.append("c", _rows("c"))  # lines start again at the beginning
    assert segment.read_bytes().count(b"\n") == 1 and b'"c"' in _lines(segment)[0]
    spool.durable(["c"])
    spool.close()
    assert not list(tmp_path.glob(SPOOL_GLOB))


def test_a_full_segment_is_replaced_and_removed_when_its_last_request_is_durable(
        tmp_path: Path) -> None:
    spool = Spool(tmp_path, rotate_bytes=1)  # every line ends a segment
    spool.append("a", _rows("a"))
    spool.append("b", _rows("b"))
    assert len(list(tmp_path.glob(SPOOL_GLOB))) == 2
    spool.durable(["a"])
    (left,) = tmp_path.glob(SPOOL_GLOB)
    assert b'"b"' in left.read_bytes()
    spool.close()  # b is not durable: its segment stays, unlocked, for the next start
    assert list(tmp_path.glob(SPOOL_GLOB)) == [left] and not _locked(left)


def test_only_dead_processes_segments_are_replayed(tmp_path: Path) -> None:
    live = Spool(tmp_path)
    live.append("live", _rows("live"))
    assert orphans(tmp_path) == []  # a sibling worker still appending: not ours to take
    dead = tmp_path / "ledger-spool-1-1.jsonl"
    dead.write_bytes(spool_module.orjson.dumps(_rows("dead")) + b"\n" + b'[["requests", {"id')
    (orphan,) = orphans(tmp_path)
    assert orphan.path == dead
    assert [rows[0][1]["id"] for rows in orphan.items()] == ["dead"]  # the torn line skipped
    assert orphans(tmp_path) == []  # taken by this replay: a second starting worker skips it
    orphan.remove()
    assert not dead.exists()
    live.close()


def _crash_after_spooling(spool_dir: Path, *request_ids: str) -> None:
    """A process that spools a row per id and dies by SIGKILL, leaving its segment."""
    script = ("import sys, os\n"
              "from datetime import UTC, datetime\n"
              "from greenroute.gateway.ledger.spool import Spool\n"
              "spool = Spool(__import__('pathlib').Path(sys.argv[1]))\n"
              "for i in sys.argv[2:]:\n"
              "    spool.append(i, [('requests', {'id': i, 'created': datetime.now(UTC),\n"
              "        'endpoint': 'completions', 'status': 200, 'latency_ms': 1.0})])\n"
              "os.kill(os.getpid(), 9)\n")
    crashed = subprocess.run([sys.executable, "-c", script, str(spool_dir), *request_ids],
                             check=False)
    assert crashed.returncode == -signal.SIGKILL


def test_replayed_rows_are_written_at_once_whatever_the_flush_window(tmp_path: Path) -> None:
    """A dead process's rows go to the ledger when the next writer starts, not a flush window
    later: with flush_interval_s = 30 they used to wait 30 s (the kill -9 test's replay then
    raced its own 30 s deadline, and lost once in ten runs)."""
    _crash_after_spooling(tmp_path, "lost")
    writer = LedgerWriter(f"sqlite:///{tmp_path / 'ledger.db'}", flush_interval_s=30,
                          batch_size=100_000, spool=True)
    started = time.monotonic()
    writer.start()
    try:
        wait_until(lambda: writer.written == 1, timeout=10)
        assert time.monotonic() - started < 10
        wait_until(lambda: not [p for p in tmp_path.glob(SPOOL_GLOB) if not _locked(p)],
                   timeout=10)  # replayed, the dead process's segment is gone
        writer.put_many(_rows("new"))
        time.sleep(0.5)
        assert writer.written == 1  # a live row still waits for its flush window
    finally:
        writer.close()
    assert writer.written == 2  # written on close


def test_a_writer_replays_a_dead_process_spool_and_keeps_rows_already_written(
        tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    url = f"sqlite:///{db}"
    first = LedgerWriter(url, flush_interval_s=0.05)
    first.start()
    final = _rows("written")
    final[0][1]["latency_ms"] = 42.0
    first.put_many(final)
    wait_until(lambda: first.written == 1)
    first.close()
    _crash_after_spooling(tmp_path, "written", "lost")
    writer = LedgerWriter(url, flush_interval_s=0.05, spool=True)
    writer.start()
    wait_until(lambda: writer.written == 2)  # both inserted; "written" is skipped as a duplicate
    wait_until(lambda: not [p for p in tmp_path.glob(SPOOL_GLOB) if not _locked(p)])
    writer.close()
    with sqlite3.connect(db) as ledger:
        rows = dict(ledger.execute("SELECT id, latency_ms FROM requests"))
    assert rows == {"written": 42.0, "lost": 1.0}  # the final row was not replaced
    assert not list(tmp_path.glob(SPOOL_GLOB))


def test_a_line_longer_than_a_segment_gets_a_segment_of_its_own(tmp_path: Path) -> None:
    """A ledger keeping texts can have a request whose line outgrows `rotate_bytes`."""
    spool = Spool(tmp_path, rotate_bytes=4096)
    spool.append("short", _rows("short"))
    long = _rows("long")
    long[0][1]["prompt_text"] = "x" * 10_000
    spool.append("long", long)
    spool.append("after", _rows("after"))
    segments = sorted(tmp_path.glob(SPOOL_GLOB), key=lambda p: p.stat().st_size)
    assert [len(_lines(p)) for p in segments] == [1, 1, 1]
    assert b'"long"' in _lines(segments[-1])[0] and segments[-1].stat().st_size > 10_000
    (orphan,) = [o for o in _replay_after_close(spool, tmp_path) if b'"long"' in
                 o.path.read_bytes()]
    assert [rows[0][1]["id"] for rows in orphan.items()] == ["long"]  # zeros after it skipped
    orphan.release()


def _replay_after_close(spool: Spool, directory: Path) -> list[Orphan]:
    spool.close()  # nothing is durable: every segment stays for the next start
    return orphans(directory)


class _Model:
    """Enough of a backend for an attempt on an unmetered tier."""

    model_id = "echo"
    reports_progress = False


@pytest.mark.parametrize("ended", [(200, None), (499, "client_closed")])
def test_a_streams_spooled_rows_are_its_ledger_rows_only_if_it_ends_as_acknowledged(
        tmp_path: Path, ended: tuple[int, str | None]) -> None:
    """A stream's rows are spooled before its last event (`acknowledge`); with no metered
    model still counting they are final, and the ledger gets them with the latency to the
    stream's end. A stream that ends otherwise (the client left during the last event) gets
    rows built again."""
    writer = LedgerWriter(f"sqlite:///{tmp_path}/ledger.db", spool=True,
                          spill_dir=tmp_path)
    writer.start()
    accounting = Accounting(Fleet([]), writer, store_text=False)
    record = accounting.open("chatcmpl-stream", "chat/completions")
    record.requested_model, record.route = "echo", "direct"
    attempt = record.attempt("echo", _Model())  # type: ignore[arg-type]
    stream = record.streaming(attempt)
    attempt.done(Usage(3, 5))
    stream.finishing(200, None)
    spooled = orjson.loads(next(line for segment in tmp_path.glob(SPOOL_GLOB)
                                for line in _lines(segment) if b"chatcmpl-stream" in line))
    time.sleep(0.02)
    stream.ended(*ended)
    writer.close()
    with sqlite3.connect(tmp_path / "ledger.db") as connection:
        status, error, latency_ms, completion = connection.execute(
            "SELECT status, error, latency_ms, completion_tokens FROM requests").fetchone()
    assert (status, error, completion) == (*ended, 5)
    assert latency_ms >= spooled[0][1]["latency_ms"] + 20  # the end, not the acknowledgement
