"""Per-request accounting: what a request asked for, which models it tried, their tokens and
energy, and the ledger row it becomes.

The request path fills in a `RequestRecord` (attribute writes), opens an `Attempt` per model it
tries, and ends the record in one of three ways: `answer(...)` (a whole answer, which gets its
energy here), `streaming(...)` (the stream's end finishes it), or `fail(...)` / `gone()`. The
row is handed to the ledger writer once every track it used is final, which the device's
sampler decides, so nothing here waits for a database or a tick.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import orjson

from greenroute.backends.base import Backend, Chunk, Completion, Usage
from greenroute.backends.energy.attribution import PeriodEnergy, Track
from greenroute.backends.energy.progress import current_track
from greenroute.backends.energy.sampler import Fleet
from greenroute.gateway import headers as h
from greenroute.gateway.carbon import GridIntensity
from greenroute.gateway.ledger.writer import Item, LedgerWriter

# Status for a client that left before its answer (nginx's convention); never seen by the client.
CLIENT_CLOSED_REQUEST = 499
J_PER_KWH = 3.6e6


class Accounting:
    """Opens a record per request; sends finished rows to the ledger (if there is one)."""

    def __init__(self, fleet: Fleet, writer: LedgerWriter | None, store_text: bool,
                 grid: GridIntensity | None = None) -> None:
        self.fleet = fleet
        self.writer = writer
        self.store_text = store_text
        self.grid = grid  # each row's intensity and gCO2 at its time (gateway/carbon.py)
        # Called with each finished record, its row ready (e.g. GatewayMetrics.observe).
        self.observers: list[Callable[[RequestRecord], None]] = []

    def open(self, request_id: str, endpoint: str) -> RequestRecord:
        return RequestRecord(self, request_id, endpoint)

    @property
    def spooling(self) -> bool:
        return self.writer is not None and self.writer.spool is not None

    def spool(self, record: RequestRecord, rows: list[Item]) -> None:
        """The record's rows as they stand, kept past a crash (gateway/ledger/spool.py)."""
        if self.writer is not None:
            self.writer.spool_rows(record.id, rows)

    def submit(self, record: RequestRecord, rows: list[Item] | None = None) -> None:
        """The record's final rows (`rows` if already built from final energy) to the ledger,
        and the record to the observers."""
        if self.writer is not None:
            self.writer.put_many(rows if rows is not None else record.rows())
        for observe in self.observers:
            observe(record)


class Attempt:
    """One model tried for a request, and its track on that model's device (if metered)."""

    __slots__ = ("tier", "model_id", "track", "self_reporting", "usage", "first_output",
                 "answered", "answer_chunks", "_done")

    def __init__(self, tier: str, backend: Backend, track: Track | None) -> None:
        self.tier = tier
        self.model_id = backend.model_id
        self.track = track
        # A backend that sees each token reports progress itself (backends/energy/progress.py).
        self.self_reporting = backend.reports_progress
        self.usage: Usage | None = None
        self.first_output: float | None = None
        self.answered = False
        # answer chunks of its stream seen: relayed to the client, or read before the
        # stream was dropped (a cascade stage judged on its first token)
        self.answer_chunks = 0
        self._done = False

    def completion_tokens(self) -> int | None:
        """Its usage's, else for a stream cut before its usage chunk (client gone, shutdown)
        the answer chunks seen so far: about one token each from vLLM and llama.cpp."""
        if self.usage is not None:
            return self.usage.completion_tokens
        return self.answer_chunks or None

    @contextmanager
    def running(self) -> Iterator[None]:
        """Around the backend call: the track is the current one, and begun unless the backend
        begins it itself when its worker starts."""
        if self.track is not None and not self.self_reporting:
            self.track.begin()
        token = current_track.set(self.track)
        try:
            yield
        finally:
            current_track.reset(token)

    def output_started(self) -> None:
        if self.first_output is None:
            self.first_output = time.monotonic()

    def done(self, usage: Usage | None) -> None:
        """The model has finished (or failed): report its tokens if the backend did not."""
        if self._done:
            return
        self._done = True
        if usage is not None:
            self.usage = usage
        track = self.track
        if track is None:
            return
        if self.self_reporting:
            track.abandon()  # only if its worker never started it; otherwise the worker ends it
            return
        now = time.monotonic()
        if usage is not None:
            if self.first_output is not None:  # prompt until the first output, then the rest
                track.tokens(0, at=self.first_output, prompt=usage.prompt_tokens)
                track.tokens(usage.completion_tokens, at=now)
            else:
                track.tokens(usage.completion_tokens, at=now, prompt=usage.prompt_tokens)
        track.end(now)

    def joules(self) -> float | None:
        return None if self.track is None else self.track.joules_now()


