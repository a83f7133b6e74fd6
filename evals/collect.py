"""`greenroute collect`: run the configured tiers over question sets and record outcomes.

Tiers run one after the other, never at once: on a CPU one model's generation takes every core,
and two at a time would slow both several-fold and skew their timings. Within a tier, requests
go `concurrency` at a time (1 for the embedded backend; more for a vLLM server, which batches).
Decoding is greedy (temperature 0, fixed seed) so a rerun gives the same answers.

Each result is appended to the outcome file as soon as it is graded, so an interrupted run
resumes where it stopped; results that failed are tried again on the next run.

Ctrl-C (SIGINT) stops a run: asyncio.run cancels it, the generation in flight stops at its next
token, and its prompt is not recorded. A process that starts with SIGINT ignored (a background
job of a shell without job control, `cmd &` in a script) keeps ignoring it, as POSIX has it;
SIGTERM stops that one, losing at most the line being written.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from greenroute.backends.base import Backend, Endpoint
from greenroute.backends.energy.meter import Meter
from greenroute.backends.registry import TierConfig, build_backend
from greenroute.evals import graders, load
from greenroute.evals.outcomes import OutcomeWriter, compact, read_rows
from greenroute.evals.pause import wait_while_paused
from greenroute.evals.prompts import Prompt, render
from greenroute.evals.signals import SignalPlan
from greenroute.evals.signals import collect as collect_signals
from greenroute.evals.signals import pending as signal_pending
from greenroute.evals.tasks import Item
from greenroute.routers.features import logprob_features

log = logging.getLogger("greenroute.evals")

TOP_LOGPROBS = 5
JUDGE_MAX_TOKENS = 256


@dataclass(frozen=True)
class CollectPlan:
    items: Sequence[Item]
    tiers: Sequence[TierConfig]
    out: Path
    seed: int = 0
    concurrency: int = 1
    judge: TierConfig | None = None
    pause_file: Path | None = None  # while it exists, no new prompt is started
    signals: SignalPlan | None = None  # cascade signals to add after the greedy pass
    signal_tiers: tuple[str, ...] = ()  # the tiers that get them (the cascade stages)


def meter_for(tier: TierConfig) -> Meter | None:
    """The meter that sees a tier's energy: the tier's `meter` config, else this process's CPU
    for an embedded model and none for a model served elsewhere (backends/energy/select.py)."""
    from greenroute.backends.energy import select

    return select.meter_for(tier)


def pending(plan: CollectPlan, tier: TierConfig) -> list[Item]:
    """The items this tier has no successful result for yet."""
    rows = read_rows(plan.out)
    return [item for item in plan.items
            if not _succeeded(rows.get(item.id, {}).get("models", {}).get(tier.name))]


def _succeeded(result: dict[str, Any] | None) -> bool:
    return result is not None and not result.get("error")


async def collect(plan: CollectPlan, stream: Any = sys.stderr) -> None:
    """Run every tier over its pending items, appending results; compact the file at the end."""
    if any(item.kind == "open" for item in plan.items) and plan.judge is None:
        raise ValueError("open-ended items need a judge tier (--judge)")
    for tier in plan.tiers:
        todo = pending(plan, tier)
        signals = plan.signals if tier.name in plan.signal_tiers else None
        if not todo:
            print(f"{tier.name}: all {len(plan.items)} prompts already collected", file=stream)
            if signals is None or not signal_pending(plan.items, read_rows(plan.out),
                                                     tier.name, signals):
                continue
        backend = build_backend(tier)
        judge = build_backend(plan.judge) if plan.judge and any(
            item.kind == "open" for item in todo) else None
        writer = OutcomeWriter(plan.out)
        try:
            await backend.start()
            if judge is not None:
                await judge.start()
            runner = _TierRun(plan, tier, backend, judge, writer, stream, len(todo))
            if todo:
                await runner.run(todo)
            if signals is not None:
                await collect_signals(backend, tier.name, plan.items, writer, signals,
                                      runner.meter, stream, plan.pause_file)
        finally:
            writer.close()
            await backend.aclose()
            if judge is not None:
                await judge.aclose()
    compact(plan.out)


class _TierRun:
    """One tier over its pending items."""

    def __init__(self, plan: CollectPlan, tier: TierConfig, backend: Backend,
                 judge: Backend | None, writer: OutcomeWriter, stream: Any, total: int) -> None:
        self.plan = plan
        self.tier = tier
        self.backend = backend
        self.judge = judge
        self.writer = writer
        self.meter = meter_for(tier) if plan.concurrency == 1 else None
        if plan.concurrency > 1 and meter_for(tier) is not None:
            log.warning("%s: energy is not recorded per prompt with concurrency > 1 (requests "
                        "overlap on one meter); tokens and latency are", tier.name)
        self.progress = Progress(tier.name, total, stream)

    async def run(self, items: Sequence[Item]) -> None:
        queue: asyncio.Queue[Item] = asyncio.Queue()
        for item in items:
            queue.put_nowait(item)

        async def worker() -> None:
            while not queue.empty():
                item = queue.get_nowait()
                await wait_while_paused(self.plan.pause_file, self.progress.note)
                prompt = render(item)
                result = await self.answer(item, prompt)
                self.writer.append(_row(item, prompt, {self.tier.name: result}))
                self.progress.advance(result)

        await asyncio.gather(*(worker() for _ in range(max(1, self.plan.concurrency))))
        self.progress.finish()

    async def answer(self, item: Item, prompt: Prompt) -> dict[str, Any]:
        """One model's graded answer to one item, or the error that prevented it."""
        body = {"model": self.tier.name, "messages": [{"role": "user", "content": prompt.text}],
                "max_tokens": prompt.max_tokens, "temperature": 0, "seed": self.plan.seed,
                "logprobs": True, "top_logprobs": TOP_LOGPROBS}
        result: dict[str, Any] = {"model_id": self.backend.model_id}
        joules_before = self.meter.read_joules() if self.meter else None
        load_before = load.sample() if self.meter else None
        started = time.perf_counter()
        try:
            completion = await self.backend.create(Endpoint.CHAT, body)
        except Exception as exc:  # recorded on the row; the run goes on
            return {**result, "quality": None, "error": _describe(exc)}
        result["latency_s"] = round(time.perf_counter() - started, 4)
        if self.meter is not None and joules_before is not None:
            result["joules"] = round(self.meter.read_joules() - joules_before, 4)
            result["energy_source"] = self.meter.source
            # What else ran meanwhile: joules of a contended call are not comparable
            beside = load.between(load_before, load.sample())
            if beside is not None:
                result["load"] = beside.record()
        data = orjson.loads(completion.body)
        choice = data["choices"][0]
        output = choice["message"].get("content") or ""
        result.update(output=output, finish_reason=choice.get("finish_reason"))
        if completion.usage is not None:
            result.update(prompt_tokens=completion.usage.prompt_tokens,
                          completion_tokens=completion.usage.completion_tokens)
        content = (choice.get("logprobs") or {}).get("content")
        if content:
            result["features"] = _rounded(logprob_features(content))
        if item.kind == "open":
            return {**result, **await self._judge(item, prompt.text, output)}
        grade = graders.grade(item, output)
        return {**result, "quality": grade.quality, "answer": grade.answer, "graded_by": "rule"}

    async def _judge(self, item: Item, question: str, output: str) -> dict[str, Any]:
        assert self.judge is not None and self.plan.judge is not None
        body = {"model": self.plan.judge.name, "temperature": 0, "seed": self.plan.seed,
                "max_tokens": JUDGE_MAX_TOKENS,
                "messages": graders.judge_messages(question, output)}
        try:
            verdict = orjson.loads((await self.judge.create(Endpoint.CHAT, body)).body)
        except Exception as exc:
            return {"quality": None, "error": f"judge failed: {_describe(exc)}"}
        text = verdict["choices"][0]["message"].get("content") or ""
        quality = graders.parse_judgement(text)
        if quality is None:
            return {"quality": None, "error": "the judge gave no rating", "judgement": text}
        return {"quality": quality, "graded_by": f"judge:{self.plan.judge.name}",
                "judgement": text}


