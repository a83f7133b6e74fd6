"""How much of a table's energy figures a slow stretch of its collection made: one tier's joules
on one task re-priced at the rate that tier ran at on the rest of the table.

    .venv/bin/python bench/reprice.py [--table evals/outcomes/embedded.jsonl] [--tier large] \
        [--task svamp] [--out /tmp/repriced.jsonl] [--recollected PATH]

The `estimate` meter counts the process's CPU seconds, so a call made while other work shared
the cores, or on a slower day, is charged more joules for the same tokens. This prints, per task,
the tier's generation rate (tokens per second, calls with over 20 generated tokens) and its
joules per token, fits joules = a x prompt tokens + b x generated tokens (least squares) on the
tier's calls outside `--task`, and writes a copy of the table in which that task's calls of the
tier cost what the fit says (nothing else changed), for `greenroute eval` to measure again.

`--recollected PATH` takes a collection of the same prompts run again on that tier (`greenroute
collect --models TIER --task TASK:N`, on a quiet machine) instead of the fit: its rates are
printed beside the table's, and the copy gets its calls whole (answer, grade, tokens, joules).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", default="evals/outcomes/embedded.jsonl")
    parser.add_argument("--tier", default="large")
    parser.add_argument("--task", default="svamp")
    parser.add_argument("--out", default="/tmp/repriced.jsonl")
    parser.add_argument("--recollected", metavar="PATH",
                        help="the task's prompts collected again on the tier: use these calls")
    args = parser.parse_args()
    rows = [json.loads(line) for line in Path(args.table).read_text().splitlines() if line]
    calls = [(row["task"], row["models"][args.tier]) for row in rows if args.tier in row["models"]]
    again: dict[str, dict[str, Any]] = {}
    if args.recollected:
        for line in Path(args.recollected).read_text().splitlines():
            row = json.loads(line) if line else None
            if row and row["task"] == args.task and args.tier in row["models"]:
                again[row["id"]] = row["models"][args.tier]
    print(f"{args.tier}: per task, generation rate (p10/p50/p90 tokens/s) and J per generated "
          "token (median)")
    tasks = [(task, [c for t, c in calls if t == task]) for task in sorted({t for t, _ in calls})]
    if again:
        tasks.append((f"{args.task} again", list(again.values())))
    for task, task_calls in tasks:
        long = [c for c in task_calls if c["completion_tokens"] > 20]
        if not long:
            continue
        rates = sorted(c["completion_tokens"] / c["latency_s"] for c in long)
        per_token = statistics.median(c["joules"] / c["completion_tokens"] for c in long)
        print(f"  {task:15s} {len(long):4d} calls  {rates[len(rates) // 10]:5.1f} / "
              f"{statistics.median(rates):5.1f} / {rates[len(rates) * 9 // 10]:5.1f} tok/s  "
              f"{per_token:.3f} J/token")
    rest = [c for t, c in calls if t != args.task]
    tokens = np.array([[c["prompt_tokens"], c["completion_tokens"]] for c in rest], dtype=float)
    joules = np.array([c["joules"] for c in rest])
    (a, b), *_ = np.linalg.lstsq(tokens, joules, rcond=None)
    fitted = tokens @ np.array([a, b])
    r2 = 1 - float(((joules - fitted) ** 2).sum() / ((joules - joules.mean()) ** 2).sum())
    print(f"fit outside {args.task}: J = {a:.4f} x prompt + {b:.4f} x generated (R^2 {r2:.3f}, "
          f"{len(rest)} calls)")
    before = after = 0.0
    quality_before = quality_after = 0.0
    with open(args.out, "w") as out:
        for row in rows:
            call = row["models"].get(args.tier)
            if row["task"] == args.task and call is not None:
                before += call["joules"]
                quality_before += call["quality"]
                if again:
                    if row["id"] not in again:
                        raise SystemExit(f"{row['id']} is not in {args.recollected}")
                    call = row["models"][args.tier] = again[row["id"]]
                else:
                    call["joules"] = round(a * call["prompt_tokens"]
                                           + b * call["completion_tokens"], 4)
                after += call["joules"]
                quality_after += call["quality"]
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    how = f"as collected again ({args.recollected})" if again else "at the fitted rate"
    print(f"{args.task} on {args.tier}: {before:.0f} J recorded, {after:.0f} J {how} "
          f"({after / before - 1:+.1%}); quality {quality_before:.0f} -> {quality_after:.0f} "
          f"right; wrote {args.out}")


if __name__ == "__main__":
    main()
