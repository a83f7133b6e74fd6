"""`greenroute train`, and the encoder choices shared with `greenroute eval`."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from greenroute.evals import metrics
from greenroute.evals.energy import parse_profile
from greenroute.evals.outcomes import OutcomeError, load_table, table_models
from greenroute.routers import artifact, calibration
from greenroute.routers.encoders import (
    DEFAULT_MODEL,
    EmbeddingCache,
    Encoder,
    EncoderError,
    SentenceTransformerEncoder,
    StaticEncoder,
    distill,
)
from greenroute.routers.models import KINDS
from greenroute.routers.training import TrainConfig, fit_policy, policy_curve, tier_data

ENCODER_HELP = ("static (the default: distilled from all-MiniLM-L6-v2, fast), minilm "
                "(all-MiniLM-L6-v2 through sentence-transformers), a static encoder directory, "
                "or a sentence-transformers name or path")


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "greenroute"


def build_encoder(choice: str) -> Encoder:
    """The encoder named on the command line."""
    if choice == "static":
        directory = cache_root() / "encoders" / "static-all-MiniLM-L6-v2-256"
        if (directory / "encoder.json").exists():
            return StaticEncoder(directory)
        print(f"distilling a static encoder from {DEFAULT_MODEL} into {directory} (once)",
              file=sys.stderr)
        return distill(SentenceTransformerEncoder(DEFAULT_MODEL), directory)
    if choice == "minilm":
        return SentenceTransformerEncoder(DEFAULT_MODEL)
    if (Path(choice) / "encoder.json").exists():
        return StaticEncoder(choice)
    return SentenceTransformerEncoder(choice)


def embedder(encoder: Encoder):  # noqa: ANN201 - a closure over the cache
    cache = EmbeddingCache(cache_root() / "embeddings")
    return lambda texts: cache.encode(encoder, list(texts))


def parse_targets(text: str) -> tuple[float, ...]:
    targets = tuple(sorted({float(t) for t in text.split(",")}))
    if not all(0 < t <= 1 for t in targets):
        raise ValueError("targets are shares of the largest tier's quality, in (0, 1]")
    return targets


def tier_names(args: argparse.Namespace, table_models: Sequence[str]) -> list[str]:
    if args.tiers:
        return args.tiers.split(",")
    if args.small and args.large:
        return [args.small, args.large]
    if "small" in table_models and "large" in table_models:
        return ["small", "large"]
    if len(table_models) == 2:
        return list(table_models)
    raise ValueError("name the tiers with --tiers (cheapest first) or --small/--large "
                     f"(the table has {', '.join(table_models)})")


def add_parsers(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = commands.add_parser(
        "train", help="train, calibrate and save a router artifact from an outcome table",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train routers for model `green` from an outcome table: a router per tier "
                    "but the largest, cascade confidence models where the table has logprob "
                    "features, and thresholds calibrated per quality target on held-out "
                    "prompts. Prints validation metrics and writes a versioned artifact.",
        epilog="example: greenroute train --outcomes evals/outcomes/embedded.jsonl "
               "--tiers small,large --kind logistic --out routers/default")
    parser.add_argument("--outcomes", required=True, metavar="PATH")
    parser.add_argument("--tiers", help="tiers, cheapest first (default: small,large, or the "
                                        "table's two models)")
    parser.add_argument("--small", help="with --large: a two-tier policy")
    parser.add_argument("--large")
    parser.add_argument("--kind", default="logistic", choices=KINDS)
    parser.add_argument("--encoder", default="static", help=ENCODER_HELP)
    parser.add_argument("--label", default="gap", choices=["gap", "only-large"],
                        help="training label: the quality gap (win rate, ties half; default) "
                             "or 0 where only the larger tier is right")
    parser.add_argument("--tolerance", type=float, default=0.0,
                        help="quality loss that still counts as 'as well' (Hybrid LLM's t)")
    parser.add_argument("--targets", default=",".join(map(str, calibration.DEFAULT_TARGETS)),
                        help="quality targets to calibrate (shares of the largest tier's quality)")
    parser.add_argument("--default-target", type=float, default=0.95,
                        help="the target `green` uses when a request names none")
    parser.add_argument("--delta", type=float, default=calibration.DEFAULT_DELTA,
                        help="calibration risk: each target holds with probability 1 - delta")
    parser.add_argument("--calibration-share", type=float, default=0.3)
    parser.add_argument("--no-cascade", action="store_true",
                        help="route on the prompt only, even when the table has logprobs")
    parser.add_argument("--energy-profile", metavar="NAME=J,...",
                        help="joules per generated token, instead of the table's joules")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, type=Path, metavar="DIR")
    parser.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    started = time.monotonic()
    try:
        tiers = tier_names(args, table_models(args.outcomes))
        table = load_table(args.outcomes, tiers)
        config = TrainConfig(kind=args.kind, tolerance=args.tolerance, scheme=args.label,
                             delta=args.delta, targets=parse_targets(args.targets),
                             calibration_share=args.calibration_share,
                             cascade=not args.no_cascade, seed=args.seed)
        profile = parse_profile(args.energy_profile) if args.energy_profile else None
        encoder = build_encoder(args.encoder)
    except (OutcomeError, ValueError, EncoderError) as exc:
        print(f"greenroute train: {exc}", file=sys.stderr)
        return 2
    data = tier_data(table, tiers, profile)
    x = embedder(encoder)(table.prompts)
    policy, calibrated = fit_policy(x, table.prompts, data, config)
    held = calibrated.held
    curve = policy_curve(policy, x[held], data.subset(held))
    pair = metrics.Pair(data.quality[held, 0], data.quality[held, -1], data.energy[held, 0],
                        data.energy[held, -1])
    validation = metrics.summarize(pair, curve)
    manifest = {
        "kind": args.kind, "label": args.label, "tolerance": args.tolerance,
        "delta": args.delta, "default_target": args.default_target,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "training": {"outcomes": str(args.outcomes), "sha256": _sha256(args.outcomes),
                     "prompts": len(table), "calibration_prompts": calibrated.prompts,
                     "energy_source": data.energy_source,
                     "cascade": [s.confidence is not None for s in policy.steps]},
        "validation": {"metrics": validation, "targets": {
            f"{t:.2f}": {"quality_ratio": c.quality_ratio, "energy_ratio": c.energy_ratio,
                         "threshold_found": c.index is not None}
            for t, c in calibrated.choices.items()}},
    }
    artifact.save(args.out, policy, encoder, manifest)
    _print_report(args, tiers, table, calibrated, validation, encoder, time.monotonic() - started)
    return 0


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _print_report(args: argparse.Namespace, tiers: list[str], table, calibrated,  # noqa: ANN001
                  validation: dict, encoder: Encoder, seconds: float) -> None:
    print(f"trained {args.kind} routers for {' -> '.join(tiers)} on {len(table)} prompts "
          f"(encoder {encoder.name}) in {seconds:.0f} s; calibrated on {calibrated.prompts} "
          f"held-out prompts, delta {args.delta}")
    print("validation (held-out): " + ", ".join(
        f"{k} {v:.3f}" for k, v in validation.items() if v is not None))
    print("target  quality/largest  energy/largest  threshold")
    for target, choice in calibrated.choices.items():
        found = "found" if choice.index is not None else "none: all to the largest tier"
        print(f"{target:6.2f}  {choice.quality_ratio:15.3f}  {choice.energy_ratio:14.3f}  "
              f"{found}")
    print(f"wrote {args.out}")
