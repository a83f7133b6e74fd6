"""Attribution of a device's measured energy to the requests in flight, on a controlled clock.

The meter here is a counter the test advances by hand (energy arrives in bursts at chosen
times), so every expected share can be computed exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from greenroute.backends.energy.attribution import Device, PeriodEnergy, Track


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@dataclass
class BurstMeter:
    """A counter whose value at time t is the sum of the bursts at or before t."""

    clock: Clock
    cheap: bool = True
    bursts: list[tuple[float, float]] = field(default_factory=list)
    source: str = "estimate"
    device: str = "test"

    def read_joules(self) -> float:
        return sum(j for t, j in self.bursts if t <= self.clock.t)


def device(cheap: bool = True, period_s: float = 1e9) -> tuple[Device, BurstMeter, Clock,
                                                              list[PeriodEnergy]]:
    clock = Clock()
    meter = BurstMeter(clock, cheap)
    periods: list[PeriodEnergy] = []
    return Device(meter, clock=clock, wall=clock, period_s=period_s,
                  on_period=periods.append), meter, clock, periods


def test_a_lone_request_gets_exactly_the_energy_of_its_lifetime() -> None:
    dev, meter, clock, periods = device()
    meter.bursts += [(0.5, 10.0), (1.5, 7.0), (3.5, 5.0)]
    clock.t = 1.0
    track = dev.track("r")
    track.begin()
    clock.t = 2.0
    track.tokens(4)
    clock.t = 3.0
    track.end()
    assert track.final and track.joules == pytest.approx(7.0)
    clock.t = 4.0
    dev.close()
    assert dev.idle_j == pytest.approx(15.0)
    assert dev.measured_j == pytest.approx(22.0)
    assert sum(p.measured_j for p in periods) == pytest.approx(22.0)
    assert sum(p.attributed_j for p in periods) == pytest.approx(7.0)


def test_concurrent_requests_split_by_tokens_in_the_interval() -> None:
    dev, meter, clock, _ = device(cheap=False)
    a, b = dev.track("a"), dev.track("b")
    a.begin()
    b.begin()
    clock.t = 0.05
    a.tokens(1)
    b.tokens(3)
    meter.bursts.append((0.1, 8.0))
    clock.t = 0.1
    dev.sample()
    a.end()
    b.end()
    clock.t = 0.2
    dev.sample()
    assert a.joules == pytest.approx(2.0) and b.joules == pytest.approx(6.0)
    assert a.final and b.final


def test_a_request_waiting_in_a_queue_gets_nothing() -> None:
    dev, meter, clock, _ = device()
    running, queued = dev.track("running"), dev.track("queued")
    running.begin()
    clock.t = 1.0
    meter.bursts.append((1.0, 5.0))
    running.tokens(10)
    running.end()
    queued.end()  # the client left before it started
    assert running.joules == pytest.approx(5.0)
    assert queued.final and queued.joules == 0.0


def test_tokens_reported_at_the_end_hold_the_split_until_then() -> None:
    """A non-streamed remote request reports its tokens when it ends: the intervals it spans
    wait for that, and a request beside it then gets its share by tokens."""
    dev, meter, clock, _ = device(cheap=False)
    remote, local = dev.track("remote"), dev.track("local")
    remote.begin()
    local.begin()
    for step in range(1, 11):  # 1 J per 0.1 s; local makes one token per step
        clock.t = step / 10
        meter.bursts.append((clock.t, 1.0))
        local.tokens(1)
        dev.sample()
    local.end()
    assert not local.final  # remote's progress over the same time is not known yet
    assert local.joules_now() == pytest.approx(10.0)  # provisional: remote has no tokens yet
    remote.tokens(30)  # spread over its whole lifetime: 3 per step
    remote.end()
    clock.t = 1.1
    dev.sample()
    assert local.final and remote.final
    assert local.joules == pytest.approx(2.5) and remote.joules == pytest.approx(7.5)


def test_prefill_reported_at_the_first_token_counts_where_it_was_processed() -> None:
    dev, meter, clock, _ = device(cheap=False)
    a, b = dev.track("a"), dev.track("b")
    a.begin()
    clock.t = 0.1
    b.begin()  # b starts a 0.4 s prefill while a generates 1 token per 0.1 s
    for step in range(2, 6):
        clock.t = step / 10
        meter.bursts.append((clock.t, 1.0))
        a.tokens(1)
        dev.sample()
    b.tokens(4)  # its prompt, over (0.1, 0.5]: 1 token per interval, like a
    a.end()
    b.end()
    clock.t = 0.6
    dev.sample()
    assert a.joules == pytest.approx(2.0) and b.joules == pytest.approx(2.0)


def test_a_meter_that_fails_loses_no_energy() -> None:
    from greenroute.backends.energy.meter import MeterError

    dev, meter, clock, _ = device(cheap=False)
    track = dev.track()
    track.begin()
    broken = meter.read_joules
    meter.read_joules = lambda: (_ for _ in ()).throw(MeterError("down"))  # type: ignore
    meter.bursts.append((0.5, 3.0))
    clock.t = 0.5
    dev.sample()  # fails: the interval stays open
    meter.read_joules = broken  # type: ignore
    track.tokens(1)
    track.end()
    clock.t = 1.0
    dev.sample()
    assert dev.read_errors == 1
    # One interval [0, 1] instead of two: the request covered half of it, so half is its.
    assert track.joules == pytest.approx(1.5)
    assert track.joules + dev.idle_j == pytest.approx(3.0)


# -- the property: conservation, and nothing outside a request's lifetime -------------------

@st.composite
def scenarios(draw: st.DrawFn) -> dict:
    horizon = 100
    cheap = draw(st.booleans())
    bursts = draw(st.lists(st.tuples(st.integers(1, horizon), st.floats(0.001, 50)),
                           max_size=40))
    ticks = draw(st.lists(st.integers(1, horizon), max_size=30))
    requests = []
    for _ in range(draw(st.integers(1, 8))):
        begin = draw(st.integers(0, horizon - 1))
        end = draw(st.integers(begin, horizon))
        reports = sorted(draw(st.lists(st.tuples(st.integers(begin, end), st.integers(1, 500)),
                                       max_size=8)))
        requests.append({"begin": begin, "end": end, "reports": reports,
                         "at_end": draw(st.booleans()), "queued_only": draw(st.booleans())
                         and not reports and begin == end})
    return {"cheap": cheap, "bursts": bursts, "ticks": ticks, "requests": requests,
            "horizon": horizon}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_energy_is_conserved_and_stays_within_lifetimes(scenario: dict) -> None:
    dev, meter, clock, periods = device(cheap=scenario["cheap"], period_s=17)
    meter.bursts = [(t / 10, j) for t, j in scenario["bursts"]]
    events: list[tuple[float, int, object]] = []  # (time, order, action)
    tracks: list[Track] = []
    boundaries = {0.0}
    for t in scenario["ticks"]:
        events.append((t / 10, 1, ("tick",)))
        boundaries.add(t / 10)
    for index, spec in enumerate(scenario["requests"]):
        track = dev.track(str(index))
        tracks.append(track)
        if not spec["queued_only"]:
            events.append((spec["begin"] / 10, 0, ("begin", track)))
        if spec["at_end"]:  # a remote request: all its tokens reported when it ends
            events.append((spec["end"] / 10, 2, ("late", track,
                                                 [(t / 10, n) for t, n in spec["reports"]])))
        else:
            for t, n in spec["reports"]:
                events.append((t / 10, 2, ("tokens", track, n)))
        events.append((spec["end"] / 10, 3, ("end", track)))
        if scenario["cheap"] and not spec["queued_only"]:
            boundaries.update((spec["begin"] / 10, spec["end"] / 10))
    events.sort(key=lambda e: (e[0], e[1]))
    for t, _, action in events:
        clock.t = t
        kind, *args = action  # type: ignore[misc]
        if kind == "tick":
            dev.sample()
        elif kind == "begin":
            args[0].begin()
        elif kind == "tokens":
            args[0].tokens(args[1])
        elif kind == "late":
            for at, n in args[1]:
                args[0].tokens(n, at=at)
        else:
            args[0].end()
    clock.t = scenario["horizon"] / 10 + 0.1
    boundaries.add(clock.t)
    dev.close()

    total = meter.read_joules()
    attributed = sum(t.joules for t in tracks)
    assert all(t.final for t in tracks)
    assert math.isclose(attributed + dev.idle_j, total, rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(dev.measured_j, total, rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(sum(p.measured_j for p in periods), total, rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(sum(p.attributed_j + p.idle_j for p in periods), total, rel_tol=1e-9,
                        abs_tol=1e-9)
    ordered = sorted(boundaries)
    for track, spec in zip(tracks, scenario["requests"], strict=True):
        assert track.joules >= 0
        if spec["queued_only"]:
            assert track.joules == 0
            continue
        begin, end = spec["begin"] / 10, spec["end"] / 10
        # The widest the intervals around its lifetime can be: from the last boundary at or
        # before it began to the first at or after it ended.
        left = max(b for b in ordered if b <= begin)
        right = min(b for b in ordered if b >= end)
        window = sum(j for t, j in meter.bursts if left < t <= right)
        assert track.joules <= window + 1e-9 * max(1.0, total)
