"""The cascade's extra confidence signals offline: collected beside the greedy answers, and
measured (how well each tells right small-tier answers from wrong ones, and what it costs).

`greenroute collect --signals agreement,self_check` runs, after a tier's greedy pass, a second
pass over the prompts whose result lacks a signal asked for:

- *agreement*: one request with `n = k` at the sampling temperature (routers/agreement.py);
  every sample is graded, and the result records the samples' answers and qualities, the
  majority's index and quality, the share agreeing with it, and the samples' tokens and joules;
- *self-check*: the tier's own model asked whether its greedy answer is correct
  (routers/selfcheck.py); the result records P(yes) and the call's tokens and joules.

Both are stored in the tier's result in the outcome table (`samples`, `self_check`), written as
a new line for that prompt and model, so an interrupted pass resumes where it stopped and the
greedy answer stays as it was. `load_table` reads them into `OutcomeTable.signals`, where
`greenroute train --signals` finds them; `greenroute outcomes signals TABLE` prints, per task,
each signal's ROC AUC and its joules per prompt.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import orjson

from greenroute.backends.base import Backend, Endpoint
from greenroute.backends.energy.meter import Meter
from greenroute.evals import graders
from greenroute.evals.outcomes import OutcomeWriter, read_rows
from greenroute.evals.pause import wait_while_paused
from greenroute.evals.prompts import Prompt, render
from greenroute.evals.tasks import Item
from greenroute.routers import agreement, selfcheck
from greenroute.routers.features import AGREEMENT, SELF_CHECK, SIGNALS


@dataclass(frozen=True)
class SignalPlan:
    signals: tuple[str, ...]  # of SIGNALS
    samples: int = agreement.SAMPLES
    temperature: float = agreement.TEMPERATURE
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [s for s in self.signals if s not in SIGNALS]
        if unknown:
            raise ValueError(f"unknown signals {', '.join(unknown)} (known: {', '.join(SIGNALS)})")
        if self.samples < 2:
            raise ValueError("agreement needs at least 2 samples")


_FIELD = {AGREEMENT: "samples", SELF_CHECK: "self_check"}


def pending(items: Sequence[Item], rows: Mapping[str, Mapping[str, Any]], tier: str,
            plan: SignalPlan) -> list[Item]:
    """Rule-graded items whose greedy answer is recorded but some asked-for signal is not."""
    todo = []
    for item in items:
        result = (rows.get(item.id) or {}).get("models", {}).get(tier)
        if item.kind == "open" or not result or result.get("error"):
            continue
        if not all(_has(result, _FIELD[s]) for s in plan.signals):
            todo.append(item)
    return todo


def _has(result: Mapping[str, Any], field: str) -> bool:
    """A signal recorded without error (a failed one is tried again on the next run)."""
    value = result.get(field)
    return isinstance(value, dict) and not value.get("error")


async def collect(backend: Backend, tier: str, items: Sequence[Item], writer: OutcomeWriter,
                  plan: SignalPlan, meter: Meter | None, stream: TextIO,
                  pause_file: Path | None = None) -> None:
    """Add the plan's signals to each pending item's recorded result, one line per item (no
    new item is started while `pause_file` exists)."""
    rows = read_rows(writer.path)
    todo = pending(items, rows, tier, plan)
    if not todo:
        print(f"{tier}: signals already collected", file=stream)
        return
    print(f"{tier}: collecting {', '.join(plan.signals)} for {len(todo)} prompts", file=stream)
    for done, item in enumerate(todo, 1):
        await wait_while_paused(pause_file, lambda line: print(f"{tier}: {line}", file=stream,
                                                               flush=True))
        prompt = render(item)
        result = dict(rows[item.id]["models"][tier])
        if AGREEMENT in plan.signals and not _has(result, "samples"):
            result["samples"] = await _samples(backend, tier, item, prompt, plan, meter)
        if SELF_CHECK in plan.signals and not _has(result, "self_check"):
            result["self_check"] = await _self_check(backend, tier, prompt,
                                                     result.get("output") or "", meter)
        row = {k: v for k, v in rows[item.id].items() if k not in ("v", "models")}
        writer.append({**row, "models": {tier: result}})
        if done % 10 == 0 or done == len(todo):
            print(f"{tier}: signals {done}/{len(todo)}", file=stream, flush=True)


async def _call(backend: Backend, body: dict[str, Any], meter: Meter | None
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """One call's parsed answer and its cost (tokens, latency, joules when metered)."""
    before = meter.read_joules() if meter else None
    started = time.perf_counter()
    completion = await backend.create(Endpoint.CHAT, body)
    cost: dict[str, Any] = {"latency_s": round(time.perf_counter() - started, 4)}
    if meter is not None and before is not None:
        cost["joules"] = round(meter.read_joules() - before, 4)
    if completion.usage is not None:
        cost.update(prompt_tokens=completion.usage.prompt_tokens,
                    completion_tokens=completion.usage.completion_tokens)
    answer: dict[str, Any] = orjson.loads(completion.body)
    return answer, cost


