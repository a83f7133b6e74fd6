"""How often a GPU's NVML energy counter moves: the update period a slow-counter setting needs.

    python bench/nvml_counter_period.py --gpu 0 --seconds 5

Reads `nvmlDeviceGetTotalEnergyConsumption` (through GreenRoute's NvmlMeter) back to back,
first idle and then under an fp16 matmul load, and prints per phase: the reads made, the
intervals between reads that saw the counter change (p10, median, p90, in ms), the median step
(mJ) and the mean power. The sampler reads a meter every 100 ms by default; a counter that moves
about as often or less needs `update_s` on its meter, or its period learned (docs/energy.md,
"Slow counters"). Then, still under load, GreenRoute's own sampler on that counter with
`read_at_steps` (the nvml meter's default): its readings per second, and how closely it timed
each step (the gap between the last reading before a step and the first after it: p50 and
p90, ms; one reading per 100 ms would give about 100). Exit 2 without torch, a CUDA GPU or
NVML. bench/gpu_check.sh runs it first.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class Phase:
    """One polling phase: reads made, times (s) and counter values (mJ) where it changed."""

    name: str
    reads: int
    seconds: float
    changes: list[tuple[float, int]]


def poll(read_mj: Callable[[], int], seconds: float, name: str) -> Phase:
    """Read the counter back to back for `seconds`, keeping each read that saw a change."""
    reads, start = 0, time.monotonic()
    last = read_mj()
    changes = [(start, last)]
    while (now := time.monotonic()) - start < seconds:
        value = read_mj()
        reads += 1
        if value != last:
            changes.append((now, value))
            last = value
    return Phase(name, reads, time.monotonic() - start, changes)


def summary(phase: Phase) -> str:
    """One line: read rate, change intervals (ms), median step (mJ), mean power (W)."""
    times = [t for t, _ in phase.changes]
    values = [v for _, v in phase.changes]
    gaps = [(b - a) * 1000 for a, b in zip(times, times[1:], strict=False)]
    steps = [b - a for a, b in zip(values, values[1:], strict=False)]
    power = (values[-1] - values[0]) / 1000 / (times[-1] - times[0]) if len(times) > 1 else 0.0
    if len(gaps) < 3:
        return (f"{phase.name}: {phase.reads} reads in {phase.seconds:.1f} s, "
                f"{len(gaps)} changes: too few to time")
    deciles = statistics.quantiles(gaps, n=10)
    return (f"{phase.name}: {phase.reads} reads in {phase.seconds:.1f} s "
            f"({phase.reads / phase.seconds:,.0f}/s), {len(gaps)} changes; interval between "
            f"changes p10 {deciles[0]:.1f} ms, median {statistics.median(gaps):.1f} ms, p90 "
            f"{deciles[-1]:.1f} ms; median step {statistics.median(steps):,.0f} mJ; mean power "
            f"over the changes {power:.1f} W")


def sampler_at_steps(meter: Any, seconds: float) -> str:
    """GreenRoute's Sampler reading `meter` at its steps for `seconds`: reads/s and brackets."""
    from greenroute.backends.energy.attribution import Device
    from greenroute.backends.energy.sampler import Sampler

    readings: list[tuple[float, float]] = []

    class Recorded:  # the meter, each reading kept
        source, device, cheap = meter.source, meter.device, True

        def read_joules(self) -> float:
            value = meter.read_joules()
            readings.append((time.monotonic(), value))
            return float(value)

    device = Device(Recorded(), update_s=None, read_at_steps=True)  # type: ignore[arg-type]
    sampler = Sampler(device, 0.1)
    sampler.start()
    time.sleep(seconds)
    sampler.stop()
    brackets = [(b[0] - a[0]) * 1000 for a, b in zip(readings, readings[1:], strict=False)
                if b[1] != a[1]][5:]  # past the first steps, while the period is learned
    if len(brackets) < 3:
        return f"sampler at steps: {len(readings)} reads, too few steps to time"
    deciles = statistics.quantiles(brackets, n=10)
    return (f"sampler at steps: {len(readings) / seconds:.0f} reads/s, "
            f"{'on' if device.read_at_steps else 'turned itself off'}; each step timed "
            f"to p50 {statistics.median(brackets):.1f} ms, p90 {deciles[-1]:.1f} ms "
            f"({len(brackets)} steps)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=5.0, help="per phase (default 5)")
    args = parser.parse_args(argv)
    from nvml_check import require_gpu  # its sibling: exit 2 saying what is missing

    torch, meter = require_gpu(args.gpu)

    def read_mj() -> int:
        return round(meter.read_joules() * 1000)  # the counter's own unit, NVML's mJ

    print(f"GPU {args.gpu}: {torch.cuda.get_device_name(args.gpu)}")
    print(summary(poll(read_mj, args.seconds, "idle")))
    device = torch.device(f"cuda:{args.gpu}")
    a = torch.randn(8192, 8192, device=device, dtype=torch.float16)
    stop = threading.Event()

    def load(x: Any = a) -> None:
        while not stop.is_set():
            for _ in range(10):
                x = (x @ x).clamp_(-1, 1)
            torch.cuda.synchronize(device)

    worker = threading.Thread(target=load)
    worker.start()
    time.sleep(1.0)  # past the clocks' ramp
    try:
        print(summary(poll(read_mj, args.seconds, "load")))
        print(sampler_at_steps(meter, args.seconds))
    finally:
        stop.set()
        worker.join()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
