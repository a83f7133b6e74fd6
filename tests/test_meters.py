"""Energy meters against fakes of what this machine does not have, each speaking the real
interface: NVML's C library under the real pynvml, a RAPL sysfs tree in a temp dir, and a
Prometheus text endpoint served over loopback HTTP.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterator
from pathlib import Path

import pynvml
import pytest
from fake_dcgm import TextEndpoint

from greenroute.backends.energy.meter import MeterError
from greenroute.backends.energy.nvml import NvmlMeter
from greenroute.backends.energy.prometheus import PrometheusMeter, parse_samples
from greenroute.backends.energy.rapl import RaplMeter
from greenroute.backends.energy.registry import MeterConfig
from greenroute.backends.energy.select import meter_config, shared_meters
from greenroute.backends.registry import TierConfig

# -- NVML: a fake libnvidia-ml under the real pynvml ------------------------------------------

HANDLE_BASE = 0x1000


class FakeNvmlLib:
    """The C functions pynvml calls, with NVML's calling convention: return codes, and
    results written through the pointers passed in."""

    def __init__(self, energy_mj: list[int | None], power_mw: list[int]) -> None:
        self.energy_mj = energy_mj  # None: the GPU has no energy counter (NOT_SUPPORTED)
        self.power_mw = power_mw
        self.lost: set[int] = set()

    @staticmethod
    def _index(handle: object) -> int:
        return ctypes.cast(handle, ctypes.c_void_p).value - HANDLE_BASE  # type: ignore

    def nvmlInitWithFlags(self, flags: int) -> int:  # noqa: N802 (NVML's names)
        return pynvml.NVML_SUCCESS

    def nvmlShutdown(self) -> int:  # noqa: N802
        return pynvml.NVML_SUCCESS

    def nvmlDeviceGetCount_v2(self, count: object) -> int:  # noqa: N802
        count._obj.value = len(self.energy_mj)  # type: ignore[attr-defined]
        return pynvml.NVML_SUCCESS

    def nvmlDeviceGetHandleByIndex_v2(self, index: ctypes.c_uint, out: object) -> int:  # noqa
        if index.value >= len(self.energy_mj):
            return pynvml.NVML_ERROR_INVALID_ARGUMENT
        pointer = out._obj  # type: ignore[attr-defined]
        ctypes.c_void_p.from_address(ctypes.addressof(pointer)).value = HANDLE_BASE + index.value
        return pynvml.NVML_SUCCESS

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: object, out: object) -> int:  # noqa
        index = self._index(handle)
        if index in self.lost:
            return pynvml.NVML_ERROR_GPU_IS_LOST
        if self.energy_mj[index] is None:
            return pynvml.NVML_ERROR_NOT_SUPPORTED
        out._obj.value = self.energy_mj[index]  # type: ignore[attr-defined]
        return pynvml.NVML_SUCCESS

    def nvmlDeviceGetPowerUsage(self, handle: object, out: object) -> int:  # noqa: N802
        out._obj.value = self.power_mw[self._index(handle)]  # type: ignore[attr-defined]
        return pynvml.NVML_SUCCESS

    def nvmlDeviceGetUUID(self, handle: object, buffer: ctypes.Array, size: object) -> int:  # noqa
        buffer.value = f"GPU-fake-{self._index(handle)}".encode()
        return pynvml.NVML_SUCCESS

    def nvmlDeviceGetName(self, handle: object, buffer: ctypes.Array, size: object) -> int:  # noqa
        buffer.value = b"NVIDIA H100 80GB HBM3"
        return pynvml.NVML_SUCCESS


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeNvmlLib]:
    lib = FakeNvmlLib([5_000_000, 7_000_000, None], [100_000, 100_000, 200_000])
    monkeypatch.setattr(pynvml, "nvmlLib", lib)
    monkeypatch.setattr(pynvml, "_nvmlGetFunctionPointer_cache", {})
    yield lib


class Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


def test_nvml_sums_the_energy_counters_of_its_gpus(fake_nvml: FakeNvmlLib) -> None:
    meter = NvmlMeter([0, 1])
    assert meter.source == "nvml" and meter.device == "gpu:0,1" and meter.integrating == []
    first = meter.read_joules()
    assert first == pytest.approx(12_000.0)  # millijoules -> joules
    fake_nvml.energy_mj[0] += 1_500  # 1.5 J on GPU 0
    fake_nvml.energy_mj[1] += 250
    assert meter.read_joules() - first == pytest.approx(1.75)


def test_nvml_integrates_power_where_the_counter_is_unsupported(
        fake_nvml: FakeNvmlLib) -> None:
    clock = Clock()
    meter = NvmlMeter([0, 2], clock=clock)
    assert meter.integrating == [2]
    start = meter.read_joules()
    clock.t = 0.5
    fake_nvml.power_mw[2] = 300_000  # 200 W -> 300 W over 0.5 s: 125 J by the trapezoid rule
    fake_nvml.energy_mj[0] += 1_000
    assert meter.read_joules() - start == pytest.approx(126.0)


def test_nvml_errors_come_out_as_meter_errors(fake_nvml: FakeNvmlLib) -> None:
    meter = NvmlMeter([1])
    fake_nvml.lost.add(1)
    with pytest.raises(MeterError, match="nvmlDeviceGetTotalEnergyConsumption: GPU is lost"):
        meter.read_joules()
    with pytest.raises(MeterError, match="Invalid Argument"):
        NvmlMeter([9])


def test_nvml_without_a_driver_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine has no NVIDIA driver: the real pynvml fails to load the library."""
    monkeypatch.setattr(pynvml, "nvmlLib", None)
    monkeypatch.setattr(pynvml, "_nvmlGetFunctionPointer_cache", {})
    with pytest.raises(MeterError, match="NVML nvmlInit: NVML Shared Library Not Found"):
        NvmlMeter([0])


