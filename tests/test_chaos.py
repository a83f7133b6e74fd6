"""Chaos (issue 13, item 5): a real `greenroute serve` on loopback, in front of fake OpenAI
upstreams that are real processes, under 5,000 requests at 64 concurrent, while the largest
tier's upstream is killed (SIGKILL) and restarted twice.

The mix: whole and streamed answers from `small`, from `large` (which falls back to `small`)
and from `large-alone` (the same upstream, no fallback), and about 10% of clients that leave
mid-answer: half during a stream (after its first event), half while waiting for a whole
answer. Every client that stays must get an answer, a fallback's answer, or a clean
OpenAI-shaped error (a 5xx JSON body, or a stream that ends with an error event): never a reset
connection or a malformed body. After a clean shutdown the SQLite ledger holds one row per
request sent, the clients that left included (as 499).
"""

from __future__ import annotations

import asyncio
import collections
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from conftest import start_gateway, stop_gateway

from greenroute.backends.fake_openai import free_port

REQUESTS = 5_000
CONCURRENCY = 64
LEAVE_EVERY = 10  # one request in ten is a client that leaves mid-answer
KILLS_AT = (0.2, 0.55)  # fractions of the run at which the large upstream is killed
DOWN_S = 1.0  # how long it stays dead each time
CAUGHT = 8  # streams and whole requests in flight on the large upstream at each kill
MESSAGES = [{"role": "user", "content": "how much energy did this answer take"}]


class Upstream:
    """`python -m greenroute.backends.fake_openai` on a fixed port, killable and restartable."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.process: subprocess.Popen[bytes] | None = None
        self.kills = 0

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "greenroute.backends.fake_openai", "--port", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/models", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError(f"fake upstream on port {self.port} did not start")

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()  # SIGKILL: its connections drop mid-answer
        self.process.wait()
        self.kills += 1

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@contextmanager
def upstream() -> Iterator[Upstream]:
    fake = Upstream()
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


def config(small: Upstream, large: Upstream, db: Path) -> str:
    def tier(name: str, url: str, model: str, extra: str = "") -> str:
        return (f'[[tiers]]\nname = "{name}"\nbackend = "openai"\nurl = "{url}"\n'
                f'model = "{model}"\nconnect_timeout_s = 1\n{extra}\n')

    return (tier("small", small.url, "echo", "energy_hint = 1.0")
            + tier("large", large.url, "echo", 'energy_hint = 5.0\nfallbacks = ["small"]')
            + tier("large-alone", large.url, "echo", "energy_hint = 5.0")
            # on the large upstream, in flight when it dies: a stream and a wait for an answer
            + tier("large-slow", large.url, "slow", "energy_hint = 5.0")
            # (its timeout: one that reached the restarted upstream instead also falls back)
            + tier("large-hang", large.url, "hang",
                   'energy_hint = 5.0\ntimeout_s = 3\nfallbacks = ["small"]')
            + tier("slow", small.url, "slow")  # streams 100 events, one per 0.1 s
            + tier("hang", small.url, "hang", "timeout_s = 60")  # answers nobody
            + "[router]\nenabled = false\n\n"
            + "[health]\ninterval_s = 0.5\ntimeout_s = 1\ncooldown_s = 1\n\n"
            + f'[ledger]\npath = "{db}"\nflush_interval_s = 0.1\n')


@dataclass
class Plan:
    """What request number `n` asks for."""

    model: str
    stream: bool
    leaves: bool = False

    @staticmethod
    def of(n: int) -> Plan:
        if n % LEAVE_EVERY == 0:  # half leave a stream, half a whole answer they wait for
            return Plan("slow" if n % (2 * LEAVE_EVERY) == 0 else "hang",
                        stream=n % (2 * LEAVE_EVERY) == 0, leaves=True)
        return Plan(("small", "large", "large-alone")[n % 3], stream=n % 2 == 1, leaves=False)


@dataclass
class Tally:
    """The outcome of every request, by kind; `wrong` lists what should never happen."""

    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    wrong: list[str] = field(default_factory=list)
    caught: collections.Counter[str] = field(default_factory=collections.Counter)  # by a kill
    done: int = 0
    answered_by_large_after_restarts: int = 0


def error_shaped(payload: Any) -> bool:
    error = payload.get("error") if isinstance(payload, dict) else None
    return isinstance(error, dict) and isinstance(error.get("message"), str) \
        and isinstance(error.get("type"), str)


def judge_whole(response: httpx.Response) -> str:
    try:
        payload = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return "malformed"
    if response.status_code == 200:
        if not payload.get("choices") or payload["choices"][0]["message"]["content"] is None:
            return "malformed"
        return "fallback" if "fallback" in response.headers["x-greenroute-route"] else "answer"
    if response.status_code >= 500 and error_shaped(payload):
        return f"error {response.status_code}"
    return "malformed"


def judge_stream(events: list[bytes], response: httpx.Response) -> str:
    if events and events[-1] == b"[DONE]":
        try:
            chunks = [orjson.loads(event) for event in events[:-1]]
        except orjson.JSONDecodeError:
            return "malformed"
        if not any(chunk["choices"] and chunk["choices"][0]["finish_reason"] == "stop"
                   for chunk in chunks):
            return "malformed"
        return "fallback" if "fallback" in response.headers["x-greenroute-route"] \
            else "answer"
    try:
        last = orjson.loads(events[-1]) if events else None
    except orjson.JSONDecodeError:
        return "malformed"
    return "stream error event" if error_shaped(last) else "malformed"


async def one(client: httpx.AsyncClient, n: int, tally: Tally, after_restarts: bool,
              plan: Plan | None = None, streaming: asyncio.Event | None = None) -> None:
    """Send request `n` (its plan, unless given) and tally what came back; `streaming` is set
    once a stream's first event has arrived."""
    plan = plan or Plan.of(n)
    body = {"model": plan.model, "messages": MESSAGES, "stream": plan.stream}
    if plan.stream:
        body["stream_options"] = {"include_usage": True}
    try:
        if plan.leaves and not plan.stream:
            # The client hangs up while the answer is being made.
            with pytest.raises(httpx.ReadTimeout):
                await client.post("/chat/completions", json=body, timeout=httpx.Timeout(
                    10, read=0.2))
            tally.outcomes["left"] += 1
            return
        async with client.stream("POST", "/chat/completions", json=body) as response:
            if plan.leaves:  # it reads the first event, then closes the connection
                async for _ in response.aiter_bytes():
                    break
                tally.outcomes["left"] += 1
                return
            if plan.stream and response.status_code == 200:
                events = []
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[len("data: "):].encode())
                        if streaming is not None:
                            streaming.set()
                outcome = judge_stream(events, response)
            else:  # a whole answer, or an error before the stream's first byte
                await response.aread()
                outcome = judge_whole(response)
            tally.statuses[response.status_code] += 1
            if after_restarts and response.headers.get("x-greenroute-model") == "large":
                tally.answered_by_large_after_restarts += 1
    except httpx.TransportError as exc:
        outcome = f"transport {type(exc).__name__}"
    if outcome == "malformed" or outcome.startswith("transport"):
        tally.wrong.append(f"request {n} {plan}: {outcome}")
    tally.outcomes[outcome] += 1
    if plan.model in ("large-slow", "large-hang"):
        tally.caught[f"{plan.model}: {outcome}"] += 1


