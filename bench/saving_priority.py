"""What the saving priority of a prompt-only step (routers/priority.py) does on an outcome table:
how well its energy model predicts joules, which tasks it sends to the small tier at a target,
and how the calibrated saving moves with its floor φ (FLOOR_SHARE).

    .venv/bin/python bench/saving_priority.py [--outcomes PATH] [--kind ensemble]

Five folds, grouped, δ = 0.1, the same code `greenroute train` and `greenroute eval` run.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np

from greenroute.evals.encoding import build_encoder, embedder
from greenroute.evals.evaluate import group_folds
from greenroute.evals.outcomes import load_table
from greenroute.evals.routing import cross_validate_policy
from greenroute.evals.training import TrainConfig, fit_policy, tier_data
from greenroute.routers import priority

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outcomes", default=str(REPO / "evals/outcomes/embedded.jsonl"))
    parser.add_argument("--encoder", default=str(REPO / "routers/default/encoder"))
    parser.add_argument("--kind", default="ensemble")
    parser.add_argument("--target", type=float, default=0.95)
    args = parser.parse_args()

    tiers = ["small", "large"]
    table = load_table(args.outcomes, tiers)
    embed = embedder(build_encoder(args.encoder))
    x, data = embed(table.prompts), tier_data(table, tiers)
    config = TrainConfig(kind=args.kind, targets=(0.9, 0.95), cascade=False)

    predicted = np.zeros_like(data.energy)
    sent: Counter[str] = Counter()
    for test in group_folds(table.prompts, 5, 0):
        train = np.setdiff1d(np.arange(len(table)), test)
        policy, _ = fit_policy(x[train], [table.prompts[i] for i in train], data.subset(train),
                               TrainConfig(kind=args.kind, targets=(args.target,),
                                           cascade=False))
        step = policy.steps[0]
        assert step.priority is not None, "this table fits no saving priority"
        predicted[test] = step.priority.joules(x[test])
        small = policy.plans(policy.scores(x[test]), policy.candidate_for(args.target))[:, 0]
        sent.update(table.tasks[i] for i in test[small])
    saved, actual = predicted[:, 1] - predicted[:, 0], data.energy[:, 1] - data.energy[:, 0]
    logs = [np.corrcoef(np.log(predicted[:, j]), np.log(data.energy[:, j]))[0, 1] for j in (0, 1)]
    print(f"out-of-fold energy model ({len(table)} prompts): correlation with the recorded log "
          f"joules, small {logs[0]:.2f}, large {logs[1]:.2f}; predicted against recorded joules "
          f"saved {np.corrcoef(saved, actual)[0, 1]:.2f}")
    print(f"sent to small at target {args.target} (calibrated, held-out folds): "
          + ", ".join(f"{task} {n}" for task, n in sent.most_common()))

    print("floor share  target  saved (mean of folds)  ideal  folds met")
    default = priority.FLOOR_SHARE
    try:
        for share in (0.05, 0.25, 0.5, 1.0):
            priority.FLOOR_SHARE = share
            _, rows = cross_validate_policy(table, tiers, embed, config)
            for row in rows:
                print(f"{share:11.2f}  {row.target:6.2f}  {np.mean(row.energy_saved):21.1%}  "
                      f"{np.mean(row.ideal_saved):5.1%}  {row.met}/5")
    finally:
        priority.FLOOR_SHARE = default


if __name__ == "__main__":
    main()
