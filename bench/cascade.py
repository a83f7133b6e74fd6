"""What a cascade costs a streaming client: time to first token of `green` (the small tier's
answer is buffered until it is judged) against streaming the small tier directly.

    .venv/bin/python bench/cascade.py [--prompts 20] [--max-tokens 48] [--model green-0.8]
                                      [--router DIR] [--data-dir DIR]

Starts `greenroute serve` on the embedded default (tiers small and large, the shipped router),
sends each prompt as a stream to `small`, then to `green`, and prints medians of the time to the
first content chunk and to the end, split by what `green` did (kept the small answer, escalated
to large, or routed straight to one tier). `--model` picks the target (`green-0.8`): at the
shipped router's default, 0.95, the embedded small tier is too weak to be tried at all.
`--router` serves another artifact for the same tiers (the shipped one routes on the prompt
only; one trained with cascade stages shows what buffering costs). Run it on a quiet machine:
llama.cpp uses every core.
With `--data-dir`, the gateway's ledger stays there for `greenroute report --db DIR/ledger.db`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import httpx
import openai

from greenroute.backends.fake_openai import free_port
from greenroute.evals.prompts import render
from greenroute.evals.tasks import load_task, sample

REPO = Path(__file__).resolve().parent.parent


def _stream(client: openai.OpenAI, model: str, text: str, max_tokens: int
            ) -> tuple[float, float, dict[str, str]]:
    started = time.perf_counter()
    first = None
    with client.chat.completions.with_streaming_response.create(
            model=model, messages=[{"role": "user", "content": text}], max_tokens=max_tokens,
            temperature=0, stream=True) as response:
        headers = dict(response.headers)
        for chunk in response.parse():
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - started
    total = time.perf_counter() - started
    return first if first is not None else total, total, headers


def _forget(client: openai.OpenAI) -> None:
    """Replace each tier's cached prompt (llama.cpp reuses the longest common prefix of the
    previous prompt), so neither of the two measured calls starts with the other's work done."""
    for tier in ("small", "large"):
        client.chat.completions.create(model=tier, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=1, temperature=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--model", default="green", help="green, or green-<target>")
    parser.add_argument("--router", type=Path, help="a `greenroute train` artifact for the "
                                                    "embedded tiers (default: the shipped one)")
    parser.add_argument("--data-dir", type=Path, help="keep the gateway's ledger here")
    args = parser.parse_args()
    items = [(task, render(item).text) for task in ("arc_easy", "boolq", "svamp")
             for item in sample(load_task(task), args.prompts // 3 + 1, 11)][:args.prompts]
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or Path(tmp)
        data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "GREENROUTE_DATA_DIR": str(data_dir)}
        env.pop("GREENROUTE_CONFIG", None)
        command = [str(Path(sys.executable).parent / "greenroute"), "serve", "--port", str(port),
                   "--log-level", "warning"]
        if args.router:
            config = Path(tmp) / "greenroute.toml"
            config.write_text((REPO / "deploy/greenroute.embedded.toml").read_text()
                              + f"\n[router]\npath = {str(args.router.resolve())!r}\n")
            command += ["--config", str(config)]
        server = subprocess.Popen(command,
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}/v1"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(url + "/models", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)
            rows: dict[str, list[tuple[float, float, float, float]]] = defaultdict(list)
            for task, text in items:
                _forget(client)
                small_first, small_total, _ = _stream(client, "small", text, args.max_tokens)
                _forget(client)
                green_first, green_total, headers = _stream(client, args.model, text,
                                                            args.max_tokens)
                tried = headers["x-greenroute-models-tried"]
                what = (f"cascade, kept {tried}" if headers["x-greenroute-route"] == "cascade"
                        and "," not in tried else f"{headers['x-greenroute-route']}: {tried}")
                rows[f"{task}: {what}"].append((small_first, small_total, green_first,
                                                green_total))
        finally:
            server.terminate()
            server.wait()
    print(f"{args.model}: streamed answers, max_tokens {args.max_tokens}, {len(items)} prompts "
          f"(ARC-Easy, BoolQ, SVAMP), {os.cpu_count()} cores; medians in seconds")
    print(f"{'task: what green did':40} {'n':>3} {'small TTFT':>11} {'green TTFT':>11} "
          f"{'small total':>12} {'green total':>12}")
    kept = [v for what, values in rows.items() if "cascade, kept" in what for v in values]
    for what, values in [*sorted(rows.items()), ("every task: cascade, kept", kept)]:
        if not values:
            continue
        med = [statistics.median(v[i] for v in values) for i in range(4)]
        print(f"{what:40} {len(values):>3} {med[0]:11.3f} {med[2]:11.3f} {med[1]:12.3f} "
              f"{med[3]:12.3f}")


if __name__ == "__main__":
    main()