async def load(gateway_url: str, large: Upstream, tally: Tally) -> None:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(1, REQUESTS + 1):
        queue.put_nowait(n)
    restarts_done = asyncio.Event()

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            n = queue.get_nowait()
            await one(client, n, tally, restarts_done.is_set())
            tally.done += 1

    async def chaos(client: httpx.AsyncClient) -> None:
        caught: list[asyncio.Task[None]] = []
        for at in KILLS_AT:
            while tally.done < at * REQUESTS:
                await asyncio.sleep(0.01)
            # Requests the kill catches mid-answer: taken from the queue, so the total stays.
            streaming = [asyncio.Event() for _ in range(CAUGHT)]
            for event in streaming:
                caught.append(asyncio.create_task(one(
                    client, queue.get_nowait(), tally, False, Plan("large-slow", True), event)))
            for _ in range(CAUGHT):
                caught.append(asyncio.create_task(one(
                    client, queue.get_nowait(), tally, False, Plan("large-hang", False))))
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in streaming)), 10)
            await asyncio.sleep(0.2)  # the whole requests are waiting on the upstream too
            large.kill()
            await asyncio.sleep(DOWN_S)
            await asyncio.to_thread(large.start)
        restarts_done.set()
        await asyncio.gather(*caught)

    # Idle connections are dropped before uvicorn's keep-alive timeout (5 s) would close them,
    # so that no request is sent on a connection the server is closing (the client's race).
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY,
                          keepalive_expiry=2)
    async with httpx.AsyncClient(base_url=gateway_url, limits=limits,
                                 timeout=httpx.Timeout(30)) as client:
        chaos_task = asyncio.create_task(chaos(client))
        await asyncio.gather(*(worker(client) for _ in range(CONCURRENCY)))
        await chaos_task


@pytest.mark.timeout(240)
def test_every_request_is_answered_and_recorded_while_the_large_upstream_dies_twice(
        tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    tally = Tally()
    with upstream() as small, upstream() as large:
        gateway = start_gateway(config(small, large, db), tmp_path, ledger=db)
        try:
            started = time.monotonic()
            asyncio.run(load(gateway.url, large, tally))
            elapsed = time.monotonic() - started
        finally:
            stop_gateway(gateway)  # SIGTERM: in-flight requests finish, the ledger is flushed
        assert gateway.process.returncode is not None
    with sqlite3.connect(db) as ledger:
        rows = collections.Counter(status for status, in ledger.execute(
            "SELECT status FROM requests"))
    print(f"\n{REQUESTS} requests in {elapsed:.1f} s: {dict(tally.outcomes)}, "
          f"statuses {dict(tally.statuses)}, ledger {dict(rows)}, caught {dict(tally.caught)}")

    assert large.kills == 2
    assert tally.wrong == [], tally.wrong
    assert sum(tally.outcomes.values()) == REQUESTS
    leavers = tally.outcomes["left"]
    assert leavers > REQUESTS // LEAVE_EVERY - 2 * CAUGHT  # all but those the kills took
    assert tally.outcomes["answer"] > REQUESTS // 2
    assert tally.outcomes["fallback"] > 0  # `large` answered by `small` while it was down
    assert any(kind.startswith("error 5") for kind in tally.outcomes)  # `large-alone` down
    assert tally.answered_by_large_after_restarts > 0  # and back after its restarts
    # What each kill caught mid-answer: streams end with an error event, whole answers come
    # from the fallback.
    assert tally.caught == {"large-slow: stream error event": 2 * CAUGHT,
                            "large-hang: fallback": 2 * CAUGHT}

    # One row per request, with the status its client saw (a stream cut by the kill: 502).
    assert sum(rows.values()) == REQUESTS
    seen: collections.Counter[int] = collections.Counter()
    for outcome, count in tally.outcomes.items():
        status = {"answer": 200, "fallback": 200, "left": 499, "stream error event": 502}.get(
            outcome) or int(outcome.removeprefix("error "))
        seen[status] += count
    assert rows == seen
