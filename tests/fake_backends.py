"""Fake model backends, and the real gateway app run in this process in front of them.

`FakeBackend` implements the Backend Protocol (backends/base.py) and answers in OpenAI's wire
format, the way the real backends do: a whole completion, or batches of stream chunks ending
with a usage-only chunk; logprobs when the request asks for them; `max_tokens` honoured with
`finish_reason: "length"`. A test scripts it with a `Reply`: the text, the token logprob, a
`BackendError` before the first output or mid-stream, or a hang until the gateway cancels.

`serve` runs `create_app` with its lifespan (ledger writer, energy fleet, backends started and
closed) behind Starlette's TestClient, which is an httpx client: the real `openai` client can
use it as its transport. `asgi_call` speaks raw ASGI for what a TestClient cannot do: a client
that disconnects.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncGenerator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import orjson
from starlette.applications import Starlette
from starlette.testclient import TestClient
from starlette.types import Message

from greenroute.backends.base import BackendError, Chunk, Completion, Endpoint, Usage
from greenroute.gateway.app import create_app
from greenroute.gateway.config import GatewayConfig

BASE_URL = "http://testserver"
PROMPT_TOKENS = 5


@dataclass
class Reply:
    """What a fake backend does with each request it gets."""

    text: str = "a fake answer"
    logprob: float = -0.1  # of every token, when the request asks for logprobs
    gives_logprobs: bool = True  # False: a backend that ignores `logprobs`
    fail: BackendError | None = None  # raised before any output
    fail_calls: int | None = None  # with `fail`: only this many calls fail (None: all of them)
    fail_midstream: Exception | None = None  # raised after the first streamed batch
    hang: bool = False  # never answer; wait to be cancelled
    hang_midstream: bool = False  # stream the first batch, then wait to be cancelled


@dataclass
class FakeBackend:
    """A scripted Backend; it records what it was asked and what happened to each call."""

    name: str
    model_id: str = ""
    reply: Reply = field(default_factory=Reply)
    healthy: bool = True
    reports_progress = False  # the gateway's accounting reports its tokens (a class attribute)
    calls: list[tuple[Endpoint, dict[str, Any]]] = field(default_factory=list)
    cancelled: int = 0  # calls the gateway cancelled while they waited
    streams_closed: int = 0  # streams closed before their end (client gone, error)
    started: bool = False
    closed: bool = False

    def __post_init__(self) -> None:
        self.model_id = self.model_id or f"{self.name}-upstream"

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [body for _, body in self.calls]

    async def start(self) -> None:
        self.started = True

    async def aclose(self) -> None:
        self.closed = True

    async def list_models(self) -> list[str]:
        return [self.model_id]

    async def health(self) -> dict[str, Any]:
        return {"ok": self.healthy, "model": self.model_id}

    async def create(self, endpoint: Endpoint, body: dict[str, Any]) -> Completion:
        self.calls.append((endpoint, body))
        await self._before_output()
        tokens, finish = self._tokens(endpoint, body)
        usage = Usage(PROMPT_TOKENS, len(tokens))
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish,
                                  "logprobs": self._logprobs(endpoint, body, tokens)}
        if endpoint is Endpoint.CHAT:
            choice["message"] = {"role": "assistant", "content": "".join(tokens)}
        else:
            choice["text"] = "".join(tokens)
        answer = {"id": f"cmpl-{self.name}", "created": 1, "model": self.model_id,
                  "object": "chat.completion" if endpoint is Endpoint.CHAT
                  else "text_completion", "choices": [choice], "usage": _usage(usage)}
        return Completion(_dumps(answer), usage)

    def stream(self, endpoint: Endpoint, body: dict[str, Any]
               ) -> AsyncGenerator[Sequence[Chunk], None]:
        self.calls.append((endpoint, body))
        return self._stream(endpoint, body)

    async def _stream(self, endpoint: Endpoint, body: dict[str, Any]
                      ) -> AsyncGenerator[Sequence[Chunk], None]:
        finished = False
        try:
            await self._before_output()
            tokens, finish = self._tokens(endpoint, body)
            chat = endpoint is Endpoint.CHAT
            for position, token in enumerate(tokens):
                if position == 1 and self.reply.fail_midstream is not None:
                    raise self.reply.fail_midstream
                if position == 1 and self.reply.hang_midstream:
                    await self._hang()
                logprobs = self._logprobs(endpoint, body, [token])
                choice: dict[str, Any] = {"index": 0, "logprobs": logprobs,
                                          "finish_reason": None}
                if chat:
                    choice["delta"] = {"content": token}
                    if position == 0:
                        choice["delta"]["role"] = "assistant"
                else:
                    choice["text"] = token
                yield [Chunk(self._chunk(endpoint, [choice]))]
            last: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
            if chat:
                last["delta"] = {}
            else:
                last["text"] = ""
            usage = Usage(PROMPT_TOKENS, len(tokens))
            yield [Chunk(self._chunk(endpoint, [last])),
                   Chunk(self._chunk(endpoint, [], usage=_usage(usage)), usage=usage,
                         usage_only=True)]
            finished = True
        finally:
            if not finished:
                self.streams_closed += 1

    async def _before_output(self) -> None:
        if self.reply.hang:
            await self._hang()
        fail_calls = self.reply.fail_calls
        if self.reply.fail is not None and (fail_calls is None or len(self.calls) <= fail_calls):
            raise self.reply.fail

    async def _hang(self) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    def _tokens(self, endpoint: Endpoint, body: dict[str, Any]) -> tuple[list[str], str]:
        words = self.reply.text.split(" ")
        tokens = [word if i == 0 else " " + word for i, word in enumerate(words)]
        limit = body.get("max_tokens") or body.get("max_completion_tokens")
        if endpoint is Endpoint.COMPLETIONS and limit is None:
            limit = 16  # OpenAI's default for text completions
        if limit is not None and len(tokens) > limit:
            return tokens[:limit], "length"
        return tokens, "stop"

    def _logprobs(self, endpoint: Endpoint, body: dict[str, Any], tokens: list[str]
                  ) -> dict[str, Any] | None:
        value = self.reply.logprob
        if not self.reply.gives_logprobs:
            return None
        if endpoint is Endpoint.CHAT:
            if not body.get("logprobs"):
                return None
            top = body.get("top_logprobs") or 0
            return {"content": [{"token": t, "logprob": value, "bytes": list(t.encode()),
                                 "top_logprobs": [{"token": t, "logprob": value,
                                                   "bytes": list(t.encode())}] * top}
                                for t in tokens]}
        if body.get("logprobs") is None:
            return None
        return {"tokens": tokens, "token_logprobs": [value] * len(tokens),
                "top_logprobs": [{t: value} for t in tokens],
                "text_offset": list(range(len(tokens)))}

    def _chunk(self, endpoint: Endpoint, choices: list[dict[str, Any]],
               usage: dict[str, int] | None = None) -> bytes:
        data: dict[str, Any] = {"id": f"cmpl-{self.name}", "created": 1, "model": self.model_id,
                                "object": "chat.completion.chunk" if endpoint is Endpoint.CHAT
                                else "text_completion", "choices": choices}
        if usage is not None:
            data["usage"] = usage
        return _dumps(data)


def _usage(usage: Usage) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}


def _dumps(data: Any) -> bytes:
    return orjson.dumps(data)


# -- the gateway in this process ----------------------------------------------------------------

def tier(name: str, energy_hint: float = 1.0, **extra: Any) -> dict[str, Any]:
    """A tier's config; the gateway never dials its url (the test passes the backend in)."""
    return {"name": name, "backend": "openai", "url": "http://fake.invalid/v1",
            "model": f"{name}-upstream", "energy_hint": energy_hint, **extra}


