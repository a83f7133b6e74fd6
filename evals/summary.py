"""An evaluation as a printed table, a Markdown summary and metrics.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from greenroute.evals.evaluate import Evaluation, PolicyResult

COLUMNS = (("apgr", "APGR", "num"), ("cpt20", "CPT(20%)", "pct"), ("cpt50", "CPT(50%)", "pct"),
           ("cpt80", "CPT(80%)", "pct"), ("aiq", "AIQ", "num"),
           ("energy_saved", "energy saved", "pct"), ("share_at_target", "large share", "pct"))


def _cell(value: float | None, kind: str) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" if kind == "pct" else f"{value:.3f}"


def _rows(evaluation: Evaluation, pick: str) -> list[list[str]]:
    rows = []
    for result in evaluation.results:
        values = {key: (result.mean(key) if pick == "folds" else result.whole.get(key))
                  for key, _, _ in COLUMNS}
        rows.append([result.name, *(_cell(values[key], kind) for key, _, kind in COLUMNS)])
    return rows


def _header(evaluation: Evaluation) -> list[str]:
    target = f"{round(100 * evaluation.target)}%"
    names = [name.replace("energy saved", f"saved @{target}").replace(
        "large share", f"large share @{target}") for _, name, _ in COLUMNS]
    return ["policy", *names]


def _aligned(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                      enumerate(zip(row, widths, strict=True))) for row in rows]


TARGET_HEADER = ["policy", "target", "quality / largest", "energy saved", "largest share",
                 "target met", "ideal saved", "price of the guarantee"]


def _target_rows(evaluation: Evaluation) -> list[list[str]]:
    rows = []
    for row in evaluation.targets:
        rows.append([row.policy, f"{row.target:.2f}",
                     _spread(row.quality_ratio, "num"), _spread(row.energy_saved, "pct"),
                     _spread(row.largest_share, "pct"),
                     f"{row.met}/{len(row.quality_ratio)}",
                     _spread(row.ideal_saved, "pct") if row.ideal_saved else "-",
                     f"{100 * row.price:.1f} points" if row.price is not None else "-"])
    return rows


def _spread(values: list[float], kind: str) -> str:
    mean = sum(values) / len(values)
    if len(values) == 1:
        return _cell(mean, kind)
    low, high = min(values), max(values)
    return f"{_cell(mean, kind)} ({_cell(low, kind)}-{_cell(high, kind)})"


def text_table(evaluation: Evaluation) -> str:
    """Both views, aligned for a terminal, and the targets when there are any."""
    out = [_context(evaluation), ""]
    for pick, title in (("folds", f"mean of {evaluation.folds} folds"),
                        ("whole", "whole table (out-of-fold scores)")):
        out.append(title)
        out += _aligned([_header(evaluation), *_rows(evaluation, pick)])
        out.append("")
    if evaluation.targets:
        out.append("calibrated targets on held-out prompts (mean over folds, min-max)")
        out += _aligned([TARGET_HEADER, *_target_rows(evaluation)])
        out.append("")
    return "\n".join(out)


def markdown(evaluation: Evaluation, plots: list[str]) -> str:
    out = ["# Routing evaluation", "", _context(evaluation), ""]
    for pick, title in (("folds", f"Mean of {evaluation.folds} folds"),
                        ("whole", "Whole table (out-of-fold scores)")):
        header = _header(evaluation)
        out += [f"## {title}", "", "| " + " | ".join(header) + " |",
                "|" + "---|" * len(header)]
        out += ["| " + " | ".join(row) + " |" for row in _rows(evaluation, pick)]
        out.append("")
    if evaluation.targets:
        out += ["## Calibrated targets on held-out prompts", "",
                "| " + " | ".join(TARGET_HEADER) + " |", "|" + "---|" * len(TARGET_HEADER)]
        out += ["| " + " | ".join(row) + " |" for row in _target_rows(evaluation)]
        out.append("")
    out += [f"![{p}]({p})" for p in plots]
    return "\n".join(out) + "\n"


def _context(evaluation: Evaluation) -> str:
    ref = evaluation.reference
    s, large = evaluation.small, evaluation.large
    return (f"{evaluation.prompts} prompts; small = {s} (quality {ref[f'quality_{s}']:.3f}, "
            f"{ref[f'joules_{s}']:.4g} J/prompt), large = {large} (quality "
            f"{ref[f'quality_{large}']:.3f}, {ref[f'joules_{large}']:.4g} J/prompt); "
            f"only large right {ref['only_large_right']}, "
            f"only small right {ref['only_small_right']}; energy: "
            + ", ".join(f"{m} {src}" for m, src in evaluation.energy_source.items()))


def metrics_json(evaluation: Evaluation) -> dict[str, Any]:
    def result(r: PolicyResult) -> dict[str, Any]:
        keys = [key for key, _, _ in COLUMNS] + ["quality_at_target"]
        return {"folds": r.folds, "mean": {k: r.mean(k) for k in keys},
                "std": {k: r.std(k) for k in keys}, "whole": r.whole}

    return {"small": evaluation.small, "large": evaluation.large, "prompts": evaluation.prompts,
            "folds": evaluation.folds, "target": evaluation.target,
            "energy_source": evaluation.energy_source, "reference": evaluation.reference,
            "policies": {r.name: result(r) for r in evaluation.results},
            "targets": [{"policy": r.policy, "target": r.target, "quality_ratio": r.quality_ratio,
                         "energy_saved": r.energy_saved, "largest_share": r.largest_share,
                         "met": r.met, "ideal_saved": r.ideal_saved, "price": r.price}
                        for r in evaluation.targets]}


def write(evaluation: Evaluation, out: Path, plots: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics_json(evaluation), indent=2) + "\n")
    (out / "summary.md").write_text(markdown(evaluation, plots))
