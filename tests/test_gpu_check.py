"""The GPU checks (bench/gpu_check.sh) on a machine without a GPU: their arithmetic, and that
they stop with status 2 and say what is missing instead of failing somewhere inside."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent


def _bench(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_shares_are_compared_with_solo_costs_scaled_to_the_total() -> None:
    check = _bench("gpu_attribution_check")
    solo = {"small": 0.1, "large": 0.8}
    # concurrent: everything 10% dearer than solo, split in solo proportion: no error
    fair = [check.Result("small", 100, 11.0), check.Result("large", 50, 44.0)]
    rows = check.compare(solo, fair)
    assert [round(r.error, 9) for r in rows] == [0.0, 0.0]
    assert rows[0].expected_per_matmul == pytest.approx(0.11)
    assert sum(r.energy_share for r in rows) == pytest.approx(1.0)
    assert rows[1].flop_share == pytest.approx(50 * 8 / (100 + 50 * 8))  # 8192^3 / 4096^3
    # split by matmul count alone (what token-count attribution does): large is undercharged
    by_count = [check.Result("small", 100, 55.0 * 100 / 150),
                check.Result("large", 50, 55.0 * 50 / 150)]
    errors = [r.error for r in check.compare(solo, by_count)]
    assert errors[1] > 0.5 and errors[0] > 2


def test_conservation_error() -> None:
    check = _bench("gpu_attribution_check")
    assert check.conservation_error(100.0, 70.0, 20.0, 10.0) == 0.0
    assert check.conservation_error(100.0, 70.0, 20.0, 0.0) == pytest.approx(0.1)
    assert check.conservation_error(0.0, 0.0, 0.0, 0.0) == 0.0


def test_the_counter_period_is_read_from_the_changes_alone() -> None:
    probe = _bench("nvml_counter_period")
    # a counter read every 10 ms that steps by 50 J every 100 ms: 500 W
    changes = [(1.0 + 0.1 * k, 1_000_000 + 50_000 * k) for k in range(11)]
    line = probe.summary(probe.Phase("load", reads=100, seconds=1.0, changes=changes))
    assert "10 changes" in line and "median 100.0 ms" in line
    assert "median step 50,000 mJ" in line and "500.0 W" in line
    few = probe.summary(probe.Phase("idle", reads=5, seconds=1.0, changes=changes[:2]))
    assert "too few to time" in few


@pytest.fixture
def no_gpu() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: run bench/gpu_check.sh instead")


@pytest.mark.usefixtures("no_gpu")
@pytest.mark.parametrize("command", [
    [sys.executable, "bench/nvml_counter_period.py", "--seconds", "1"],
    [sys.executable, "bench/nvml_check.py", "--seconds", "1"],
    [sys.executable, "bench/gpu_attribution_check.py", "--seconds", "1"],
    ["bash", "bench/gpu_check.sh"],
])
def test_without_a_gpu_the_checks_say_so_and_exit_2(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO,
                            env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2, result.stderr
    assert "no CUDA GPU 0 here" in result.stderr
    assert "Traceback" not in result.stderr