# -- RAPL: a sysfs tree in a temp dir ---------------------------------------------------------

def _zone(root: Path, name: str, energy: int, max_range: int) -> Path:
    zone = root / name
    zone.mkdir(parents=True)
    (zone / "name").write_text("package-0\n")
    (zone / "energy_uj").write_text(f"{energy}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_range}\n")
    return zone


def test_rapl_sums_packages_and_handles_wrap_around(tmp_path: Path) -> None:
    zero = _zone(tmp_path, "intel-rapl:0", 900_000, 1_000_000)
    one = _zone(tmp_path, "intel-rapl:1", 10_000, 1_000_000)
    _zone(tmp_path, "intel-rapl:0:0", 123, 1_000_000)  # a core subzone: part of package 0
    meter = RaplMeter(tmp_path)
    assert meter.source == "rapl" and meter.device == "cpu:intel-rapl:0,intel-rapl:1"
    assert meter.read_joules() == 0.0
    (zero / "energy_uj").write_text("100000\n")  # wrapped: 100,000 + 100,000 uJ
    (one / "energy_uj").write_text("60000\n")  # +50,000 uJ
    assert meter.read_joules() == pytest.approx(0.25)
    (zero / "energy_uj").write_text("400000\n")
    assert meter.read_joules() == pytest.approx(0.55)


def test_rapl_without_zones_or_readable_counters_is_a_meter_error(tmp_path: Path) -> None:
    with pytest.raises(MeterError, match="no RAPL package zones"):
        RaplMeter(tmp_path)
    zone = _zone(tmp_path, "intel-rapl:0", 1, 10)
    (zone / "energy_uj").unlink()
    with pytest.raises(MeterError, match="energy_uj"):
        RaplMeter(tmp_path)


# -- Prometheus: a real HTTP server serving the text format -----------------------------------

DCGM_TEXT = """\
# HELP DCGM_FI_DEV_SM_CLOCK SM clock frequency (in MHz).
# TYPE DCGM_FI_DEV_SM_CLOCK gauge
DCGM_FI_DEV_SM_CLOCK{gpu="0",UUID="GPU-a",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="gpu-1"} 1980
# HELP DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION Total energy consumption since boot (in mJ).
# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter
DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{gpu="0",UUID="GPU-a",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="gpu-1"} {e0}
DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{gpu="1",UUID="GPU-b",device="nvidia1",modelName="NVIDIA H100 80GB HBM3",Hostname="gpu-1"} {e1}
DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{gpu="2",UUID="GPU-c",device="nvidia2",modelName="a \\"quoted\\" name",Hostname="gpu-1"} {e2}
"""


class Exporter:
    """A loopback /metrics serving DCGM_TEXT with the current counters."""

    def __init__(self) -> None:
        self.energy = {"e0": 1_000_000, "e1": 2_000_000, "e2": 4_000_000}
        self.endpoint = TextEndpoint(self.text)
        self.url = self.endpoint.url

    def text(self) -> str:
        text = DCGM_TEXT
        for key, value in self.energy.items():
            text = text.replace("{" + key + "}", str(value))
        return text


@pytest.fixture
def exporter() -> Iterator[Exporter]:
    served = Exporter()
    with served.endpoint:
        yield served


def test_prometheus_sums_the_selected_gpus_in_joules(exporter: Exporter) -> None:
    meter = PrometheusMeter(exporter.url, gpus=[0, 1])
    assert meter.source == "prometheus" and not meter.cheap
    first = meter.read_joules()
    exporter.energy["e0"] += 2_000  # 2 J
    exporter.energy["e1"] += 500
    exporter.energy["e2"] += 99_000  # not ours
    assert meter.read_joules() - first == pytest.approx(2.5)


def test_prometheus_counter_reset_restarts_from_zero(exporter: Exporter) -> None:
    meter = PrometheusMeter(exporter.url, gpus=[0])
    first = meter.read_joules()
    exporter.energy["e0"] = 3_000  # the exporter restarted: 3 J since then
    assert meter.read_joules() - first == pytest.approx(3.0)


