"""A local server that speaks the OpenAI wire protocol the way vLLM does, for tests and bench/.

Behaviour is chosen by the requested model, so one server plays every upstream a test needs:
  echo          answers at once, echoing the last user message (streams word by word, and sends
                vLLM's usage-only final chunk when asked for usage)
  hang          accepts the request and never answers; records when the caller leaves
  slow          streams one chunk every 0.1 s for 100 chunks (to test cancellation)
  error-400     refuses with an OpenAI-shaped 400 (as vLLM does for a too-long prompt)
  error-500     fails with a 500
  error-503     answers 503
  vllm-legacy   refuses with older vLLM's error shape {"object": "error", "message": ...}
  paced         like echo, but takes 5 ms per word, counted as it goes (for energy tests)
`/metrics` serves vLLM's token counters over every answer (`vllm:prompt_tokens_total`,
`vllm:generation_tokens_total`, `vllm:num_requests_running`), named and labelled as vLLM does.
Also `DyingServer`: a raw TCP server that reads a request and closes the connection, before any
response or (with `after_headers`) after one event of a stream.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

MODELS = ["echo", "hang", "slow", "error-400", "error-500", "error-503", "vllm-legacy", "paced"]
PACE_S = 0.005


@dataclass
class Record:
    """What the fake saw, for tests to assert on."""

    bodies: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    streams_started: int = 0
    streams_finished: int = 0
    streams_aborted: int = 0
    hangs_abandoned: list[float] = field(default_factory=list)  # seconds until the caller left
    # vLLM's counters: tokens processed for every client, requests running now
    prompt_tokens: int = 0
    generation_tokens: int = 0
    running: int = 0


def vllm_metrics(record: Record, model_name: str = "fake") -> str:
    """vLLM's `/metrics` text for the counters (prometheus_client's format, as vLLM serves it:
    a counter's samples end in `_total`, values are floats, labels `engine` and `model_name`)."""
    labels = f'{{engine="0",model_name="{model_name}"}}'
    families = [
        ("vllm:num_requests_running", "Number of requests in model execution batches.",
         "gauge", "", record.running),
        ("vllm:prompt_tokens", "Number of prefill tokens processed.", "counter", "_total",
         record.prompt_tokens),
        ("vllm:generation_tokens", "Number of generation tokens processed.", "counter",
         "_total", record.generation_tokens),
    ]
    lines = []
    for name, help_text, kind, suffix, value in families:
        lines += [f"# HELP {name}{suffix} {help_text}", f"# TYPE {name}{suffix} {kind}",
                  f"{name}{suffix}{labels} {float(value)!r}"]
    return "\n".join(lines) + "\n"


def _completion(model: str, text: str, chat: bool) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": "stop", "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    words = len(text.split())
    return {"id": "cmpl-fake", "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice],
            "usage": {"prompt_tokens": 7, "completion_tokens": words, "total_tokens": 7 + words}}


def _chunk(model: str, text: str | None, chat: bool, finish: str | None = None) -> bytes:
    if chat:
        choice: dict[str, Any] = {"index": 0, "delta": {"content": text} if text is not None
                                  else {}, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish}
    data = {"id": "cmpl-fake", "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}
    return b"data: " + orjson.dumps(data) + b"\n\n"


def build_app(record: Record) -> Starlette:
    async def generate(request: Request) -> Response:
        chat = request.url.path.endswith("chat/completions")
        body = orjson.loads(await request.body())
        record.bodies.append(body)
        record.headers.append(dict(request.headers))
        model = body.get("model", "")
        if model == "hang":
            started = time.monotonic()
            while not await request.is_disconnected():
                await asyncio.sleep(0.02)
            record.hangs_abandoned.append(time.monotonic() - started)
            return Response(status_code=499)
        if model.startswith("error-") or model == "vllm-legacy":
            status = 400 if model == "vllm-legacy" else int(model.split("-")[1])
            error = {"message": f"fake upstream error {status}", "type": "BadRequestError",
                     "param": None, "code": status}
            content = {"object": "error", **error} if model == "vllm-legacy" else {"error": error}
            return Response(orjson.dumps(content), status_code=status,
                            media_type="application/json")
        if chat:
            text = "echo: " + str(body["messages"][-1].get("content"))
        else:
            text = "echo: " + str(body.get("prompt"))
        if not body.get("stream"):
            record.running += 1
            record.prompt_tokens += 7
            try:
                for _ in text.split():
                    if model == "paced":
                        await asyncio.sleep(PACE_S)
                    record.generation_tokens += 1
            finally:
                record.running -= 1
            return Response(orjson.dumps(_completion(model, text, chat)),
                            media_type="application/json")
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(_events(record, model, text, chat, usage),
                                 media_type="text/event-stream")

    async def metrics(request: Request) -> Response:
        return Response(vllm_metrics(record), media_type="text/plain; version=0.0.4")

    async def models(request: Request) -> Response:
        return Response(orjson.dumps({"object": "list", "data": [
            {"id": m, "object": "model", "owned_by": "fake"} for m in MODELS]}),
            media_type="application/json")

    return Starlette(routes=[
        Route("/v1/chat/completions", generate, methods=["POST"]),
        Route("/v1/completions", generate, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ])


async def _events(record: Record, model: str, text: str, chat: bool,
                  usage: bool) -> AsyncIterator[bytes]:
    record.streams_started += 1
    record.running += 1
    record.prompt_tokens += 7
    finished = False
    try:
        if chat:
            yield b'data: {"id":"cmpl-fake","object":"chat.completion.chunk","created":0,' \
                  b'"model":"' + model.encode() + b'","choices":[{"index":0,"delta":' \
                  b'{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
        words = text.split(" ") if model != "slow" else ["tick"] * 100
        for i, word in enumerate(words):
            if model == "slow":
                await asyncio.sleep(0.1)
            elif model == "paced":
                await asyncio.sleep(PACE_S)
            record.generation_tokens += 1
            yield _chunk(model, word if i == 0 else " " + word, chat)
        yield _chunk(model, None if chat else "", chat, finish="stop")
        if usage:
            data = {"id": "cmpl-fake", "object": "chat.completion.chunk", "created": 0,
                    "model": model, "choices": [], "usage": {
                        "prompt_tokens": 7, "completion_tokens": len(words),
                        "total_tokens": 7 + len(words)}}
            yield b"data: " + orjson.dumps(data) + b"\n\n"
        yield b"data: [DONE]\n\n"
        finished = True
    finally:
        record.running -= 1
        if finished:
            record.streams_finished += 1
        else:
            record.streams_aborted += 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class FakeUpstream:
    """The fake served by uvicorn on a thread, on a free loopback port."""

    def __init__(self) -> None:
        self.record = Record()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        config = uvicorn.Config(build_app(self.record), host="127.0.0.1", port=self.port,
                                log_level="warning", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> FakeUpstream:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake upstream did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)


class DyingServer:
    """Reads one HTTP request per connection, then closes it: before answering, or mid-stream."""

    def __init__(self, after_headers: bool = False) -> None:
        self.after_headers = after_headers
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}/v1"
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                if self.after_headers:
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                                 b"transfer-encoding: chunked\r\n\r\n")
                    event = _chunk("die", "partial", True)
                    conn.sendall(b"%x\r\n%s\r\n" % (len(event), event))
                    time.sleep(0.05)

    def __enter__(self) -> DyingServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sock.close()


def main() -> None:
    """Serve the fake on its own (`python -m greenroute.backends.fake_openai --port N`)."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(build_app(Record()), host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False, loop="uvloop", http="httptools")


if __name__ == "__main__":
    main()
