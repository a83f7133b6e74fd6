"""GPU energy from NVML (pynvml, the `nvidia-ml-py` package), summed over a backend's GPUs.

Volta and newer GPUs keep a cumulative energy counter (`nvmlDeviceGetTotalEnergyConsumption`,
millijoules since the driver loaded): a difference of two reads is exact, however far apart.
Where a GPU does not support it, the meter integrates `nvmlDeviceGetPowerUsage` (milliwatts)
between reads with the trapezoid rule, so its accuracy then depends on being read often: the
sampler reads every ~100 ms. Every NVML call goes through `_call`, the one place NVML errors
become `MeterError`s.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from greenroute.backends.energy.meter import EnergySource, MeterError

T = TypeVar("T")


def load_nvml() -> Any:
    """The pynvml module, or a MeterError saying how to get it."""
    try:
        import pynvml  # type: ignore[import-untyped]  # nvidia-ml-py ships no type hints
    except ImportError:
        raise MeterError("the nvml meter needs nvidia-ml-py: pip install 'greenroute[gpu]'") \
            from None
    return pynvml


def _call(nvml: Any, fn: Callable[..., T], *args: Any) -> T:
    """Call an NVML function; NVML's errors come out as MeterError naming the call."""
    try:
        return fn(*args)
    except nvml.NVMLError as exc:
        raise MeterError(f"NVML {fn.__name__}: {exc}") from exc


@dataclass
class _Gpu:
    index: int
    handle: Any
    counter: bool  # True: the hardware energy counter; False: integrated power
    last_power_w: float = 0.0
    last_time: float = 0.0
    integrated_j: float = 0.0


class NvmlMeter:
    """Cumulative joules of the listed GPUs (indices as NVML numbers them)."""

    source: EnergySource = "nvml"
    cheap = True  # a driver call, no I/O: tens of microseconds

    def __init__(self, gpus: Sequence[int], nvml: Any = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not gpus:
            raise ValueError("the nvml meter needs at least one GPU index")
        self._nvml = nvml if nvml is not None else load_nvml()
        self._clock = clock
        self._lock = threading.Lock()  # the power integration keeps state between reads
        self.device = "gpu:" + ",".join(str(i) for i in gpus)
        _call(self._nvml, self._nvml.nvmlInit)
        self._gpus = [self._open(index) for index in gpus]

    def _open(self, index: int) -> _Gpu:
        nvml = self._nvml
        handle = _call(nvml, nvml.nvmlDeviceGetHandleByIndex, index)
        try:
            nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
            return _Gpu(index, handle, counter=True)
        except nvml.NVMLError_NotSupported:
            power = _call(nvml, nvml.nvmlDeviceGetPowerUsage, handle) / 1000.0
            return _Gpu(index, handle, counter=False, last_power_w=power, last_time=self._clock())
        except nvml.NVMLError as exc:
            raise MeterError(f"NVML nvmlDeviceGetTotalEnergyConsumption: {exc}") from exc

    @property
    def integrating(self) -> list[int]:
        """GPUs without an energy counter, whose power is integrated instead."""
        return [gpu.index for gpu in self._gpus if not gpu.counter]

    def read_joules(self) -> float:
        nvml = self._nvml
        total = 0.0
        with self._lock:
            for gpu in self._gpus:
                if gpu.counter:
                    total += _call(nvml, nvml.nvmlDeviceGetTotalEnergyConsumption,
                                   gpu.handle) / 1000.0
                    continue
                power = _call(nvml, nvml.nvmlDeviceGetPowerUsage, gpu.handle) / 1000.0
                now = self._clock()
                gpu.integrated_j += (gpu.last_power_w + power) / 2 * (now - gpu.last_time)
                gpu.last_power_w, gpu.last_time = power, now
                total += gpu.integrated_j
        return total

    def per_gpu_millijoules(self) -> list[tuple[int, str, str, float]]:
        """(index, uuid, name, millijoules) per GPU, for `greenroute agent`."""
        nvml = self._nvml
        self.read_joules()  # advance the integration of counter-less GPUs
        rows = []
        with self._lock:
            for gpu in self._gpus:
                uuid = _text(_call(nvml, nvml.nvmlDeviceGetUUID, gpu.handle))
                name = _text(_call(nvml, nvml.nvmlDeviceGetName, gpu.handle))
                if gpu.counter:
                    mj = float(_call(nvml, nvml.nvmlDeviceGetTotalEnergyConsumption, gpu.handle))
                else:
                    mj = gpu.integrated_j * 1000.0
                rows.append((gpu.index, uuid, name, mj))
        return rows


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
