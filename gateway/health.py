"""Tier health: a circuit breaker per tier, fed by requests and by background checks.

A breaker opens after `failure_threshold` consecutive failures (a connection error or a 5xx
before the first byte) or at once when a background check fails. While open, requests for the
tier go to its fallbacks without waiting for it. After `cooldown_s` it is half-open: one request
(or the next check) is let through as a trial; its success closes the breaker, its failure opens
it again for another cooldown. Checks of all tiers run concurrently, at most `max_concurrent` at
once, each bounded by `timeout_s`, so one hung upstream holds up neither the others nor
`/health`, which runs a round of its own (reporting only: its result moves no breaker, so a
probe's rhythm does not change routing) and answers the results (`snapshot`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from greenroute.backends.base import Backend, BackendError, BackendUnavailable
from greenroute.gateway.config import HealthConfig

log = logging.getLogger("greenroute.gateway")


class BreakerOpen(BackendUnavailable):
    """A tier was not called: its breaker is open (or its half-open trial is in flight)."""

    def __init__(self, tier: str) -> None:
        super().__init__(f"tier {tier!r} is unavailable: its circuit breaker is open after "
                         "repeated failures; it gets a trial request when its cooldown ends")
        self.tier = tier


class BreakerState(enum.IntEnum):
    """The value is the `greenroute_tier_breaker_state` gauge's."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    """One tier's breaker. Not locked: it is used from the event loop only."""

    def __init__(self, failure_threshold: int, cooldown_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.failures = 0  # consecutive
        self.opened_at: float | None = None
        self.trial = False  # a half-open breaker's one trial request is in flight

    @property
    def state(self) -> BreakerState:
        if self.opened_at is None:
            return BreakerState.CLOSED
        if self.clock() - self.opened_at >= self.cooldown_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def allow(self) -> bool:
        """Whether a request may go to the tier now; a half-open breaker lets one through."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN or self.trial:
            return False
        self.trial = True
        return True

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None
        self.trial = False

    def failure(self) -> None:
        self.failures += 1
        self.trial = False
        if self.opened_at is not None or self.failures >= self.failure_threshold:
            self.open()

    def open(self) -> None:
        self.opened_at = self.clock()
        self.trial = False

    def release(self) -> None:
        """A trial ended with no verdict (the client left): the next request may try."""
        self.trial = False


class TierHealth:
    """One tier: its breaker and its last background check."""

    def __init__(self, name: str, backend: Backend, breaker: CircuitBreaker) -> None:
        self.name = name
        self.backend = backend
        self.breaker = breaker
        self.last: dict[str, Any] | None = None  # the backend's health() answer, or the error
        self.checked_at: float | None = None  # wall-clock time of the last check

    def snapshot(self) -> dict[str, Any]:
        result: dict[str, Any] = dict(self.last) if self.last is not None else {"ok": None}
        result["breaker"] = self.breaker.state.name.lower()
        result["checked_at"] = self.checked_at
        return result


class HealthMonitor:
    """Every tier's health; checks them in the background every `interval_s` (0: never)."""

    def __init__(self, config: HealthConfig, backends: Mapping[str, Backend],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.tiers = {name: TierHealth(name, backend,
                                       CircuitBreaker(config.failure_threshold,
                                                      config.cooldown_s, clock))
                      for name, backend in backends.items()}
        self._limit = asyncio.Semaphore(config.max_concurrent)
        self._task: asyncio.Task[None] | None = None

    def breaker(self, tier: str) -> CircuitBreaker:
        return self.tiers[tier].breaker

    @contextlib.contextmanager
    def guard(self, tier: str) -> Iterator[None]:
        """Around one call to `tier` that fails before its first byte or not at all: raise
        BreakerOpen instead of calling a tier whose breaker refuses, and give the breaker the
        call's outcome (a 5xx is a failure; an answer or a 4xx, a sign of life)."""
        breaker = self.tiers[tier].breaker
        if not breaker.allow():
            raise BreakerOpen(tier)
        try:
            yield
        except BackendError as exc:
            if exc.status >= 500:
                breaker.failure()
            else:
                breaker.success()
            raise
        except BaseException:
            breaker.release()  # the client left: no verdict on the tier
            raise
        breaker.success()

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """The last check of each tier and its breaker's state, for `/health`."""
        return {name: tier.snapshot() for name, tier in self.tiers.items()}

    def start(self) -> None:
        if self.config.interval_s > 0 and self._task is None:
            self._task = asyncio.create_task(self._run(), name="greenroute-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def check_all(self, feed_breakers: bool = True) -> None:
        """One round: every tier checked concurrently (bounded); their breakers updated unless
        `feed_breakers` is False (`/health`: a probe reports, the background checks decide)."""
        await asyncio.gather(*(self._check(tier, feed_breakers)
                               for tier in self.tiers.values()))

    async def _run(self) -> None:
        while True:
            try:
                await self.check_all()
            except Exception:  # a round must never end the loop
                log.exception("health checks failed")
            await asyncio.sleep(self.config.interval_s)

    async def _check(self, tier: TierHealth, feed_breaker: bool) -> None:
        async with self._limit:
            try:
                result = await asyncio.wait_for(tier.backend.health(), self.config.timeout_s)
            except TimeoutError:
                result = {"ok": False, "error": f"no answer within {self.config.timeout_s:g} s"}
            except Exception as exc:  # a check must answer, whatever the backend does
                result = {"ok": False, "error": repr(exc)}
        tier.last = result
        tier.checked_at = time.time()
        if not feed_breaker:
            return
        breaker = tier.breaker
        if result.get("ok"):
            if breaker.state is BreakerState.HALF_OPEN:
                breaker.success()
        elif breaker.state is not BreakerState.OPEN:
            if breaker.state is BreakerState.CLOSED:
                log.warning("tier %s failed its health check; its breaker opens", tier.name)
            breaker.open()
