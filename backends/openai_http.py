"""Backend for any OpenAI-compatible HTTP server: vLLM, llama.cpp's server, a cloud endpoint.

The request body goes upstream as the client sent it (model id swapped, usage requested on
streams) and the answer comes back byte for byte: the gateway parses the JSON only to read
usage and errors, and never re-serializes what it forwards.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson

from backends.base import (
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
    """One upstream model behind an OpenAI-compatible base URL, over a pooled async client."""

    def __init__(self, name: str, base_url: str, model_id: str, *, api_key: str | None = None,
                 timeout_s: float = 120.0, connect_timeout_s: float = 5.0,
                 max_connections: int = 256) -> None:
        self.name = name
        self.model_id = model_id
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            base_url=self.base_url + "/",
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=max_connections),
        )

    async def start(self) -> None:
        """Nothing to load: the upstream runs on its own and may come up after the gateway."""

    async def aclose(self) -> None:
        await self._client.aclose()

    async def create(self, endpoint: Endpoint, body: dict[str, Any]) -> Completion:
        body["model"] = self.model_id
        body.pop("stream", None)
        with _transport_errors(self.name):
            response = await self._client.post(endpoint.value, content=orjson.dumps(body),
                                               headers={"content-type": "application/json"})
        if response.status_code >= 400:
            raise _upstream_error(self.name, response.status_code, response.content)
        content = response.content
        try:
            data = orjson.loads(content)
        except orjson.JSONDecodeError:
            raise BadGateway(f"backend {self.name!r} returned a body that is not JSON") from None
        if not isinstance(data, dict) or "choices" not in data:
            raise BadGateway(f"backend {self.name!r} returned a body with no choices")
        return Completion(body=content, usage=Usage.from_openai(data.get("usage")))

    async def stream(self, endpoint: Endpoint, body: dict[str, Any]) -> AsyncIterator[Chunk]:
        body["model"] = self.model_id
        body["stream"] = True
        options = body.get("stream_options")
        body["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                  "include_usage": True}
        request = self._client.build_request(
            "POST", endpoint.value, content=orjson.dumps(body),
            headers={"content-type": "application/json", "accept": "text/event-stream"})
        with _transport_errors(self.name):
            response = await self._client.send(request, stream=True)
        try:
            if response.status_code >= 400:
                with _transport_errors(self.name):
                    await response.aread()
                raise _upstream_error(self.name, response.status_code, response.content)
            with _transport_errors(self.name):
                async for payload in _sse_payloads(response.aiter_bytes()):
                    yield _parse_chunk(self.name, payload)
        finally:
            # Closing mid-stream drops the upstream connection, which is how vLLM learns to abort.
            await response.aclose()

    async def list_models(self) -> list[str]:
        with _transport_errors(self.name):
            response = await self._client.get("models")
        if response.status_code >= 400:
            raise _upstream_error(self.name, response.status_code, response.content)
        data = orjson.loads(response.content)
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


async def _sse_payloads(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Yield the `data:` payloads of a server-sent event stream, stopping at `[DONE]`."""
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if not line.startswith(b"data:"):
                continue  # blank separators, comments (": ping"), event names
            payload = line[5:].strip()
            if payload == b"[DONE]":
                return
            if payload:
                yield payload
    if buffer.startswith(b"data:") and (payload := buffer[5:].strip()) not in (b"", b"[DONE]"):
        yield payload


def _parse_chunk(name: str, payload: bytes) -> Chunk:
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise BadGateway(f"backend {name!r} sent a stream event that is not JSON") from None
    if not isinstance(data, dict):
        raise BadGateway(f"backend {name!r} sent a stream event that is not an object")
    if "error" in data:
        raise _error_from_body(name, 502, data)
    usage = Usage.from_openai(data.get("usage"))
    return Chunk(data=payload, usage=usage, usage_only=usage is not None and not data.get("choices"))


def _upstream_error(name: str, status: int, content: bytes) -> BackendError:
    """Turn an upstream error response into the error the client should see."""
    try:
        data = orjson.loads(content)
    except orjson.JSONDecodeError:
        data = None
    return _error_from_body(name, status, data if isinstance(data, dict) else {})


def _error_from_body(name: str, status: int, data: dict[str, Any]) -> BackendError:
    # OpenAI shape {"error": {...}}; older vLLM answers {"object": "error", "message": ...}.
    error = data.get("error") if isinstance(data.get("error"), dict) else data
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
    """Map httpx transport failures onto the gateway's 502/503/504 errors."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        if exc is None or not isinstance(exc, httpx.TransportError):
            return
        name = self.name
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)):
            raise BackendUnavailable(f"backend {name!r} is unreachable: {exc!r}") from exc
        if isinstance(exc, httpx.TimeoutException):
            raise BackendTimeout(f"backend {name!r} did not answer in time") from exc
        raise BadGateway(f"backend {name!r} failed mid-response: {exc!r}") from exc
