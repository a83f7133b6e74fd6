"""The wire side of a cascade: what a stage asks its tier for, what the router judges, and how a
kept answer goes back to a client that asked for a stream.

A stage always asks for logprobs (the confidence model reads them) and for no more tokens than
`cascade_max_tokens`; a stage whose answer hit that cap, rather than the client's own limit, is
not judged but escalated: a cut-off answer is not an answer. Logprobs the client did not ask
for are removed before the answer goes back. A stage judged on its first token, for a streaming
client, streams uncapped instead (`first_token_body`): its answer, once kept, is the client's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import orjson

from greenroute.backends.base import Chunk, Endpoint
from greenroute.routers import agreement

TOP_LOGPROBS = 5


def stage_body(endpoint: Endpoint, body: dict[str, Any], cap: int, samples: int = 1
               ) -> dict[str, Any]:
    """The request a cascade stage sends: non-streamed, with logprobs, tokens capped; with
    `samples` > 1, that many answers sampled at the agreement signal's temperature in one
    request (`n`: a vLLM server shares their prefill; llama.cpp reuses its cached prompt)."""
    stage = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    if samples > 1:
        stage["n"] = samples
        stage["temperature"] = agreement.TEMPERATURE
    if endpoint is Endpoint.CHAT:
        stage["logprobs"] = True
        stage["top_logprobs"] = max(TOP_LOGPROBS, body.get("top_logprobs") or 0)
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        stage.pop("max_completion_tokens", None)
        stage["max_tokens"] = min(limit, cap) if limit else cap
    else:
        stage["logprobs"] = max(TOP_LOGPROBS, body.get("logprobs") or 0)
        stage["max_tokens"] = min(body.get("max_tokens") or 16, cap)
    return stage


def first_token_body(endpoint: Endpoint, body: dict[str, Any]) -> dict[str, Any]:
    """The request of a stage judged on its first token: streamed (also for a client that did
    not ask for a stream: a stage not kept stops after one token), with usage and logprobs, and
    not capped, since a kept answer is the one the client gets."""
    stage = {**body, "stream": True, "stream_options": {"include_usage": True}}
    if endpoint is Endpoint.CHAT:
        stage["logprobs"] = True
        stage["top_logprobs"] = max(TOP_LOGPROBS, body.get("top_logprobs") or 0)
    else:
        stage["logprobs"] = max(TOP_LOGPROBS, body.get("logprobs") or 0)
    return stage


def first_token(endpoint: Endpoint, chunks: Sequence[Chunk]
                ) -> tuple[bool, list[dict[str, Any]] | None]:
    """Whether a stream's first generated token is among its first chunks (a chunk carried
    logprobs, or text), and that token's logprobs in the chat shape: None when its chunk had
    none (a backend that ignores `logprobs`: the answer cannot be judged)."""
    for chunk in chunks:
        if chunk.usage_only:
            continue
        data = orjson.loads(chunk.data)
        if not data.get("choices"):
            continue
        content = logprob_content(endpoint, data)
        if content:
            return True, content[:1]
        if _delta_text(endpoint, data["choices"][0]):
            return True, None
    return False, None


def assemble(endpoint: Endpoint, chunks: Sequence[Chunk]) -> dict[str, Any]:
    """A whole answer from a stream's chunks (one choice): its text, logprobs, finish reason
    and usage, in the shape the endpoint answers without streaming."""
    head: dict[str, Any] = {}
    text: list[str] = []
    finish = None
    lists: dict[str, list[Any]] = {}
    usage: dict[str, Any] | None = None
    for chunk in chunks:
        data = orjson.loads(chunk.data)
        head = head or data
        if isinstance(data.get("usage"), dict):
            usage = data["usage"]
        for choice in data.get("choices") or ():
            text.append(_delta_text(endpoint, choice))
            finish = choice.get("finish_reason") or finish
            logprobs = choice.get("logprobs")
            if isinstance(logprobs, dict):
                for key, values in logprobs.items():
                    if isinstance(values, list):
                        lists.setdefault(key, []).extend(values)
    choice_out: dict[str, Any] = {"index": 0, "logprobs": lists or None,
                                  "finish_reason": finish}
    if endpoint is Endpoint.CHAT:
        choice_out["message"] = {"role": "assistant", "content": "".join(text)}
    else:
        choice_out["text"] = "".join(text)
    answer = {"id": head.get("id", ""), "created": head.get("created", int(time.time())),
              "model": head.get("model", ""), "choices": [choice_out],
              "object": "chat.completion" if endpoint is Endpoint.CHAT else "text_completion"}
    if usage is not None:
        answer["usage"] = usage
    return answer


def answer_chunks(endpoint: Endpoint, chunks: Sequence[Chunk]) -> int:
    """How many of a stream's chunks carry answer text: about one token each."""
    count = 0
    for chunk in chunks:
        if chunk.usage_only:
            continue
        count += sum(bool(_delta_text(endpoint, choice))
                     for choice in orjson.loads(chunk.data).get("choices") or ())
    return count


