"""Check the NVML meter against nvidia-smi on a real GPU, under a PyTorch load.

    pip install -e '.[gpu]' torch
    python bench/nvml_check.py --gpu 0 --seconds 30

Runs a matmul loop on the GPU for `--seconds`, reading GreenRoute's NvmlMeter before and after,
while a thread polls `nvidia-smi --query-gpu=power.draw` every 100 ms and integrates it. Prints
both energies and their ratio; they should agree within a few percent (nvidia-smi's power.draw
is an average over a short window, the counter is exact). Not run in CI: it needs a GPU; without
one (or without torch, NVML or nvidia-smi) it says which is missing and exits with status 2.
bench/gpu_check.sh runs it with bench/gpu_attribution_check.py.
This script has not been run yet: no GPU was available in the session that wrote it.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
import time
from typing import Any, NoReturn

from greenroute.backends.energy.meter import MeterError
from greenroute.backends.energy.nvml import NvmlMeter


def require_gpu(gpu: int) -> tuple[Any, NvmlMeter]:
    """torch and an NvmlMeter for `gpu`, or SystemExit(2) saying what is missing."""
    try:
        import torch
    except ImportError:
        _missing("torch is not installed (pip install torch)")
    if not torch.cuda.is_available() or gpu >= torch.cuda.device_count():
        _missing(f"no CUDA GPU {gpu} here (torch.cuda.is_available() is "
                 f"{torch.cuda.is_available()})")
    if shutil.which("nvidia-smi") is None:
        _missing("nvidia-smi is not on PATH")
    try:
        return torch, NvmlMeter([gpu])
    except MeterError as exc:
        _missing(f"NVML: {exc}")


def _missing(what: str) -> NoReturn:
    print(f"nvml_check: {what}; this check needs a CUDA GPU host", file=sys.stderr)
    raise SystemExit(2)


def smi_power_w(gpu: int) -> float:
    out = subprocess.run(["nvidia-smi", f"--id={gpu}", "--query-gpu=power.draw",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True,
                         check=True).stdout
    return float(out.strip().splitlines()[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--tolerance", type=float, default=0.10,
                        help="largest |ratio - 1| that passes (default 0.10)")
    args = parser.parse_args()
    torch, meter = require_gpu(args.gpu)
    device = torch.device(f"cuda:{args.gpu}")
    a = torch.randn(8192, 8192, device=device, dtype=torch.float16)
    stop = threading.Event()
    smi_joules = 0.0

    def poll() -> None:
        nonlocal smi_joules
        last_t, last_p = time.monotonic(), smi_power_w(args.gpu)
        while not stop.is_set():
            time.sleep(0.1)
            t, p = time.monotonic(), smi_power_w(args.gpu)
            smi_joules += (p + last_p) / 2 * (t - last_t)
            last_t, last_p = t, p

    poller = threading.Thread(target=poll)
    start_j, start_t = meter.read_joules(), time.monotonic()
    poller.start()
    while time.monotonic() - start_t < args.seconds:
        for _ in range(20):
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize(device)
    stop.set()
    poller.join()
    nvml_joules, elapsed = meter.read_joules() - start_j, time.monotonic() - start_t
    print(f"GPU {args.gpu}, {elapsed:.1f} s of fp16 matmul; counter-less GPUs integrated: "
          f"{meter.integrating or 'none'}")
    print(f"NvmlMeter (nvmlDeviceGetTotalEnergyConsumption): {nvml_joules:,.1f} J "
          f"({nvml_joules / elapsed:.1f} W mean)")
    print(f"nvidia-smi power.draw integrated at 10 Hz:        {smi_joules:,.1f} J "
          f"({smi_joules / elapsed:.1f} W mean)")
    ratio = nvml_joules / smi_joules if smi_joules else float("inf")
    ok = abs(ratio - 1) <= args.tolerance
    print(f"ratio: {ratio:.3f} ({'PASS' if ok else 'FAIL'}: tolerance {args.tolerance:.0%})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
