"""Server-sent events for streamed answers, and noticing clients that leave.

A client that disconnects must cancel the upstream generation at once, even while the upstream
is silent (a long prompt being processed, a hung server): waiting for the next write to fail is
not enough. So both the event stream and non-streamed requests listen for `http.disconnect`
beside the work, and cancel the work when it comes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import anyio
import orjson
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from backends.base import BackendError, Chunk
from gateway.errors import APIError, server_error

log = logging.getLogger("greenroute.gateway")
T = TypeVar("T")

DONE = b"data: [DONE]\n\n"


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it and raising ClientGone if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.wait((task,))  # let the work see its cancellation and clean up first
    raise ClientGone


async def sse_events(first: Chunk | None, rest: AsyncIterator[Chunk],
                     include_usage: bool) -> AsyncIterator[bytes]:
    """Encode chunks as SSE; a failure after the first byte becomes an error event.

    The usage-only chunk is forwarded only to clients that asked for it, as OpenAI does.
    """
    try:
        chunk = first
        while chunk is not None:
            if include_usage or not chunk.usage_only:
                yield b"data: " + chunk.data + b"\n\n"
            chunk = await anext(rest, None)
        yield DONE
    except BackendError as exc:
        yield b"data: " + orjson.dumps(APIError.from_backend(exc).body()) + b"\n\n"
    except Exception:
        log.exception("stream failed")
        yield b"data: " + orjson.dumps(server_error().body()) + b"\n\n"
    finally:
        with anyio.CancelScope(shield=True):  # close upstream even when cancelled by a disconnect
            await rest.aclose()


class EventStreamResponse(StreamingResponse):
    """A streaming response that stops (and so closes its source) when the client disconnects."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:
            async def stream() -> None:
                try:
                    await self.stream_response(send)
                except OSError:
                    pass  # the client is gone; the listener below ends the group
                group.cancel_scope.cancel()

            group.start_soon(stream)
            await _wait_for_disconnect(receive)
            group.cancel_scope.cancel()
