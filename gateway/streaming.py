"""Server-sent events for streamed answers, and noticing clients that leave.

A client that disconnects must cancel the upstream generation at once, even while the upstream
is silent (a long prompt being processed, a hung server): waiting for the next write to fail is
not enough. So both the event stream and non-streamed requests listen for `http.disconnect`
beside the work, and cancel the work when it comes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Protocol, TypeVar

import orjson
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from greenroute.backends.base import BackendError, Chunk, ChunkStream
from greenroute.gateway.errors import APIError, server_error

log = logging.getLogger("greenroute.gateway")
T = TypeVar("T")

DONE = b"data: [DONE]\n\n"


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def watch_disconnect(receive: Receive) -> asyncio.Future[None]:
    """A task that completes when the client disconnects (call once the body has been read)."""
    return asyncio.ensure_future(_wait_for_disconnect(receive))


async def until_disconnect(watcher: asyncio.Future[None], work: Awaitable[T]) -> T:
    """Await `work`, cancelling it and raising ClientGone if `watcher` completes first."""
    task = asyncio.ensure_future(work)
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.wait((task,))  # let the work see its cancellation and clean up first
    raise ClientGone


class StreamObserver(Protocol):
    """What the gateway's accounting sees of a stream: the chunk carrying usage (its returned
    bytes replace the chunk's: they add the energy), and how the stream ended."""

    def usage_chunk(self, chunk: Chunk) -> bytes: ...

    def ended(self, status: int, code: str | None) -> None: ...


async def sse_events(first: Sequence[Chunk] | None, rest: ChunkStream, include_usage: bool,
                     observer: StreamObserver | None = None) -> AsyncIterator[bytes]:
    """Encode batches of chunks as SSE, one write per batch; a failure after the first byte
    becomes an error event.

    The usage-only chunk is forwarded only to clients that asked for it, as OpenAI does.
    """
    status: int = 499  # unless it gets to the end or to an error
    code: str | None = "client_closed"
    try:
        batch = first
        while batch is not None:
            parts = []
            for chunk in batch:
                data = chunk.data
                if chunk.usage is not None and observer is not None:
                    data = observer.usage_chunk(chunk)
                if include_usage or not chunk.usage_only:
                    parts.append(b"data: " + data + b"\n\n")
            if parts:
                yield b"".join(parts)
            batch = await anext(rest, None)
        status, code = 200, None
        yield DONE
    except BackendError as exc:
        error = APIError.from_backend(exc)
        status, code = error.status, error.code
        yield b"data: " + orjson.dumps(error.body()) + b"\n\n"
    except Exception:
        log.exception("stream failed")
        error = server_error()
        status, code = error.status, error.code
        yield b"data: " + orjson.dumps(error.body()) + b"\n\n"
    finally:
        try:
            await rest.aclose()  # also on cancellation (client gone): it closes the upstream
        finally:
            if observer is not None:
                observer.ended(status, code)


class EventStreamResponse(StreamingResponse):
    """A streaming response that stops (and so closes its source) when the client disconnects.

    `watcher` completes on disconnect (see `watch_disconnect`); one watcher serves the whole
    request, from waiting for the first chunk to the last byte.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], watcher: asyncio.Future[None],
                 headers: dict[str, str]) -> None:
        super().__init__(content, headers=headers)
        self.watcher = watcher

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = asyncio.ensure_future(self.stream_response(send))
        try:
            await asyncio.wait((stream, self.watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not stream.done():
                stream.cancel()  # the client left: the generator's finally closes the upstream
                await asyncio.wait((stream,))
            self.watcher.cancel()
        if not stream.cancelled() and isinstance(stream.exception(), OSError):
            return  # the client went away between two writes
        if not stream.cancelled():
            stream.result()
