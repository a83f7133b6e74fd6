"""Attribution: each metered interval's joules, split across the requests in flight on a device.

A `Device` owns one meter (one device group: some GPUs, a CPU package, this process). Its
counter is read by a sampler every ~100 ms and, when the meter is cheap to read, also at every
request's start and end, so that request boundaries fall on interval boundaries. Each reading
closes an interval [t0, t1] with the energy E the counter gained (a slow meter's interval is
cut at t1 before the scrape, so tokens reported during it count in the next one).

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
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from greenroute.backends.energy.costs import TokenCosts
from greenroute.backends.energy.meter import Meter, MeterError
from greenroute.backends.energy.server_tokens import ServerCount, ServerTokens

log = logging.getLogger("greenroute.energy")
_Key = TypeVar("_Key")  # what a weight table is keyed by: a track, or a tier

Clock = Callable[[], float]
CARRY_DECAY = 0.9  # per interval: a carried token is forgotten within a couple of seconds
# update_s = None (auto): until the counter has stepped twice, its period is unknown, so the
# intervals since its last step wait up to twice this for the next one
AUTO_WAIT_S = 120.0
# Reading at steps (`read_at_steps`): while a cheap slow counter's next step is due, read it
# this often, from this long before the earliest time it can come to this long after the
# latest (an H200's NVML counter stepped every 100 ms, p10-p90 97.8-102.0 ms: docs/energy.md).
STEP_READ_S = 0.005
STEP_MARGIN_S = 0.003
STEP_SPANS = 9  # the counter's period: the median of this many times between steps


@dataclass(eq=False, slots=True)
class Track:
    """One request's use of one device: its active span, token progress and joules."""

    device: Device
    label: str = ""
    on_final: Callable[[Track], None] | None = None
    tier: str = ""  # whose token costs weigh its tokens (costs.py)
    begun: float | None = None
    ended: float | None = None
    mark: float = 0.0  # tokens are reported up to here
    joules: float = 0.0  # from settled intervals; the whole once `final`
    final: bool = False

    def begin(self) -> None:
        """The device starts working on this request (not while it waits in a queue)."""
        self.device._begin(self)

    def tokens(self, n: float, at: float | None = None, prompt: float = 0.0) -> None:
        """n generated and `prompt` prompt tokens were processed since the previous report, up
        to `at` (default: now)."""
        self.device._tokens(self, prompt, n, at)

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
    # [prompt, generated, prefills] each track processed within [t0, t1]: tokens, and the
    # share of its prefill passes (a pass has a fixed cost besides its tokens, costs.py)
    weights: dict[Track, list[float]] = field(default_factory=dict)
    # with server counters: tier -> (prompt, generated) tokens its server processed, for all
    # its clients, and the most requests it had running at either end
    server: dict[str, tuple[float, float]] | None = None
    running: float = 0.0
    priced: bool = True  # a slow counter has stepped past t1, so `joules` is known


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
    other_j: float = 0.0  # used by the server's other clients (other gateway processes)


