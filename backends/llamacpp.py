"""The embedded CPU default: GGUF models served in-process by llama.cpp (llama-cpp-python).

One model runs one generation at a time (a llama.cpp context is not thread-safe), so each model
owns a single worker thread; requests queue in front of it, off the event loop, up to
`max_queue`, and past that the backend answers 503 rather than letting latency grow unbounded.

llama-cpp-python refuses `logprobs` unless the model was loaded with `logits_all=True`, which
keeps logits for every prompt position (memory, and ~30% slower prompts). Instead, a logits
processor takes the log-softmax of each step's logits and the sampled token's entry is read off
it: the same numbers, at no cost when logprobs are not asked for. The same per-token hook counts
tokens for streamed usage and stops a generation whose client has gone away.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from greenroute.backends.base import (
    BackendUnavailable,
    BadGateway,
    Chunk,
    Completion,
    Endpoint,
    InvalidRequest,
    Usage,
)
from greenroute.backends.energy.progress import Progress, current_track

MAX_SAMPLES = 16  # n: samples run one after another, so each costs a whole generation


class GenerationCancelled(Exception):
    """Raised inside the worker thread to stop a generation nobody is waiting for."""


_END = object()

# One sampled token: its id, its logprob, and the top alternatives (id, logprob).
_Entry = tuple[int, float, list[tuple[int, float]]]


class LlamaCppBackend:
    """A GGUF model in this process, behind a one-thread queue."""

    # Energy: the worker begins a request's track when it starts on it (not while it queues),
    # reports the prompt at the first sampled token and then each token, and ends it.
    reports_progress = True

    def __init__(self, name: str, model_path: Path, model_id: str, *, threads: int | None = None,
                 context: int = 4096, max_queue: int = 32) -> None:
        self.name = name
        self.model_id = model_id
        self.model_path = model_path
        self.threads = threads or os.cpu_count() or 1
        self.context = context
        self.max_queue = max_queue
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{name}")
        self._llm: Any = None
        self._active: _Generation | None = None  # read and written on the worker thread only
        self._pending = 0
        self._pending_lock = threading.Lock()

    async def start(self) -> None:
        if self._llm is None:
            await asyncio.wrap_future(self._executor.submit(self._load))

    async def aclose(self) -> None:
        """Stop the running generation at its next token, drop queued ones, free the model."""
        if self._active is not None:
            self._active.cancel.set()
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        self._llm = None

    def _load(self) -> None:
        from llama_cpp import Llama

        if not self.model_path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.model_path} "
                                    "(run `greenroute models` to fetch the default weights)")
        llm = Llama(model_path=str(self.model_path), n_ctx=self.context, n_threads=self.threads,
                    n_threads_batch=self.threads, verbose=False)
        sample = llm.sample

        def sample_and_observe(*args: Any, **kwargs: Any) -> int:
            token: int = sample(*args, **kwargs)
            if self._active is not None:
                self._active.on_token(token)
            return token

        # Llama.generate calls self.sample once per token: the one per-token hook it offers.
        llm.sample = sample_and_observe  # type: ignore[method-assign]
        self._llm = llm

    # -- requests -----------------------------------------------------------------------------

    async def create(self, endpoint: Endpoint, body: dict[str, Any]) -> Completion:
        self._check_logit_bias(body)
        if (body.get("n") or 1) > 1:
            return await self._create_samples(endpoint, body, int(body["n"]))
        kwargs, logprobs = _llama_kwargs(endpoint, body)
        generation = _Generation(self, logprobs, current_track.get())
        future = self._submit(self._run, endpoint, kwargs, generation)
        try:
            result = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            generation.cancel.set()  # the client left: stop at the next token
            raise
        return Completion(body=orjson.dumps(result), usage=Usage.from_openai(result.get("usage")))

    async def _create_samples(self, endpoint: Endpoint, body: dict[str, Any], n: int
                              ) -> Completion:
        """`n` > 1 (the cascade's agreement signal): n generations one after another, one
        choice each. llama.cpp keeps the last prompt's KV cache and reuses its longest common
        prefix, so only the first sample pays the prefill; usage counts the prompt once and
        every sample's tokens, as OpenAI's `n` does. Sample i uses seed + i (a random seed when
        none is given), so the samples differ and a rerun with a seed repeats them."""
        if n > MAX_SAMPLES:
            raise InvalidRequest(f"the embedded llama.cpp backend samples at most {MAX_SAMPLES} "
                                 "choices (n)", param="n")
        seed = body.get("seed")
        seed = random.randrange(2**31) if seed is None else int(seed)
        # One request, one track: each sample's generation would end it after the first, and
        # the track ignores what comes after its end (the other samples' tokens and joules).
        track = current_track.get()
        held = current_track.set(_HeldOpen(track) if track is not None else None)
        try:
            results = [orjson.loads((await self.create(endpoint, {**body, "n": 1,
                                                                  "seed": seed + i})).body)
                       for i in range(n)]
        finally:
            current_track.reset(held)
            if track is not None:
                track.end()
        merged: dict[str, Any] = results[0]
        merged["choices"] = [{**r["choices"][0], "index": i} for i, r in enumerate(results)]
        prompt = int(merged["usage"]["prompt_tokens"])
        completion = sum(int(r["usage"]["completion_tokens"]) for r in results)
        merged["usage"] = {"prompt_tokens": prompt, "completion_tokens": completion,
                           "total_tokens": prompt + completion}
        return Completion(body=orjson.dumps(merged), usage=Usage.from_openai(merged["usage"]))

    async def stream(self, endpoint: Endpoint,
                     body: dict[str, Any]) -> AsyncGenerator[list[Chunk], None]:
        self._check_logit_bias(body)
        kwargs, logprobs = _llama_kwargs(endpoint, body)
        kwargs["stream"] = True
        generation = _Generation(self, logprobs, current_track.get())
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone (shutdown): nobody to deliver to
                generation.cancel.set()

        future = self._submit(self._run_stream, endpoint, kwargs, generation, put)
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield [item]  # one token at a time: the model is slower than the network
        finally:
            generation.cancel.set()  # no-op when finished; stops the model when the client left
            future.cancel()  # drops it from the queue if it never started

    def _check_logit_bias(self, body: dict[str, Any]) -> None:
        """Refuse ids outside the vocabulary: llama-cpp-python ignores a too-large one with a
        logged traceback per generated token, and counts a negative one from the end."""
        bias = body.get("logit_bias")
        if not bias or self._llm is None:
            return
        vocabulary = int(self._llm.n_vocab())
        for key, value in bias.items():
            try:
                token = int(key)
            except (TypeError, ValueError):
                token = -1
            if not 0 <= token < vocabulary:
                raise InvalidRequest(f"logit_bias: {key!r} is not a token id of this model "
                                     f"(0 to {vocabulary - 1})", param="logit_bias")
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidRequest(f"logit_bias: the bias of {key!r} is not a number",
                                     param="logit_bias")

    async def list_models(self) -> list[str]:
        return [self.model_id]

    async def health(self) -> dict[str, Any]:
        return {"ok": self._llm is not None, "queued": self._pending, "threads": self.threads}

    # -- worker thread ------------------------------------------------------------------------

    def _submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        if self._llm is None:
            raise BackendUnavailable(f"backend {self.name!r} has no model loaded")
        with self._pending_lock:
            if self._pending >= self.max_queue:
                raise BackendUnavailable(
                    f"backend {self.name!r} is busy: {self._pending} requests queued (max_queue)")
            self._pending += 1
        future = self._executor.submit(fn, *args)
        future.add_done_callback(self._release)
        return future

    def _release(self, _: Future[Any]) -> None:
        with self._pending_lock:
            self._pending -= 1

    def _generate(self, endpoint: Endpoint, kwargs: dict[str, Any],
                  generation: _Generation) -> Any:
        if endpoint is Endpoint.CHAT:
            return self._llm.create_chat_completion(
                **kwargs, logits_processor=generation.logits_processors())
        if kwargs["prompt"] == "":
            # No tokens (for a model that adds no BOS) fails an assertion inside llama.cpp;
            # OpenAI's models start an empty prompt from their document boundary: so does this.
            bos = self._llm.token_bos()
            kwargs = {**kwargs, "prompt": [bos if bos >= 0 else self._llm.token_eos()]}
        return self._llm.create_completion(**kwargs,
                                           logits_processor=generation.logits_processors())

    def _run(self, endpoint: Endpoint, kwargs: dict[str, Any],
             generation: _Generation) -> dict[str, Any]:
        self._active = generation
        generation.begin()
        try:
            result: dict[str, Any] = self._generate(endpoint, kwargs, generation)
        except GenerationCancelled:  # its caller left, or the backend is closing: not an answer
            raise BackendUnavailable(f"backend {self.name!r} stopped the generation") from None
        except ValueError as exc:  # llama-cpp-python's way of saying "prompt too long" and kin
            raise _invalid(endpoint, exc) from None
        except Exception as exc:
            raise BadGateway(f"backend {self.name!r} failed: {exc!r}") from exc
        finally:
            self._active = None
            generation.end()
        result["model"] = self.model_id
        if endpoint is Endpoint.CHAT:
            for choice in result["choices"]:
                choice["message"].setdefault("refusal", None)  # required (nullable) by the spec
        if generation.logprobs is not None:
            generation.attach_all(endpoint, result["choices"][0])
        return result

    def _run_stream(self, endpoint: Endpoint, kwargs: dict[str, Any], generation: _Generation,
                    put: Callable[[Any], None]) -> None:
        self._active = generation
        generation.begin()
        chunk: dict[str, Any] = {}
        try:
            for chunk in self._generate(endpoint, kwargs, generation):
                chunk["model"] = self.model_id
                if generation.logprobs is not None:
                    generation.attach_new(endpoint, chunk["choices"][0])
                put(Chunk(data=orjson.dumps(chunk)))
            generation.end()  # before the usage chunk, which carries the energy
            usage = generation.usage()
            put(Chunk(data=orjson.dumps({
                "id": chunk.get("id") or f"cmpl-{uuid.uuid4().hex}",
                "object": chunk.get("object", "chat.completion.chunk"),
                "created": chunk.get("created", int(time.time())),
                "model": self.model_id,
                "choices": [],
                "usage": {"prompt_tokens": usage.prompt_tokens,
                          "completion_tokens": usage.completion_tokens,
                          "total_tokens": usage.total_tokens},
            }), usage=usage, usage_only=True))
        except GenerationCancelled:
            pass
        except ValueError as exc:
            put(_invalid(endpoint, exc))
        except Exception as exc:
            put(BadGateway(f"backend {self.name!r} failed: {exc!r}"))
        finally:
            self._active = None
            generation.end()
            put(_END)


class _HeldOpen:
    """A request's track, passed to each of its `n` samples' generations: begun by the first,
    fed by all, ended by none (the request ends it after the last)."""

    def __init__(self, track: Progress) -> None:
        self._track = track

    def begin(self) -> None:
        self._track.begin()

    def tokens(self, n: float, at: float | None = None, prompt: float = 0.0) -> None:
        self._track.tokens(n, at, prompt)

    def end(self, at: float | None = None) -> None:
        pass


class _Generation:
    """What the worker observes of one generation: token counts, logprobs, cancellation."""

    def __init__(self, backend: LlamaCppBackend, logprobs: int | None,
                 track: Progress | None = None) -> None:
        self._backend = backend
        self.logprobs = logprobs  # None: not asked; else how many alternatives per token
        self.track = track  # energy attribution (backends/energy/progress.py)
        self.cancel = threading.Event()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.entries: list[_Entry] = []
        self._attached = 0
        self._step: tuple[np.ndarray, float] | None = None
        self._cached: np.ndarray | None = None  # the KV cache's tokens when the worker began

    def logits_processors(self) -> list[Callable[[Any, np.ndarray], np.ndarray]] | None:
        return [self._observe_logits] if self.logprobs is not None else None

    def _observe_logits(self, _input_ids: Any, logits: np.ndarray) -> np.ndarray:
        values = np.array(logits, dtype=np.float64)  # a copy: later samplers edit in place
        peak = values.max()
        self._step = (values, float(peak + np.log(np.exp(values - peak).sum())))
        return logits

    def begin(self) -> None:
        if self.track is not None:
            llm = self._backend._llm
            self._cached = np.array(llm.input_ids[:llm.n_tokens]) if llm is not None else None
            self.track.begin()

    def _evaluated(self, prompt: int) -> int:
        """How many of the prompt's tokens prefill computed: llama.cpp reuses the longest
        prefix the KV cache shares with the previous sequence (as Llama.generate matches it), so
        a repeated system prompt or the agreement signal's next sample costs only its rest.
        Usage still counts the whole prompt; the energy weights count what was computed."""
        llm = self._backend._llm
        if self._cached is None or llm is None:
            return prompt
        new = np.asarray(llm.input_ids[:prompt])
        size = min(self._cached.size, new.size)
        same = self._cached[:size] == new[:size]
        shared = size if bool(same.all()) else int(np.argmin(same))
        return max(prompt - shared, 1)

    def end(self) -> None:
        if self.track is not None:
            self.track.end()

    def on_token(self, token: int) -> None:
        if self.cancel.is_set():
            raise GenerationCancelled
        llm = self._backend._llm
        prefilled = 0
        if self.prompt_tokens == 0:
            self.prompt_tokens = llm.n_tokens  # the whole prompt is evaluated before the 1st sample
            prefilled = self._evaluated(self.prompt_tokens)
        # The first token's logits come out of the prefill pass itself, so it is reported with
        # the prompt and spread over the prefill's time (not as an instant after it).
        if _is_end_of_generation(llm, token):
            if prefilled and self.track is not None:
                self.track.tokens(0, prompt=prefilled)
            return
        self.completion_tokens += 1
        if self.track is not None:
            self.track.tokens(1, prompt=prefilled)
        if self._step is not None:
            values, log_z = self._step
            top: list[tuple[int, float]] = []
            if self.logprobs:
                k = min(self.logprobs, values.size)
                best = np.argpartition(values, -k)[-k:]
                top = [(int(i), float(values[i] - log_z))
                       for i in best[np.argsort(-values[best])]]
            self.entries.append((token, float(values[token] - log_z), top))
            self._step = None

    def usage(self) -> Usage:
        return Usage(self.prompt_tokens, self.completion_tokens)

    # -- OpenAI logprobs shapes ----------------------------------------------------------------

    def attach_all(self, endpoint: Endpoint, choice: dict[str, Any]) -> None:
        choice["logprobs"] = self._format(endpoint, self.entries)
        self._attached = len(self.entries)

    def attach_new(self, endpoint: Endpoint, choice: dict[str, Any]) -> None:
        has_text = choice.get("delta", {}).get("content") if endpoint is Endpoint.CHAT \
            else choice.get("text")
        if has_text and self._attached < len(self.entries):
            choice["logprobs"] = self._format(endpoint, self.entries[self._attached:])
            self._attached = len(self.entries)

    def _format(self, endpoint: Endpoint, entries: list[_Entry]) -> dict[str, Any]:
        llm = self._backend._llm

        def piece(token: int) -> bytes:
            raw: bytes = llm.detokenize([token], special=True)
            return raw

        if endpoint is Endpoint.CHAT:
            def item(token: int, logprob: float) -> dict[str, Any]:
                raw = piece(token)
                return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob,
                        "bytes": list(raw)}
            return {"content": [{**item(t, lp), "top_logprobs": [item(a, alp) for a, alp in top]}
                                for t, lp, top in entries], "refusal": None}
        texts = [piece(t).decode("utf-8", errors="replace") for t, _, _ in entries]
        return {
            "tokens": texts,
            "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{piece(a).decode("utf-8", errors="replace"): alp for a, alp in top}
                             for _, _, top in entries],
            "text_offset": list(_offsets(texts)),
        }


def _invalid(endpoint: Endpoint, exc: ValueError) -> InvalidRequest:
    param = "messages" if endpoint is Endpoint.CHAT else "prompt"
    return InvalidRequest(str(exc), code="invalid_request", param=param)


def _offsets(texts: list[str]) -> Iterator[int]:
    offset = 0
    for text in texts:
        yield offset
        offset += len(text)


def _is_end_of_generation(llm: Any, token: int) -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_vocab_is_eog(llm._model.vocab, token))


# -- OpenAI request -> llama-cpp-python arguments ---------------------------------------------

_COMMON = ("temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty")


def _llama_kwargs(endpoint: Endpoint, body: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    """Map an OpenAI body onto llama-cpp-python's arguments; also return the logprobs asked."""
    if body.get("n") not in (None, 1):
        raise InvalidRequest("the embedded llama.cpp backend generates one choice (n=1)", param="n")
    kwargs = {key: body[key] for key in _COMMON if body.get(key) is not None}
    kwargs.setdefault("temperature", 1.0)  # OpenAI's default, not llama-cpp-python's 0.2/0.8
    if body.get("logit_bias"):
        kwargs["logit_bias"] = {str(k): float(v) for k, v in body["logit_bias"].items()}
    if endpoint is Endpoint.CHAT:
        if body.get("tools") or body.get("functions"):
            raise InvalidRequest("tool calling is not supported by the embedded llama.cpp backend; "
                                 "serve the model with vLLM for tools", param="tools")
        kwargs["messages"] = [_message(m) for m in body["messages"]]
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if max_tokens is not None:
            kwargs["max_tokens"] = max_tokens
        if (response_format := _response_format(body.get("response_format"))) is not None:
            kwargs["response_format"] = response_format
        logprobs = (body.get("top_logprobs") or 0) if body.get("logprobs") else None
        return kwargs, logprobs
    prompt = body["prompt"]
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise InvalidRequest("the embedded llama.cpp backend takes one text prompt",
                                 param="prompt")
        prompt = prompt[0]
    kwargs["prompt"] = prompt
    kwargs["max_tokens"] = body.get("max_tokens") or 16  # OpenAI's default for completions
    if body.get("echo"):
        if body.get("logprobs") is not None:
            raise InvalidRequest("echo with logprobs is not supported by the embedded backend",
                                 param="echo")
        kwargs["echo"] = True
    if body.get("suffix"):
        kwargs["suffix"] = body["suffix"]
    return kwargs, body.get("logprobs")


def _message(message: dict[str, Any]) -> dict[str, Any]:
    role = "system" if message["role"] == "developer" else message["role"]
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.get("type") != "text":
                raise InvalidRequest(f"content part {part.get('type')!r} is not supported by the "
                                     "embedded llama.cpp backend (text only)", param="messages")
            texts.append(part.get("text", ""))
        content = "\n".join(texts)
    return {"role": role, "content": content or ""}


def _response_format(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, dict) or value.get("type") in (None, "text"):
        return None
    if value["type"] == "json_object":
        return {"type": "json_object"}
    if value["type"] == "json_schema":
        schema = (value.get("json_schema") or {}).get("schema")
        return {"type": "json_object", "schema": schema} if schema else {"type": "json_object"}
    raise InvalidRequest(f"response_format {value['type']!r} is not supported",
                         param="response_format")
