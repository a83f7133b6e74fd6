"""The eval harness's subcommands of `greenroute`: collect, eval, outcomes import."""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
from collections.abc import Callable
from pathlib import Path

from greenroute.backends import weights
from greenroute.backends.registry import TierConfig, prepare_tiers
from greenroute.evals import collect as collecting
from greenroute.evals import plots, summary, train_command
from greenroute.evals.encoding import ENCODER_HELP, Embed, build_encoder, embedder
from greenroute.evals.energy import parse_profile
from greenroute.evals.evaluate import evaluate
from greenroute.evals.metrics import DEFAULT_TARGET
from greenroute.evals.outcomes import (
    OutcomeError,
    describe,
    import_table,
    load_table,
    read_rows,
    regrade,
    table_models,
)
from greenroute.evals.plan_choice import fit_chosen_policy
from greenroute.evals.policies import BUILTIN, Policy, ScoresFilePolicy
from greenroute.evals.routing import RouterKindPolicy, cross_validate_policy, evaluate_artifact
from greenroute.evals.signals import SignalPlan
from greenroute.evals.signals import report as signal_report
from greenroute.evals.tasks import KINDS, TASKS, Item, TaskError, load_file, load_task, sample
from greenroute.evals.training import TrainConfig, fit_policy
from greenroute.gateway.config import (
    CONFIG_ENV,
    ConfigError,
    GatewayConfig,
    load_config,
)
from greenroute.routers import artifact
from greenroute.routers.artifact import ArtifactError
from greenroute.routers.calibration import DEFAULT_DELTA
from greenroute.routers.encoders import EncoderError
from greenroute.routers.models import KINDS as ROUTER_KINDS
from greenroute.routers.models import KNNRouter