class Device:
    """One meter's counter, its open interval, the intervals awaiting settlement, and the
    active tracks.

    `servers` (tier -> its model server's token counters) makes the server the denominator:
    this process takes E x (its tokens / the servers' tokens) and the rest is `other`.
    `costs` weighs each tier's prompt and generated tokens. `update_s` > 0 marks a slow counter
    (one that steps about every `update_s`): a step is spread over the time since the previous
    one, and intervals settle only once the counter has stepped past them. `update_s` None
    handles every counter so and learns its period (the longest time between two steps seen):
    a fresh counter steps at every reading, so it is priced as it goes; its first step is only
    the baseline, since what time it covers before this process read it is unknown.
    `read_at_steps`, on a cheap slow counter: the sampler asks `next_read_in` when to read, and
    is told to read densely while the next step is due, so each step's time is known to a few
    milliseconds instead of to one sampler interval."""

    def __init__(self, meter: Meter, *, period_s: float = 60.0,
                 on_period: Callable[[PeriodEnergy], None] | None = None,
                 clock: Clock = time.monotonic, wall: Clock = time.time,
                 servers: Mapping[str, ServerTokens] | None = None,
                 costs: TokenCosts | None = None, update_s: float | None = 0.0,
                 read_at_steps: bool = False) -> None:
        self.meter = meter
        self.servers = dict(servers or {})
        self.costs = costs or TokenCosts()
        self.auto = update_s is None  # learn the counter's period (0 until it has stepped twice)
        self.update_s = update_s or 0.0
        # request boundaries can be interval boundaries only where nothing else must be read
        self._cheap = meter.cheap and not self.servers
        self.name = meter.device
        self.source = meter.source
        self.period_s = period_s
        self.on_period = on_period
        self._clock = clock
        self._wall_offset = wall() - clock()
        self._lock = threading.Lock()
        t, reading = clock(), meter.read_joules()
        self._open_server = self._read_servers()
        self._open_t0, self._open_counter = t, reading
        self._open_weights: dict[Track, list[float]] = {}
        # a slow counter: when and at what it last stepped, and the intervals since then
        self._change_t, self._change_counter = t, reading
        self._unpriced: list[Interval] = []
        self._stepped = False
        # reading at steps: the readings either side of the counter's last step, and the
        # times between its recent steps (off for good if it steps faster than it should)
        self.read_at_steps = read_at_steps and self._cheap and (self.auto or self.update_s > 0)
        self._last_step: tuple[float, float] | None = None
        self._step_spans: deque[float] = deque(maxlen=STEP_SPANS)
        # decayed least-squares sums for step = idle W x time + busy W x covered time
        self._power_fit = [0.0] * 5  # tt, tc, cc, te, ce
        # with server counters: this process's tokens that an interval's server count could
        # not hold yet (reported a little before the server counted them), carried forward
        self._carry = 0.0
        self._pending: deque[Interval] = deque()
        self._active: list[Track] = []  # begun, not yet final
        self._settled_until = t
        self._period: PeriodEnergy = self._new_period(t, reading)
        self.measured_j = self.attributed_j = self.idle_j = self.other_j = 0.0
        self.read_errors = 0

    # -- requests -----------------------------------------------------------------------------

    def track(self, label: str = "", on_final: Callable[[Track], None] | None = None,
              tier: str = "") -> Track:
        return Track(self, label, on_final, tier)

    def _begin(self, track: Track) -> None:
        with self._lock:
            if track.begun is not None or track.ended is not None:
                return
            t = self._clock()
            if self._cheap:
                self._read_and_close(t)
            track.begun = track.mark = t
            self._active.append(track)

    def _tokens(self, track: Track, prompt: float, generated: float, at: float | None) -> None:
        with self._lock:
            if track.begun is None or track.ended is not None or prompt < 0 or generated < 0 \
                    or prompt + generated <= 0:
                return
            now = self._clock()
            at = now if at is None else min(max(at, track.mark), now)
            # a report with prompt tokens is the prefill pass that computed them
            self._spread(track, (prompt, generated, 1.0 if prompt > 0 else 0.0), track.mark, at)
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
                if self._cheap:
                    self._read_and_close(now)
                finals = self._settle()
        self._notify(finals)

    def _joules_now(self, track: Track) -> float:
        with self._lock:
            if track.final:
                return track.joules
            provisional = track.joules
            for interval in self._pending:
                shares, _, _ = self._split(interval)
                provisional += shares.get(track, 0.0)
            return provisional

    # -- the counter --------------------------------------------------------------------------

    def sample(self) -> None:
        """Read the meter and close the open interval (the sampler calls this every tick)."""
        finals: list[Track] = []
        try:
            if self._cheap:
                with self._lock:
                    self._close(self._clock(), self.meter.read_joules())
                    finals = self._settle()
            else:  # slow (HTTP): read outside the lock; nothing else reads this meter
                self._sample_slowly()
                with self._lock:
                    finals = self._settle()
        except MeterError as exc:
            self._read_failed(exc)
        self._notify(finals)

    def _sample_slowly(self) -> None:
        """Cut the open interval now, then read the servers and the meter for it.

        The cut comes first, under the lock: tokens reported during the scrapes (tens of
        milliseconds on a busy host) belong to the next interval, not to the one the readings
        close. Reading first and closing after let them land in the closed interval, where
        the tracks that reported them, begun after its end, have no share: their energy went
        to the other clients. On a failed read the cut is undone."""
        with self._lock:
            interval = self._cut(self._clock())
        try:
            server = self._read_servers()
            reading = self.meter.read_joules()
        except MeterError:
            with self._lock:
                self._uncut(interval)
            raise
        with self._lock:
            self._fill(interval, reading, server)

    def close(self) -> None:
        """Final reading; end what is still active and settle everything (shutdown)."""
        try:
            reading: float | None = self.meter.read_joules()
            server = self._read_servers()
        except MeterError as exc:
            self._read_failed(exc)
            reading = None
        with self._lock:
            now = self._clock()
            if reading is not None:
                self._close(now, reading, server)
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

    def _power_shape(self, step: float) -> list[float]:
        """How a slow counter's step is spread over the intervals it covers: by an estimate of
        their power, `idle W + extra W while a request is active`, fitted to the steps so far
        (the first ones, or a fit that makes no sense: constant power)."""
        covered = []
        for waiting in self._unpriced:
            spans = [(max(t.begun, waiting.t0), min(t.ended if t.ended is not None
                                                    else math.inf, waiting.t1))
                     for t in self._active if t.begun is not None]
            covered.append(_union_length([(a, b) for a, b in spans if b > a]))
        durations = [w.t1 - w.t0 for w in self._unpriced]
        length, busy = sum(durations), sum(covered)
        fit = self._power_fit
        for i in range(5):
            fit[i] *= 0.9  # recent steps count most
        for i, value in enumerate((length * length, length * busy, busy * busy,
                                   length * step, busy * step)):
            fit[i] += value
        tt, tc, cc, te, ce = fit
        det = tt * cc - tc * tc
        if det > 1e-9 * max(tt * cc, 1e-12):
            idle_w, extra_w = (te * cc - tc * ce) / det, (tt * ce - tc * te) / det
            if idle_w >= 0 and extra_w >= 0:
                return [idle_w * d + extra_w * c for d, c in zip(durations, covered,
                                                                 strict=True)]
        return durations

    def _read_servers(self) -> dict[str, ServerCount] | None:
        return {tier: s.read() for tier, s in self.servers.items()} if self.servers else None

    def _close(self, t: float, reading: float,
               server: dict[str, ServerCount] | None = None) -> None:
        self._fill(self._cut(t), reading, server)

    def _cut(self, t: float) -> Interval:
        """End the open interval's tokens at t; its energy follows from `_fill`."""
        interval = Interval(self._open_t0, max(t, self._open_t0), 0.0, self._open_counter,
                            self._open_weights, priced=False)
        self._pending.append(interval)
        self._open_t0, self._open_weights = interval.t1, {}
        return interval

    def _uncut(self, interval: Interval) -> None:
        """A cut whose readings failed: its tokens rejoin the open interval."""
        self._pending.remove(interval)
        for track, counts in self._open_weights.items():
            _add(interval.weights, track, counts, 1.0)
        self._open_t0, self._open_weights = interval.t0, interval.weights

    def _fill(self, interval: Interval, reading: float,
              server: dict[str, ServerCount] | None) -> None:
        """The meter's reading (and the servers' counts) that close a cut interval."""
        joules = reading - self._open_counter
        if joules < 0:
            log.error("energy meter %s went backwards by %.3f J; counting 0", self.name, -joules)
            joules = 0.0
            self._change_counter = reading
        interval.joules, interval.counter1, interval.priced = joules, reading, True
        if server is not None and self._open_server is not None:
            interval.server = {
                tier: (max(now.prompt - server_before.prompt, 0.0),
                       max(now.generated - server_before.generated, 0.0))
                for tier, now in server.items()
                if (server_before := self._open_server.get(tier)) is not None}
            interval.running = max(sum(c.running for c in server.values()),
                                   sum(c.running for c in self._open_server.values()))
        if server is not None:
            self._open_server = server
        if self.update_s > 0 or self.auto:
            self._price(interval, reading)
        self._open_counter = reading

    def _price(self, interval: Interval, reading: float) -> None:
        """A slow counter: spread each step over the time since the previous step (power taken
        as constant in between), and hold the intervals until the counter steps past them."""
        interval.priced, interval.joules, interval.counter1 = False, 0.0, self._change_counter
        self._unpriced.append(interval)
        step = reading - self._change_counter
        if step > 0:
            self._stepped_between(interval.t0, interval.t1)
            span = interval.t1 - self._change_t
            if not self._stepped:
                # The first step also holds energy from before this process started reading:
                # it is taken to cover at least one update period, and the part before the
                # first reading is left out (the counter's start moves up by it). With the
                # period unknown (auto), all of it is: the first step is the baseline.
                full = max(span, self.update_s)
                before = step if self.auto else (
                    step * (1.0 - span / full) if full > 0 else 0.0)
                step -= before
                self._change_counter += before
                self._period.counter_start_j += before
                self._stepped = True
            elif self.auto:
                self.update_s = max(self.update_s, span)
            base = self._change_counter
            shape = self._power_shape(step) if step > 0 else [0.0] * len(self._unpriced)
            total = sum(shape)
            for waiting, weight in zip(self._unpriced, shape, strict=True):
                part = step * weight / total if total > 0 else (
                    step if waiting is interval else 0.0)
                base += part
                waiting.joules, waiting.counter1, waiting.priced = part, base, True
            interval.counter1 = reading
        elif interval.t1 - self._change_t <= 2 * (
                AUTO_WAIT_S if self.auto and self.update_s == 0 else self.update_s):
            return  # no step yet: the counter may simply not have updated
        # else: no step for two update periods: the device used no energy, or the counter is
        # stuck; either way nothing more is known about these intervals
        for waiting in self._unpriced:
            waiting.priced = True
        self._unpriced.clear()
        self._change_t, self._change_counter = interval.t1, reading

    def next_read_in(self, interval_s: float) -> float:
        """Seconds until the sampler's next reading: `interval_s`, or with `read_at_steps`,
        once the counter's period is known, a reading every `STEP_READ_S` from just before the
        earliest time its next step can come (its last step's earlier bracketing reading plus
        one period) to just after the latest: the step is then seen within a few milliseconds
        of when it happened, where one reading per interval placed it up to an interval late
        (that lag was most of a sub-second request's error on an NVML counter)."""
        with self._lock:
            if not self.read_at_steps or self._last_step is None or len(self._step_spans) < 3:
                return interval_s
            period = statistics.median(self._step_spans)
            before, after = self._last_step
            start, end = before + period - STEP_MARGIN_S, after + period + STEP_MARGIN_S
            now = self._clock()
            if now < start:
                return min(interval_s, start - now)
            if now < end:
                return min(interval_s, STEP_READ_S)
            return interval_s  # the step did not come when due: read as usual until it does

    def _stepped_between(self, t0: float, t1: float) -> None:
        """The counter stepped after the reading at t0 and by the one at t1 (reading at steps:
        the period and the phase of the next step)."""
        if self._last_step is not None:
            before, after = self._last_step
            span = t1 - after
            if self._step_spans and span < statistics.median(self._step_spans) / 2:
                if after == t0 and after - before <= 2 * STEP_READ_S:
                    # steps at three readings in a row, the last two closer than half a
                    # period: a counter that moves at every reading, not a slow one
                    self.read_at_steps = False
                # else the previous step was seen late: this span says nothing of the period
            else:
                self._step_spans.append(span)
        self._last_step = (t0, t1)

    # -- splitting ----------------------------------------------------------------------------

    def _spread(self, track: Track, n: Sequence[float], a: float, b: float) -> None:
        """Add (prompt, generated, prefills), processed uniformly over (a, b], to the intervals
        that cover it."""
        if b <= a:
            target = self._open_weights if b >= self._open_t0 else next(
                (i.weights for i in reversed(self._pending) if i.t0 <= b), None)
            if target is not None:
                _add(target, track, n, 1.0)
            return
        length = b - a
        if b > self._open_t0:
            _add(self._open_weights, track, n, (b - max(a, self._open_t0)) / length)
        for interval in reversed(self._pending):
            if interval.t1 <= a:
                break
            overlap = min(b, interval.t1) - max(a, interval.t0)
            if overlap > 0:
                _add(interval.weights, track, n, overlap / length)

    def _weights(self, interval: Interval, among: Mapping[Track, object],
                 prefills: bool = True) -> dict[Track, float]:
        """Each track's tokens in the interval, weighted by what a token of its tier costs
        (and its prefill passes, unless compared with a server's token counts, which have
        none)."""
        weights = {}
        for track, (prompt, generated, passes) in interval.weights.items():
            if track in among and prompt + generated > 0:
                cost = self.costs.cost(track.tier)
                weights[track] = prompt * cost.prompt + generated * cost.generated \
                    + (passes * cost.prefill if prefills else 0.0)
        return weights

    def _split(self, interval: Interval,
               commit: bool = False) -> tuple[dict[Track, float], float, float]:
        """(joules per track, idle joules, other clients' joules) of one interval, from what is
        known now."""
        t0, t1, energy = interval.t0, interval.t1, interval.joules
        spans: dict[Track, tuple[float, float]] = {}
        for track in self._active:
            assert track.begun is not None
            start = max(track.begun, t0)
            stop = min(track.ended if track.ended is not None else math.inf, t1)
            if stop > start or (t1 == t0 and track.begun <= t0 and stop >= start):
                spans[track] = (start, stop)
        length = t1 - t0
        if interval.server is not None:
            return self._split_by_server(interval, spans, length, commit)
        if not spans or energy == 0.0:
            return {}, energy, 0.0
        covered = _union_length(spans.values())
        idle = energy * (1.0 - covered / length) if length > 0 else 0.0
        weights = self._weights(interval, spans)
        if not weights:  # nobody processed a token here: by time active instead
            weights = {t: (b - a) if length > 0 else 1.0 for t, (a, b) in spans.items()}
        total = sum(weights.values())
        if total <= 0:
            return {}, energy, 0.0
        attributable = energy - idle
        return {t: attributable * w / total for t, w in weights.items()}, idle, 0.0

    def _split_by_server(self, interval: Interval, spans: dict[Track, tuple[float, float]],
                         length: float, commit: bool) -> tuple[dict[Track, float], float, float]:
        """The servers counted every client's tokens: this process's share is its tokens over
        theirs (cost-weighted); the rest went to other clients. Idle only when the servers
        processed nothing, had nothing running and no request of ours was active.

        Our tokens are reported from outside the server (spread over each request's time), so
        an interval may hold more of ours than the server counted in it, and the next fewer:
        the excess is carried to the following intervals (decaying by CARRY_DECAY each), where
        it may fill what the server counted beyond ours. `commit`: settling, not a preview."""
        energy = interval.joules
        assert interval.server is not None
        served = 0.0
        for tier, (prompt, generated) in interval.server.items():
            # a server counts tokens, not prefill passes: their fixed cost is not weighed here
            cost = self.costs.cost(tier)
            served += prompt * cost.prompt + generated * cost.generated
        carry = self._carry
        if served > 0:
            weights = self._weights(interval, spans, prefills=False)
            own = sum(weights.values())
            if own >= served:
                mine, carry = energy, carry + own - served
            else:
                used = min(carry, served - own) if own > 0 else 0.0
                mine, carry = energy * (own + used) / served, carry - used
            if commit:
                self._carry = carry * CARRY_DECAY
            if own <= 0:
                return {}, 0.0, energy
            shares = {t: mine * w / own for t, w in weights.items()}
        elif spans:  # ours were active (waiting on the server): by requests running
            times = {t: (b - a) / length if length > 0 else 1.0 for t, (a, b) in spans.items()}
            ours = sum(times.values())
            if ours <= 0:
                return {}, 0.0, energy
            mine = energy * min(1.0, ours / max(interval.running, ours))
            shares = {t: mine * w / ours for t, w in times.items()}
        elif interval.running > 0:
            return {}, 0.0, energy
        else:
            return {}, energy, 0.0
        return shares, 0.0, energy - sum(shares.values())

    def _settled(self, interval: Interval) -> bool:
        return interval.priced and all(track.ended is not None or track.mark >= interval.t1
                   or (track.begun is not None and track.begun >= interval.t1)
                   for track in self._active)

    def _settle(self, force: bool = False) -> list[Track]:
        """Split the settled intervals, oldest first; return the tracks that became final."""
        while self._pending and (force or self._settled(self._pending[0])):
            interval = self._pending.popleft()
            shares, idle, other = self._split(interval, commit=True)
            self._learn(interval, idle + other)
            for track, joules in shares.items():
                track.joules += joules
            attributed = sum(shares.values())
            # what rounding leaves goes to the larger remainder, so the three sum to E exactly
            if other > 0:
                other = interval.joules - attributed - idle
            else:
                idle = interval.joules - attributed
            self.measured_j += interval.joules
            self.attributed_j += attributed
            self.idle_j += idle
            self.other_j += other
            period = self._period
            period.ended = interval.t1 + self._wall_offset
            period.counter_end_j = interval.counter1
            period.measured_j += interval.joules
            period.attributed_j += attributed
            period.idle_j += idle
            period.other_j += other
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

    def _learn(self, interval: Interval, unattributable: float) -> None:
        """A solo interval (one tier processed tokens) is an observation of that tier's costs."""
        if interval.joules <= 0:
            return
        if interval.server is not None:
            busy = {tier: n for tier, n in interval.server.items() if n[0] + n[1] > 0}
            if len(busy) == 1:
                ((tier, (prompt, generated)),) = busy.items()
                self.costs.observe(tier, prompt, generated, interval.joules)
            return
        tiers: dict[str, list[float]] = {}
        for track, counts in interval.weights.items():
            _add(tiers, track.tier, counts, 1.0)
        if len(tiers) == 1:
            ((tier, (prompt, generated, prefills)),) = tiers.items()
            self.costs.observe(tier, prompt, generated, interval.joules - unattributable,
                               prefills)

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


def _add(weights: dict[_Key, list[float]], key: _Key, n: Sequence[float],
         fraction: float) -> None:
    sums = weights.setdefault(key, [0.0, 0.0, 0.0])
    for i, value in enumerate(n):
        sums[i] += value * fraction


def _union_length(spans: object) -> float:
    total = 0.0
    end = -math.inf
    for a, b in sorted(spans):  # type: ignore[call-overload]
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total
