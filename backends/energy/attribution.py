"""Attribution: each metered interval's joules, split across the requests in flight on a device.

A `Device` owns one meter (one device group: some GPUs, a CPU package, this process). Its
counter is read by a sampler every ~100 ms and, when the meter is cheap to read, also at every
request's start and end, so that request boundaries fall on interval boundaries. Each reading
closes an interval [t0, t1] with the energy E the counter gained.

A `Track` is one request's use of one device. It is *active* from `begin()` to `end()` (a
request waiting in a queue is not), and it reports progress with `tokens(n, at)`: n tokens
processed uniformly over (its previous report, at]. An embedded model reports its prefill when
the first token is sampled and then each generated token; a remote model's tokens are reported
at the end of the request, its prompt over the wait for the first output and its completion
over the rest (or everything over the whole lifetime when nothing was streamed).

An interval is split once it is *settled*: every track active in it has reported its tokens up
to t1, or ended. Then:

    covered  = the time within [t0, t1] when at least one track was active
    idle     = E x (1 - covered / (t1 - t0))        energy with no request in flight
    share(r) = (E - idle) x w(r) / sum(w)            w = tokens r processed within [t0, t1]

and when no active track processed a token in the interval (a queue, a network wait), w is the
time each was active in it. So the shares plus idle are E, the counter's delta, to rounding, and
a request gets energy only from intervals that overlap its active time. Intervals settle in
order; a request's joules are final once it has ended and every interval up to its end is
settled. Tracks' progress calls come from any thread (the event loop, a model's worker thread);
one lock per device guards everything, and all the work under it is a few dict updates.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from greenroute.backends.energy.meter import Meter, MeterError

log = logging.getLogger("greenroute.energy")

Clock = Callable[[], float]


@dataclass(eq=False, slots=True)
class Track:
    """One request's use of one device: its active span, token progress and joules."""

    device: Device
    label: str = ""
    on_final: Callable[[Track], None] | None = None
    begun: float | None = None
    ended: float | None = None
    mark: float = 0.0  # tokens are reported up to here
    joules: float = 0.0  # from settled intervals; the whole once `final`
    final: bool = False

    def begin(self) -> None:
        """The device starts working on this request (not while it waits in a queue)."""
        self.device._begin(self)

    def tokens(self, n: float, at: float | None = None) -> None:
        """n tokens were processed since the previous report, up to `at` (default: now)."""
        self.device._tokens(self, n, at)

    def end(self, at: float | None = None) -> None:
        """The device is done with this request; later calls do nothing."""
        self.device._end(self, at)

    def abandon(self) -> None:
        """End it only if its device never started on it (for backends that begin and end
        their tracks themselves: the gateway's clean-up must not cut a running one short)."""
        self.device._end(self, None, only_unbegun=True)

    def joules_now(self) -> float:
        """Final joules, or the best figure while other requests' progress is still pending."""
        return self.device._joules_now(self)


@dataclass(slots=True)
class Interval:
    t0: float
    t1: float
    joules: float
    counter1: float  # the meter's reading at t1
    weights: dict[Track, float] = field(default_factory=dict)  # tokens within [t0, t1]


@dataclass(slots=True)
class PeriodEnergy:
    """A device's settled energy over a stretch of time: what the ledger's idle table holds."""

    device: str
    source: str
    started: float  # wall-clock seconds
    ended: float
    counter_start_j: float
    counter_end_j: float
    measured_j: float
    attributed_j: float
    idle_j: float
    intervals: int