def gateway_config(*tiers: dict[str, Any], **sections: Any) -> GatewayConfig:
    """A validated config: no router and no ledger unless a section asks for them."""
    data: dict[str, Any] = {"tiers": list(tiers), "router": {"enabled": False},
                            "ledger": {"enabled": False}} | sections
    return GatewayConfig.model_validate(data)


def build_app(config: GatewayConfig, *backends: FakeBackend) -> Starlette:
    return create_app(config, backends={backend.name: backend for backend in backends})


@contextmanager
def serve(config: GatewayConfig, *backends: FakeBackend) -> Iterator[TestClient]:
    """The app over these backends, its lifespan running until the block ends (which closes
    the backends and flushes the ledger)."""
    with TestClient(build_app(config, *backends), base_url=BASE_URL,
                    raise_server_exceptions=True) as client:
        yield client


def openai_client(http: TestClient, api_key: str = "unused") -> openai.OpenAI:
    """The real `openai` client, sending through the in-process app."""
    return openai.OpenAI(base_url=BASE_URL + "/v1", api_key=api_key, http_client=http,
                         max_retries=0)


def ledger(path: Path, request_id: str) -> tuple[sqlite3.Row | None, list[sqlite3.Row]]:
    """A request's row and its models' rows, read from the SQLite file the app left."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT * FROM requests WHERE id = ?", (request_id,)).fetchone()
        models = db.execute("SELECT * FROM request_models WHERE request_id = ? "
                            "ORDER BY position", (request_id,)).fetchall()
    return row, models


def ledger_ids(path: Path) -> list[str]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return [r[0] for r in db.execute("SELECT id FROM requests ORDER BY created")]


# -- raw ASGI: a client that leaves ---------------------------------------------------------

@dataclass
class Exchange:
    """What the app sent on one raw ASGI request."""

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    first_body: asyncio.Event = field(default_factory=asyncio.Event)


async def asgi_call(app: Starlette, path: str, body: bytes, leave: asyncio.Event,
                    exchange: Exchange) -> None:
    """POST `body` to `path`; the client disconnects when `leave` is set. The app's lifespan
    must already be running (`async with app.router.lifespan_context(app)`)."""
    scope: dict[str, Any] = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "server": ("testserver", 80), "client": ("127.0.0.1", 12345),
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())]}
    sent_body = False

    async def receive() -> Message:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            exchange.status = message["status"]
            exchange.headers = {k.decode(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            exchange.body += message.get("body", b"")
            if message.get("body"):
                exchange.first_body.set()

    await app(scope, receive, send)
