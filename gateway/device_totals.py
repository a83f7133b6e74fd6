"""A device's energy counted once, however many gateway processes read its counter.

Every process that meters a device writes its own `device_energy` periods, so a ledger shared
by replicas or workers holds one series of periods per reader. For a counter they all see, a
GPU read through a DCGM exporter or NVML, a CPU package read through RAPL, summing the series
counts the device's measured and idle energy once per reader. Which readers see one counter:

- `prometheus`: the exporter's GPUs, whoever scrapes them (the device name holds the URL);
- `nvml`, `rapl`: the host's devices, so the readers on one host (the row's `host`);
- `estimate`: the process's own CPU time, never shared: each reader is its own device.

Per shared counter, measured and idle energy are taken once over the union of the readers'
periods: each stretch of time that several readers' periods cover is counted from one of them,
the reader that covers most time overall, as its period's energy pro rata of the stretch's
length (power taken as even within a period, so only the edges of overlaps are interpolated).
Attributed energy is each reader's own requests', so it adds up over readers, and what the
counter measured beyond it and the idle energy went to the server's other clients. Rows from
before readers were recorded (empty `reader`) count as one reader, as they always did.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

from greenroute.gateway.ledger.schema import DeviceEnergyRow

HOST_DEVICES = ("nvml", "rapl")  # a counter of the host the reader ran on
OWN_DEVICES = ("estimate",)  # a counter of the reader process itself


@dataclass
class CountedDevice:
    """One counter's energy over a report's window, each joule counted once."""

    device: str
    source: str
    host: str  # for host devices; "" otherwise
    readers: set[str] = field(default_factory=set)
    measured_j: float = 0.0
    attributed_j: float = 0.0
    idle_j: float = 0.0
    other_j: float = 0.0
    # (row, the share of its measured and idle energy counted) for pricing idle energy by time
    counted: list[tuple[DeviceEnergyRow, float]] = field(default_factory=list)


def count_devices(rows: Iterable[DeviceEnergyRow]) -> list[CountedDevice]:
    """The ledger's device rows as one entry per device, shared counters deduplicated."""
    groups: dict[tuple[str, str, str, str], list[DeviceEnergyRow]] = defaultdict(list)
    for row in rows:
        host = row.host if row.source in HOST_DEVICES else ""
        own = row.reader if row.source in OWN_DEVICES else ""
        groups[row.device, row.source, host, own].append(row)
    devices: dict[tuple[str, str, str], CountedDevice] = {}
    for (device, source, host, _), members in groups.items():
        entry = devices.setdefault((device, source, host), CountedDevice(device, source, host))
        shares = _union_shares(members)
        measured = sum(r.measured_j * s for r, s in shares)
        idle = sum(r.idle_j * s for r, s in shares)
        attributed = sum(r.attributed_j for r in members)
        if len({r.reader for r in members}) > 1:
            other = max(measured - attributed - idle, 0.0)
        else:  # one reader's books balance exactly: keep its own figure
            other = sum(r.other_j for r in members)
        entry.readers.update(r.reader for r in members)
        entry.measured_j += measured
        entry.attributed_j += attributed
        entry.idle_j += idle
        entry.other_j += other
        entry.counted.extend(shares)
    return list(devices.values())


def _union_shares(rows: Sequence[DeviceEnergyRow]) -> list[tuple[DeviceEnergyRow, float]]:
    """Each row with the share of its energy that counts: 1 for a sole reader; with several,
    the part of its time where no reader ranked above it also has a period."""
    readers = {r.reader for r in rows}
    if len(readers) <= 1:
        return [(r, 1.0) for r in rows]
    covered: dict[str, float] = defaultdict(float)
    for r in rows:
        covered[r.reader] += _seconds(r)
    rank = {reader: i for i, reader in enumerate(
        sorted(readers, key=lambda reader: (-covered[reader], reader)))}
    # sweep the periods' starts and ends; between two events the open periods are fixed
    events = sorted({t for r in rows for t in (_start(r), _end(r))})
    starting: dict[float, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        starting[_start(r)].append(i)
    open_rows: dict[int, None] = {}
    shares = [0.0] * len(rows)
    for a, b in pairwise(events):
        for i in starting.get(a, ()):
            open_rows[i] = None
        for i in [i for i in open_rows if _end(rows[i]) <= a]:
            del open_rows[i]
        if open_rows:
            top = min(open_rows, key=lambda i: rank[rows[i].reader])
            shares[top] += (b - a) / _seconds(rows[top])
    for i, r in enumerate(rows):  # a period of no length counts where no other reader's is
        if _seconds(r) == 0 and not any(
                o.reader != r.reader and _start(o) <= _start(r) <= _end(o) for o in rows):
            shares[i] = 1.0
    return [(r, min(s, 1.0)) for r, s in zip(rows, shares, strict=True)]


def _start(row: DeviceEnergyRow) -> float:
    return row.started.timestamp()


def _end(row: DeviceEnergyRow) -> float:
    return row.ended.timestamp()


def _seconds(row: DeviceEnergyRow) -> float:
    return max(_end(row) - _start(row), 0.0)
