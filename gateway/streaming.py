"""Server-sent events for streamed answers, and noticing clients that leave.

A client that disconnects must cancel the upstream generation at once, even while the upstream
is silent (a long prompt being processed, a hung server): waiting for the next write to fail is
not enough. So both the event stream and non-streamed requests listen for `http.disconnect`
beside the work, and cancel the work when it comes. They listen the same way for the end of the
server's shutdown grace (gateway/draining.py): work still running then is cancelled too, but the
client is told, with a 503 or a final error event.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncGenerator, Awaitable, Sequence
from typing import Protocol, TypeVar

import orjson
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from greenroute.backends.base import BackendError, Chunk, ChunkStream
from greenroute.gateway.errors import APIError, server_error, shutting_down

log = logging.getLogger("greenroute.gateway")
T = TypeVar("T")

DONE = b"data: [DONE]\n\n"


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class Stopped(Exception):
    """The server's shutdown grace ended before the answer was ready."""


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def watch_disconnect(receive: Receive) -> asyncio.Future[None]:
    """A task that completes when the client disconnects (call once the body has been read)."""
    return asyncio.ensure_future(_wait_for_disconnect(receive))


async def until_disconnect(watcher: asyncio.Future[None], work: Awaitable[T],
                           stop: asyncio.Future[None] | None = None) -> T:
    """Await `work`, cancelling it and raising ClientGone if `watcher` completes first, or
    Stopped if `stop` (the end of the shutdown grace) does.

    The work runs in the calling task, which the watcher's callback cancels: no task and no
    `asyncio.wait` per call, which cost ~30 us of a pass-through request's CPU here
    (docs/gateway.md). A cancellation this function did not cause (the server stopping the
    request's task) goes through unchanged.
    """
    if watcher.done() or (stop is not None and stop.done()):
        if inspect.iscoroutine(work):
            work.close()  # never started: nothing to clean up
        raise ClientGone if watcher.done() else Stopped
    task = asyncio.current_task()
    assert task is not None
    reason: list[type[ClientGone] | type[Stopped]] = []
    over = False  # the work has ended: a callback already scheduled then must do nothing

    def cancel_for(why: type[ClientGone] | type[Stopped]) -> None:
        if not over and not reason:
            reason.append(why)
            task.cancel()

    def client_left(_: asyncio.Future[None]) -> None:
        cancel_for(ClientGone)

    def grace_ended(_: asyncio.Future[None]) -> None:
        cancel_for(Stopped)

    watcher.add_done_callback(client_left)
    if stop is not None:
        stop.add_done_callback(grace_ended)
    try:
        result = await work
    except asyncio.CancelledError:
        if reason and task.uncancel() == 0:
            raise reason[0] from None
        raise
    finally:
        over = True
        watcher.remove_done_callback(client_left)
        if stop is not None:
            stop.remove_done_callback(grace_ended)
    if reason:  # cancelled, but the work swallowed it and answered: the request goes on
        task.uncancel()
    return result


class StreamObserver(Protocol):
    """What the gateway's accounting sees of a stream: every answer chunk relayed, the chunk
    carrying usage (its returned bytes replace the chunk's: they add the energy), and how the
    stream ended."""

    def relayed(self, chunk: Chunk) -> None: ...

    def usage_chunk(self, chunk: Chunk) -> bytes: ...

    def finishing(self, status: int, code: str | None) -> None: ...  # before the last event

    def ended(self, status: int, code: str | None) -> None: ...


