"""`EventStreamResponse` (gateway/streaming.py) over raw ASGI: however a stream ends (to its
last chunk, its client gone before the first byte or between two, the shutdown grace over), its
upstream is closed and its accounting ended exactly once, so no stream loses its ledger row."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import orjson
from starlette.types import Message

from greenroute.backends.base import Chunk
from greenroute.gateway.streaming import DONE, EventStream, EventStreamResponse

SCOPE = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}


class Upstream:
    """A started stream of batches, as `Backend.stream` returns one after its first batch."""

    def __init__(self, batches: int, hang: bool = False) -> None:
        self.left = [[Chunk(b'{"n": %d}' % i)] for i in range(1, batches)]
        self.hang = hang
        self.closed = 0

    def __aiter__(self) -> Upstream:
        return self

    async def __anext__(self) -> Sequence[Chunk]:
        if self.left:
            return self.left.pop(0)
        if self.hang:
            await asyncio.sleep(10)
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self.closed += 1


class Observer:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.endings: list[tuple[int, str | None]] = []

    def relayed(self, chunk: Chunk) -> None:
        self.chunks.append(chunk.data)

    def usage_chunk(self, chunk: Chunk) -> bytes:
        return chunk.data

    def finishing(self, status: int, code: str | None) -> None:
        pass

    def ended(self, status: int, code: str | None) -> None:
        self.endings.append((status, code))


def serve(batches: int, *, gone_before: bool = False, gone_after_bytes: int | None = None,
          gone_after_s: float | None = None, stop_before: bool = False, hang: bool = False
          ) -> tuple[Upstream, Observer, list[Message], asyncio.Future[None]]:
    """One streamed response over ASGI; the client leaves (or the grace ends) as asked."""
    upstream, observer, sent = Upstream(batches, hang), Observer(), []

    async def main() -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        watcher: asyncio.Future[None] = loop.create_future()
        stop: asyncio.Future[None] = loop.create_future()
        if gone_before:
            watcher.set_result(None)
        if gone_after_s is not None:
            loop.call_later(gone_after_s, watcher.set_result, None)
        if stop_before:
            stop.set_result(None)

        async def send(message: Message) -> None:
            sent.append(message)
            if gone_after_bytes is not None and len(sent) > gone_after_bytes:
                watcher.set_result(None)
                await asyncio.sleep(10)  # a client that stopped reading: the write blocks

        async def receive() -> Message:
            raise AssertionError("the response never reads: the watcher does")

        events = EventStream([Chunk(b'{"n": 0}')], upstream, False, observer, stop)
        response = EventStreamResponse(events, watcher, {})
        await asyncio.wait_for(response(SCOPE, receive, send), timeout=5)
        return watcher

    watcher = asyncio.run(main())
    return upstream, observer, sent, watcher


def bodies(sent: list[Message]) -> list[bytes]:
    return [m["body"] for m in sent if m["type"] == "http.response.body" and m["body"]]


def test_a_stream_to_its_end_sends_every_batch_and_done_and_ends_once() -> None:
    upstream, observer, sent, watcher = serve(3)
    assert bodies(sent) == [b'data: {"n": 0}\n\n', b'data: {"n": 1}\n\n', b'data: {"n": 2}\n\n',
                            DONE]
    assert observer.endings == [(200, None)]
    assert upstream.closed == 1
    assert watcher.cancelled()  # the request stops watching for a disconnect


def test_a_client_gone_before_the_response_starts_still_ends_the_stream() -> None:
    upstream, observer, sent, _ = serve(3, gone_before=True)
    assert sent == []
    assert observer.endings == [(499, "client_closed")]  # its ledger row is written
    assert upstream.closed == 1  # and the model stops generating


def test_a_client_gone_between_two_writes_ends_the_stream_once() -> None:
    upstream, observer, sent, _ = serve(5, gone_after_bytes=2)  # start, then one batch
    assert len(bodies(sent)) == 2  # the write that blocked was the second batch
    assert observer.endings == [(499, "client_closed")]
    assert upstream.closed == 1


def test_a_client_gone_while_the_upstream_is_silent_ends_the_stream_once() -> None:
    upstream, observer, sent, _ = serve(1, gone_after_s=0.05, hang=True)
    assert bodies(sent) == [b'data: {"n": 0}\n\n']  # then it waited on the upstream
    assert observer.chunks == [b'{"n": 0}']
    assert observer.endings == [(499, "client_closed")]
    assert upstream.closed == 1


def test_a_stream_cut_by_the_shutdown_grace_ends_with_an_error_event() -> None:
    upstream, observer, sent, _ = serve(3, stop_before=True)
    assert sent[0]["type"] == "http.response.start"
    last = orjson.loads(bodies(sent)[-1].removeprefix(b"data: "))
    assert last["error"]["code"] == "server_shutting_down"
    assert observer.endings == [(503, "server_shutting_down")]
    assert upstream.closed == 1
