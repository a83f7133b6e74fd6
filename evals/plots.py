"""Plots of an evaluation: quality against energy, and against the share of large calls."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np

from greenroute.evals.evaluate import ORACLE, RANDOM, Evaluation
from greenroute.evals.metrics import Curve

QUALITY_ENERGY = "quality_energy.png"
QUALITY_SHARE = "quality_share.png"


def write(evaluation: Evaluation, out: Path) -> list[str]:
    """Write both PNGs into `out`; return their file names."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    ref = evaluation.reference
    small, large = evaluation.small, evaluation.large
    target_quality = evaluation.target * ref[f"quality_{large}"]
    axes_of: tuple[tuple[str, Callable[[Curve], np.ndarray], str], ...] = (
        (QUALITY_ENERGY, lambda c: c.energy, "mean energy per prompt (J)"),
        (QUALITY_SHARE, lambda c: 100 * c.share, "prompts sent to the large model (%)"))
    for name, x_of, x_label in axes_of:
        figure, axes = plt.subplots(figsize=(8.5, 4.5), dpi=120)
        colors = itertools.cycle([tuple(rgba) for rgba in plt.get_cmap("tab20")(np.arange(20))])
        for result in evaluation.results:
            if result.curve is None:
                continue
            color: str | tuple[float, ...]
            if result.name in (RANDOM, ORACLE):
                color, line = ("grey", "--") if result.name == RANDOM else ("black", ":")
            else:  # whole calibrated policies dashed beside their scores alone
                color, line = next(colors), "--" if result.whole_policy else "-"
            x = x_of(result.curve)
            order = np.argsort(x, kind="stable")
            axes.plot(x[order], result.curve.quality[order], label=result.name, color=color,
                      linestyle=line)
        if name == QUALITY_ENERGY:
            axes.scatter([ref[f"joules_{small}"], ref[f"joules_{large}"]],
                         [ref[f"quality_{small}"], ref[f"quality_{large}"]], color="tab:red",
                         zorder=3, label=f"{small} / {large} alone")
        axes.axhline(target_quality, color="tab:green", linewidth=0.8,
                     label=f"{round(100 * evaluation.target)}% of {large}'s quality")
        axes.set_xlabel(x_label)
        axes.set_ylabel("mean quality")
        axes.set_title(f"{small} vs {large}, {evaluation.prompts} prompts")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        figure.tight_layout()
        figure.savefig(out / name)
        plt.close(figure)
    return [QUALITY_ENERGY, QUALITY_SHARE]