class EventStream:
    """The server-sent events of one stream: batches of chunks encoded as SSE, one write per
    batch; a failure after the first byte becomes an error event.

    The usage-only chunk is forwarded only to clients that asked for it, as OpenAI does. A
    stream cancelled once `stop` is done was cut by the end of the shutdown grace, not by its
    client: EventStreamResponse sends its error event. `aclose` ends the stream's upstream and
    accounting whether or not it was ever iterated: a client gone before its response started
    still gets its ledger row.
    """

    def __init__(self, first: Sequence[Chunk] | None, rest: ChunkStream, include_usage: bool,
                 observer: StreamObserver | None = None,
                 stop: asyncio.Future[None] | None = None) -> None:
        self.first = first
        self.rest = rest
        self.include_usage = include_usage
        self.observer = observer
        self.stop = stop
        self._events: AsyncGenerator[bytes, None] | None = None

    def __aiter__(self) -> AsyncGenerator[bytes, None]:
        if self._events is None:
            self._events = self._encode()
        return self._events

    async def aclose(self) -> None:
        """Close the stream where it stands: its upstream is closed and its accounting ended
        exactly once (as cut by the client, or by the shutdown), unless it already ended."""
        if self._events is None:  # never iterated: the generator's finally would never run
            self._events = self._encode()
            await self._events.aclose()  # runs nothing; iterating it now yields nothing
            await self._end(499, "client_closed")
        else:
            await self._events.aclose()

    async def _encode(self) -> AsyncGenerator[bytes, None]:
        observer = self.observer
        status: int = 499  # unless it gets to the end or to an error
        code: str | None = "client_closed"
        try:
            batch = self.first
            while batch is not None:
                parts = []
                for chunk in batch:
                    data = chunk.data
                    if observer is not None:
                        if chunk.usage is not None:
                            data = observer.usage_chunk(chunk)
                        if not chunk.usage_only:
                            observer.relayed(chunk)
                    if self.include_usage or not chunk.usage_only:
                        parts.append(b"data: " + data + b"\n\n")
                if parts:
                    yield b"".join(parts)
                batch = await anext(self.rest, None)
            status, code = 200, None
            if observer is not None:
                observer.finishing(status, code)
            yield DONE
        except BackendError as exc:
            error = APIError.from_backend(exc)
            status, code = error.status, error.code
            if observer is not None:
                observer.finishing(status, code)
            yield b"data: " + orjson.dumps(error.body()) + b"\n\n"
        except Exception:
            log.exception("stream failed")
            error = server_error()
            status, code = error.status, error.code
            if observer is not None:
                observer.finishing(status, code)
            yield b"data: " + orjson.dumps(error.body()) + b"\n\n"
        finally:
            await self._end(status, code)

    async def _end(self, status: int, code: str | None) -> None:
        if status == 499 and self.stop is not None and self.stop.done():
            error = shutting_down()
            status, code = error.status, error.code
        try:
            await self.rest.aclose()  # also on cancellation (client gone): it closes the upstream
        finally:
            if self.observer is not None:
                self.observer.ended(status, code)


class EventStreamResponse(StreamingResponse):
    """A streaming response that stops (and so closes its source) when the client disconnects,
    or when the shutdown grace ends (the events' `stop`), which it tells the client with an
    error event.

    `watcher` completes on disconnect (see `watch_disconnect`); one watcher serves the whole
    request, from waiting for the first chunk to the last byte.
    """

    media_type = "text/event-stream"

    def __init__(self, events: EventStream, watcher: asyncio.Future[None],
                 headers: dict[str, str]) -> None:
        super().__init__(events, headers=headers)
        self.events = events
        self.watcher = watcher

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:  # in the request's own task, which the watcher cancels (see until_disconnect)
            await until_disconnect(self.watcher, self.stream_response(sending),
                                   self.events.stop)
        except ClientGone:
            pass
        except Stopped:  # not the client: the shutdown grace ended
            await self.events.aclose()
            await self._stopped(send, started)
        except OSError:
            pass  # the client went away between two writes
        finally:
            self.watcher.cancel()
            await self.events.aclose()  # the upstream and the accounting end, whatever happened

    async def _stopped(self, send: Send, started: bool) -> None:
        """End a stream cut by the shutdown with an OpenAI-shaped error event."""
        try:
            if not started:
                await send({"type": "http.response.start", "status": self.status_code,
                            "headers": self.raw_headers})
            await send({"type": "http.response.body", "more_body": False,
                        "body": b"data: " + orjson.dumps(shutting_down().body()) + b"\n\n"})
        except OSError:
            pass  # the client left as well
