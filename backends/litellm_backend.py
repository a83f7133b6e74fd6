"""Backend for cloud models (OpenAI, Anthropic, Bedrock, ...) through litellm: the optional
`cloud` extra, for a "large" tier that is not served locally.

litellm translates the OpenAI request to each provider's API and back, so this backend only
maps arguments, errors and usage. It is imported lazily: without the extra, configuring a
litellm tier fails at start-up with a clear message instead of at import time.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncGenerator
from typing import Any

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

# litellm fetches a model price list from the internet at import unless told otherwise.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


class LiteLLMBackend:
    """One provider model, named in litellm's `provider/model` form."""

    reports_progress = False  # it sees no tokens until the answer: the gateway reports usage

    def __init__(self, name: str, model_id: str, *, api_base: str | None = None,
                 api_key: str | None = None, timeout_s: float = 120.0) -> None:
        self.name = name
        self.model_id = model_id
        self._api_base = api_base
        self._api_key = api_key
        self._timeout_s = timeout_s
        self._litellm: Any = None

    async def start(self) -> None:
        try:
            import litellm
        except ImportError:
            raise RuntimeError(
                f"tier {self.name!r} needs litellm: pip install 'greenroute[cloud]'") from None
        litellm.suppress_debug_info = True
        self._litellm = litellm

    async def aclose(self) -> None:
        return None

    def _arguments(self, endpoint: Endpoint, body: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        args = {k: v for k, v in body.items() if k not in ("model", "stream")}
        args.update(model=self.model_id, timeout=self._timeout_s, drop_params=True)
        if self._api_base:
            args["api_base"] = self._api_base
        if self._api_key:
            args["api_key"] = self._api_key
        call = self._litellm.acompletion if endpoint is Endpoint.CHAT \
            else self._litellm.atext_completion
        return call, args

    async def create(self, endpoint: Endpoint, body: dict[str, Any]) -> Completion:
        call, args = self._arguments(endpoint, body)
        try:
            response = await call(**args)
        except Exception as exc:
            raise _map_error(self.name, exc) from exc
        data = response.model_dump()
        return Completion(body=orjson.dumps(data, default=str),
                          usage=Usage.from_openai(data.get("usage")))

    async def stream(self, endpoint: Endpoint,
                     body: dict[str, Any]) -> AsyncGenerator[list[Chunk], None]:
        call, args = self._arguments(endpoint, body)
        args["stream"] = True
        args["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        try:
            response = await call(**args)
            async for item in response:
                data = item.model_dump(exclude_none=True)
                data.setdefault("created", int(time.time()))
                usage = Usage.from_openai(data.get("usage"))
                yield [Chunk(data=orjson.dumps(data, default=str), usage=usage,
                             usage_only=usage is not None and not data.get("choices"))]
        except BackendError:
            raise
        except Exception as exc:
            raise _map_error(self.name, exc) from exc

    async def list_models(self) -> list[str]:
        return [self.model_id]

    async def health(self) -> dict[str, Any]:
        return {"ok": self._litellm is not None}


def _map_error(name: str, exc: Exception) -> BackendError:
    kind = type(exc).__name__
    message = f"backend {name!r}: {getattr(exc, 'message', None) or exc}"
    status = getattr(exc, "status_code", None)
    if kind == "Timeout":
        return BackendTimeout(message)
    if kind == "ServiceUnavailableError" or status == 503:
        return BackendUnavailable(message)
    if kind == "APIConnectionError":
        return BadGateway(message)
    if status in (400, 404, 413, 422, 429):
        return BackendError(message, status=400 if status == 422 else status,
                            type="invalid_request_error", code=kind)
    return BadGateway(message)
