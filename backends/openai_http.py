"""Backend for any OpenAI-compatible HTTP server: vLLM, llama.cpp's server, a cloud endpoint.

The request body goes upstream as the client sent it (model id swapped, usage requested on
streams) and the answer comes back byte for byte: the gateway parses the JSON only to read
usage and errors, and never re-serializes what it forwards.

The client is aiohttp, not httpx: on this hot path, per upstream call on 2 cores, httpx took
1.20 ms, httpx on aiohttp's transport 0.95 ms and aiohttp 0.58 ms (docs/gateway.md), and the
gateway's whole added-latency budget is 1 ms.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import aiohttp
import orjson

from greenroute.backends.base import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    BadGateway,
    Chunk,
    Completion,
    Endpoint,
    Usage,
)


class OpenAIHTTPBackend:
    """One upstream model behind an OpenAI-compatible base URL, over pooled keep-alive
    connections."""

    reports_progress = False  # it sees no tokens until the answer: the gateway reports usage

    def __init__(self, name: str, base_url: str, model_id: str, *, api_key: str | None = None,
                 timeout_s: float = 120.0, connect_timeout_s: float = 5.0,
                 max_connections: int = 256) -> None:
        self.name = name
        self.model_id = model_id
        self.base_url = base_url.rstrip("/")
        self._headers = {"content-type": "application/json"}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        # sock_read: the longest silence allowed from the upstream, between any two reads.
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s,
                                              sock_read=timeout_s)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Open the connection pool (it needs the running loop). The upstream itself may come
        up after the gateway: nothing is sent to it here."""
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout,
                                                  headers=self._headers, auto_decompress=True)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise BackendUnavailable(f"backend {self.name!r} is not started")
        return self._session

    def _url(self, path: str) -> str:
        return f"{self.base_url}/{path}"

    async def _request(self, method: str, path: str, data: bytes | None = None
                       ) -> tuple[bytes, dict[str, Any]]:
        """Send one request; return the body as received and parsed, or raise the right error."""
        with _transport_errors(self.name):
            async with self.session.request(method, self._url(path), data=data) as response:
                content = await response.read()
        if response.status >= 400:
            raise _upstream_error(self.name, response.status, content)
        try:
            parsed = orjson.loads(content)
        except orjson.JSONDecodeError:
            raise BadGateway(f"backend {self.name!r} answered {path} with a body that is not "
                             "JSON") from None
        if not isinstance(parsed, dict):
            raise BadGateway(f"backend {self.name!r} answered {path} with a non-object")
        return content, parsed

    async def create(self, endpoint: Endpoint, body: dict[str, Any]) -> Completion:
        body["model"] = self.model_id
        body.pop("stream", None)
        content, data = await self._request("POST", endpoint.value, orjson.dumps(body))
        if "choices" not in data:
            raise BadGateway(f"backend {self.name!r} returned a body with no choices")
        return Completion(body=content, usage=Usage.from_openai(data.get("usage")))

    async def stream(self, endpoint: Endpoint,
                     body: dict[str, Any]) -> AsyncGenerator[list[Chunk], None]:
        body["model"] = self.model_id
        body["stream"] = True
        options = body.get("stream_options")
        body["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                  "include_usage": True}
        with _transport_errors(self.name):
            response = await self.session.post(self._url(endpoint.value), data=orjson.dumps(body),
                                               headers={"accept": "text/event-stream"})
        try:
            with _transport_errors(self.name):
                if response.status >= 400:
                    raise _upstream_error(self.name, response.status, await response.read())
                async for payloads in _sse_payloads(response.content.iter_any()):
                    yield [_parse_chunk(self.name, payload) for payload in payloads]
        finally:
            # Closing mid-stream drops the upstream connection, which is how vLLM learns to abort.
            response.close()

    async def list_models(self) -> list[str]:
        _, data = await self._request("GET", "models")
        return [m["id"] for m in data.get("data", []) if isinstance(m, dict) and "id" in m]

    async def health(self) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            models = await self.list_models()
        except BackendError as exc:
            return {"ok": False, "error": exc.message}
        latency_ms = round((time.perf_counter() - started) * 1000, 2)
        if self.model_id not in models:
            return {"ok": False, "error": f"upstream does not serve {self.model_id!r}",
                    "latency_ms": latency_ms}
        return {"ok": True, "latency_ms": latency_ms}


async def _sse_payloads(reads: AsyncIterator[bytes]) -> AsyncIterator[list[bytes]]:
    """Yield the `data:` payloads of a server-sent event stream, those of one read together,
    stopping at `[DONE]`."""
    buffer = b""
    async for read in reads:
        buffer += read
        *lines, buffer = buffer.split(b"\n")
        payloads: list[bytes] = []
        for line in lines:
            if not line.startswith(b"data:"):
                continue  # blank separators, comments (": ping"), event names
            payload = line[5:].strip()
            if payload == b"[DONE]":
                if payloads:
                    yield payloads
                return
            if payload:
                payloads.append(payload)
        if payloads:
            yield payloads
    if buffer.startswith(b"data:") and (payload := buffer[5:].strip()) not in (b"", b"[DONE]"):
        yield [payload]


def _parse_chunk(name: str, payload: bytes) -> Chunk:
    # Most chunks carry neither usage nor an error: forward them unparsed. A quoted key in the
    # raw bytes is the only way either can appear (inside a JSON string the quotes are escaped).
    if b'"usage"' not in payload and b'"error"' not in payload:
        if not payload.startswith(b"{"):
            raise BadGateway(f"backend {name!r} sent a stream event that is not a JSON object")
        return Chunk(data=payload)
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise BadGateway(f"backend {name!r} sent a stream event that is not JSON") from None
    if not isinstance(data, dict):
        raise BadGateway(f"backend {name!r} sent a stream event that is not an object")
    if "error" in data:
        raise _error_from_body(name, 502, data)
    usage = Usage.from_openai(data.get("usage"))
    return Chunk(data=payload, usage=usage,
                 usage_only=usage is not None and not data.get("choices"))


def _upstream_error(name: str, status: int, content: bytes) -> BackendError:
    """Turn an upstream error response into the error the client should see."""
    try:
        data = orjson.loads(content)
    except orjson.JSONDecodeError:
        data = None
    return _error_from_body(name, status, data if isinstance(data, dict) else {})


def _error_from_body(name: str, status: int, data: dict[str, Any]) -> BackendError:
    # OpenAI shape {"error": {...}}; older vLLM answers {"object": "error", "message": ...}.
    nested = data.get("error")
    error: dict[str, Any] = nested if isinstance(nested, dict) else data
    message = str(error.get("message") or f"backend {name!r} answered HTTP {status}")
    if status in (400, 404, 413, 422, 429):
        # The client's request was refused upstream (context too long, bad parameter, rate
        # limit): pass it on, so the client sees what it can fix.
        code = error.get("code")
        return BackendError(message, status=400 if status == 422 else status,
                            type=str(error.get("type") or "invalid_request_error"),
                            code=str(code) if code is not None else None,
                            param=error.get("param"))
    if status == 503:
        return BackendUnavailable(f"backend {name!r} is unavailable: {message}")
    if status == 504:
        return BackendTimeout(f"backend {name!r} timed out upstream: {message}")
    # 401/403 mean the gateway's own upstream credentials are wrong; 5xx is an upstream failure.
    return BadGateway(f"backend {name!r} failed (HTTP {status}): {message}")


class _transport_errors:
    """Map transport failures onto the gateway's 502/503/504 errors."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        if exc is None or isinstance(exc, (BackendError, asyncio.CancelledError)):
            return
        name = self.name
        if isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)):
            raise BackendUnavailable(f"backend {name!r} is unreachable: {exc}") from exc
        if isinstance(exc, (asyncio.TimeoutError, aiohttp.SocketTimeoutError)):
            raise BackendTimeout(f"backend {name!r} did not answer in time") from exc
        if isinstance(exc, (aiohttp.ClientError, OSError)):
            raise BadGateway(f"backend {name!r} failed mid-response: {exc!r}") from exc
