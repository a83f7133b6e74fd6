"""The meter kinds a tier may name, one entry each, and the schema of a meter's configuration.

A kind says which config fields it needs, how to open its meter and which counter it reads
(`group_key`: tiers whose meters read the same counter share one device group). Adding a kind
is one `MeterKind` subclass and one entry in `METERS`; `MeterConfig.kind` accepts exactly the
names there, plus `none` (the tier's energy is not measured). Driver bindings (pynvml) are
loaded only when a meter is opened, so reading a config loads none.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from greenroute.backends.energy.estimate import DEFAULT_WATTS_PER_CORE, CpuTimeEstimateMeter
from greenroute.backends.energy.meter import Meter
from greenroute.backends.energy.nvml import NvmlMeter
from greenroute.backends.energy.prometheus import DCGM_ENERGY, PrometheusMeter
from greenroute.backends.energy.rapl import POWERCAP, RaplMeter

NO_METER = "none"


class MeterConfig(BaseModel):
    """Which energy counter sees a tier's work (docs/energy.md). Tiers with the same meter share
    one device group: its energy is split between their requests."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str  # a key of METERS, or "none"
    # nvml: GPU indices to sum. prometheus: values of the `gpu` label to sum (empty: all).
    gpus: tuple[int, ...] = ()
    # prometheus: the exporter's URL (DCGM exporter, or `greenroute agent`), series and unit.
    url: str | None = None
    metric: str = DCGM_ENERGY
    joules_per_unit: float = Field(default=0.001, gt=0)  # DCGM reports millijoules
    timeout_s: float = Field(default=2.0, gt=0)
    # How often the counter itself updates, in seconds; > 0 turns on slow-counter handling
    # (each step spread over the time since the previous one). DCGM exporter: 30 (its -c 30000).
    # 0: every reading is fresh. Unset: prometheus and nvml learn it from the counter's steps
    # (a DCGM exporter at its defaults works as is; NVML's counter steps every ~100 ms); rapl
    # and estimate are fresh.
    update_s: float | None = Field(default=None, ge=0)
    # A counter that is cheap to read and steps slowly (nvml): read it densely while its next
    # step is due (every 5 ms, for about 10 ms per step), so each step's time is known to a few
    # ms rather than to one sampler interval. False: one reading per interval.
    read_at_steps: bool = True
    # prometheus on a vLLM tier: where to read the server's token counters, the denominator
    # shared with its other clients. "auto": the tier's url without /v1, plus /metrics; "off";
    # or a URL.
    server_metrics: str = "auto"
    # estimate: watts per busy core (Cloud Carbon Footprint's AWS average, docs/energy.md).
    watts_per_core: float = Field(default=DEFAULT_WATTS_PER_CORE, gt=0)
    # rapl: the powercap tree.
    rapl_root: str = str(POWERCAP)

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        if kind != NO_METER and kind not in METERS:
            known = ", ".join([*METERS, NO_METER])
            raise ValueError(f"unknown meter kind {kind!r}; known: {known}")
        return kind

    @model_validator(mode="after")
    def _check_kind_fields(self) -> MeterConfig:
        if self.kind != NO_METER:
            METERS[self.kind].check(self)
        return self


class MeterKind(abc.ABC):
    """How one kind of meter is configured, opened and grouped."""

    # MeterConfig fields this kind cannot do without, with what each one is.
    requires: ClassVar[dict[str, str]] = {}
    # True: the counter may step less often than the sampler reads it, so with `update_s`
    # unset its period is learned from its steps (docs/energy.md, "Slow counters").
    steps_slowly: ClassVar[bool] = False

    def check(self, config: MeterConfig) -> None:
        """Raise ValueError naming the first required field the config leaves empty."""
        for field, what in self.requires.items():
            if not getattr(config, field):
                raise ValueError(f"meter {config.kind!r} needs {field} ({what})")

    @abc.abstractmethod
    def open(self, config: MeterConfig) -> Meter:
        """The meter (raises MeterError if its counter cannot be read)."""

    @abc.abstractmethod
    def group_key(self, config: MeterConfig) -> tuple[object, ...]:
        """Meters with the same key read the same counter."""


class EstimateKind(MeterKind):
    def open(self, config: MeterConfig) -> Meter:
        return CpuTimeEstimateMeter(config.watts_per_core)

    def group_key(self, config: MeterConfig) -> tuple[object, ...]:
        return ("estimate", config.watts_per_core)


class NvmlKind(MeterKind):
    requires: ClassVar[dict[str, str]] = {"gpus": "NVML indices"}
    steps_slowly = True  # an H200's counter stepped every 100 ms (docs/energy.md)

    def open(self, config: MeterConfig) -> Meter:
        return NvmlMeter(config.gpus)

    def group_key(self, config: MeterConfig) -> tuple[object, ...]:
        return ("nvml", tuple(sorted(config.gpus)))


class PrometheusKind(MeterKind):
    requires: ClassVar[dict[str, str]] = {"url": "the exporter's metrics URL"}
    steps_slowly = True  # DCGM exporter: every 30 s at its defaults

    def open(self, config: MeterConfig) -> Meter:
        assert config.url  # required by check()
        return PrometheusMeter(config.url, config.gpus, metric=config.metric,
                               joules_per_unit=config.joules_per_unit,
                               timeout_s=config.timeout_s)

    def group_key(self, config: MeterConfig) -> tuple[object, ...]:
        return ("prometheus", config.url, config.metric, tuple(sorted(config.gpus)))


class RaplKind(MeterKind):
    def open(self, config: MeterConfig) -> Meter:
        return RaplMeter(Path(config.rapl_root))

    def group_key(self, config: MeterConfig) -> tuple[object, ...]:
        return ("rapl", config.rapl_root)


METERS: dict[str, MeterKind] = {
    "estimate": EstimateKind(),
    "nvml": NvmlKind(),
    "rapl": RaplKind(),
    "prometheus": PrometheusKind(),
}
