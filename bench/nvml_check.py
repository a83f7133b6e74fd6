"""Check the NVML meter against nvidia-smi on a real GPU, under a PyTorch load.

    pip install -e '.[gpu]' torch
    python bench/nvml_check.py --gpu 0 --seconds 30

Runs a matmul loop on the GPU for `--seconds`, reading GreenRoute's NvmlMeter before and after,
while a thread polls `nvidia-smi --query-gpu=power.draw` every 100 ms and integrates it. Prints
both energies and their ratio; they should agree within a few percent (nvidia-smi's power.draw
is an average over a short window, the counter is exact). Not run in CI: it needs a GPU.
This script has not been run yet: no GPU was available in the session that wrote it.
"""

from __future__ import annotations

import argparse
import subprocess
import threading
import time

from greenroute.backends.energy.nvml import NvmlMeter


def smi_power_w(gpu: int) -> float:
    out = subprocess.run(["nvidia-smi", f"--id={gpu}", "--query-gpu=power.draw",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True,
                         check=True).stdout
    return float(out.strip().splitlines()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()

    import torch

    meter = NvmlMeter([args.gpu])
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
    print(f"ratio: {nvml_joules / smi_joules:.3f}")


if __name__ == "__main__":
    main()
