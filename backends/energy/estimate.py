"""An energy estimate from CPU time, for machines where no counter can be read.

joules = CPU seconds used by this process x watts per busy core. The default, 3.5 W, is Cloud
Carbon Footprint's average maximum watts per vCPU across AWS's processor micro-architectures
(from the SPECpower database): the draw of one vCPU at 100% utilisation, which is what one
CPU-second of inference is. It counts this process only (other processes on the machine are not
its concern) and no idle power, and it is labelled `estimate` wherever it appears.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from greenroute.backends.energy.meter import EnergySource

DEFAULT_WATTS_PER_CORE = 3.5


class CpuTimeEstimateMeter:
    """Estimated joules of this process: its CPU time times a fixed power per busy core."""

    source: EnergySource = "estimate"
    cheap = True  # one clock_gettime call

    def __init__(self, watts_per_core: float = DEFAULT_WATTS_PER_CORE,
                 cpu_seconds: Callable[[], float] = time.process_time) -> None:
        if watts_per_core <= 0:
            raise ValueError("watts_per_core must be positive")
        self.watts_per_core = watts_per_core
        self.device = "cpu:process"
        self._cpu_seconds = cpu_seconds

    def read_joules(self) -> float:
        return self._cpu_seconds() * self.watts_per_core
