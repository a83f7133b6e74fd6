"""Which meter sees a tier's energy: the tier's `meter` config, or its backend kind's default.

Default: `estimate` (this process's CPU time) for an embedded llama.cpp tier, since it runs in
this process; no meter for a model served elsewhere (vLLM, a cloud API), whose energy the
gateway cannot see unless told where to read it (`nvml` when it shares this host's GPUs,
`prometheus` for another host). Tiers whose meters read the same counter share one device
group (`MeterKind.group_key`), so one sampler splits that counter between all their requests.
"""

from __future__ import annotations

from collections.abc import Iterable

from greenroute.backends.energy.meter import Meter
from greenroute.backends.energy.registry import METERS, NO_METER, MeterConfig
from greenroute.backends.registry import TierConfig


def meter_config(tier: TierConfig) -> MeterConfig | None:
    """The tier's meter config after defaults; None when its energy cannot be seen."""
    if tier.meter is not None:
        return None if tier.meter.kind == NO_METER else tier.meter
    return tier.kind.default_meter


def meter_for(tier: TierConfig) -> Meter | None:
    """A new meter for one tier (None: its energy is not measured)."""
    config = meter_config(tier)
    return METERS[config.kind].open(config) if config is not None else None


def shared_meters(tiers: Iterable[TierConfig]) -> dict[str, tuple[tuple[object, ...], Meter]]:
    """tier name -> (group key, meter), one meter object per group; unmetered tiers left out."""
    built: dict[tuple[object, ...], Meter] = {}
    result = {}
    for tier in tiers:
        config = meter_config(tier)
        if config is None:
            continue
        kind = METERS[config.kind]
        key = kind.group_key(config)
        if key not in built:
            built[key] = kind.open(config)
        result[tier.name] = (key, built[key])
    return result