def _row(item: Item, prompt: Prompt, models: dict[str, Any]) -> dict[str, Any]:
    return {"id": item.id, "task": item.task, "kind": item.kind, "prompt": prompt.text,
            "gold": list(item.gold), "models": models}


def _rounded(features: dict[str, float] | None) -> dict[str, float] | None:
    return None if features is None else {k: round(v, 5) for k, v in features.items()}


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {getattr(exc, 'message', None) or exc}"


class Progress:
    """A progress line with rate and ETA: redrawn in place on a terminal, else every 10 items
    (or 30 s) as its own line, so background logs stay readable."""

    def __init__(self, label: str, total: int, stream: Any) -> None:
        self.label = label
        self.total = total
        self.stream = stream
        self.done = self.failed = self.contended = 0
        self.quality = 0.0
        self.started = self._last = time.monotonic()
        self.tty = bool(getattr(stream, "isatty", lambda: False)())

    def advance(self, result: dict[str, Any]) -> None:
        self.done += 1
        if result.get("error"):
            self.failed += 1
        else:
            self.quality += float(result.get("quality") or 0.0)
        if load.contended(result.get("load")):
            self.contended += 1
        now = time.monotonic()
        if self.tty or self.done % 10 == 0 or now - self._last > 30 or self.done == self.total:
            self._last = now
            self._write(self.line(now))

    def line(self, now: float) -> str:
        elapsed = now - self.started
        rate = elapsed / self.done if self.done else 0.0
        eta = rate * (self.total - self.done)
        answered = self.done - self.failed
        mean = f"{100 * self.quality / answered:.1f}%" if answered else "-"
        return (f"{self.label}: {self.done}/{self.total} ({100 * self.done / self.total:.0f}%), "
                f"{rate:.2f} s/prompt, ETA {_clock(eta)}, quality {mean}, failed {self.failed}"
                + (f", {self.contended} beside other work (their joules are not comparable: "
                   "collect on a quiet machine)" if self.contended else ""))

    def note(self, text: str) -> None:
        self._write(f"{self.label}: {text}")

    def finish(self) -> None:
        if self.tty:
            print(file=self.stream, flush=True)

    def _write(self, text: str) -> None:
        if self.tty:
            print(f"\r\033[K{text}", end="", file=self.stream, flush=True)
        else:
            print(text, file=self.stream, flush=True)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
