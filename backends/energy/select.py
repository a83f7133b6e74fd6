"""Which meter sees a tier's energy: the tier's `meter` config, or a default by backend.

Default: `estimate` (this process's CPU time) for an embedded llama.cpp tier, since it runs in
this process; no meter for a model served elsewhere (vLLM, a cloud API), whose energy the
gateway cannot see unless told where to read it (`nvml` when it shares this host's GPUs,
`prometheus` for another host). Tiers whose meters read the same counter share one device
group (`group_key`), so one sampler splits that counter between all their requests.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from greenroute.backends.energy.estimate import CpuTimeEstimateMeter
from greenroute.backends.energy.meter import Meter
from greenroute.gateway.config import MeterConfig, TierConfig


def meter_config(tier: TierConfig) -> MeterConfig | None:
    """The tier's meter config after defaults; None when its energy cannot be seen."""
    if tier.meter is not None:
        return None if tier.meter.kind == "none" else tier.meter
    return MeterConfig(kind="estimate") if tier.backend == "llamacpp" else None


def group_key(config: MeterConfig) -> tuple[object, ...]:
    """Meters with the same key read the same counter."""
    if config.kind == "nvml":
        return ("nvml", tuple(sorted(config.gpus)))
    if config.kind == "prometheus":
        return ("prometheus", config.url, config.metric, tuple(sorted(config.gpus)))
    if config.kind == "rapl":
        return ("rapl", config.rapl_root)
    return ("estimate", config.watts_per_core)


def build_meter(config: MeterConfig) -> Meter:
    """Open the meter a config names (raises MeterError if its counter cannot be read)."""
    if config.kind == "nvml":
        from greenroute.backends.energy.nvml import NvmlMeter

        return NvmlMeter(config.gpus)
    if config.kind == "prometheus":
        from greenroute.backends.energy.prometheus import PrometheusMeter

        assert config.url
        return PrometheusMeter(config.url, config.gpus, metric=config.metric,
                               joules_per_unit=config.joules_per_unit,
                               timeout_s=config.timeout_s)
    if config.kind == "rapl":
        from greenroute.backends.energy.rapl import RaplMeter

        return RaplMeter(Path(config.rapl_root))
    return CpuTimeEstimateMeter(config.watts_per_core)


def meter_for(tier: TierConfig) -> Meter | None:
    """A new meter for one tier (None: its energy is not measured)."""
    config = meter_config(tier)
    return build_meter(config) if config is not None else None


def shared_meters(tiers: Iterable[TierConfig]) -> dict[str, tuple[tuple[object, ...], Meter]]:
    """tier name -> (group key, meter), one meter object per group; unmetered tiers left out."""
    built: dict[tuple[object, ...], Meter] = {}
    result = {}
    for tier in tiers:
        config = meter_config(tier)
        if config is None:
            continue
        key = group_key(config)
        if key not in built:
            built[key] = build_meter(config)
        result[tier.name] = (key, built[key])
    return result