async def _samples(backend: Backend, tier: str, item: Item, prompt: Prompt, plan: SignalPlan,
                   meter: Meter | None) -> dict[str, Any]:
    body = {"model": tier, "messages": [{"role": "user", "content": prompt.text}],
            "max_tokens": prompt.max_tokens, "temperature": plan.temperature,
            "seed": plan.seed, "n": plan.samples}
    try:
        answer, cost = await _call(backend, body, meter)
    except Exception as exc:  # recorded; a later run tries again
        return {"error": f"{type(exc).__name__}: {exc}"}
    outputs = [(c.get("message") or {}).get("content") or "" for c in answer["choices"]]
    grades = [graders.grade(item, output) for output in outputs]
    chosen = agreement.agree(outputs, item.kind, item.choices)
    return {"k": len(outputs), "temperature": plan.temperature, "outputs": outputs,
            "answers": [g.answer for g in grades], "qualities": [g.quality for g in grades],
            "majority": chosen.index, "majority_quality": grades[chosen.index].quality,
            AGREEMENT: chosen.share, **cost}


async def _self_check(backend: Backend, tier: str, prompt: Prompt, output: str,
                      meter: Meter | None) -> dict[str, Any]:
    try:
        answer, cost = await _call(backend, selfcheck.request(tier, prompt.text, output), meter)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    content = (answer["choices"][0].get("logprobs") or {}).get("content")
    return {"p_yes": selfcheck.p_yes(content), **cost}


# -- reading them back ------------------------------------------------------------------------

def auc(scores: np.ndarray, right: np.ndarray) -> float | None:
    """P(a right answer scores above a wrong one), ties counting half (Mann-Whitney); None
    when the answers are all right or all wrong."""
    right = right.astype(bool)
    positives, negatives = scores[right], scores[~right]
    if not len(positives) or not len(negatives):
        return None
    above = (positives[:, None] > negatives[None, :]).mean()
    ties = (positives[:, None] == negatives[None, :]).mean()
    return float(above + ties / 2)


def report(path: str, tier: str) -> str:
    """Markdown: per task, over the prompts with agreement recorded, the greedy and majority
    accuracy, each signal's AUC against the correctness of the answer it would return (greedy
    for logprobs and self-check, the majority for agreement; agreement also against greedy),
    and joules per prompt of the greedy answer, the k samples and the self-check call (the
    self-check's columns over the prompts that have one)."""
    rows = [r for r in read_rows(path).values()
            if _complete((r.get("models") or {}).get(tier))]
    header = ["task", "prompts", "greedy right", "majority right", "AUC lp_mean",
              "AUC agreement (majority)", "AUC agreement (greedy)", "AUC self-check",
              "J greedy", "J samples", "J self-check"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task in [*sorted({r["task"] for r in rows}), "all"]:
        chosen = [r["models"][tier] for r in rows if task in ("all", r["task"])]
        greedy = np.array([r["quality"] >= 1.0 for r in chosen])
        majority = np.array([r["samples"]["majority_quality"] >= 1.0 for r in chosen])
        share = np.array([r["samples"][AGREEMENT] for r in chosen])
        check = np.array([_p_yes(r) for r in chosen])
        lp = np.array([(r.get("features") or {}).get("lp_mean", np.nan) for r in chosen])
        cells = [f"**{task}**" if task == "all" else task, str(len(chosen)),
                 f"{greedy.mean():.2f}", f"{majority.mean():.2f}",
                 _fmt(auc(lp, greedy) if not np.isnan(lp).any() else None),
                 _fmt(auc(share, majority)), _fmt(auc(share, greedy)),
                 _fmt(auc(check[~np.isnan(check)], greedy[~np.isnan(check)])),
                 _joules(chosen, None), _joules(chosen, "samples"), _joules(chosen, "self_check")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _complete(result: Mapping[str, Any] | None) -> bool:
    return result is not None and not result.get("error") and _has(result, "samples")


def _p_yes(result: Mapping[str, Any]) -> float:
    value = (result.get("self_check") or {}).get("p_yes")
    return float("nan") if value is None else float(value)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _joules(results: Sequence[Mapping[str, Any]], field: str | None) -> str:
    values = [(r if field is None else r.get(field) or {}).get("joules") for r in results]
    known = [float(v) for v in values if v is not None]
    return "n/a" if len(known) < len(values) else f"{np.mean(known):.1f}"
