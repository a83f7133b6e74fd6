"""Speed and memory of the embedded tiers on this machine, through GreenRoute's llama.cpp backend.

    .venv/bin/python bench/models.py [tiny small large] [--repeats 5]

Each model is measured in its own process (so resident memory is that model's): prompt
processing speed on a ~300-token prompt, generation speed over 128 tokens (greedy), and the
process's resident memory after loading. Prints medians. Run it on a quiet machine: llama.cpp
takes every core it is given and slows several-fold when anything else runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PROMPT = ("Summarise the following notes in one sentence.\n" +
          "The gateway routes each request to the smallest model that answers it well, "
          "measures the energy of every request and reports it per token. " * 12)


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _measure(name: str, repeats: int) -> dict[str, float]:
    from greenroute.backends import weights
    from greenroute.backends.base import Endpoint
    from greenroute.backends.llamacpp import LlamaCppBackend

    spec = weights.resolve(name)
    backend = LlamaCppBackend(name, weights.ensure(name), spec.name, context=2048)
    await backend.start()
    rss = _rss_mb()
    prompt_rates, gen_rates = [], []
    for i in range(repeats + 1):  # the first round warms up
        messages = [{"role": "user", "content": f"[{i}] {PROMPT}"}]  # no prompt cache reuse
        started = time.perf_counter()
        result = await backend.create(Endpoint.CHAT, {"messages": messages, "max_tokens": 1,
                                                      "temperature": 0})
        prompt_time = time.perf_counter() - started
        stamps = []
        async for batch in backend.stream(Endpoint.CHAT, {
                "messages": [{"role": "user", "content": f"[{i}] Count from 1 to 200."}],
                "max_tokens": 128, "temperature": 0}):
            stamps.extend(time.perf_counter() for chunk in batch if not chunk.usage_only)
        if i == 0:
            continue
        prompt_rates.append(result.usage.prompt_tokens / prompt_time)
        gen_rates.append((len(stamps) - 3) / (stamps[-2] - stamps[1]))  # between 1st and last token
    await backend.aclose()
    return {"prompt_tok_s": statistics.median(prompt_rates),
            "gen_tok_s": statistics.median(gen_rates), "rss_mb": rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=["tiny", "small", "large"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child process: measure one model
    args = parser.parse_args()
    if args.one:
        print(json.dumps(asyncio.run(_measure(args.one, args.repeats))))
        return
    print(f"embedded tiers, {os.cpu_count()} threads, medians of {args.repeats} runs")
    print(f"{'model':8} {'prompt tok/s':>13} {'gen tok/s':>10} {'RSS MB':>8}")
    for name in args.models:
        out = subprocess.run([sys.executable, __file__, "--one", name, "--repeats",
                              str(args.repeats)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name:8} {r['prompt_tok_s']:13.1f} {r['gen_tok_s']:10.1f} {r['rss_mb']:8.0f}")


if __name__ == "__main__":
    main()
