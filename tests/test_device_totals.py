"""A device that several processes read into one ledger is counted once by the report."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from greenroute.gateway.device_totals import count_devices
from greenroute.gateway.ledger.schema import DeviceEnergyRow

T0 = datetime(2026, 12, 2, tzinfo=UTC)
DCGM = "http://gpu-box:9400/metrics#gpu=0"


def row(reader: str, start_s: float, end_s: float, measured: float, attributed: float,
        idle: float, *, device: str = DCGM, source: str = "prometheus",
        host: str = "h1") -> DeviceEnergyRow:
    return DeviceEnergyRow(
        device=device, source=source, host=host, reader=reader,
        started=T0 + timedelta(seconds=start_s), ended=T0 + timedelta(seconds=end_s),
        counter_start_j=0.0, counter_end_j=measured, measured_j=measured,
        attributed_j=attributed, idle_j=idle, other_j=measured - attributed - idle,
        intervals=10)


def test_two_readers_of_one_counter_over_the_same_time_count_it_once() -> None:
    # both processes read the same 600 J over the minute; a served 300 J of it, b 200 J
    rows = [row("a", 0, 60, 600, 300, 50), row("b", 0.5, 60.5, 600, 200, 50)]
    (device,) = count_devices(rows)
    assert device.readers == {"a", "b"}
    # a's minute, and b's half second beyond it (10 J/s, idle 50/60 J/s)
    assert device.measured_j == pytest.approx(600 + 5)
    assert device.attributed_j == pytest.approx(500)
    assert device.idle_j == pytest.approx(50 + 50 / 120)
    assert device.other_j == pytest.approx(605 - 500 - 50 - 50 / 120)


def test_readers_that_overlap_in_part_count_the_union_of_their_time() -> None:
    # a reads [0, 60) and [60, 120); b starts at 90 and reads [90, 150): only b's last 30 s
    # are beyond a's
    rows = [row("a", 0, 60, 600, 400, 100), row("a", 60, 120, 600, 400, 100),
            row("b", 90, 150, 600, 200, 60)]
    (device,) = count_devices(rows)
    assert device.measured_j == pytest.approx(600 + 600 + 600 * 30 / 60)
    assert device.idle_j == pytest.approx(100 + 100 + 60 * 30 / 60)
    assert device.attributed_j == pytest.approx(1000)
    assert device.other_j == pytest.approx(1500 - 1000 - 230)
    shares = {(r.reader, r.started): s for r, s in device.counted}
    assert shares["b", T0 + timedelta(seconds=90)] == pytest.approx(0.5)


def test_a_sole_reader_keeps_its_own_figures() -> None:
    rows = [row("a", 0, 60, 600, 300, 50), row("a", 60, 120, 300, 100, 150)]
    (device,) = count_devices(rows)
    assert (device.measured_j, device.attributed_j, device.idle_j, device.other_j) == (
        900, 400, 200, 300)


def test_rows_from_before_readers_were_recorded_sum_as_before() -> None:
    rows = [row("", 0, 60, 600, 300, 50), row("", 30, 90, 600, 300, 50)]
    (device,) = count_devices(rows)
    assert device.measured_j == pytest.approx(1200)


def test_per_process_estimates_add_up_and_host_devices_stay_apart() -> None:
    rows = [row("a", 0, 60, 100, 80, 20, device="cpu:process", source="estimate"),
            row("b", 0, 60, 50, 40, 10, device="cpu:process", source="estimate"),
            row("a", 0, 60, 600, 500, 100, device="gpu:0", source="nvml", host="h1"),
            row("b", 0, 60, 700, 600, 100, device="gpu:0", source="nvml", host="h2"),
            row("c", 0, 60, 600, 0, 100, device="gpu:0", source="nvml", host="h1")]
    devices = {(d.device, d.host): d for d in count_devices(rows)}
    cpu = devices["cpu:process", ""]
    assert (cpu.measured_j, cpu.attributed_j, cpu.readers) == (150, 120, {"a", "b"})
    assert devices["gpu:0", "h2"].measured_j == 700  # another host's GPU 0
    h1 = devices["gpu:0", "h1"]  # two processes on h1 read its GPU 0: once
    assert h1.measured_j == pytest.approx(600)
    assert h1.attributed_j == pytest.approx(500)
