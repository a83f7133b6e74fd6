"""How much of a table's energy figures a slow stretch of its collection made: one tier's joules
on one task re-priced at the rate that tier ran at on the rest of the table.

    .venv/bin/python bench/reprice.py [--table evals/outcomes/embedded.jsonl] [--tier large] \
        [--task svamp] [--out /tmp/repriced.jsonl]

The `estimate` meter counts the process's CPU seconds, so a call made while other work shared
the cores, or on a slower day, is charged more joules for the same tokens. This prints, per task,
the tier's generation rate (tokens per second, calls with over 20 generated tokens) and its
joules per token, fits joules = a x prompt tokens + b x generated tokens (least squares) on the
tier's calls outside `--task`, and writes a copy of the table in which that task's calls of the
tier cost what the fit says (nothing else changed), for `greenroute eval` to measure again.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", default="evals/outcomes/embedded.jsonl")
    parser.add_argument("--tier", default="large")
    parser.add_argument("--task", default="svamp")
    parser.add_argument("--out", default="/tmp/repriced.jsonl")
    args = parser.parse_args()
    rows = [json.loads(line) for line in Path(args.table).read_text().splitlines() if line]
    calls = [(row["task"], row["models"][args.tier]) for row in rows if args.tier in row["models"]]
    print(f"{args.tier}: per task, generation rate (p10/p50/p90 tokens/s) and J per generated "
          "token (median)")
    for task in sorted({task for task, _ in calls}):
        long = [c for t, c in calls if t == task and c["completion_tokens"] > 20]
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
    with open(args.out, "w") as out:
        for row in rows:
            call = row["models"].get(args.tier)
            if row["task"] == args.task and call is not None:
                before += call["joules"]
                call["joules"] = round(a * call["prompt_tokens"] + b * call["completion_tokens"], 4)
                after += call["joules"]
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{args.task} on {args.tier}: {before:.0f} J recorded, {after:.0f} J at the fitted rate "
          f"({after / before - 1:+.1%}); wrote {args.out}")


if __name__ == "__main__":
    main()