def add_parsers(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    _add_collect(commands)
    _add_eval(commands)
    _add_outcomes(commands)


# -- collect ----------------------------------------------------------------------------------

def _add_collect(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = commands.add_parser(
        "collect", help="run tiers over question sets and record per-prompt outcomes",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the configured tiers over question sets (greedy decoding), grade every "
                    "answer, and append one outcome row per prompt and model to --out. Tiers run "
                    "one after the other. Rerunning the same command resumes: prompts already "
                    "answered are skipped, failed ones are tried again.",
        epilog="tasks (in ../shared/data/tasks, or --data-dir): " + ", ".join(TASKS) + "\n"
               "example: greenroute collect --task mmlu:300 --task gsm8k:200 "
               "--models small,large --out evals/outcomes/mine.jsonl")
    parser.add_argument("--task", action="append", default=[], metavar="NAME[:N]",
                        help="a task, optionally with how many of its prompts to sample "
                             "(repeatable)")
    parser.add_argument("--file", metavar="PATH", help="a JSONL or CSV question file instead of "
                        "a known task (with --kind and --field)")
    parser.add_argument("--kind", choices=KINDS, help="answer kind of --file")
    parser.add_argument("--field", action="append", default=[], metavar="NAME=FIELD",
                        help="--file's field for question, choices, gold, passage, id "
                             "(repeatable)")
    parser.add_argument("--limit", type=int, help="prompts per task when NAME has no :N "
                                                  "(default: all)")
    parser.add_argument("--seed", type=int, default=0, help="sampling and decoding seed")
    parser.add_argument("--models", help="tiers to run, comma-separated, in this order "
                                         "(default: every tier, cheapest first)")
    parser.add_argument("--config", metavar="PATH",
                        help=f"gateway config declaring the tiers (default: ${CONFIG_ENV}, "
                             "else the embedded default)")
    parser.add_argument("--out", required=True, metavar="PATH", help="outcome table (JSONL)")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="requests in flight per tier (1 for embedded models)")
    parser.add_argument("--judge", metavar="TIER", help="tier that grades open-ended answers")
    parser.add_argument("--data-dir", metavar="DIR", help="where the task files are")
    parser.add_argument("--pause-file", metavar="PATH", type=Path,
                        help="while this file exists, start no new prompt (lets you use the "
                             "machine without skewing timings)")
    parser.add_argument("--signals", metavar="NAME,...", help="also collect cascade signals "
                        "beside the greedy answers: agreement (k samples), self_check")
    parser.add_argument("--signal-tiers", metavar="TIER,...", help="tiers that get --signals "
                        "(default: every tier collected but the configuration's largest)")
    parser.set_defaults(handler=_collect)


def _collect(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        items = _items(args)
        tiers = _tiers(config, args.models)
        judge = _tiers(config, args.judge)[0] if args.judge else None
        # k and the temperature are the gateway's own (routers/agreement.py): a signal measured
        # on other samples than those served would be calibrated on something else.
        signals = SignalPlan(tuple(args.signals.split(",")), seed=args.seed) \
            if args.signals else None
        signal_tiers = tuple(args.signal_tiers.split(",")) if args.signal_tiers else tuple(
            t.name for t in tiers if t.name != config.tiers[-1].name)
        prepare_tiers([*tiers, *([judge] if judge else [])],
                      log=lambda line: print(line, file=sys.stderr))
    except (ConfigError, TaskError, ValueError, weights.WeightsError) as exc:
        print(f"greenroute collect: {exc}", file=sys.stderr)
        return 2
    print(f"collecting {len(items)} prompts x {len(tiers)} tier(s) into {args.out}",
          file=sys.stderr)
    plan = collecting.CollectPlan(items=items, tiers=tiers, out=Path(args.out), seed=args.seed,
                                  concurrency=args.concurrency, judge=judge,
                                  pause_file=args.pause_file, signals=signals,
                                  signal_tiers=signal_tiers)
    try:
        asyncio.run(collecting.collect(plan))
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    except ValueError as exc:
        print(f"greenroute collect: {exc}", file=sys.stderr)
        return 2
    return 0


def _items(args: argparse.Namespace) -> list[Item]:
    if args.file:
        if not args.kind:
            raise TaskError("--file needs --kind")
        fields = dict(pair.split("=", 1) for pair in args.field)
        return sample(load_file(args.file, args.kind, fields), args.limit, args.seed)
    if not args.task:
        raise TaskError("name at least one --task (or a --file)")
    items: list[Item] = []
    for spec in args.task:
        name, _, count = spec.partition(":")
        limit = int(count) if count else args.limit
        items += sample(load_task(name, args.data_dir), limit, args.seed)
    return items


def _tiers(config: GatewayConfig, names: str | None) -> list[TierConfig]:
    by_name = {tier.name: tier for tier in config.tiers}
    if not names:
        return config.tiers_by_energy()
    unknown = [n for n in names.split(",") if n not in by_name]
    if unknown:
        raise ValueError(f"unknown tier(s) {', '.join(unknown)}; the config has "
                         f"{', '.join(by_name)}")
    return [by_name[n] for n in names.split(",")]


# -- eval -------------------------------------------------------------------------------------

def _add_eval(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = commands.add_parser(
        "eval", help="score routing policies on an outcome table (k-fold), with random and "
                     "oracle",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Cross-validate routing policies on an outcome table, grouped so that no "
                    "prompt is in two folds, and report APGR, CPT(20/50/80%%), AIQ and the "
                    "energy saved at a quality target, beside the random and oracle policies. "
                    "With --targets, each target's row also shows the ideal saving (the best "
                    "threshold chosen on the held-out fold itself) and the price of the "
                    "guarantee (ideal minus calibrated). "
                    "Writes metrics.json, summary.md and PNG plots to --out.",
        epilog="example: greenroute eval --outcomes mmlu.jsonl --policy length --out eval-mmlu")
    parser.add_argument("--outcomes", required=True, metavar="PATH", help="outcome table")
    parser.add_argument("--small", help="the cheaper model (default: `small`, or the first of "
                                        "a two-model table)")
    parser.add_argument("--large", help="the stronger model (default: `large`, or the second)")
    parser.add_argument("--tiers", help="several tiers, cheapest first, for --targets (the "
                                        "metrics compare the first with the last)")
    parser.add_argument("--policy", action="append", default=[], choices=sorted(BUILTIN),
                        help="a built-in policy (repeatable); random and oracle are always "
                             "reported")
    parser.add_argument("--scores", action="append", default=[], metavar="PATH",
                        help="a policy's per-prompt scores, JSONL {id, score} (higher: small "
                             "model), or decisions 1 = small / 0 = large (repeatable)")
    parser.add_argument("--kind", action="append", default=[], choices=[*ROUTER_KINDS, "all"],
                        help="a router kind, trained on each fold's other folds (repeatable; "
                             "all: every kind)")
    parser.add_argument("--baseline", action="store_true",
                        help="add the plain baseline: kNN, k=50, label 'only large right'")
    parser.add_argument("--encoder", help=ENCODER_HELP + " (default: static, "
                                          "or the --router artifact's)")
    parser.add_argument("--targets", metavar="T,T,...",
                        help="also cross-validate each --kind's whole policy (cascade where the "
                             "table has logprobs, calibrated thresholds) and report the quality "
                             "and energy it realised at these targets on held-out prompts")
    parser.add_argument("--signals", metavar="NAME,...", help="with --targets: cascade "
                        "signals the confidence models read besides logprobs (agreement, "
                        "self_check; collected by greenroute collect --signals)")
    parser.add_argument("--judge", choices=["answer", "first-token"], default="answer",
                        help="with --targets: judge cascade stages on their whole answer or "
                        "on their first token only (greenroute train --judge)")
    parser.add_argument("--no-cascade", action="store_true", help="with --targets: route on "
                                                                  "the prompt only")
    parser.add_argument("--rank-by-score", action="store_true",
                        help="with --targets: prompt-only steps admit prompts by the router's "
                        "score alone, not by joules saved per quality lost (the default, as "
                        "greenroute train)")
    parser.add_argument("--choose-plan", action="store_true",
                        help="with --targets: each fold's policy chooses its plan family as "
                             "`greenroute train` does (prompt-only or cascade, at delta/2 each)")
    parser.add_argument("--delta", type=float, default=DEFAULT_DELTA,
                        help="with --targets: the calibration risk, each target to hold with "
                             "probability 1 - delta (default: %(default)s)")
    parser.add_argument("--router", metavar="DIR", help="evaluate a trained artifact (use "
                                                        "prompts it was not trained on)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="fold assignment seed")
    parser.add_argument("--target", type=float, default=DEFAULT_TARGET,
                        help="quality target as a share of the large model's quality "
                             "(default: %(default)s)")
    parser.add_argument("--energy-profile", metavar="NAME=J,...",
                        help="joules per generated token per model (or per role small/large); "
                             "overrides measured joules. Default when the table has none: "
                             "small=0.095,large=0.563 (ML.ENERGY, Llama-3.1 8B vs 70B, H100)")
    parser.add_argument("--out", metavar="DIR", type=Path, help="write metrics.json, "
                        "summary.md and plots here")
    parser.set_defaults(handler=_eval)


def _eval(args: argparse.Namespace) -> int:
    try:
        tiers = train_command.tier_names(args, table_models(args.outcomes))
        small, large = tiers[0], tiers[-1]
        table = load_table(args.outcomes, tiers)
        profile = parse_profile(args.energy_profile) if args.energy_profile else None
        factories: list[Callable[[], Policy]] = [BUILTIN[name] for name in args.policy]
        factories += [functools.partial(ScoresFilePolicy, path) for path in args.scores]
        kinds = list(ROUTER_KINDS) if "all" in args.kind else args.kind
        embed = None
        if kinds or args.baseline or args.router:
            encoder = (artifact.load(args.router).encoder if args.router and not args.encoder
                       else build_encoder(args.encoder or "static"))
            embed = embedder(encoder)
            factories += [functools.partial(RouterKindPolicy, kind, embed) for kind in kinds]
            if args.baseline:
                factories.append(functools.partial(_baseline, embed))
        evaluation = evaluate(table, small, large, factories, folds=args.folds, seed=args.seed,
                              target=args.target, profile=profile)
        if args.targets and embed is not None:
            targets = train_command.parse_targets(args.targets)
            for kind in kinds:
                config = TrainConfig(kind=kind, targets=targets, seed=args.seed,
                                     delta=args.delta, cascade=not args.no_cascade,
                                     signals=train_command.parse_signals(args.signals),
                                     first_token=args.judge == "first-token",
                                     rank_by_saving=not args.rank_by_score)
                result, rows = cross_validate_policy(
                    table, tiers, embed, config, folds=args.folds, seed=args.seed,
                    profile=profile, name=f"{kind}+chosen plan" if args.choose_plan else None,
                    fit=fit_chosen_policy if args.choose_plan else fit_policy)
                evaluation.results.insert(-2, result)
                evaluation.targets += rows
        if args.router and embed is not None:
            result, rows = evaluate_artifact(artifact.load(args.router), table, embed, profile)
            evaluation.results.insert(-2, result)
            evaluation.targets += rows
    except (OutcomeError, ValueError, OSError, ArtifactError, EncoderError) as exc:
        print(f"greenroute eval: {exc}", file=sys.stderr)
        return 2
    if table.dropped:
        print(f"note: {table.dropped} prompt(s) without a result from every tier were left "
              "out", file=sys.stderr)
    print(summary.text_table(evaluation))
    if args.out:
        plot_names = plots.write(evaluation, args.out)
        summary.write(evaluation, args.out, plot_names)
        print(f"wrote {args.out}/metrics.json, summary.md, {', '.join(plot_names)}")
    return 0


def _baseline(embed: Embed) -> RouterKindPolicy:
    """The plain baseline of earlier routers: kNN, k = 50, label "only the larger tier is
    right"."""
    policy = RouterKindPolicy("knn", embed, scheme="only-large", name="knn50-only-large")
    policy.router = KNNRouter(k=50)
    return policy


# -- outcomes import --------------------------------------------------------------------------

def _add_outcomes(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = commands.add_parser("outcomes", help="import external outcome tables")
    sub = parser.add_subparsers(dest="outcomes_command", required=True)
    imp = sub.add_parser(
        "import", help="turn a table with one correctness column per model into an outcome "
                       "table",
        description="Import a JSONL or CSV table (RouteLLM's CSVs, ../shared's "
                    "routellm_mmlu.jsonl, ...) with a prompt field and one correctness field "
                    "per model (JSON booleans, \"True\"/\"False\", 0/1 or scores in [0, 1]).",
        epilog="example: greenroute outcomes import ../shared/data/outcomes/routellm_mmlu.jsonl "
               "--prompt-field question,choices --model mixtral=mixtral_8x7b_correct "
               "--model gpt4=gpt4_1106_correct --id-field mmlu_test_line --task-field subject "
               "--out mmlu.jsonl")
    imp.add_argument("source", help="JSONL or CSV file")
    imp.add_argument("--out", required=True, help="outcome table to write")
    imp.add_argument("--prompt-field", required=True, metavar="FIELD[,FIELD...]",
                     help="the prompt text; several fields are joined by newlines")
    imp.add_argument("--model", action="append", required=True, metavar="NAME=FIELD",
                     help="a model and its correctness field, cheapest first (repeatable)")
    imp.add_argument("--id-field", help="field with a unique id (default: the record number)")
    imp.add_argument("--task-field", help="field naming each prompt's task or subject")
    imp.add_argument("--task", help="task name for every row (default: the file's stem)")
    imp.set_defaults(handler=_import)
    again = sub.add_parser(
        "regrade", help="grade a collected table's stored answers again with today's graders",
        description="Re-apply the graders to every rule-graded answer stored in an outcome "
                    "table (after a grader fix), in place; the questions are reloaded by id.")
    again.add_argument("path", help="outcome table")
    again.add_argument("--data-dir", metavar="DIR", help="where the task files are")
    again.set_defaults(handler=_regrade)
    show = sub.add_parser("summary", help="per-task quality and energy of each model, as Markdown",
                          description="Summarize an outcome table: per task, each model's mean "
                                      "quality and joules, and how many prompts only the "
                                      "strongest or only the cheapest model got right.")
    show.add_argument("path", help="outcome table")
    show.add_argument("--models", help="models to compare, cheapest first (default: the "
                                       "table's order)")
    show.set_defaults(handler=_summary)
    signals = sub.add_parser("signals", help="per task, how well each cascade signal tells a "
                             "tier's right answers from its wrong ones (AUC), and its joules")
    signals.add_argument("path", help="outcome table collected with --signals")
    signals.add_argument("--model", default="small", help="the tier whose signals (small)")
    signals.set_defaults(handler=_signals)


def _signals(args: argparse.Namespace) -> int:
    try:
        print(signal_report(args.path, args.model))
    except (OutcomeError, OSError) as exc:
        print(f"greenroute outcomes signals: {exc}", file=sys.stderr)
        return 2
    return 0


def _summary(args: argparse.Namespace) -> int:
    try:
        print(describe(args.path, args.models.split(",") if args.models else None))
    except (OutcomeError, OSError) as exc:
        print(f"greenroute outcomes summary: {exc}", file=sys.stderr)
        return 2
    return 0


def _regrade(args: argparse.Namespace) -> int:
    try:
        tasks = {row.get("task") for row in read_rows(args.path).values()}
        items = {item.id: item for task in sorted(t for t in tasks if t in TASKS)
                 for item in load_task(task, args.data_dir)}
        changed = regrade(args.path, items)
    except (OutcomeError, TaskError, OSError) as exc:
        print(f"greenroute outcomes regrade: {exc}", file=sys.stderr)
        return 2
    print(f"{changed} result(s) graded differently; {args.path} rewritten")
    return 0


def _import(args: argparse.Namespace) -> int:
    try:
        models = dict(pair.split("=", 1) for pair in args.model)
        count = import_table(args.source, args.out, prompt_field=args.prompt_field,
                             model_fields=models, id_field=args.id_field,
                             task_field=args.task_field, task=args.task)
    except (OutcomeError, OSError, ValueError) as exc:
        print(f"greenroute outcomes import: {exc}", file=sys.stderr)
        return 2
    print(f"{count} prompts -> {args.out}")
    return 0