def test_prometheus_failures_are_meter_errors(exporter: Exporter) -> None:
    with pytest.raises(MeterError, match="no DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION series for "
                                         "gpu 7"):
        PrometheusMeter(exporter.url, gpus=[0, 7])
    meter = PrometheusMeter(exporter.url)  # every GPU
    exporter.endpoint.close()
    with pytest.raises(MeterError, match="scraping"):
        meter.read_joules()


def test_exposition_parser_reads_labels_and_skips_comments() -> None:
    samples = list(parse_samples(DCGM_TEXT.replace("{e0}", "1").replace("{e1}", "2.5e3")
                                 .replace("{e2}", "3")))
    assert [s[0] for s in samples].count("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION") == 3
    assert samples[2][2] == 2500.0
    assert samples[3][1]["modelName"] == 'a "quoted" name'


def test_agent_serves_nvml_counters_that_a_prometheus_meter_reads(
        fake_nvml: FakeNvmlLib) -> None:
    from greenroute.gateway.agent import serve

    nvml = NvmlMeter([0, 1, 2])
    stop = threading.Event()
    server = serve(nvml, "127.0.0.1", 0, 0.05, stop)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
        remote = PrometheusMeter(url, gpus=[0, 1])
        first = remote.read_joules()  # its origin is its first scrape
        fake_nvml.energy_mj[1] += 4_000
        fake_nvml.energy_mj[0] += 1_000
        assert remote.read_joules() - first == pytest.approx(5.0)
        every = PrometheusMeter(url)  # GPU 2's integrated power is served too
        before = every.read_joules()
        fake_nvml.energy_mj[0] += 1_000
        assert every.read_joules() - before >= 1.0
    finally:
        stop.set()


# -- which meter a tier gets ------------------------------------------------------------------

def test_meter_defaults_and_device_groups() -> None:
    embedded = TierConfig(name="a", backend="llamacpp", path="x.gguf")
    also_embedded = TierConfig(name="b", backend="llamacpp", path="y.gguf")
    remote = TierConfig(name="c", backend="openai", url="http://h/v1", model="m")
    off = TierConfig(name="d", backend="llamacpp", path="z.gguf",
                     meter=MeterConfig(kind="none"))
    assert meter_config(embedded) == MeterConfig(kind="estimate")
    assert meter_config(remote) is None and meter_config(off) is None
    meters = shared_meters([embedded, also_embedded, remote, off])
    assert set(meters) == {"a", "b"}
    assert meters["a"][1] is meters["b"][1]  # one process: one CPU device, shared
    with pytest.raises(ValueError, match="needs gpus"):
        MeterConfig(kind="nvml")


# -- a model server's token counters (vLLM's /metrics) -----------------------------------------

def test_server_tokens_read_vllms_counters_and_absorb_a_restart() -> None:
    from greenroute.backends.energy.server_tokens import ServerTokens, metrics_url
    from greenroute.backends.fake_openai import FakeUpstream

    assert metrics_url("http://gpu:8000/v1") == "http://gpu:8000/metrics"
    assert metrics_url("http://gpu:8000/v1/") == "http://gpu:8000/metrics"
    with FakeUpstream() as upstream:
        record = upstream.record
        record.prompt_tokens, record.generation_tokens, record.running = 100, 40, 3
        counters = ServerTokens(metrics_url(upstream.url))
        first = counters.read()
        assert (first.prompt, first.generated, first.running) == (0.0, 0.0, 3.0)  # a baseline
        record.prompt_tokens, record.generation_tokens = 130, 50
        assert (counters.read().prompt, counters.read().generated) == (30.0, 10.0)
        record.prompt_tokens, record.generation_tokens = 5, 2  # the server restarted
        again = counters.read()
        assert (again.prompt, again.generated) == (35.0, 12.0)


def test_a_vllm_tier_metered_by_prometheus_reads_its_servers_counters_by_default() -> None:
    from fake_dcgm import FakeDcgm

    from greenroute.backends.energy.sampler import Fleet
    from greenroute.backends.fake_openai import FakeUpstream

    with FakeUpstream() as upstream, FakeDcgm(lambda: 100.0) as exporter:
        def tier(name: str, url: str, **meter: object) -> TierConfig:
            return TierConfig.model_validate({
                "name": name, "backend": "openai", "url": url, "model": "echo",
                "meter": {"kind": "prometheus", "url": exporter.url, **meter}})

        not_vllm = exporter.url.removesuffix("/metrics") + "/v1"  # its /metrics has no tokens
        fleet = Fleet([tier("auto", upstream.url), tier("off", upstream.url, gpus=[0],
                                                         server_metrics="off")])
        assert list(fleet.devices["auto"].servers) == ["auto"]
        assert fleet.devices["off"].servers == {}
        plain = Fleet([tier("plain", not_vllm)])
        assert plain.devices["plain"].servers == {}  # a warning says it runs without them
        with pytest.raises(MeterError):
            Fleet([tier("by-hand", upstream.url, server_metrics="http://127.0.0.1:9/metrics")])
