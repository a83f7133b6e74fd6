"""`greenroute train`, and the argument parsing it shares with `greenroute eval`."""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from greenroute.evals import metrics
from greenroute.evals.encoding import ENCODER_HELP, build_encoder, embedder
from greenroute.evals.energy import parse_profile
from greenroute.evals.outcomes import OutcomeError, OutcomeTable, load_table, table_models
from greenroute.evals.plan_choice import PlanChoice, fit_chosen
from greenroute.evals.training import Calibration, TrainConfig, tier_data
from greenroute.routers import artifact, calibration
from greenroute.routers.encoders import Encoder, EncoderError
from greenroute.routers.features import SIGNALS
from greenroute.routers.models import KINDS


def parse_deltas(text: str) -> tuple[float, ...]:
    """Risk levels, the served one first; each in (0, 1)."""
    deltas = tuple(dict.fromkeys(float(d) for d in text.split(",")))
    if not all(0 < d < 1 for d in deltas):
        raise ValueError("delta is the chance a target may miss on new traffic, in (0, 1)")
    return deltas


def parse_targets(text: str) -> tuple[float, ...]:
    targets = tuple(sorted({float(t) for t in text.split(",")}))
    if not all(0 < t <= 1 for t in targets):
        raise ValueError("targets are shares of the largest tier's quality, in (0, 1]")
    return targets


def tier_names(args: argparse.Namespace, table_models: Sequence[str]) -> list[str]:
    if args.tiers:
        return str(args.tiers).split(",")
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
                    "features, and thresholds calibrated per quality target on every prompt's "
                    "cross-fitted (out-of-fold) outcome; the served routers are then fitted on "
                    "all prompts. Where the table has logprobs, both plan families (prompt-only "
                    "and cascade) are calibrated at delta/2 and the one saving more at the "
                    "default target is served (Bonferroni: the guarantee still holds at delta); "
                    "the manifest records the choice and each family's saving. Prints "
                    "out-of-fold validation metrics and writes a versioned artifact.",
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
    parser.add_argument("--delta", default=str(calibration.DEFAULT_DELTA), metavar="D[,D...]",
                        help="calibration risk: each target holds with probability 1 - delta "
                             "(default: %(default)s). Several: the first is served, the others "
                             "are stored for `[router] delta` to choose")
    parser.add_argument("--folds", type=int, default=5,
                        help="cross-fitting folds for calibration (default: %(default)s)")
    parser.add_argument("--signals", metavar="NAME,...", help="cascade signals the confidence "
                        "models read besides logprobs: agreement, self_check (the table must "
                        "have them: greenroute collect --signals)")
    parser.add_argument("--judge", choices=["answer", "first-token"], default="answer",
                        help="what a cascade stage is judged on: its whole answer, or only its "
                        "first token's logprob and entropy, so that a kept answer streams to "
                        "the client live (default: answer)")
    parser.add_argument("--cascade-only", action="store_true",
                        help="serve the cascade family even where routing on the prompt only "
                        "would save more (no plan choice, so no delta split)")
    parser.add_argument("--no-cascade", action="store_true",
                        help="route on the prompt only, even when the table has logprobs "
                             "(no plan choice, so no delta split)")
    parser.add_argument("--rank-by-score", action="store_true",
                        help="a prompt-only step admits prompts by its router's score alone, "
                        "not by joules saved per quality lost (the default)")
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
        deltas = parse_deltas(args.delta)
        if args.folds < 2:
            raise ValueError("--folds: cross-fitting needs at least 2 folds")
        config = TrainConfig(kind=args.kind, tolerance=args.tolerance, scheme=args.label,
                             delta=deltas[0], also_deltas=deltas[1:],
                             targets=parse_targets(args.targets), inner_folds=args.folds,
                             cascade=not args.no_cascade, seed=args.seed,
                             signals=parse_signals(args.signals),
                             first_token=args.judge == "first-token",
                             cascade_only=args.cascade_only,
                             rank_by_saving=not args.rank_by_score)
        if args.cascade_only and args.no_cascade:
            raise ValueError("--cascade-only and --no-cascade exclude each other")
        profile = parse_profile(args.energy_profile) if args.energy_profile else None
        encoder = build_encoder(args.encoder)
        data = tier_data(table, tiers, profile, config.signals, config.first_token)
    except (OutcomeError, ValueError, EncoderError) as exc:
        print(f"greenroute train: {exc}", file=sys.stderr)
        return 2
    x = embedder(encoder)(table.prompts)
    policy, calibrated, plan = fit_chosen(x, table.prompts, data, config, args.default_target)
    pair = metrics.Pair(data.quality[:, 0], data.quality[:, -1], data.energy[:, 0],
                        data.energy[:, -1])
    validation = metrics.summarize(pair, calibrated.replay.curve())
    manifest = {
        "kind": args.kind, "label": args.label, "tolerance": args.tolerance,
        "delta": config.delta, "default_target": args.default_target,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "training": {"outcomes": str(args.outcomes), "sha256": _sha256(args.outcomes),
                     "prompts": len(table), "calibration_prompts": calibrated.prompts,
                     "calibration": f"cross-fitted, {config.inner_folds} folds",
                     "energy_source": data.energy_source,
                     "cascade": [s.confidence is not None for s in policy.steps],
                     "judge": args.judge},
        "plan": plan.manifest(),
        "validation": {"metrics": validation, "targets": {
            f"{t:.2f}": {"quality_ratio": c.quality_ratio, "energy_ratio": c.energy_ratio,
                         "threshold_found": c.index is not None}
            for t, c in calibrated.choices.items()}},
    }
    artifact.save(args.out, policy, encoder, manifest)
    _print_report(args, tiers, table, calibrated, plan, validation, encoder,
                  time.monotonic() - started)
    return 0


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _print_report(args: argparse.Namespace, tiers: list[str], table: OutcomeTable,
                  calibrated: Calibration, plan: PlanChoice,
                  validation: dict[str, float | None], encoder: Encoder, seconds: float) -> None:
    print(f"trained {args.kind} routers for {' -> '.join(tiers)} on {len(table)} prompts "
          f"(encoder {encoder.name}) in {seconds:.0f} s; calibrated on {calibrated.prompts} "
          f"prompts' out-of-fold outcomes, delta {args.delta}")
    print(f"plan: {plan.family}, the least energy at target {plan.target:g} of "
          + ", ".join(f"{c.family} {100 * c.energy_saved:.1f}% saved (quality "
                      f"{c.quality_ratio:.3f})" for c in plan.candidates)
          + f"; each calibrated at delta {plan.delta_each:g}")
    print("validation (out-of-fold): " + ", ".join(
        f"{k} {v:.3f}" for k, v in validation.items() if v is not None))
    print("target  quality/largest  energy/largest  threshold")
    for target, choice in calibrated.choices.items():
        found = "found" if choice.index is not None else "none: all to the largest tier"
        print(f"{target:6.2f}  {choice.quality_ratio:15.3f}  {choice.energy_ratio:14.3f}  "
              f"{found}")
    print(f"wrote {args.out}")


def parse_signals(text: str | None) -> tuple[str, ...]:
    """`agreement,self_check` -> the signal names, checked."""
    names = tuple(n.strip() for n in (text or "").split(",") if n.strip())
    unknown = [n for n in names if n not in SIGNALS]
    if unknown:
        raise ValueError(f"--signals: unknown {', '.join(unknown)} (known: {', '.join(SIGNALS)})")
    return names
