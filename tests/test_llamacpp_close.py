"""The embedded backend stopped mid-generation: closed while it generates (Ctrl-C in
`greenroute collect`, a gateway shutting down), the request in flight fails rather than coming
back as an empty answer; cancelled by its caller, the model stops at its next token."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from greenroute.backends.base import BackendUnavailable, Completion, Endpoint
from greenroute.backends.llamacpp import LlamaCppBackend

LONG = {"messages": [{"role": "user", "content": "Count from 1 to 500, one number per line."}],
        "max_tokens": 400, "temperature": 0, "logprobs": True}


async def _generating(weights: Path) -> tuple[LlamaCppBackend, asyncio.Task[Completion]]:
    """A backend three tokens into a long generation, and the request waiting on it."""
    backend = LlamaCppBackend("tiny", weights, "smollm2", threads=1, context=512)
    await backend.start()
    request = asyncio.create_task(backend.create(Endpoint.CHAT, dict(LONG)))
    while backend._active is None or backend._active.completion_tokens < 3:
        assert not request.done(), "the generation ended before the test could stop it"
        await asyncio.sleep(0.01)
    return backend, request


def test_closing_the_backend_fails_the_request_in_flight(tiny_weights: Path) -> None:
    async def close() -> BaseException | None:
        backend, request = await _generating(tiny_weights)
        await backend.aclose()
        try:
            await request
        except BaseException as exc:
            return exc
        return None

    error = asyncio.run(close())
    assert isinstance(error, BackendUnavailable), error
    assert error.status == 503 and "stopped the generation" in str(error)


def test_a_cancelled_request_stops_the_model_at_its_next_token(tiny_weights: Path) -> None:
    async def cancel() -> int:
        backend, request = await _generating(tiny_weights)
        generation = backend._active
        assert generation is not None
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        await asyncio.to_thread(backend._executor.submit(lambda: None).result)  # worker idle
        await backend.aclose()
        return generation.completion_tokens

    assert asyncio.run(cancel()) < 50  # not the 400 it was asked for
