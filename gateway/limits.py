"""Per-key rate limits (requests and tokens per UTC minute) and energy budgets (joules per UTC
day), shared by every replica through the ledger database's `key_usage` table.

Each process counts what it admits (a request when it is let in; its tokens and joules when its
ledger row is ready, the energy final) in memory, and every `[limits] sync_interval_s` adds
those counts to the key's rows for the current windows (an upsert: `count = count + delta`)
and reads back the fleet's totals, in one transaction. A request is judged against the fleet's
totals at the last sync plus what this process admitted since, so the request path never waits
for the database. The counts survive a restart (they are in the database); a crash loses at
most one interval's counts of the process that crashed.

Tolerance: a replica does not see what another admitted since that one's last sync before its
own (up to two intervals), so a fleet of R replicas can admit up to (R - 1) x (what one replica
admits in 2 x sync_interval_s) beyond a limit, plus the requests in flight whose tokens and
energy are not known yet (tokens and joules are counted when a request ends). With no ledger
database the counts are this process's alone and start from zero on restart.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, and_, delete, insert, or_, select, update
from sqlalchemy.exc import SQLAlchemyError

from greenroute.gateway.accounting import RequestRecord
from greenroute.gateway.errors import APIError
from greenroute.gateway.keys import Key
from greenroute.gateway.ledger import store
from greenroute.gateway.ledger.schema import KeyUsageRow

log = logging.getLogger("greenroute.limits")

MINUTE, DAY = "minute", "day"
SECONDS = {MINUTE: 60, DAY: 86_400}
KEEP_MINUTES_S = 3600  # minute rows older than this are deleted (day rows are kept: history)
_TABLE = KeyUsageRow.__table__  # type: ignore[attr-defined]

# OpenAI's rate-limit headers, and GreenRoute's energy budget's.
LIMIT_REQUESTS = "x-ratelimit-limit-requests"
REMAINING_REQUESTS = "x-ratelimit-remaining-requests"
RESET_REQUESTS = "x-ratelimit-reset-requests"
LIMIT_TOKENS = "x-ratelimit-limit-tokens"
REMAINING_TOKENS = "x-ratelimit-remaining-tokens"
RESET_TOKENS = "x-ratelimit-reset-tokens"
ENERGY_BUDGET_REMAINING = "x-greenroute-energy-budget-remaining"  # joules left today (UTC)
RETRY_AFTER = "retry-after"

Window = tuple[str, str, int]  # (key id, MINUTE or DAY, the window's start in Unix seconds)


@dataclass
class Counts:
    requests: int = 0
    tokens: int = 0
    joules: float = 0.0

    def add(self, other: Counts) -> None:
        self.requests += other.requests
        self.tokens += other.tokens
        self.joules += other.joules


class Limits:
    """The counters of every limited key, and the thread that syncs them with the database."""

    def __init__(self, engine: Engine | None, sync_interval_s: float,
                 on_sync: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.sync_interval_s = sync_interval_s
        self.on_sync = on_sync  # also run each interval (KeyStore.refresh)
        self.clock = clock
        self.sync_failures = 0
        self._lock = threading.Lock()
        self._fleet: dict[Window, Counts] = {}  # every replica's, read at the last sync
        self._inflight: dict[Window, Counts] = {}  # being added to the database right now
        self._pending: dict[Window, Counts] = {}  # admitted here since then
        self._limited: set[str] = set()  # key ids whose use is counted
        self._migrated = False
        self._pruned = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="limits-sync", daemon=True)

    # -- the request side ---------------------------------------------------------------------

    def admit(self, key: Key, headers: dict[str, str]) -> None:
        """Let one request of `key` in, or raise a 429; puts the limits' headers in `headers`
        either way."""
        if not key.limited:
            return
        now = self.clock()
        minute, day = _start(now, MINUTE), _start(now, DAY)
        with self._lock:
            self._limited.add(key.id)
            used_minute = self._used((key.id, MINUTE, minute))
            used_day = self._used((key.id, DAY, day))
            refusal = self._judge(key, used_minute, used_day, now, headers)
            if refusal is None:
                for window in ((key.id, MINUTE, minute), (key.id, DAY, day)):
                    self._pending.setdefault(window, Counts()).requests += 1
        if refusal is not None:
            raise refusal

    def observe(self, record: RequestRecord) -> None:
        """A request has ended and its energy is final: count its tokens and joules (an
        Accounting observer)."""
        if record.key_id is None or record.key_id not in self._limited:
            return
        answer = next((a for a in record.attempts if a.answered), None)
        tokens = 0
        if answer is not None:
            usage = answer.usage
            tokens = usage.total_tokens if usage is not None else answer.completion_tokens() or 0
        joules = record.joules() or 0.0
        if not tokens and not joules:
            return
        now = self.clock()
        with self._lock:
            for period in (MINUTE, DAY):
                counts = self._pending.setdefault((record.key_id, period, _start(now, period)),
                                                  Counts())
                counts.tokens += tokens
                counts.joules += joules

    def used(self, key_id: str, period: str) -> Counts:
        """The fleet's use of a key in the current window, as this process sees it now."""
        with self._lock:
            return self._used((key_id, period, _start(self.clock(), period)))

    def _used(self, window: Window) -> Counts:
        total = Counts()
        for counts in (self._fleet, self._inflight, self._pending):
            if window in counts:
                total.add(counts[window])
        return total

    def _judge(self, key: Key, minute: Counts, day: Counts, now: float,
               headers: dict[str, str]) -> APIError | None:
        minute_left = _start(now, MINUTE) + SECONDS[MINUTE] - now
        day_left = _start(now, DAY) + SECONDS[DAY] - now
        refusal: APIError | None = None
        if key.rpm is not None:
            headers[LIMIT_REQUESTS] = str(key.rpm)
            headers[REMAINING_REQUESTS] = str(max(0, key.rpm - minute.requests - 1))
            headers[RESET_REQUESTS] = _duration(minute_left)
            if minute.requests >= key.rpm:
                headers[REMAINING_REQUESTS] = "0"
                refusal = _rate_limited(key, "requests", "requests per min (RPM)", key.rpm,
                                        minute.requests, minute_left)
        if key.tpm is not None:
            headers[LIMIT_TOKENS] = str(key.tpm)
            headers[REMAINING_TOKENS] = str(max(0, key.tpm - minute.tokens))
            headers[RESET_TOKENS] = _duration(minute_left)
            if refusal is None and minute.tokens >= key.tpm:
                refusal = _rate_limited(key, "tokens", "tokens per min (TPM)", key.tpm,
                                        minute.tokens, minute_left)
        if key.joules_per_day is not None:
            left = max(0.0, key.joules_per_day - day.joules)
            headers[ENERGY_BUDGET_REMAINING] = f"{left:.3f}"
            if refusal is None and left <= 0:
                refusal = APIError(
                    429, f"Energy budget reached for key {key.id!r}: limit "
                         f"{key.joules_per_day:g} J per day (UTC), used {day.joules:.3f} J. It "
                         f"resets in {_duration(day_left)}.",
                    type="energy", code="energy_budget_exceeded")
                headers[RETRY_AFTER] = str(math.ceil(day_left))
        if refusal is not None and RETRY_AFTER not in headers:
            headers[RETRY_AFTER] = str(math.ceil(minute_left))
        return refusal

    # -- syncing with the database ------------------------------------------------------------

    def start(self) -> None:
        """Read the fleet's counts once (blocking), then sync in the background."""
        self.sync()
        self._thread.start()

    def stop(self) -> None:
        """Stop syncing, after one last sync of what this process counted."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.sync()

    def _run(self) -> None:
        while not self._stop.wait(self.sync_interval_s):
            try:
                self.sync()
            except Exception:  # the thread must outlive any one failure
                log.exception("limits: sync failed")

    def sync(self) -> None:
        """Add this process's counts to the database and read every replica's back."""
        if self.on_sync is not None:
            self.on_sync()
        now = self.clock()
        if self.engine is None:  # counts are this process's alone: drop past windows
            with self._lock:
                self._pending = {w: c for w, c in self._pending.items()
                                 if w[2] >= _start(now, w[1])}
            return
        with self._lock:
            for window, counts in self._pending.items():
                self._inflight.setdefault(window, Counts()).add(counts)
            self._pending = {}
            batch = {window: Counts(c.requests, c.tokens, c.joules)
                     for window, c in self._inflight.items()}
        try:
            fleet = self._exchange(batch, now)
        except (SQLAlchemyError, store.LedgerError) as exc:
            self.sync_failures += 1
            if self.sync_failures == 1 or self.sync_failures % 60 == 0:
                log.error("limits: cannot sync with the ledger database (%s); judging by "
                          "the last counts read and this process's since",
                          f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            return  # the batch stays in flight and goes with the next sync
        with self._lock:
            self._fleet = fleet
            self._inflight = {}

    def _exchange(self, batch: dict[Window, Counts], now: float) -> dict[Window, Counts]:
        assert self.engine is not None
        if not self._migrated:
            store.migrate(self.engine)
            self._migrated = True
        c = _TABLE.c
        with self.engine.begin() as connection:
            for window, counts in sorted(batch.items()):  # one order: no deadlock on Postgres
                _add(connection, window, counts)
            current = or_(and_(c.period == MINUTE, c.window == _start(now, MINUTE)),
                          and_(c.period == DAY, c.window == _start(now, DAY)))
            rows = connection.execute(select(c.key_id, c.period, c.window, c.requests,
                                             c.tokens, c.joules).where(current)).all()
            if now - self._pruned > SECONDS[MINUTE]:
                connection.execute(delete(_TABLE).where(
                    c.period == MINUTE, c.window < now - KEEP_MINUTES_S))
                self._pruned = now
        return {(r.key_id, r.period, r.window): Counts(r.requests, r.tokens, r.joules)
                for r in rows}


def _add(connection: Connection, window: Window, counts: Counts) -> None:
    """key_usage[window] += counts, creating the row if it is the window's first."""
    key_id, period, start = window
    values = {"key_id": key_id, "period": period, "window": start,
              "requests": counts.requests, "tokens": counts.tokens, "joules": counts.joules}
    c = _TABLE.c
    keys = [c.key_id, c.period, c.window]
    sums = ("requests", "tokens", "joules")
    if connection.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        lite = sqlite_insert(_TABLE).values(values)
        connection.execute(lite.on_conflict_do_update(
            index_elements=keys, set_={n: c[n] + lite.excluded[n] for n in sums}))
        return
    if connection.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        pg = pg_insert(_TABLE).values(values)
        connection.execute(pg.on_conflict_do_update(
            index_elements=keys, set_={n: c[n] + pg.excluded[n] for n in sums}))
        return
    changed = connection.execute(update(_TABLE).where(
        c.key_id == key_id, c.period == period, c.window == start).values(
        requests=c.requests + counts.requests, tokens=c.tokens + counts.tokens,
        joules=c.joules + counts.joules))
    if changed.rowcount == 0:
        connection.execute(insert(_TABLE).values(values))


def _start(now: float, period: str) -> int:
    """The start of the UTC minute or day that `now` falls in."""
    size = SECONDS[period]
    return int(now // size * size)


def _rate_limited(key: Key, kind: str, what: str, limit: int, used: int,
                  reset_s: float) -> APIError:
    """OpenAI's 429 for a rate limit: type "requests" or "tokens", code rate_limit_exceeded."""
    return APIError(429, f"Rate limit reached for {what} on key {key.id!r}: Limit {limit}, "
                         f"Used {used}, Requested 1. Please try again in {_duration(reset_s)}.",
                    type=kind, code="rate_limit_exceeded")


def _duration(seconds: float) -> str:
    """OpenAI's reset format: "17.5s", "6m0s", "3h2m5s"."""
    if seconds < 60:
        return f"{max(0.0, round(seconds, 1)):g}s"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{hours}h" if hours else "") + f"{minutes}m{secs}s"