class Device:
    """One meter's counter, its open interval, the intervals awaiting settlement, and the
    active tracks."""

    def __init__(self, meter: Meter, *, period_s: float = 60.0,
                 on_period: Callable[[PeriodEnergy], None] | None = None,
                 clock: Clock = time.monotonic, wall: Clock = time.time) -> None:
        self.meter = meter
        self.name = meter.device
        self.source = meter.source
        self.period_s = period_s
        self.on_period = on_period
        self._clock = clock
        self._wall_offset = wall() - clock()
        self._lock = threading.Lock()
        t, reading = clock(), meter.read_joules()
        self._open_t0, self._open_counter = t, reading
        self._open_weights: dict[Track, float] = {}
        self._pending: deque[Interval] = deque()
        self._active: list[Track] = []  # begun, not yet final
        self._settled_until = t
        self._period: PeriodEnergy = self._new_period(t, reading)
        self.measured_j = self.attributed_j = self.idle_j = 0.0
        self.read_errors = 0

    # -- requests -----------------------------------------------------------------------------

    def track(self, label: str = "", on_final: Callable[[Track], None] | None = None) -> Track:
        return Track(self, label, on_final)

    def _begin(self, track: Track) -> None:
        with self._lock:
            if track.begun is not None or track.ended is not None:
                return
            t = self._clock()
            if self.meter.cheap:
                self._read_and_close(t)
            track.begun = track.mark = t
            self._active.append(track)

    def _tokens(self, track: Track, n: float, at: float | None) -> None:
        with self._lock:
            if track.begun is None or track.ended is not None or n <= 0:
                return
            now = self._clock()
            at = now if at is None else min(max(at, track.mark), now)
            self._spread(track, n, track.mark, at)
            track.mark = at

    def _end(self, track: Track, at: float | None, only_unbegun: bool = False) -> None:
        with self._lock:
            if track.ended is not None or (only_unbegun and track.begun is not None):
                return
            now = self._clock()
            if track.begun is None:  # never started (refused, cancelled in the queue): 0 J
                track.begun = track.mark = track.ended = now
                track.final = True
                finals = [track]
            else:
                track.ended = min(max(at if at is not None else now, track.mark), now)
                track.mark = track.ended
                if self.meter.cheap:
                    self._read_and_close(now)
                finals = self._settle()
        self._notify(finals)

    def _joules_now(self, track: Track) -> float:
        with self._lock:
            if track.final:
                return track.joules
            provisional = track.joules
            for interval in self._pending:
                shares, _ = self._split(interval)
                provisional += shares.get(track, 0.0)
            return provisional

    # -- the counter --------------------------------------------------------------------------

    def sample(self) -> None:
        """Read the meter and close the open interval (the sampler calls this every tick)."""
        finals: list[Track] = []
        try:
            if self.meter.cheap:
                with self._lock:
                    self._close(self._clock(), self.meter.read_joules())
                    finals = self._settle()
            else:  # slow (HTTP): read outside the lock; nothing else reads this meter
                t = self._clock()
                reading = self.meter.read_joules()
                with self._lock:
                    self._close(t, reading)
                    finals = self._settle()
        except MeterError as exc:
            self._read_failed(exc)
        self._notify(finals)

    def close(self) -> None:
        """Final reading; end what is still active and settle everything (shutdown)."""
        try:
            reading = self.meter.read_joules()
        except MeterError as exc:
            self._read_failed(exc)
            reading = None
        with self._lock:
            now = self._clock()
            if reading is not None:
                self._close(now, reading)
            for track in self._active:
                if track.ended is None:
                    track.ended = track.mark = now
            finals = self._settle(force=True)
            self._emit_period()
        self._notify(finals)

    def _read_and_close(self, t: float) -> None:
        try:
            self._close(t, self.meter.read_joules())
        except MeterError as exc:  # the sampler will close it later
            self.read_errors += 1
            log.debug("meter %s: %s", self.name, exc)

    def _read_failed(self, exc: MeterError) -> None:
        self.read_errors += 1
        if self.read_errors == 1 or self.read_errors % 600 == 0:
            log.warning("energy meter %s (%s) could not be read (%d times): %s", self.name,
                        self.source, self.read_errors, exc)

    def _close(self, t: float, reading: float) -> None:
        t = max(t, self._open_t0)
        joules = reading - self._open_counter
        if joules < 0:
            log.error("energy meter %s went backwards by %.3f J; counting 0", self.name, -joules)
            joules = 0.0
        self._pending.append(Interval(self._open_t0, t, joules, reading, self._open_weights))
        self._open_t0, self._open_counter, self._open_weights = t, reading, {}

    # -- splitting ----------------------------------------------------------------------------

    def _spread(self, track: Track, n: float, a: float, b: float) -> None:
        """Add n tokens, processed uniformly over (a, b], to the intervals that cover it."""
        if b <= a:
            target = self._open_weights if b >= self._open_t0 else next(
                (i.weights for i in reversed(self._pending) if i.t0 <= b), None)
            if target is not None:
                target[track] = target.get(track, 0.0) + n
            return
        length = b - a
        if b > self._open_t0:
            part = n * (b - max(a, self._open_t0)) / length
            self._open_weights[track] = self._open_weights.get(track, 0.0) + part
        for interval in reversed(self._pending):
            if interval.t1 <= a:
                break
            overlap = min(b, interval.t1) - max(a, interval.t0)
            if overlap > 0:
                interval.weights[track] = interval.weights.get(track, 0.0) + n * overlap / length

    def _split(self, interval: Interval) -> tuple[dict[Track, float], float]:
        """(joules per track, idle joules) of one interval, from what is known now."""
        t0, t1, energy = interval.t0, interval.t1, interval.joules
        spans: dict[Track, tuple[float, float]] = {}
        for track in self._active:
            assert track.begun is not None
            start = max(track.begun, t0)
            stop = min(track.ended if track.ended is not None else math.inf, t1)
            if stop > start or (t1 == t0 and track.begun <= t0 and stop >= start):
                spans[track] = (start, stop)
        if not spans or energy == 0.0:
            return {}, energy
        length = t1 - t0
        covered = _union_length(spans.values())
        idle = energy * (1.0 - covered / length) if length > 0 else 0.0
        weights = {t: w for t, w in interval.weights.items() if t in spans and w > 0}
        if not weights:  # nobody processed a token here: by time active instead
            weights = {t: (b - a) if length > 0 else 1.0 for t, (a, b) in spans.items()}
        total = sum(weights.values())
        if total <= 0:
            return {}, energy
        attributable = energy - idle
        return {t: attributable * w / total for t, w in weights.items()}, idle

    def _settled(self, interval: Interval) -> bool:
        return all(track.ended is not None or track.mark >= interval.t1
                   or (track.begun is not None and track.begun >= interval.t1)
                   for track in self._active)

    def _settle(self, force: bool = False) -> list[Track]:
        """Split the settled intervals, oldest first; return the tracks that became final."""
        while self._pending and (force or self._settled(self._pending[0])):
            interval = self._pending.popleft()
            shares, idle = self._split(interval)
            for track, joules in shares.items():
                track.joules += joules
            attributed = interval.joules - idle if shares else 0.0
            idle = interval.joules - attributed
            self.measured_j += interval.joules
            self.attributed_j += attributed
            self.idle_j += idle
            period = self._period
            period.ended = interval.t1 + self._wall_offset
            period.counter_end_j = interval.counter1
            period.measured_j += interval.joules
            period.attributed_j += attributed
            period.idle_j += idle
            period.intervals += 1
            self._settled_until = interval.t1
            if interval.t1 + self._wall_offset - period.started >= self.period_s:
                self._emit_period()
        finals = [t for t in self._active
                  if t.ended is not None and t.ended <= self._settled_until]
        if finals:
            self._active = [t for t in self._active if t not in finals]
            for track in finals:
                track.final = True
        return finals

    # -- periods ------------------------------------------------------------------------------

    def _new_period(self, t: float, counter: float) -> PeriodEnergy:
        wall = t + self._wall_offset
        return PeriodEnergy(self.name, self.source, wall, wall, counter, counter, 0.0, 0.0, 0.0, 0)

    def _emit_period(self) -> None:
        period = self._period
        if period.intervals == 0:
            return
        self._period = self._new_period(period.ended - self._wall_offset, period.counter_end_j)
        if self.on_period is not None:
            self.on_period(period)

    def _notify(self, finals: list[Track]) -> None:
        for track in finals:
            if track.on_final is not None:
                try:
                    track.on_final(track)
                except Exception:
                    log.exception("energy callback failed for %s", track.label)


def _union_length(spans: object) -> float:
    total = 0.0
    end = -math.inf
    for a, b in sorted(spans):  # type: ignore[call-overload]
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total
