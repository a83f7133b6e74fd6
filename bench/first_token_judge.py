"""What a cascade judged on its stage's first token would keep and save, replayed offline.

A streaming client under a cascade waits for the stage's whole answer today, because the
confidence model reads features of the whole answer. A judge that reads only the first token's
logprob and entropy (`lp_first`, `entropy_first`, both in every collected outcome table) could
decide after one token and stream the rest live. This replays that judge on recorded outcomes
with the harness's own cross-validation, beside the whole-answer judge and prompt-only routing,
so its quality and saving are measured, not assumed:

    .venv/bin/python bench/first_token_judge.py --outcomes evals/outcomes/embedded.jsonl
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from greenroute.evals.encoding import build_encoder, embedder
from greenroute.evals.outcomes import load_table
from greenroute.evals.routing import cross_validate_policy
from greenroute.evals.training import Calibration, TierData, TrainConfig, fit_policy, tier_data
from greenroute.routers.features import FEATURES
from greenroute.routers.policy import RoutingPolicy

FIRST_TOKEN = ("lp_first", "entropy_first")


def first_token_only(data: TierData) -> TierData:
    """The table's features with everything but the first token's held constant (the
    confidence model standardises them to zero)."""
    keep = np.array([name in FIRST_TOKEN for name in FEATURES])
    features = [None if f is None else np.where(keep, f, 0.0) for f in data.features]
    return replace(data, features=features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outcomes", default="evals/outcomes/embedded.jsonl")
    parser.add_argument("--kind", default="ensemble")
    parser.add_argument("--targets", default="0.8,0.9,0.95")
    args = parser.parse_args()
    table = load_table(args.outcomes, ["small", "large"])
    embed = embedder(build_encoder("static"))
    targets = tuple(float(t) for t in args.targets.split(","))
    base = TrainConfig(kind=args.kind, targets=targets)

    def first_token_fit(x: np.ndarray, prompts: Sequence[str], data: TierData,
                        config: TrainConfig) -> tuple[RoutingPolicy, Calibration]:
        return fit_policy(x, prompts, first_token_only(data), config)

    runs = {"prompt-only": (replace(base, cascade=False), fit_policy),
            "cascade, whole answer judged": (base, fit_policy),
            "cascade, first token judged": (base, first_token_fit)}
    print(f"{len(table)} prompts, {args.kind}, 5-fold grouped; per target: quality kept "
          "(vs large), energy saved, folds meeting the target")
    for name, (config, fit) in runs.items():
        _, rows = cross_validate_policy(table, ["small", "large"], embed, config,
                                        fit=fit, name=name)
        cells = [f"{r.target:g}: {np.mean(r.quality_ratio):.3f}, "
                 f"{100 * np.mean(r.energy_saved):.1f}%, {r.met}/5" for r in rows]
        print(f"{name:30s} " + " | ".join(cells))
    data = tier_data(table, ["small", "large"])
    print(f"(energy per prompt: small {data.energy[:, 0].mean():.1f} J, "
          f"large {data.energy[:, 1].mean():.1f} J)")


if __name__ == "__main__":
    main()