class RequestRecord:
    """Everything the ledger keeps about one request, filled in as it is handled."""

    def __init__(self, accounting: Accounting, request_id: str, endpoint: str) -> None:
        self.accounting = accounting
        self.id = request_id
        self.endpoint = endpoint
        self.created = datetime.now(UTC)
        self.started = time.perf_counter()
        self.key_id: str | None = None
        self.stream = False
        self.requested_model: str | None = None
        self.route: str | None = None
        self.quality_target: float | None = None
        self.router_score: float | None = None
        self.target_rule: str | None = None  # a rule that changed the target (carbon-aware)
        self.attempts: list[Attempt] = []
        self.status = 0
        self.error: str | None = None
        self.latency_ms = 0.0
        self.ttft_ms: float | None = None
        self.prompt_text: str | None = None
        self.answer_text: str | None = None
        self._lock = threading.Lock()
        self._waiting = 0  # tracks not final yet
        self._finished = False
        self._submitted = False
        self._spooled = False
        self._acknowledged: list[Item] | None = None  # a stream's spooled rows, if final

    @property
    def store_text(self) -> bool:
        return self.accounting.store_text

    def attempt(self, tier: str, backend: Backend) -> Attempt:
        track = self.accounting.fleet.track(tier, self.id, self._track_final)
        if track is not None:
            with self._lock:
                self._waiting += 1
        attempt = Attempt(tier, backend, track)
        self.attempts.append(attempt)
        return attempt

    def asked(self, body: dict[str, Any]) -> None:
        """The request is valid: what it asked for."""
        self.stream = bool(body.get("stream"))
        if self.store_text:
            self.prompt_text = prompt_text(body)

    def answer(self, attempt: Attempt, completion: Completion,
               headers: dict[str, str]) -> Completion:
        """`attempt`'s whole answer goes back (a cascade's may not be the last model tried): the
        request is over. Returns the answer with its energy in `usage.energy_joules`, and puts
        it in `headers`, when a model tried is metered."""
        attempt.done(completion.usage)
        attempt.answered = True
        if self.ttft_ms is None:  # its first token reaches the client with the last one
            self.ttft_ms = (time.perf_counter() - self.started) * 1000
        if self.store_text:
            self.answer_text = _answer_text(completion)
        self._finish(200)
        joules = self._energy(headers)
        if joules is None:
            return completion
        data = completion.parsed()
        _add_energy(data, joules)
        return Completion(completion.body, completion.usage, data)

    def streaming(self, attempt: Attempt) -> StreamAccounting:
        """`attempt`'s stream goes back, from its first batch: what sees it to its end."""
        if self.ttft_ms is None:
            self.ttft_ms = (time.perf_counter() - self.started) * 1000
        attempt.output_started()
        attempt.answered = True  # its answer reaches the client, even if the stream is cut
        return StreamAccounting(self, attempt)

    def fail(self, status: int, code: str | None) -> None:
        """The request is refused or failed with this status and error code."""
        self._finish(status, code)

    def gone(self) -> None:
        """The client left before its answer (a no-op once the request is over)."""
        self._finish(CLIENT_CLOSED_REQUEST, "client_closed")

    def acknowledge(self, status: int, code: str | None) -> None:
        """A stream's last event is about to go out: its rows as they stand go to the spool,
        so a crash from here on cannot lose the request (its final rows follow as usual)."""
        if self._spooled or self._finished:
            return
        self._spooled = True
        self.latency_ms = (time.perf_counter() - self.started) * 1000
        self.status, self.error = status, code
        if self.accounting.spooling:
            with self._lock:
                final = self._waiting == 0  # no metered model still counting: energy is final
            rows = self.rows()
            self.accounting.spool(self, rows)
            if final:
                self._acknowledged = rows  # the ledger's too, if the stream ends as it said

    def _energy(self, headers: dict[str, str]) -> float | None:
        """The energy so far, also put in `headers` (None: no model tried is metered)."""
        joules = self.joules()
        if joules is not None:
            headers[h.ENERGY] = f"{joules:.6f}"
            headers[h.ENERGY_SOURCE] = self.energy_source() or ""
        return joules

    def _finish(self, status: int, error: str | None = None) -> None:
        """The request is over (answered, refused or abandoned): close its attempts; the row
        goes to the ledger as soon as their energy is final."""
        if self._finished:
            return
        self.latency_ms = (time.perf_counter() - self.started) * 1000
        self.status = status
        self.error = error
        if status < 400 and self.attempts and not any(a.answered for a in self.attempts):
            self.attempts[-1].answered = True  # a stream: the last model tried answered
        for attempt in self.attempts:
            attempt.done(None)
        # Spooled before the answer or error goes out (streams: at `acknowledge`). Rows built
        # while no track is still waiting are final: the ledger gets the same list.
        rows = None
        if not self._spooled and self.accounting.spooling:
            self._spooled = True
            with self._lock:
                final = self._waiting == 0
            rows = self.rows()
            self.accounting.spool(self, rows)
            if not final:
                rows = None
        elif self._acknowledged is not None and (status, error) == (
                self._acknowledged[0][1]["status"], self._acknowledged[0][1]["error"]):
            # A stream that ended as its acknowledgement said: the same rows, to its last byte.
            rows = self._acknowledged
            rows[0][1]["latency_ms"] = round(self.latency_ms, 3)
        with self._lock:
            self._finished = True
            ready = self._waiting == 0
        if ready:
            self._submit(rows)

    def joules(self) -> float | None:
        """The energy of every model tried, as known now (None: none of them is metered)."""
        values = [j for a in self.attempts if (j := a.joules()) is not None]
        return sum(values) if values else None

    def energy_source(self) -> str | None:
        sources = sorted({a.track.device.source for a in self.attempts if a.track is not None})
        return "+".join(sources) if sources else None

    def _track_final(self, track: Track) -> None:
        with self._lock:
            self._waiting -= 1
            ready = self._finished and self._waiting == 0
        if ready:
            self._submit()

    def _submit(self, rows: list[Item] | None = None) -> None:
        with self._lock:
            if self._submitted:
                return
            self._submitted = True
        self.accounting.submit(self, rows)

    # -- the rows -----------------------------------------------------------------------------

    def rows(self) -> list[Item]:
        answer = next((a for a in self.attempts if a.answered), None)
        usage = answer.usage if answer is not None else None
        joules = self.joules()
        completion = answer.completion_tokens() if answer is not None else None
        grid = self.accounting.grid
        intensity = grid.at(self.created) if grid is not None else None
        row = {
            "id": self.id, "created": self.created, "key_id": self.key_id,
            "endpoint": self.endpoint, "stream": self.stream,
            "requested_model": self.requested_model, "route": self.route,
            "quality_target": self.quality_target, "router_score": self.router_score,
            "answered_by": answer.tier if answer else None,
            "upstream_model": answer.model_id if answer else None,
            "models_tried": len(self.attempts), "status": self.status, "error": self.error,
            "prompt_tokens": usage.prompt_tokens if usage is not None else None,
            "completion_tokens": completion,
            "latency_ms": round(self.latency_ms, 3),
            "ttft_ms": round(self.ttft_ms, 3) if self.ttft_ms is not None else None,
            "joules": joules,
            "joules_per_token": joules / completion if joules is not None and completion
            else None,
            "energy_source": self.energy_source(),
            "grid_gco2_per_kwh": intensity,
            "gco2": joules / J_PER_KWH * intensity if joules is not None
            and intensity is not None else None,
            "target_rule": self.target_rule,
            "prompt_text": self.prompt_text if self.store_text else None,
            "answer_text": self.answer_text if self.store_text else None,
        }
        rows: list[tuple[str, dict[str, Any]]] = [("requests", row)]
        for position, attempt in enumerate(self.attempts):
            track = attempt.track
            rows.append(("request_models", {
                "request_id": self.id, "position": position, "tier": attempt.tier,
                "upstream_model": attempt.model_id,
                "prompt_tokens": attempt.usage.prompt_tokens if attempt.usage else None,
                "completion_tokens": attempt.completion_tokens(),
                "joules": track.joules if track is not None else None,
                "energy_source": track.device.source if track is not None else None,
                "device": track.device.name if track is not None else None,
                "answered": attempt.answered}))
        return rows


