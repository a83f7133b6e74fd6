"""Samplers: one thread per device group reads its meter every interval (~100 ms).

A thread, not an event-loop task: meter reads block (NVML calls, sysfs reads, an HTTP scrape),
and a slow scrape of one meter must not delay the others or any request.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from greenroute.backends.energy.attribution import Device, PeriodEnergy, Track
from greenroute.backends.energy.meter import MeterError
from greenroute.backends.energy.select import shared_meters
from greenroute.backends.registry import TierConfig

log = logging.getLogger("greenroute.energy")


class Sampler:
    """Calls `device.sample()` every `interval_s` on its own daemon thread."""

    def __init__(self, device: Device, interval_s: float) -> None:
        self.device = device
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"energy-{device.name}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.device.sample()
            except Exception:  # a sampler must outlive any one bad reading
                log.exception("energy sampler %s failed", self.device.name)

    def stop(self) -> None:
        """Stop sampling, then take the final reading and settle everything."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.device.close()


class Fleet:
    """The devices of a gateway's tiers, one per distinct meter, with their samplers."""

    def __init__(self, tiers: Iterable[TierConfig], *, interval_s: float = 0.1,
                 period_s: float = 60.0,
                 on_period: Callable[[PeriodEnergy], None] | None = None) -> None:
        self.devices: dict[str, Device] = {}  # tier name -> device
        self._samplers: list[Sampler] = []
        by_key: dict[tuple[object, ...], Device] = {}
        for tier, (key, meter) in shared_meters(tiers).items():
            if key not in by_key:
                by_key[key] = Device(meter, period_s=period_s, on_period=on_period)
                self._samplers.append(Sampler(by_key[key], interval_s))
            self.devices[tier] = by_key[key]

    def start(self) -> None:
        for sampler in self._samplers:
            sampler.start()
            log.info("energy: tiers %s metered by %s (%s), every %.0f ms",
                     ", ".join(t for t, d in self.devices.items() if d is sampler.device),
                     sampler.device.name, sampler.device.source, sampler.interval_s * 1000)

    def track(self, tier: str, label: str,
              on_final: Callable[[Track], None] | None = None) -> Track | None:
        device = self.devices.get(tier)
        return device.track(label, on_final) if device is not None else None

    def distinct(self) -> list[Device]:
        return [s.device for s in self._samplers]

    def stop(self) -> None:
        for sampler in self._samplers:
            try:
                sampler.stop()
            except MeterError as exc:
                log.warning("energy: final reading of %s failed: %s", sampler.device.name, exc)
