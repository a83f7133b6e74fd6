"""Routing-decision latency for model `green`, per encoder: one short prompt at a time (p50,
p99) and many at once (decisions per second), through the same RouterService the gateway uses.

    .venv/bin/python bench/routing.py [--outcomes PATH] [--encoders static,minilm] [--kind K]

For each encoder it trains a router of `--kind` on the outcome table (embeddings cached), saves
and loads it as an artifact, then times `RouterService.decide`: encode the routing text, score
it, plan the tiers. A decision is what `green` adds before the first tier is called.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

from greenroute.evals.encoding import build_encoder, embedder
from greenroute.evals.outcomes import load_table, table_models
from greenroute.evals.training import TrainConfig, fit_policy, tier_data
from greenroute.routers import artifact
from greenroute.routers.service import RouterService

REPO = Path(__file__).resolve().parent.parent

PROMPTS = [
    "What is the capital of Australia?",
    "Write a haiku about autumn leaves.",
    "A train travels 60 km in 45 minutes. What is its average speed in km/h?",
    "Explain the difference between TCP and UDP in two sentences.",
    "Is a tomato a fruit or a vegetable?",
    "Translate 'good morning' into French.",
    "Which planet has the most moons?",
    "Summarize the plot of Romeo and Juliet in one line.",
]


async def _sequential(service: RouterService, rounds: int) -> list[float]:
    times = []
    for i in range(rounds):
        started = time.perf_counter()
        await service.decide(PROMPTS[i % len(PROMPTS)], 0.95)
        times.append(time.perf_counter() - started)
    return times


async def _concurrent(service: RouterService, total: int, concurrency: int) -> float:
    queue = list(range(total))

    async def worker() -> None:
        while queue:
            i = queue.pop()
            await service.decide(PROMPTS[i % len(PROMPTS)], 0.95)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outcomes", default=str(REPO / "evals/outcomes/embedded.jsonl"))
    parser.add_argument("--encoders", default="static,minilm")
    parser.add_argument("--kind", default="logistic")
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rank-by-score", action="store_true",
                        help="train prompt-only steps to rank by score, not by saving priority")
    args = parser.parse_args()

    tiers = table_models(args.outcomes)
    tiers = ["small", "large"] if {"small", "large"} <= set(tiers) else tiers[:2]
    table = load_table(args.outcomes, tiers)
    print(f"routing decisions, {args.kind} router on {len(table)} prompts of {args.outcomes}, "
          f"{os.cpu_count()} cores; short prompts ({min(map(len, PROMPTS))}-"
          f"{max(map(len, PROMPTS))} characters)")
    print(f"{'encoder':48} {'p50':>9} {'p99':>9} {'decisions/s':>12} {'at conc.':>9}")
    for choice in args.encoders.split(","):
        encoder = build_encoder(choice)
        x = embedder(encoder)(table.prompts)
        policy, _ = fit_policy(x, table.prompts, tier_data(table, tiers),
                               TrainConfig(kind=args.kind, rank_by_saving=not args.rank_by_score))
        with tempfile.TemporaryDirectory() as tmp:
            service = RouterService(artifact.load(artifact.save(Path(tmp) / "router", policy,
                                                                encoder, {"kind": args.kind})))
            rounds = args.rounds if service.inline else max(200, args.rounds // 10)
            asyncio.run(_sequential(service, 50))  # warm up
            times = sorted(asyncio.run(_sequential(service, rounds)))
            rate = asyncio.run(_concurrent(service, rounds, args.concurrency))
            service.close()
        p50 = statistics.median(times) * 1000
        p99 = times[int(len(times) * 0.99) - 1] * 1000
        print(f"{encoder.name:48} {p50:7.3f}ms {p99:7.3f}ms {rate:12,.0f} "
              f"{args.concurrency:>9}")


if __name__ == "__main__":
    main()
