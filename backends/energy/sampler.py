"""Samplers: one thread per device group reads its meter every interval (~100 ms).

A thread, not an event-loop task: meter reads block (NVML calls, sysfs reads, an HTTP scrape),
and a slow scrape of one meter must not delay the others or any request.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from greenroute.backends.energy.attribution import Device, PeriodEnergy, Track
from greenroute.backends.energy.costs import TokenCosts
from greenroute.backends.energy.meter import MeterError
from greenroute.backends.energy.registry import METERS, MeterConfig
from greenroute.backends.energy.select import meter_config, shared_meters
from greenroute.backends.energy.server_tokens import ServerTokens, metrics_url
from greenroute.backends.registry import TierConfig

log = logging.getLogger("greenroute.energy")

# Meter kinds that see a whole GPU, shared by every client of the servers on it.
SERVER_METERED = ("prometheus", "nvml")


class Sampler:
    """Calls `device.sample()` every `interval_s` on its own daemon thread (more often around
    the steps of a counter read at its steps: `Device.next_read_in`)."""

    def __init__(self, device: Device, interval_s: float) -> None:
        self.device = device
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"energy-{device.name}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        delay = self.interval_s
        while not self._stop.wait(delay):
            try:
                self.device.sample()
                delay = self.device.next_read_in(self.interval_s)
            except Exception:  # a sampler must outlive any one bad reading
                log.exception("energy sampler %s failed", self.device.name)
                delay = self.interval_s

    def stop(self) -> None:
        """Stop sampling, then take the final reading and settle everything."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.device.close()


def server_tokens(tier: TierConfig, meter: MeterConfig) -> ServerTokens | None:
    """The token counters of the server behind a tier, if its energy is read beside them: a
    vLLM (`openai`) tier metered by `prometheus` or `nvml` (a GPU that other processes may
    use too), unless `server_metrics = "off"`. With "auto", a server without the counters (not
    vLLM) is used without them, and a warning says so."""
    setting = meter.server_metrics
    if setting == "off" or meter.kind not in SERVER_METERED:
        return None
    if setting != "auto":
        counters = ServerTokens(setting, meter.timeout_s)
        counters.read()  # a URL set by hand must work: fail at start-up
        return counters
    if tier.backend != "openai" or not tier.url:
        return None
    counters = ServerTokens(metrics_url(tier.url), meter.timeout_s)
    try:
        counters.read()
    except MeterError as exc:
        log.warning("energy: tier %s: no server token counters (%s); its share of the meter "
                    "is taken as everything this process sees", tier.name, exc)
        return None
    return counters


class Fleet:
    """The devices of a gateway's tiers, one per distinct meter, with their samplers."""

    def __init__(self, tiers: Iterable[TierConfig], *, interval_s: float = 0.1,
                 period_s: float = 60.0,
                 on_period: Callable[[PeriodEnergy], None] | None = None) -> None:
        self.devices: dict[str, Device] = {}  # tier name -> device
        self._samplers: list[Sampler] = []
        tiers = list(tiers)
        meters = shared_meters(tiers)
        groups: dict[tuple[object, ...], list[TierConfig]] = {}
        for tier in tiers:
            if tier.name in meters:
                groups.setdefault(meters[tier.name][0], []).append(tier)
        for members in groups.values():
            configs = {t.name: meter_config(t) for t in members}
            servers = {t.name: counters for t in members
                       if (config := configs[t.name]) is not None
                       and (counters := server_tokens(t, config)) is not None}
            first = configs[members[0].name]
            device = Device(meters[members[0].name][1], period_s=period_s, on_period=on_period,
                            servers=servers,
                            costs=TokenCosts({t.name: t.energy_hint for t in members}),
                            update_s=_update_s(first),
                            read_at_steps=first is not None and first.read_at_steps)
            self._samplers.append(Sampler(device, interval_s))
            for tier in members:
                self.devices[tier.name] = device

    def start(self) -> None:
        for sampler in self._samplers:
            sampler.start()
            log.info("energy: tiers %s metered by %s (%s), every %.0f ms",
                     ", ".join(t for t, d in self.devices.items() if d is sampler.device),
                     sampler.device.name, sampler.device.source, sampler.interval_s * 1000)

    def track(self, tier: str, label: str,
              on_final: Callable[[Track], None] | None = None) -> Track | None:
        device = self.devices.get(tier)
        return device.track(label, on_final, tier) if device is not None else None

    def distinct(self) -> list[Device]:
        return [s.device for s in self._samplers]

    def stop(self) -> None:
        for sampler in self._samplers:
            try:
                sampler.stop()
            except MeterError as exc:
                log.warning("energy: final reading of %s failed: %s", sampler.device.name, exc)


def _update_s(meter: MeterConfig | None) -> float | None:
    """The counter's update period for its Device: as configured, else learned (None) for a
    kind whose counter steps (a DCGM exporter every 30 s, NVML every ~100 ms), else 0."""
    if meter is None:
        return 0.0
    if meter.update_s is not None:
        return meter.update_s
    kind = METERS.get(meter.kind)
    return None if kind is not None and kind.steps_slowly else 0.0
