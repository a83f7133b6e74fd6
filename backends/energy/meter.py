"""The one interface every energy meter implements."""

from __future__ import annotations

from typing import Literal, Protocol

EnergySource = Literal["nvml", "prometheus", "rapl", "estimate"]


class MeterError(Exception):
    """The meter's counter could not be read (device gone, permission, endpoint down)."""


class Meter(Protocol):
    """A cumulative energy counter for one device group.

    `read_joules` returns the energy used since an arbitrary origin fixed by the meter, never
    decreasing: callers only ever look at the difference between two readings. `cheap` says a
    read costs microseconds, so the attributor may also read at a request's start and end (exact
    interval boundaries); an expensive meter (an HTTP scrape) is read only by its sampler.
    """

    source: EnergySource
    device: str  # what is measured, e.g. "gpu:0,1" or "cpu:process"
    cheap: bool

    def read_joules(self) -> float: ...
