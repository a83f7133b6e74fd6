"""One generation request between its validation and its response: the models it calls, and the
one answer it sends back.

The direct path (gateway/app.py) and model `green` (gateway/green.py) call models only through
an `Exchange`, which does what every call needs around it: the energy track is current, a
client that disconnects cancels the call, a failed model is closed in the accounting. What they
return, a `Whole` or a `Streamed` answer, `respond` turns into the response and the request's
accounting (gateway/accounting.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.responses import Response
from starlette.types import Receive

from greenroute.backends.base import Backend, BackendError, Chunk, ChunkStream, Completion, Endpoint
from greenroute.gateway import cascade
from greenroute.gateway.accounting import Attempt, RequestRecord
from greenroute.gateway.streaming import (
    EventStream,
    EventStreamResponse,
    until_disconnect,
    watch_disconnect,
)


@dataclass(frozen=True, slots=True)
class Whole:
    """An answer sent at once: `attempt`'s completion. A client that asked for a stream gets it
    as events (a cascade stage's answer, buffered to be judged)."""

    attempt: Attempt
    completion: Completion


@dataclass(frozen=True, slots=True)
class Streamed:
    """A stream that has produced its first batch (so it has started), relayed to its end."""

    attempt: Attempt
    first: Sequence[Chunk] | None
    rest: ChunkStream


Answer = Whole | Streamed


class Exchange:
    """The calls one request makes, and its response.

    One watcher on the client's `http.disconnect` serves every call the request makes, so a
    failover after a failed call still notices a client that leaves; it stops when the request
    ends with a whole answer or an error (`close`), or goes with a stream to its end.
    """

    def __init__(self, endpoint: Endpoint, body: dict[str, Any], record: RequestRecord,
                 headers: dict[str, str], receive: Receive,
                 stop: asyncio.Future[None] | None = None) -> None:
        self.endpoint = endpoint
        self.body = body  # validated: its options hold their validated values (schemas.py)
        self.record = record
        self.headers = headers
        self.stream = bool(body.get("stream"))
        options = body.get("stream_options")  # read now: a backend may change the body
        self.include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
        self._watcher = watch_disconnect(receive)
        self._stop = stop  # the end of the shutdown grace (gateway/draining.py)

    async def answer(self, tier: str, backend: Backend, body: dict[str, Any]) -> Answer:
        """`tier` answers `body` the way the client asked: whole or streamed."""
        if self.stream:
            return await self.open_stream(tier, backend, body)
        return await self.create(tier, backend, body)

    async def create(self, tier: str, backend: Backend, body: dict[str, Any]) -> Whole:
        """`tier`'s whole answer to `body`."""
        attempt = self.record.attempt(tier, backend)
        try:
            with attempt.running():
                completion = await until_disconnect(self._watcher,
                                                    backend.create(self.endpoint, body),
                                                    self._stop)
        except BackendError:
            attempt.done(None)
            raise
        attempt.done(completion.usage)
        return Whole(attempt, completion)

    async def open_stream(self, tier: str, backend: Backend, body: dict[str, Any]) -> Streamed:
        """`tier`'s stream, once its first batch is there: failing to start is still an HTTP
        error (or a failover), not an error event after a 200."""
        attempt = self.record.attempt(tier, backend)
        with attempt.running():
            chunks = backend.stream(self.endpoint, body)
            try:
                first = await until_disconnect(self._watcher, anext(chunks, None), self._stop)
            except BaseException as exc:
                await chunks.aclose()
                if isinstance(exc, BackendError):
                    attempt.done(None)
                raise
        return Streamed(attempt, first, chunks)

    async def read_until(self, streamed: Streamed,
                         enough: Callable[[Sequence[Chunk]], bool]) -> list[Chunk]:
        """A stream's chunks from its first batch on, read until `enough` of them are there or
        it ends (a cascade stage judged on its first token). A failure closes the stream."""
        held = list(streamed.first or ())
        try:
            while not enough(held):
                batch = await until_disconnect(self._watcher, anext(streamed.rest, None),
                                               self._stop)
                if batch is None:
                    break
                held.extend(batch)
        except BaseException as exc:
            await streamed.rest.aclose()
            if isinstance(exc, BackendError):
                streamed.attempt.done(None)
            raise
        return held

    async def collect(self, streamed: Streamed, held: Sequence[Chunk]) -> Whole:
        """The rest of a stream read to its end and assembled into a whole answer, as the
        client asked for it (a kept first-token stage, for a client that did not stream)."""
        chunks = await self.read_until(Streamed(streamed.attempt, held, streamed.rest),
                                       lambda _: False)
        usage = next((c.usage for c in reversed(chunks) if c.usage is not None), None)
        streamed.attempt.done(usage)
        data = cascade.client_view(self.endpoint, self.body,
                                   cascade.assemble(self.endpoint, chunks))
        return Whole(streamed.attempt, Completion(orjson.dumps(data), usage, data))

    async def drop(self, streamed: Streamed, held: Sequence[Chunk]) -> None:
        """Stop a stream whose answer is not used: the model stops generating, and the attempt
        keeps the energy it spent and its tokens (the usage, if it came with the chunks read,
        else about one token per answer chunk)."""
        await streamed.rest.aclose()
        streamed.attempt.answer_chunks = cascade.answer_chunks(self.endpoint, held)
        streamed.attempt.done(next((c.usage for c in held if c.usage is not None), None))

    def respond(self, answer: Answer) -> Response:
        """The response for `answer`, its energy added, its accounting closed (a stream's when
        it ends)."""
        headers, include_usage = self.headers, self.include_usage
        if isinstance(answer, Streamed):
            observer = self.record.streaming(answer.attempt)
            headers["cache-control"] = "no-cache"
            headers["x-accel-buffering"] = "no"  # nginx: do not buffer the event stream
            events = EventStream(answer.first, answer.rest, include_usage, observer, self._stop)
            return EventStreamResponse(events, self._watcher, headers)
        self.close()
        completion = self.record.answer(answer.attempt, answer.completion, headers)
        if not self.stream:
            return Response(completion.json(), media_type="application/json", headers=headers)
        headers["cache-control"] = "no-cache"
        return Response(cascade.as_event_stream(self.endpoint, completion.parsed(), include_usage),
                        media_type="text/event-stream", headers=headers)

    def close(self) -> None:
        """Stop watching for a disconnect: the request ends without a stream."""
        self._watcher.cancel()
