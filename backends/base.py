"""The one interface every model backend implements, and the errors it may raise.

The gateway speaks OpenAI's wire format on both sides, so a backend takes the client's request
body (a dict, already validated, `model` already resolved) and returns bytes ready for the client:
an upstream's JSON passes through untouched, and only what the gateway needs to account for the
request (token usage) is pulled out beside it.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson


class Endpoint(enum.Enum):
    """The generation endpoints; the value is the path under an OpenAI base URL."""

    CHAT = "chat/completions"
    COMPLETIONS = "completions"


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def from_openai(cls, usage: Any) -> Usage | None:
        """Read an OpenAI `usage` object; None when absent or malformed."""
        if not isinstance(usage, dict):
            return None
        try:
            return cls(int(usage.get("prompt_tokens") or 0),
                       int(usage.get("completion_tokens") or 0))
        except (TypeError, ValueError):
            return None


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole (non-streamed) answer: the JSON body for the client and what it cost.

    Backends leave `data` unset, so their bytes reach the client untouched. The gateway sets it
    when it has parsed the answer anyway (to judge a cascade stage, to add its energy): from
    then on `data` is the answer, perhaps changed, and it is written out once, by `json()`.
    """

    body: bytes
    usage: Usage | None
    data: dict[str, Any] | None = None

    def parsed(self) -> dict[str, Any]:
        """The answer as a dict: `data`, else the body parsed now (to keep it, build a
        Completion with it as `data`)."""
        if self.data is not None:
            return self.data
        parsed: dict[str, Any] = orjson.loads(self.body)
        return parsed

    def json(self) -> bytes:
        """The bytes the client gets: the backend's own, unless the gateway parsed them."""
        return self.body if self.data is None else orjson.dumps(self.data)


@dataclass(frozen=True, slots=True)
class Chunk:
    """One server-sent event of a streamed answer: its JSON payload, and usage if it carries any.

    `usage_only` marks the final chunk with no choices that exists only to carry usage; the
    gateway forwards it only to clients that asked for it (`stream_options.include_usage`).
    """

    data: bytes
    usage: Usage | None = None
    usage_only: bool = False


class BackendError(Exception):
    """A failure to get an answer, carrying the HTTP status and OpenAI error fields to report."""

    status: int = 502
    type: str = "api_error"
    code: str | None = "backend_error"

    def __init__(self, message: str, *, status: int | None = None, type: str | None = None,
                 code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        if code is not None:
            self.code = code
        self.param = param


class BackendUnavailable(BackendError):
    """The backend cannot take the request now (not reachable, overloaded): retry later."""

    status = 503
    code = "backend_unavailable"


class BackendTimeout(BackendError):
    """The backend did not answer in time."""

    status = 504
    code = "backend_timeout"


class BadGateway(BackendError):
    """The backend failed while answering or answered something that is not a valid response."""

    status = 502
    code = "bad_gateway"


class InvalidRequest(BackendError):
    """The request is valid OpenAI but asks for something this backend cannot do (e.g. n > 1)."""

    status = 400
    type = "invalid_request_error"
    code = "unsupported_parameter"


class ChunkStream(Protocol):
    """What `Backend.stream` returns: an async iterator of chunk batches, with `aclose()` to
    stop early (the client left), which ends the upstream's work. An async generator is one."""

    def __aiter__(self) -> AsyncIterator[Sequence[Chunk]]: ...

    def __anext__(self) -> Awaitable[Sequence[Chunk]]: ...

    def aclose(self) -> Awaitable[None]: ...


class Backend(Protocol):
    """A model server the gateway can send requests to.

    `create` and `stream` take the client's body (the backend sets `model` to its upstream id).
    `stream` yields batches: the chunks that became available together (one network read), so
    the gateway writes them in one send. It raises any error that happens before its first
    batch from the first `__anext__`, so the gateway can still answer with an HTTP status.

    `reports_progress`: the backend sees each token, so it begins, feeds and ends the energy
    track of each request itself (backends/energy/progress.py); otherwise the gateway begins
    the track around the call and reports the tokens from `usage` when it ends.
    """

    name: str
    model_id: str
    reports_progress: bool

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def create(self, endpoint: Endpoint, body: dict[str, Any]) -> Completion: ...

    def stream(self, endpoint: Endpoint, body: dict[str, Any]) -> ChunkStream: ...

    async def list_models(self) -> list[str]: ...

    async def health(self) -> dict[str, Any]: ...