class StreamAccounting:
    """Puts the energy into a stream's usage chunk, and finishes its record when it ends (the
    `StreamObserver` of gateway/streaming.py)."""

    def __init__(self, record: RequestRecord, attempt: Attempt) -> None:
        self.record = record
        self.attempt = attempt
        self.texts: list[str] | None = [] if record.store_text else None  # store_text only

    def relayed(self, chunk: Chunk) -> None:
        self.attempt.answer_chunks += 1
        if self.texts is not None:
            text = _chunk_text(chunk.data)
            if text:
                self.texts.append(text)

    def usage_chunk(self, chunk: Chunk) -> bytes:
        self.attempt.done(chunk.usage)
        joules = self.record.joules()
        if joules is None:
            return chunk.data
        data = orjson.loads(chunk.data)
        _add_energy(data, joules)
        return orjson.dumps(data)

    def finishing(self, status: int, code: str | None) -> None:
        if self.texts is not None:
            self.record.answer_text = "".join(self.texts)
        self.record.acknowledge(status, code)

    def ended(self, status: int, code: str | None) -> None:
        if self.texts is not None:
            self.record.answer_text = "".join(self.texts)
        self.record._finish(status, code)


def reader_identity() -> tuple[str, str]:
    """(host, reader) that this process's device_energy rows carry: the host's name, and one
    unique over the processes sharing a ledger (host, pid, start time)."""
    host = socket.gethostname()
    return host, f"{host}/{os.getpid()}/{time.time():.3f}"


