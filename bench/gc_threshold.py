"""The garbage collector's cost per request at several `[server] gc_threshold` settings.

    .venv/bin/python bench/gc_threshold.py [--requests 4000] [--concurrency 64] \
        [--thresholds 700,2000,5000,10000,50000]

Starts the fake OpenAI upstream and one `greenroute serve` per threshold in front of it, each
in a process that also times every collection (`gc.callbacks`) and writes the totals to a file
twice a second. Then sends the same pass-through requests to every gateway in one loop
(bench/overhead.py's, each round in another order), non-streamed and streamed, and prints per
gateway: the collections of each generation, the collector's time and all threads' CPU time
per request, the added p50, and the resident memory after the run (docs/gateway.md, *The
garbage collector while serving*).
"""

from __future__ import annotations

import argparse
import ast
import gc
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from overhead import _cpu_s, _run, _run_loop, _start, _wait_until_up, gateway_config

from greenroute.backends.fake_openai import free_port

GC_STATS_ENV = "GREENROUTE_BENCH_GC_STATS"


def _serve_with_gc_stats(path: str) -> None:
    """`greenroute serve ...` (the rest of argv) in this process, timing every collection."""
    totals = {generation: [0, 0.0] for generation in range(3)}
    started = [0.0]

    def timed(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            total = totals[info["generation"]]
            total[0] += 1
            total[1] += time.perf_counter() - started[0]

    def dump() -> None:
        while True:
            time.sleep(0.5)
            Path(path + ".tmp").write_text(repr({g: tuple(t) for g, t in totals.items()}))
            os.replace(path + ".tmp", path)

    gc.callbacks.append(timed)
    threading.Thread(target=dump, daemon=True).start()
    from greenroute.gateway.cli import main
    sys.exit(main())


def _gc_stats(path: Path) -> dict[int, tuple[int, float]]:
    stats: dict[int, tuple[int, float]] = ast.literal_eval(path.read_text())
    return stats


def _resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1000
    return float("nan")


def main() -> None:
    if os.environ.get(GC_STATS_ENV):
        _serve_with_gc_stats(os.environ[GC_STATS_ENV])
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=4000, help="per gateway and mode")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--thresholds", default="700,2000,5000,10000,50000")
    args = parser.parse_args()
    thresholds = [int(t) for t in args.thresholds.split(",")]
    upstream_port = free_port()
    upstream_url = f"http://127.0.0.1:{upstream_port}/v1"
    with tempfile.TemporaryDirectory() as tmp:
        upstream = _start([sys.executable, "-m", "greenroute.backends.fake_openai", "--port",
                           str(upstream_port)], upstream_url + "/models")
        gateways: dict[str, tuple[subprocess.Popen[bytes], int, Path]] = {}
        try:
            for threshold in thresholds:
                port, stats = free_port(), Path(tmp) / f"{threshold}.gc"
                config = gateway_config(Path(tmp) / str(threshold), port, upstream_url,
                                        gc_threshold=threshold)
                process = subprocess.Popen(
                    [sys.executable, __file__, "serve", "--config", str(config)],
                    env={**os.environ, GC_STATS_ENV: str(stats)},
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                gateways[f"gc={threshold}"] = (process, port, stats)
                _wait_until_up(f"http://127.0.0.1:{port}/v1/models")
            print(f"{args.requests} requests per gateway and mode, {args.concurrency} concurrent")
            print(f"{'gateway':>10} | {'stream':>6} | {'collections':>14} | {'GC/req':>8} | "
                  f"{'CPU/req':>8} | {'added p50':>9} | {'resident':>8}")
            for stream in (False, True):
                urls = {"direct": upstream_url + "/chat/completions",
                        **{name: f"http://127.0.0.1:{port}/v1/chat/completions"
                           for name, (_, port, _) in gateways.items()}}
                _run_loop(_run(urls, 500, args.concurrency, stream))  # warm up
                time.sleep(1.0)  # the stats files are written twice a second
                before = {name: (_cpu_s(p.pid), _gc_stats(s))
                          for name, (p, _, s) in gateways.items()}
                rows = _run_loop(_run(urls, args.requests, args.concurrency, stream))
                time.sleep(1.0)
                done = args.requests // args.concurrency * args.concurrency
                added = {row["gateway"]: row["added_p50_ms"] for row in rows}
                for name, (process, _, stats) in gateways.items():
                    cpu0, gc0 = before[name]
                    gc1 = _gc_stats(stats)
                    counts = " / ".join(str(gc1[g][0] - gc0[g][0]) for g in range(3))
                    gc_s = sum(gc1[g][1] - gc0[g][1] for g in range(3))
                    print(f"{name:>10} | {'yes' if stream else 'no':>6} | {counts:>14} | "
                          f"{gc_s / done * 1e6:>5.0f} us | "
                          f"{(_cpu_s(process.pid) - cpu0) / done * 1e6:>5.0f} us | "
                          f"{added[name]:>6.2f} ms | {_resident_mb(process.pid):>5.1f} MB")
        finally:
            for process, _, _ in gateways.values():
                process.terminate()
                process.wait()
            upstream.terminate()
            upstream.wait()


if __name__ == "__main__":
    main()
