"""Latency the gateway adds to a pass-through request, over calling the upstream directly.

    .venv/bin/python bench/overhead.py [--requests 2000] [--concurrency 64] [--spool on|off]
    .venv/bin/python bench/overhead.py --spool-cost-only
    .venv/bin/python bench/overhead.py --upstream-port 18100 --baseline-url http://127.0.0.1:18102/v1
    .venv/bin/python bench/overhead.py --upstream-port 18100 \
        --baseline-url before=http://127.0.0.1:18102/v1 --baseline-url after=http://127.0.0.1:18103/v1

The client is aiohttp on uvloop (lighter than httpx, so it takes less CPU from the
processes it measures). Starts a local OpenAI-protocol upstream that answers at once
(`greenroute.backends.fake_openai`, its own process) and a gateway in front of it (`greenroute
serve`, its own process), then sends the same chat request both ways, alternating (each round
in another order) so that drift and queueing hit every path alike: sequentially, and from
`--concurrency` workers at once; non-streamed and streamed (time to the end of the stream).
Prints p50/p99 of each path, the p50/p99 the gateway adds (to the end of the body), the p50 it
adds to the first byte of the body (TTFB: a streamed answer's first chunk), and requests per
second.

`--baseline-url` compares with another gateway (another version, started by hand in front of
the same upstream: `--upstream-port` fixes the upstream's port; the bench waits up to a minute
for it, so it can be started once the upstream answers, before a version with health checks
takes the upstream for down): its requests are interleaved
with the others in the same loop, so every path sees the same conditions, and it gets its own
rows ("baseline", or NAME with `NAME=URL`; repeat the option for several versions).
`--gc-threshold N` starts this version a second time with `[server] gc_threshold = N`
(gateway/collector.py; 700 is CPython's default) and measures it in the same loop, as `gc=N`.
`--baseline-pid NAME=PID` names that gateway's process, so that its CPU time per request (every
thread's, read from /proc before and after each mode) is printed beside this version's.

Then the ledger spool's own cost per request (gateway/ledger/spool.py), measured in-process,
because microseconds disappear in the end-to-end figures' noise: what the request path does
with `[ledger] spool = true` and not with it (build the request's rows, encode them as one
JSON line, one write() on an O_APPEND file), and what the writer thread adds (the per-batch
bookkeeping and truncation once the rows are in the database).

All three processes (client, gateway, upstream) share this machine's cores: run it on a quiet
machine, and read the concurrent figures as "what 2 cores do", not as the gateway alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx

from greenroute.backends.base import Usage
from greenroute.backends.energy.sampler import Fleet
from greenroute.backends.fake_openai import free_port
from greenroute.evals.load import thread_cpu_s
from greenroute.gateway.accounting import Accounting
from greenroute.gateway.ledger.writer import LedgerWriter

REPO = Path(__file__).resolve().parent.parent

BODY = {"model": "echo", "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
        "max_tokens": 16, "temperature": 0}
PLAIN_BODY = json.dumps(BODY).encode()
STREAM_BODY = json.dumps({**BODY, "stream": True}).encode()
JSON = {"content-type": "application/json"}


def _wait_until_up(url: str, timeout_s: float = 60.0) -> None:
    """Wait until `url` answers 200 (a gateway or upstream starting; a baseline started by hand)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


def gateway_config(stem: Path, port: int, upstream_url: str, *, spool: bool = True,
                   gc_threshold: int | None = None) -> Path:
    """A pass-through gateway's config (`stem`.toml, its ledger `stem`.db) in front of the
    fake upstream."""
    config = stem.with_suffix(".toml")
    config.write_text(
        f'[server]\nport = {port}\nlog_level = "warning"\n'
        + (f"gc_threshold = {gc_threshold}\n" if gc_threshold is not None else "")
        + f'\n[ledger]\npath = "{stem.with_suffix(".db")}"\n'
        f'spool = {"true" if spool else "false"}\n\n'
        f'[[tiers]]\nname = "echo"\nbackend = "openai"\nurl = "{upstream_url}"\n'
        'model = "echo"\n')
    return config


def _start(args: list[str], ready_url: str) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        _wait_until_up(ready_url, timeout_s=30)
    except RuntimeError:
        process.kill()
        raise RuntimeError(f"{args[0]} did not start") from None
    return process


async def _one(client: aiohttp.ClientSession, url: str, stream: bool) -> tuple[float, float]:
    """Seconds to the first byte of the body and to its end."""
    body = STREAM_BODY if stream else PLAIN_BODY
    started = time.perf_counter()
    first = None
    async with client.post(url, data=body, headers=JSON) as response:
        async for _ in response.content.iter_any():  # to the end of the body or stream
            if first is None:
                first = time.perf_counter() - started
    if response.status != 200:
        raise RuntimeError(f"{url}: HTTP {response.status}")
    ended = time.perf_counter() - started
    return (ended if first is None else first), ended


