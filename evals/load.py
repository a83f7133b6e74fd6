"""What else the machine was doing while a call was collected: the cores other processes kept
busy, and the time the hypervisor took (steal), over the call (Linux /proc).

The `estimate` meter charges this process's CPU seconds, and a call made while other work
shares the cores takes more of them per token (threads wait and spin): a table's large-tier
SVAMP rows, collected beside other work, cost 1.7x the joules per token of the same tier's
GSM8K rows (docs/routing.md, *A pricing artifact in the table*). Each collected result records
the load it ran under, so such rows can be found (`greenroute outcomes summary` counts them)
instead of being discovered later in the savings.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

# /proc/stat's first line: user nice system idle iowait irq softirq steal guest guest_nice
_BUSY = (0, 1, 2, 5, 6)  # user, nice, system, irq, softirq (guest time is inside user)
_STEAL = 7
BUSY_OTHERS_CORES = 0.25  # a call with more than this beside it counts as contended


@dataclass(frozen=True)
class Sample:
    wall_s: float
    busy_s: float  # every core's busy time, every process
    own_s: float  # this process's CPU time
    steal_s: float


@dataclass(frozen=True)
class Load:
    """Over one interval: cores kept busy by other processes, and cores' worth of steal."""

    others_cores: float
    steal_cores: float

    def record(self) -> dict[str, float]:
        """As an outcome table stores it (a result's `load`)."""
        return {"others_cores": self.others_cores, "steal_cores": self.steal_cores}


def contended(recorded: Mapping[str, float] | None) -> bool:
    """Whether a result's recorded `load` says other work shared the machine."""
    if not recorded:
        return False
    return recorded["others_cores"] + recorded["steal_cores"] > BUSY_OTHERS_CORES


def sample() -> Sample | None:
    """The counters now; None where /proc/stat cannot be read (not Linux)."""
    try:
        with open("/proc/stat", "rb") as stat:
            fields = stat.readline().split()[1:]
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    values = [int(v) / ticks for v in fields]
    own = os.times()
    return Sample(time.monotonic(), sum(values[i] for i in _BUSY),
                  own.user + own.system, values[_STEAL] if len(values) > _STEAL else 0.0)


def between(before: Sample | None, after: Sample | None) -> Load | None:
    """The load over the interval between two samples (None if either is missing or the
    interval is too short for the counters' 10 ms ticks to say anything)."""
    if before is None or after is None:
        return None
    wall = after.wall_s - before.wall_s
    if wall < 0.5:
        return None
    others = (after.busy_s - before.busy_s) - (after.own_s - before.own_s)
    steal = after.steal_s - before.steal_s
    return Load(round(max(others, 0.0) / wall, 2), round(steal / wall, 2))


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) each thread of process `pid` has used, by thread id, from
    /proc/<pid>/task; a thread that ends while it is read is left out. For the benches and tests
    that check what a process, or one of its threads, really used."""
    ticks = os.sysconf("SC_CLK_TCK")
    used = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except FileNotFoundError:
            continue
        used[tid] = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
    return used
