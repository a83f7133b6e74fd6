"""Attribution on a real GPU: concurrent matmul "requests" of known sizes, metered by NVML
through GreenRoute's own Device and Track (backends/energy/attribution.py).

    pip install -e '.[gpu]' torch
    python bench/gpu_attribution_check.py --gpu 0 --seconds 15

Each request is a thread multiplying n x n fp16 matrices on its own CUDA stream and reporting
one "token" per matmul to its track, as a tier reports tokens; its tier is its size. Phases:

1. solo: each size alone for `--seconds`, so its joules per matmul are known (and the Device,
   which learns each tier's token cost from intervals where only that tier is active, sees
   solo intervals of both);
2. concurrent: `--requests` of each size at once for `--seconds`.

It prints each concurrent request's attributed joules per matmul against its size's solo
figure (scaled so that both sum to the energy attributed in phase 2, because running together
changes the total: the comparison is of shares), their FLOP shares, and the ledger invariant
(attributed + idle + other = the NVML counter's delta). It passes (exit 0) when every request
is within `--tolerance` of its solo share and the invariant holds within 0.1%; exit 1
otherwise; exit 2 when there is no CUDA GPU, torch or NVML. bench/gpu_check.sh runs this after
bench/nvml_check.py, in under 8 minutes.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SIZES = {"small": 4096, "large": 8192}  # tier -> n of its n x n matmuls
BATCH = 8  # matmuls launched between two progress reports (one stream synchronize)
INTERVAL_S = 0.1  # the sampler's period, as the gateway's default [energy] interval_ms


@dataclass
class Result:
    """One concurrent request: its size, the matmuls it did, the joules it was given."""

    tier: str
    matmuls: int
    joules: float


@dataclass
class Row:
    tier: str
    matmuls: int
    joules_per_matmul: float
    expected_per_matmul: float  # its size's solo J/matmul, scaled to the phase's total
    error: float  # relative
    flop_share: float
    energy_share: float


def compare(solo: dict[str, float], results: Sequence[Result]) -> list[Row]:
    """Each request's J/matmul against its size's solo J/matmul, the solo figures scaled so
    that solo-priced work sums to the joules actually attributed."""
    attributed = sum(r.joules for r in results)
    priced = sum(solo[r.tier] * r.matmuls for r in results)
    scale = attributed / priced if priced else 0.0
    flops = {r.tier: 2 * SIZES.get(r.tier, 0) ** 3 for r in results}
    total_flops = sum(flops[r.tier] * r.matmuls for r in results)
    rows = []
    for r in results:
        per = r.joules / r.matmuls if r.matmuls else 0.0
        expected = solo[r.tier] * scale
        rows.append(Row(r.tier, r.matmuls, per, expected,
                        abs(per - expected) / expected if expected else float("inf"),
                        flops[r.tier] * r.matmuls / total_flops if total_flops else 0.0,
                        r.joules / attributed if attributed else 0.0))
    return rows


def conservation_error(measured: float, attributed: float, idle: float, other: float) -> float:
    """|attributed + idle + other - measured| / measured (0 for no energy at all)."""
    if measured == 0:
        return 0.0 if attributed + idle + other == 0 else float("inf")
    return abs(attributed + idle + other - measured) / measured


def require_gpu(gpu: int) -> tuple[Any, Any]:
    """torch and an NvmlMeter for `gpu`, or SystemExit(2) saying what is missing."""
    try:
        import torch
    except ImportError:
        print("gpu_attribution_check: torch is not installed (pip install torch); this check "
              "needs a CUDA GPU", file=sys.stderr)
        raise SystemExit(2) from None
    if not torch.cuda.is_available() or gpu >= torch.cuda.device_count():
        print(f"gpu_attribution_check: no CUDA GPU {gpu} here (torch.cuda.is_available() is "
              f"{torch.cuda.is_available()}); run it on a GPU host", file=sys.stderr)
        raise SystemExit(2)
    from greenroute.backends.energy.meter import MeterError
    from greenroute.backends.energy.nvml import NvmlMeter

    try:
        return torch, NvmlMeter([gpu])
    except MeterError as exc:
        print(f"gpu_attribution_check: NVML: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def run_requests(torch: Any, device: Any, gpu: int, tiers: Sequence[str], seconds: float
                 ) -> list[Result]:
    """One thread per tier in `tiers`, all at once, for `seconds`; each its own track."""
    cuda = torch.device(f"cuda:{gpu}")
    matrices = {t: torch.randn(SIZES[t], SIZES[t], device=cuda, dtype=torch.float16)
                for t in set(tiers)}
    torch.cuda.synchronize(cuda)
    start = threading.Barrier(len(tiers))
    counts = [0] * len(tiers)
    tracks = [device.track(f"{tier}-{i}", tier=tier) for i, tier in enumerate(tiers)]

    def work(index: int) -> None:
        tier, track = tiers[index], tracks[index]
        stream = torch.cuda.Stream(cuda)
        a = matrices[tier]
        out = torch.empty_like(a)
        start.wait()
        track.begin()
        deadline = time.monotonic() + seconds
        with torch.cuda.stream(stream):
            while time.monotonic() < deadline:
                for _ in range(BATCH):
                    torch.matmul(a, a, out=out)
                stream.synchronize()
                counts[index] += BATCH
                track.tokens(BATCH)
        track.end()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(tiers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    deadline = time.monotonic() + 10
    while not all(t.final for t in tracks) and time.monotonic() < deadline:
        time.sleep(INTERVAL_S)  # the sampler settles the last intervals
    return [Result(tiers[i], counts[i], tracks[i].joules) for i in range(len(tiers))]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=15.0, help="per phase (default 15)")
    parser.add_argument("--requests", type=int, default=2, help="concurrent requests of each "
                        "size (default 2)")
    parser.add_argument("--tolerance", type=float, default=0.15,
                        help="largest relative error of a request's share (default 0.15)")
    args = parser.parse_args(argv)
    torch, meter = require_gpu(args.gpu)

    from greenroute.backends.energy.attribution import Device
    from greenroute.backends.energy.sampler import Sampler

    device = Device(meter, period_s=3600)
    sampler = Sampler(device, INTERVAL_S)
    sampler.start()
    print(f"GPU {args.gpu}: {torch.cuda.get_device_name(args.gpu)}; NVML counter-less GPUs "
          f"integrated: {meter.integrating or 'none'}")
    solo = {}
    for tier in SIZES:
        (result,) = run_requests(torch, device, args.gpu, [tier], args.seconds)
        solo[tier] = result.joules / result.matmuls
        print(f"solo {tier:5} (n={SIZES[tier]}): {result.matmuls} matmuls, "
              f"{result.joules:,.1f} J, {solo[tier]:.4f} J/matmul")
    before = (device.measured_j, device.attributed_j, device.idle_j, device.other_j)
    tiers = [t for t in SIZES for _ in range(args.requests)]
    results = run_requests(torch, device, args.gpu, tiers, args.seconds)
    sampler.stop()
    measured, attributed, idle, other = (after - b for after, b in zip(
        (device.measured_j, device.attributed_j, device.idle_j, device.other_j), before,
        strict=True))
    rows = compare(solo, results)
    print(f"concurrent: {len(results)} requests for {args.seconds:g} s; NVML measured "
          f"{measured:,.1f} J, attributed {attributed:,.1f} J, idle {idle:,.1f} J, other "
          f"{other:,.1f} J")
    print(f"{'request':8} {'matmuls':>8} {'J/matmul':>10} {'solo-based':>10} {'error':>7} "
          f"{'FLOP share':>10} {'J share':>8}")
    for row in rows:
        print(f"{row.tier:8} {row.matmuls:8d} {row.joules_per_matmul:10.4f} "
              f"{row.expected_per_matmul:10.4f} {row.error:7.1%} {row.flop_share:10.1%} "
              f"{row.energy_share:8.1%}")
    drift = conservation_error(measured, attributed, idle, other)
    worst = max(row.error for row in rows)
    print(f"invariant: |attributed + idle + other - measured| / measured = {drift:.2e}; "
          f"worst share error {worst:.1%} (tolerance {args.tolerance:.0%})")
    ok = drift <= 1e-3 and worst <= args.tolerance
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