def _cpu_s(pid: int) -> float:
    """CPU seconds every thread of process `pid` has used (Linux /proc)."""
    return sum(thread_cpu_s(pid).values())


async def _run(urls: dict[str, str], requests: int, concurrency: int,
               stream: bool, pids: dict[str, int] | None = None) -> list[dict[str, float]]:
    """One row per gateway in `urls` ("gateway", and "baseline" if given) against "direct";
    with the CPU time per request of each gateway whose process is in `pids`."""
    times: dict[str, list[float]] = {path: [] for path in urls}
    firsts: dict[str, list[float]] = {path: [] for path in urls}
    connector = aiohttp.TCPConnector(limit=concurrency * len(urls))
    async with aiohttp.ClientSession(connector=connector) as client:
        for url in urls.values():  # warm up connections and code paths
            await asyncio.gather(*(_one(client, url, stream) for _ in range(concurrency)))
        per_worker = requests // concurrency

        paths = list(urls)

        async def worker(index: int) -> None:
            # Each round starts one path later, and each worker at another path: a path's
            # place in the round changes what it queues behind (two identical gateways
            # measured 85 us apart sequentially, 4 ms at 64 concurrent, in fixed order).
            for round_ in range(per_worker):
                start = (index + round_) % len(paths)
                for path in paths[start:] + paths[:start]:
                    first, ended = await _one(client, urls[path], stream)
                    firsts[path].append(first)
                    times[path].append(ended)

        cpu_before = {path: _cpu_s(pid) for path, pid in (pids or {}).items()}
        started = time.perf_counter()
        await asyncio.gather(*(worker(index) for index in range(concurrency)))
        elapsed = time.perf_counter() - started
        cpu_used = {path: _cpu_s(pid) - cpu_before[path] for path, pid in (pids or {}).items()}
    quantiles: dict[str, tuple[float, float]] = {}
    for path, values in times.items():
        values.sort()
        quantiles[path] = (statistics.median(values) * 1000,
                           values[int(len(values) * 0.99) - 1] * 1000)
    first_p50 = {path: statistics.median(values) * 1000 for path, values in firsts.items()}
    rows = []
    direct_p50, direct_p99 = quantiles["direct"]
    for path in urls:
        if path == "direct":
            continue
        p50, p99 = quantiles[path]
        # Every path ran in the same window; each got about an equal part of it.
        rows.append({"gateway": path, "direct_p50_ms": direct_p50, "gateway_p50_ms": p50,
                     "added_p50_ms": p50 - direct_p50, "direct_p99_ms": direct_p99,
                     "added_first_byte_p50_ms": first_p50[path] - first_p50["direct"],
                     "gateway_p99_ms": p99, "added_p99_ms": p99 - direct_p99,
                     "gateway_rps": len(times[path]) / (elapsed / len(urls)),
                     "cpu_us_per_request": cpu_used[path] / len(times[path]) * 1e6
                     if path in cpu_used else float("nan")})
    return rows


class _Model:
    """Enough of a backend for a RequestRecord's attempt."""

    model_id = "echo"
    reports_progress = False


def spool_cost(requests: int) -> dict[str, float]:
    """Per-request microseconds of the spool: on the request path (rows, encode, write) and in
    the writer thread (marking a batch of 500 durable)."""
    with tempfile.TemporaryDirectory() as tmp:
        writer = LedgerWriter(f"sqlite:///{tmp}/ledger.db", spool=True)
        accounting = Accounting(Fleet([]), writer, store_text=False)
        records = []
        for i in range(requests):
            record = accounting.open(f"chatcmpl-{i:032x}", "chat/completions")
            record.requested_model, record.route, record.status = "echo", "direct", 200
            attempt = record.attempt("echo", _Model())  # type: ignore[arg-type]
            attempt.usage, attempt.answered = Usage(12, 16), True
            records.append(record)
        times = []
        for record in records:
            started = time.perf_counter()
            accounting.spool(record, record.rows())  # what RequestRecord._finish does first
            times.append(time.perf_counter() - started)
        assert writer.spool is not None
        ids = [record.id for record in records]
        started = time.perf_counter()
        for at in range(0, len(ids), 500):
            writer.spool.durable(ids[at:at + 500])
        durable = time.perf_counter() - started
        writer.spool.close()
    times.sort()
    return {"p50_us": statistics.median(times) * 1e6,
            "p99_us": times[int(len(times) * 0.99) - 1] * 1e6,
            "mean_us": statistics.fmean(times) * 1e6,
            "writer_us": durable / requests * 1e6}


