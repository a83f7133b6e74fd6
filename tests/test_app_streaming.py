"""Clients that leave, in process over raw ASGI: the gateway cancels the backend's work at once
(waiting for an answer, or mid-stream) and the ledger records the request as 499.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
from fake_backends import (
    Exchange,
    FakeBackend,
    Reply,
    asgi_call,
    build_app,
    gateway_config,
    ledger,
    ledger_ids,
    tier,
)
from routing_fixtures import handmade_artifact

from greenroute.gateway.config import GatewayConfig

HELLO = [{"role": "user", "content": "hello there"}]


async def leave_when(condition_met: asyncio.Event | None, backend: FakeBackend,
                     leave: asyncio.Event) -> None:
    """Disconnect once the backend has been called (and, if given, once `condition_met`)."""
    while not backend.calls:
        await asyncio.sleep(0.005)
    if condition_met is not None:
        await condition_met.wait()
    await asyncio.sleep(0.02)  # the backend is now waiting, or streaming
    leave.set()


def run(config: GatewayConfig, backends: list[FakeBackend], body: dict[str, object],
        waits_on: FakeBackend, after_first_bytes: bool = False,
        path: str = "/v1/chat/completions") -> Exchange:
    """One request whose client leaves while `waits_on` works; the app's whole lifespan runs,
    so the ledger is flushed when this returns."""
    async def main() -> Exchange:
        app = build_app(config, *backends)
        exchange = Exchange()
        leave = asyncio.Event()
        async with app.router.lifespan_context(app):
            await asyncio.wait_for(asyncio.gather(
                asgi_call(app, path, orjson.dumps(body), leave, exchange),
                leave_when(exchange.first_body if after_first_bytes else None, waits_on,
                           leave)), timeout=10)
        return exchange

    return asyncio.run(main())


def config(db: Path, **sections: object) -> GatewayConfig:
    return gateway_config(tier("small", 1.0), tier("large", 5.0),
                          ledger={"path": str(db)}, **sections)


def test_a_client_that_leaves_before_a_whole_answer_cancels_the_backend(tmp_path: Path) -> None:
    small = FakeBackend("small", reply=Reply(hang=True))
    exchange = run(config(tmp_path / "l.db"), [small, FakeBackend("large")],
                   {"model": "small", "messages": HELLO}, waits_on=small)
    assert small.cancelled == 1
    assert exchange.status == 499  # never seen by the client, but it is what is recorded
    request_id, = ledger_ids(tmp_path / "l.db")
    row, models = ledger(tmp_path / "l.db", request_id)
    assert row is not None
    assert (row["status"], row["error"], row["route"], row["answered_by"]) == (
        499, "client_closed", "direct", None)
    assert [(m["tier"], m["answered"]) for m in models] == [("small", 0)]


def test_a_client_that_leaves_before_the_first_chunk_cancels_the_stream(tmp_path: Path) -> None:
    small = FakeBackend("small", reply=Reply(hang=True))
    exchange = run(config(tmp_path / "l.db"), [small, FakeBackend("large")],
                   {"model": "small", "messages": HELLO, "stream": True}, waits_on=small)
    assert small.cancelled == 1 and small.streams_closed == 1
    assert exchange.status == 499
    row, _ = ledger(tmp_path / "l.db", ledger_ids(tmp_path / "l.db")[0])
    assert row is not None and (row["status"], row["error"], row["stream"]) == (
        499, "client_closed", 1)


def test_a_client_that_leaves_mid_stream_closes_the_backends_stream(tmp_path: Path) -> None:
    small = FakeBackend("small", reply=Reply(text="many words to stream", hang_midstream=True))
    exchange = run(config(tmp_path / "l.db"), [small, FakeBackend("large")],
                   {"model": "small", "messages": HELLO, "stream": True}, waits_on=small,
                   after_first_bytes=True)
    assert exchange.status == 200  # the stream had begun
    assert exchange.body.startswith(b"data: ") and b"many" in exchange.body
    assert b"[DONE]" not in exchange.body
    assert small.cancelled == 1 and small.streams_closed == 1
    row, models = ledger(tmp_path / "l.db", exchange.headers["x-request-id"])
    assert row is not None
    assert (row["status"], row["error"], row["ttft_ms"] is not None) == (
        499, "client_closed", True)


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_during_a_cascade_stage_stops_the_cascade(
        tmp_path: Path, stream: bool) -> None:
    router = handmade_artifact(tmp_path, steps=[("small", 0.6, 0.5)], largest="large",
                               energy=[1.0, 5.0], thresholds={0.5: 0.3})
    small, large = FakeBackend("small", reply=Reply(hang=True)), FakeBackend("large")
    db = tmp_path / "l.db"
    exchange = run(config(db, router={"path": str(router), "default_target": 0.5}),
                   [small, large], {"model": "green", "messages": HELLO, "stream": stream},
                   waits_on=small)
    assert small.cancelled == 1
    assert large.calls == []  # a client that left gets no second tier
    assert exchange.status == 499
    row, models = ledger(db, ledger_ids(db)[0])
    assert row is not None
    assert (row["status"], row["error"], row["route"], row["quality_target"]) == (
        499, "client_closed", "cascade", 0.5)
    assert [m["tier"] for m in models] == ["small"]
