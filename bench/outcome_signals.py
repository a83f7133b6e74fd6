"""What an outcome table says beyond `greenroute outcomes summary`: per tier, the time, tokens
and joules it took; on multiple-choice tasks, which letters each tier answered; and how well the
answer's logprob features tell the tier's right answers from its wrong ones (ROC AUC, 0.5 is
chance) — the signal a cascade lives on.

    .venv/bin/python bench/outcome_signals.py [--outcomes PATH] [--models small,large]
    .venv/bin/python bench/outcome_signals.py --probe 40      # also re-ask the small model

`--probe N` runs the embedded small model over N ARC-Easy questions with the collection prompt
and with a reworded one (the letter asked for after the options), to tell a prompt artefact
from the model's own bias. It generates: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
from collections import Counter
from pathlib import Path

import numpy as np

from greenroute.evals.outcomes import read_rows
from greenroute.evals.signals import auc

REPO = Path(__file__).resolve().parent.parent


def totals(rows: list[dict], models: list[str]) -> None:
    print("tier     hours  prompt tok  output tok  joules   J/output tok  source")
    for m in models:
        results = [r["models"][m] for r in rows]
        joules = sum(x.get("joules") or 0.0 for x in results)
        output = sum(x["completion_tokens"] for x in results)
        sources = ",".join(sorted({str(x.get("energy_source")) for x in results}))
        print(f"{m:8} {sum(x['latency_s'] for x in results) / 3600:5.2f} "
              f"{sum(x['prompt_tokens'] for x in results):11,} {output:11,} {joules:7,.0f} "
              f"{joules / output:14.3f}  {sources}")


def letters(rows: list[dict], models: list[str]) -> None:
    print("\nanswers on multiple choice (most common first; gold for comparison)")
    for task in sorted({r["task"] for r in rows if r["kind"] == "choice"}):
        chosen = [r for r in rows if r["task"] == task]
        gold = Counter(r["gold"][0] for r in chosen).most_common()
        print(f"{task} ({len(chosen)}): gold {gold}")
        for m in models:
            print(f"  {m:6} {Counter(r['models'][m]['answer'] for r in chosen).most_common(5)}")


def signals(rows: list[dict], model: str) -> None:
    print(f"\nROC AUC of {model}'s logprob features for its own right answers (entropies negated)")
    names = ("lp_first", "lp_mean", "lp_min", "entropy_first")
    print(f"{'task':16}" + "".join(f"{n:>15}" for n in names))
    for task in [*sorted({r["task"] for r in rows}), "all"]:
        chosen = [r["models"][model] for r in rows if task in ("all", r["task"])]
        right = np.array([x["quality"] >= 1.0 for x in chosen])
        cells = []
        for name in names:
            sign = -1.0 if name.startswith("entropy") else 1.0
            value = auc(sign * np.array([x["features"][name] for x in chosen]), right)
            cells.append("n/a" if value is None else f"{value:.2f}")
        print(f"{task:16}" + "".join(f"{c:>15}" for c in cells))


REWORDED = "Question: {question}\n{options}\n\nWhich option is correct? Reply with its letter only."


async def probe(count: int) -> None:
    import orjson

    from greenroute.backends.base import Endpoint
    from greenroute.backends.registry import build_backend, prepare_tiers
    from greenroute.evals.graders import grade
    from greenroute.evals.prompts import render
    from greenroute.evals.tasks import LETTERS, load_task, sample
    from greenroute.gateway.config import load_config

    tier = next(t for t in load_config(None).tiers if t.name == "small")
    prepare_tiers([tier])
    backend = build_backend(tier)
    await backend.start()
    items = sample(load_task("arc_easy"), count, 0)
    print(f"\nprobe: small over {len(items)} ARC-Easy questions, two prompts")
    try:
        for name, text_of in (
                ("collection prompt", lambda item: render(item).text),
                ("reworded", lambda item: REWORDED.format(question=item.question, options="\n".join(
                    f"{LETTERS[i]}. {c}" for i, c in enumerate(item.choices))))):
            right, answers = 0, Counter()
            for item in items:
                body = {"messages": [{"role": "user", "content": text_of(item)}],
                        "max_tokens": 8, "temperature": 0}
                reply = orjson.loads((await backend.create(Endpoint.CHAT, body)).body)
                verdict = grade(item, reply["choices"][0]["message"]["content"])
                answers[verdict.answer] += 1
                right += int(verdict.quality >= 1.0)
            print(f"  {name:18} {right}/{len(items)} right, answers {answers.most_common(5)}")
    finally:
        await backend.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outcomes", default=str(REPO / "evals/outcomes/embedded.jsonl"))
    parser.add_argument("--models", default="small,large")
    parser.add_argument("--probe", type=int, metavar="N", help="re-ask the small model N questions")
    args = parser.parse_args()
    models = args.models.split(",")
    rows = [r for r in read_rows(args.outcomes).values()
            if all(m in r["models"] and not r["models"][m].get("error") for m in models)]
    print(f"{args.outcomes}: {len(rows)} prompts answered by {', '.join(models)}")
    totals(rows, models)
    letters(rows, models)
    signals(rows, models[0])
    if args.probe:
        asyncio.run(probe(args.probe))


if __name__ == "__main__":
    main()
