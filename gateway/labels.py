"""Energy labels: one card per tier, from the ledger (`greenroute report --labels`).

A card gives a tier's Wh per 1,000 requests and per 1,000 output tokens, its gCO2 per 1,000
requests, its quality on an outcome table when one is given, its energy source, and a rating
from A to E. The rating is relative, like AI Energy Score's stars: the tier with the fewest
joules per output token in the window is the reference, and each letter after A is one more
doubling of its energy per output token (docs/energy.md, "Energy labels"). Per output token,
not per request, because a router sends different requests to different tiers: per request,
a tier that gets the long questions would look worse for its traffic, not for its model.

A tier's figures come from its own attempts (`request_models`), so a cascade's escalated
request counts once for each tier that worked on it, each with its own joules.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from greenroute.gateway.ledger.schema import AttemptRow

J_PER_WH = 3600.0
J_PER_KWH = 3.6e6
RATINGS = "ABCDE"
RATING_SCALE = ("energy per output token relative to the most efficient tier in the window: "
                "A under 2x, B under 4x, C under 8x, D under 16x, E 16x or more")
ESTIMATE_NOTE = "ESTIMATE: CPU time x watts per core, not a measurement"
# The EU energy label's colours, A (dark green) to E (red).
COLOURS = ("#00a651", "#8dc63f", "#fff200", "#f7941d", "#ed1c24")


@dataclass(frozen=True)
class Quality:
    """A tier's mean score on an outcome table, and which of the table's models it is."""

    model: str
    mean: float
    prompts: int


@dataclass(frozen=True)
class Label:
    """One tier's card. Energy figures cover its metered attempts only; None where unknown."""

    tier: str
    requests: int  # attempts on this tier, answered or not
    answered: int
    metered: int  # attempts with joules
    output_tokens: int
    metered_output_tokens: int  # of the metered attempts: the per-token figure's denominator
    joules: float
    wh_per_1k_requests: float | None
    wh_per_1k_output_tokens: float | None
    gco2_per_1k_requests: float | None
    energy_sources: list[str]
    estimate: bool  # some of its energy is the CPU-time estimate, not a measured counter
    upstream_models: list[str]
    relative_to_best: float | None = None  # its J/output token over the best tier's
    rating: str | None = None
    quality: Quality | None = None

    @property
    def source_text(self) -> str:
        if not self.energy_sources:
            return "not metered"
        return ESTIMATE_NOTE if self.estimate else "measured: " + "+".join(self.energy_sources)


def rating(ratio: float) -> str:
    """The letter for a tier whose J/output token is `ratio` times the best tier's (>= 1)."""
    return RATINGS[min(max(int(math.floor(math.log2(ratio))), 0), len(RATINGS) - 1)]


def tier_labels(attempts: Iterable[AttemptRow], grid: float,
                intensity: Mapping[str, float] | None = None) -> list[Label]:
    """The cards of every tier with attempts, rated against each other: the most efficient
    first, unrated tiers last (by name). A call's gCO2 is at its request's own grid intensity
    (`intensity`, by request id, as the ledger stored it) and at `grid` where there is none."""
    by_tier: dict[str, list[AttemptRow]] = defaultdict(list)
    for attempt in attempts:
        by_tier[attempt.tier].append(attempt)
    labels = rate([_label(tier, rows, grid, intensity or {})
                   for tier, rows in sorted(by_tier.items())])
    return sorted(labels, key=lambda x: (x.relative_to_best is None, x.relative_to_best or 0))


def _label(tier: str, rows: Sequence[AttemptRow], grid: float,
           intensity: Mapping[str, float]) -> Label:
    metered = [a for a in rows if a.joules is not None]
    joules = sum(a.joules or 0.0 for a in metered)
    gco2 = sum((a.joules or 0.0) / J_PER_KWH * intensity.get(a.request_id, grid)
               for a in metered)
    output = sum(a.completion_tokens or 0 for a in metered)
    sources = sorted({a.energy_source for a in metered if a.energy_source})
    return Label(
        tier=tier, requests=len(rows), answered=sum(1 for a in rows if a.answered),
        metered=len(metered), output_tokens=sum(a.completion_tokens or 0 for a in rows),
        metered_output_tokens=output, joules=joules,
        wh_per_1k_requests=joules / J_PER_WH / len(metered) * 1000 if metered else None,
        wh_per_1k_output_tokens=joules / J_PER_WH / output * 1000 if output else None,
        gco2_per_1k_requests=gco2 / len(metered) * 1000 if metered else None,
        energy_sources=sources, estimate="estimate" in sources,
        upstream_models=sorted({a.upstream_model for a in rows if a.upstream_model}))