def _run_loop(coroutine):  # type: ignore[no-untyped-def]
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="per path and mode")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--spool", choices=("on", "off"), default="on",
                        help="the gateway's [ledger] spool (default on, as in the product)")
    parser.add_argument("--spool-cost-only", action="store_true",
                        help="only the in-process spool cost, no gateway")
    parser.add_argument("--upstream-port", type=int,
                        help="the fake upstream's port (default: a free one)")
    parser.add_argument("--baseline-url", metavar="[NAME=]URL", action="append", default=[],
                        help="another gateway's /v1 (e.g. a previous version in front of the "
                             "same upstream), measured in the same loop; repeatable")
    parser.add_argument("--gc-threshold", metavar="N", type=int, action="append", default=[],
                        help="also run this version with [server] gc_threshold = N (700 is "
                             "CPython's default), as a gateway named gc=N; repeatable")
    parser.add_argument("--baseline-pid", metavar="NAME=PID", action="append", default=[],
                        help="the process of the --baseline-url of that NAME, for its CPU time")
    args = parser.parse_args()
    spool = spool_cost(max(args.requests, 20_000))
    spool_line = (f"ledger spool, per request ({max(args.requests, 20_000)} requests, "
                  f"in-process): request path p50 {spool['p50_us']:.1f} us, "
                  f"p99 {spool['p99_us']:.1f} us, mean {spool['mean_us']:.1f} us; "
                  f"writer thread {spool['writer_us']:.2f} us")
    if args.spool_cost_only:
        print(spool_line)
        return

    upstream_port = args.upstream_port or free_port()
    upstream_url = f"http://127.0.0.1:{upstream_port}/v1"
    greenroute = str(Path(sys.executable).parent / "greenroute")
    gateways: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        upstream = _start([sys.executable, "-m", "greenroute.backends.fake_openai", "--port",
                           str(upstream_port)], upstream_url + "/models")
        # This version as configured, then the same version with other collector thresholds.
        variants = {"gateway": None, **{f"gc={n}": n for n in args.gc_threshold}}
        for name, threshold in variants.items():
            port = free_port()
            config = gateway_config(Path(tmp) / str(len(gateways)), port, upstream_url,
                                    spool=args.spool == "on", gc_threshold=threshold)
            gateways[name] = (_start([greenroute, "serve", "--config", str(config)],
                                     f"http://127.0.0.1:{port}/v1/models"), port)
        baselines = {}
        for baseline in args.baseline_url:
            name, named, url = baseline.partition("=")
            if not named or "://" in name:
                name, url = "baseline", baseline
            baselines[name] = url.rstrip("/")
            _wait_until_up(url.rstrip("/") + "/models")  # one started once the upstream was up
        pids = {name: process.pid for name, (process, _) in gateways.items()}
        for named in args.baseline_pid:
            name, _, pid = named.partition("=")
            pids[name] = int(pid)
        try:
            rows = []
            for concurrency in (1, args.concurrency):
                for stream in (False, True):
                    urls = {"direct": upstream_url + "/chat/completions"}
                    for name, (_, port) in gateways.items():
                        urls[name] = f"http://127.0.0.1:{port}/v1/chat/completions"
                    for name, url in baselines.items():
                        urls[name] = url + "/chat/completions"
                    for result in _run_loop(_run(urls, args.requests, concurrency, stream,
                                                       pids)):
                        rows.append({"concurrency": concurrency, "stream": stream, **result})
        finally:
            for process in [process for process, _ in gateways.values()] + [upstream]:
                process.terminate()
                process.wait()

    print(f"gateway overhead, {args.requests} requests per path and mode, "
          f"{os.cpu_count()} cores, Python {sys.version.split()[0]}, spool {args.spool}")
    header = ("gateway", "conc", "stream", "direct p50", "gw p50", "added p50", "direct p99",
              "gw p99", "added p99", "added TTFB", "gw req/s", "CPU/req")
    print(" | ".join(f"{h:>10}" for h in header))
    for r in rows:
        cells = (r["gateway"], r["concurrency"], "yes" if r["stream"] else "no",
                 *(f"{r[k]:.3f} ms" for k in ("direct_p50_ms", "gateway_p50_ms", "added_p50_ms",
                                              "direct_p99_ms", "gateway_p99_ms", "added_p99_ms",
                                              "added_first_byte_p50_ms")),
                 f"{r['gateway_rps']:.0f}", f"{r['cpu_us_per_request']:.0f} us")
        print(" | ".join(f"{c:>10}" for c in cells))
    print(spool_line)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "spool": spool}, indent=2))


if __name__ == "__main__":
    main()