def period_row(period: PeriodEnergy, host: str = "", reader: str = "") -> dict[str, Any]:
    """A device_energy row from a device's settled period, read by `reader` on `host`."""
    return {"device": period.device, "source": period.source, "host": host, "reader": reader,
            "started": datetime.fromtimestamp(period.started, UTC),
            "ended": datetime.fromtimestamp(period.ended, UTC),
            "counter_start_j": period.counter_start_j, "counter_end_j": period.counter_end_j,
            "measured_j": period.measured_j, "attributed_j": period.attributed_j,
            "idle_j": period.idle_j, "other_j": period.other_j, "intervals": period.intervals}


def prompt_text(body: dict[str, Any]) -> str:
    """What the client asked, for ledgers configured to keep text."""
    if "messages" in body:
        return orjson.dumps(body["messages"]).decode()
    return orjson.dumps(body.get("prompt")).decode()


def _add_energy(data: dict[str, Any], joules: float) -> None:
    """The one place energy enters an answer: `usage.energy_joules`, beside its tokens."""
    usage = data.get("usage")
    if isinstance(usage, dict):
        usage["energy_joules"] = round(joules, 6)


def _chunk_text(data: bytes) -> str | None:
    """The first choice's text in a stream chunk (chat delta or completion text)."""
    try:
        for choice in orjson.loads(data)["choices"]:
            if choice.get("index", 0) == 0:
                text = choice["delta"].get("content") if "delta" in choice else choice.get("text")
                return text if isinstance(text, str) else None
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return None
    return None


def _answer_text(completion: Completion) -> str | None:
    try:
        choice = completion.parsed()["choices"][0]
        text = choice.get("text") if "text" in choice else choice["message"].get("content")
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        return None
    return text if isinstance(text, str) else None