def rate(labels: Sequence[Label]) -> list[Label]:
    """Each card with its rating. Tiers with no energy per output token stay unrated, and so
    does one whose counter never moved (0 Wh): no ratio can be taken against nothing."""
    per_token = {x.tier: v for x in labels
                 if (v := x.wh_per_1k_output_tokens) is not None and v > 0}
    if not per_token:
        return list(labels)
    best = min(per_token.values())
    return [replace(x, relative_to_best=per_token[x.tier] / best,
                    rating=rating(per_token[x.tier] / best)) if x.tier in per_token else x
            for x in labels]


def with_quality(labels: Sequence[Label], outcomes: str | Path) -> list[Label]:
    """Each card with its tier's mean quality on an outcome table (greenroute.evals.outcomes).

    A tier is the table's model of the same name (collection names models after tiers), else
    the model whose `model_id` is the tier's upstream model. Means are over the prompts every
    matched model answered, so the tiers' qualities are on the same prompts."""
    from greenroute.evals import outcomes as tables  # numpy: only when a table is asked for

    rows = tables.read_rows(outcomes)
    if not rows:
        raise tables.OutcomeError(f"no outcome rows in {outcomes}")
    ids: dict[str, set[str]] = defaultdict(set)
    for row in rows.values():
        for model, result in row["models"].items():
            if result.get("model_id"):
                ids[model].add(str(result["model_id"]))
    names = {m for row in rows.values() for m in row["models"]}
    matched: dict[str, str] = {}
    for label in labels:
        by_id = [m for m in sorted(names) if ids[m] & set(label.upstream_models)]
        if label.tier in names:
            matched[label.tier] = label.tier
        elif by_id:
            matched[label.tier] = by_id[0]
    if not matched and labels:
        raise tables.OutcomeError(
            f"{outcomes}: no tier ({', '.join(x.tier for x in labels)}) is one of its models "
            f"({', '.join(sorted(names))}) by name or by model_id")
    if not matched:
        return list(labels)
    table = tables.load_table(outcomes, sorted(set(matched.values())))
    quality = {tier: Quality(model, float(table.quality[model].mean()), len(table))
               for tier, model in matched.items()}
    return [replace(x, quality=quality.get(x.tier)) for x in labels]


def notes(labels: Sequence[Label]) -> list[str]:
    """What a reader of the cards must know: estimates, ratings across different sources."""
    said = []
    estimated = [x.tier for x in labels if x.estimate]
    if estimated:
        said.append(f"{', '.join(estimated)}: energy is an estimate (CPU time x watts per "
                    "core), not a measured counter (docs/energy.md)")
    sources = {tuple(x.energy_sources) for x in labels if x.rating}
    if len(sources) > 1:
        said.append("ratings compare tiers metered by different sources: "
                    + "; ".join("+".join(s) for s in sorted(sources)))
    return said


# -- output -----------------------------------------------------------------------------------

def _num(value: float | None, significant: int = 3) -> str:
    """A figure to `significant` digits, never in exponent form (0.000123, 1.23, 1,235)."""
    if value is None:
        return "-"
    if value == 0:
        return "0"
    digits = max(0, significant - 1 - math.floor(math.log10(abs(value))))
    return f"{value:,.{digits}f}"


def _ratio(value: float) -> str:
    return f"{value:.0f}x" if value >= 10 else f"{value:.2f}x"


def card_lines(label: Label) -> list[str]:
    """A card's figures as text lines (the same lines on the terminal and in the PNG)."""
    lines = [f"{_num(label.wh_per_1k_requests)} Wh / 1,000 requests",
             f"{_num(label.wh_per_1k_output_tokens)} Wh / 1,000 output tokens",
             f"{_num(label.gco2_per_1k_requests)} gCO2 / 1,000 requests"]
    if label.quality is not None:
        lines.append(f"quality {label.quality.mean:.3f} ({label.quality.prompts:,} prompts, "
                     f"model {label.quality.model})")
    lines.append(f"{label.requests:,} requests ({label.answered:,} answered), "
                 f"{label.output_tokens:,} output tokens")
    return lines


def _rating_detail(label: Label) -> str:
    if label.relative_to_best is None:
        return "unrated: no energy per output token"
    return f"{_ratio(label.relative_to_best)} the best energy per output token"