def _delta_text(endpoint: Endpoint, choice: dict[str, Any]) -> str:
    """A streamed choice's new text."""
    if endpoint is Endpoint.CHAT:
        return str((choice.get("delta") or {}).get("content") or "")
    return str(choice.get("text") or "")


def stream_view(endpoint: Endpoint, body: dict[str, Any], chunk: Chunk) -> Chunk:
    """A stage's chunk as the client asked for it: logprobs only if it asked for them."""
    if _asks_logprobs(endpoint, body) or chunk.usage_only:
        return chunk
    data = orjson.loads(chunk.data)
    for choice in data.get("choices", []):
        choice["logprobs"] = None
    return Chunk(orjson.dumps(data), chunk.usage, chunk.usage_only)


def keep_majority(endpoint: Endpoint, answer: dict[str, Any]) -> float:
    """Reduce a sampled answer to its majority choice, in place, and return the share of
    samples that agree with it (the agreement signal). Usage stays that of every sample: the
    ledger pays for all of them."""
    choices = answer["choices"]
    chosen = agreement.agree([answer_text(endpoint, c) for c in choices])
    answer["choices"] = [{**choices[chosen.index], "index": 0}]
    return chosen.share


def answer_text(endpoint: Endpoint, choice: dict[str, Any]) -> str:
    """A choice's text: the chat message's content, or the completion's text."""
    if endpoint is Endpoint.CHAT:
        return str((choice.get("message") or {}).get("content") or "")
    return str(choice.get("text") or "")


def cut_by_cap(endpoint: Endpoint, body: dict[str, Any], answer: dict[str, Any],
               cap: int) -> bool:
    """The stage stopped at the cascade's cap, not at the client's own limit or a natural end."""
    if answer["choices"][0].get("finish_reason") != "length":
        return False
    if endpoint is Endpoint.CHAT:
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
    else:
        limit = body.get("max_tokens") or 16
    return limit is None or limit > cap


def logprob_content(endpoint: Endpoint, answer: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The answer's token logprobs in the chat shape (token, logprob, top_logprobs)."""
    logprobs = answer["choices"][0].get("logprobs")
    if not isinstance(logprobs, dict):
        return None
    if endpoint is Endpoint.CHAT:
        return logprobs.get("content")
    tokens = logprobs.get("tokens") or []
    values = logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or [None] * len(tokens)
    return [{"token": t, "logprob": v if v is not None else -math.inf,
             "top_logprobs": [{"token": a, "logprob": b} for a, b in (top or {}).items()]}
            for t, v, top in zip(tokens, values, tops, strict=False)]


def client_view(endpoint: Endpoint, body: dict[str, Any], answer: dict[str, Any]
                ) -> dict[str, Any]:
    """The answer as the client asked for it: logprobs only if it asked for them."""
    if not _asks_logprobs(endpoint, body):
        for choice in answer.get("choices", []):
            choice["logprobs"] = None
    return answer


def as_event_stream(endpoint: Endpoint, answer: dict[str, Any], include_usage: bool) -> bytes:
    """A whole answer as the server-sent events a streaming client expects: the text in one
    chunk, then the finish reason, then (when asked for) the usage chunk, then [DONE]."""
    choice = answer["choices"][0]
    base = {"id": answer.get("id", ""), "created": answer.get("created", int(time.time())),
            "model": answer.get("model", "")}
    if endpoint is Endpoint.CHAT:
        base["object"] = "chat.completion.chunk"
        message = choice.get("message") or {}
        chunks = [
            {**base, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                         "content": message.get("content") or ""},
                                  "logprobs": choice.get("logprobs"), "finish_reason": None}]},
            {**base, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                  "finish_reason": choice.get("finish_reason")}]},
        ]
    else:
        base["object"] = "text_completion"
        chunks = [
            {**base, "choices": [{"index": 0, "text": choice.get("text") or "",
                                  "logprobs": choice.get("logprobs"), "finish_reason": None}]},
            {**base, "choices": [{"index": 0, "text": "", "logprobs": None,
                                  "finish_reason": choice.get("finish_reason")}]},
        ]
    if include_usage and answer.get("usage"):
        chunks.append({**base, "choices": [], "usage": answer["usage"]})
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def _asks_logprobs(endpoint: Endpoint, body: dict[str, Any]) -> bool:
    """Whether the client itself asked for logprobs (a stage always does)."""
    return bool(body.get("logprobs")) if endpoint is Endpoint.CHAT \
        else body.get("logprobs") is not None