def render_cards(labels: Sequence[Label], header: str, out: Any) -> None:
    """The cards side by side on a terminal (rich panels)."""
    from rich.columns import Columns
    from rich.console import Console
    from rich.panel import Panel
    from rich.text import Text

    console = Console(file=out, width=120)
    console.print(header)
    panels = []
    for label in labels:
        text = Text()
        letter = f"{label.rating}: " if label.rating else ""
        text.append(f"rating {letter}{_rating_detail(label)}\n", style="bold")
        text.append("\n".join(card_lines(label)) + "\n")
        text.append(label.source_text, style="bold red" if label.estimate else "")
        panels.append(Panel(text, title=f"[bold]{label.tier}[/bold]", width=58))
    console.print(Columns(panels) if panels else "no tier has requests in this window")
    console.print(f"rating: {RATING_SCALE}")
    for note in notes(labels):
        console.print(f"note: {note}")


def csv_rows(labels: Sequence[Label]) -> list[list[Any]]:
    header = ["tier", "rating", "relative_to_best", "wh_per_1k_requests",
              "wh_per_1k_output_tokens", "gco2_per_1k_requests", "quality", "quality_model",
              "quality_prompts", "requests", "answered", "metered", "output_tokens",
              "metered_output_tokens", "joules", "energy_sources"]
    rows: list[list[Any]] = [header]
    for x in labels:
        q = x.quality
        rows.append([x.tier, x.rating, x.relative_to_best, x.wh_per_1k_requests,
                     x.wh_per_1k_output_tokens, x.gco2_per_1k_requests,
                     q.mean if q else None, q.model if q else None, q.prompts if q else None,
                     x.requests, x.answered, x.metered, x.output_tokens,
                     x.metered_output_tokens, x.joules,
                     "+".join(x.energy_sources)])
    return [["" if v is None else v for v in row] for row in rows]


def plot_cards(labels: Sequence[Label], path: str, subtitle: str) -> None:
    """The cards side by side in a PNG: each an A-E scale with the tier's letter marked, its
    figures, and its energy source (an estimate in a red band). `subtitle` may hold two
    lines (the ledger; the window and grid)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch, Rectangle

    card, gap = 4.0, 0.25  # inches
    row = len(labels) * (card + gap) - gap
    width = max(row + 2 * gap, 7.0)
    figure = plt.figure(figsize=(width, 6.0), dpi=100)
    for index, label in enumerate(labels):
        left = (width - row) / 2 + index * (card + gap)
        ax = figure.add_axes((left / width, 0.12, card / width, 0.74))
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.axis("off")
        ax.add_patch(FancyBboxPatch((0.01, 0.01), 0.98, 0.98, boxstyle="round,pad=0,"
                                    "rounding_size=0.03", fill=False, linewidth=1.5))
        ax.text(0.5, 0.93, label.tier, ha="center", va="center", fontsize=16,
                fontweight="bold")
        for step, (letter, colour) in enumerate(zip(RATINGS, COLOURS, strict=True)):
            y = 0.80 - step * 0.065
            ax.add_patch(Rectangle((0.06, y), 0.22 + 0.07 * step, 0.055, color=colour))
            ax.text(0.08, y + 0.027, letter, va="center", fontsize=11, fontweight="bold")
            if letter == label.rating:
                ax.annotate("", xy=(0.30 + 0.07 * step, y + 0.027), xytext=(0.72, y + 0.027),
                            arrowprops={"arrowstyle": "-|>", "lw": 2, "color": "black"})
                ax.text(0.80, y + 0.027, letter, ha="center", va="center", fontsize=24,
                        fontweight="bold")
        ax.text(0.06, 0.49, _rating_detail(label), va="center", fontsize=9,
                style="italic")
        for line_no, line in enumerate(card_lines(label)):
            ax.text(0.06, 0.41 - line_no * 0.055, line, va="center", fontsize=9.5,
                    fontweight="bold" if line_no < 2 else "normal")
        band = "#ed1c24" if label.estimate else "#dddddd"
        ax.add_patch(Rectangle((0.04, 0.04), 0.92, 0.075, color=band))
        source = "ESTIMATE: CPU time x W/core,\nnot a measurement" if label.estimate \
            else label.source_text
        ax.text(0.5, 0.078, source, ha="center", va="center", fontsize=9, fontweight="bold",
                color="white" if label.estimate else "black")
    if not labels:
        figure.text(0.5, 0.5, "no tier has requests in this window", ha="center")
    figure.text(0.5, 0.955, "GreenRoute energy labels", ha="center", va="center",
                fontsize=14, fontweight="bold")
    figure.text(0.5, 0.905, subtitle, ha="center", va="center", fontsize=9)
    figure.text(0.5, 0.055, "rating: " + RATING_SCALE.replace("window: ", "window:\n"),
                ha="center", va="center", fontsize=9)
    figure.savefig(path)
    plt.close(figure)

