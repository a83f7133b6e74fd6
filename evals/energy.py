"""Energy per prompt for offline evaluation: measured joules when the outcome table has them,
else a per-model profile of joules per generated token.

The default profile is the ML.ENERGY leaderboard's energy per output token on one H100 for
Llama-3.1-8B-Instruct (0.095 J) and Llama-3.1-70B-Instruct (0.563 J): a real small/large pair
served the way GreenRoute serves production traffic (vLLM, batched). It applies to the smaller and
the larger model of a pair when the table has no measurements of its own. A table without token
counts (RouteLLM's MMLU results) gets one profile unit per call, so only the ratio of the two
models' figures matters there.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from greenroute.evals.outcomes import OutcomeTable

DEFAULT_PROFILE = {"small": 0.095, "large": 0.563}
SOURCE_PROFILE = "profile"


def parse_profile(text: str) -> dict[str, float]:
    """ "small=0.095,large=0.563" -> {"small": 0.095, "large": 0.563}."""
    profile = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        try:
            profile[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"bad energy profile entry {part!r} (want name=joules_per_token)") \
                from None
        if profile[name.strip()] <= 0:
            raise ValueError(f"energy profile entry {part!r} must be positive")
    return profile


def prompt_energy(table: OutcomeTable, model: str, role: str,
                  profile: Mapping[str, float] | None = None) -> tuple[np.ndarray, str]:
    """Joules per prompt for `model` (whose role in the pair is "small" or "large"), and where
    they come from: the table's measurements (their source, e.g. "estimate"), or "profile"."""
    joules = table.joules.get(model)
    if profile is None and joules is not None:
        return joules, f"measured ({table.energy_source.get(model) or 'mixed sources'})"
    profile = {**DEFAULT_PROFILE, **(profile or {})}
    per_token = profile.get(model, profile.get(role))
    if per_token is None:
        raise ValueError(f"no energy profile for {model!r}")
    tokens = table.completion_tokens.get(model)
    units = tokens if tokens is not None else np.ones(len(table))
    return per_token * np.maximum(units, 1.0), SOURCE_PROFILE


def first_token_energy(table: OutcomeTable, model: str, joules: np.ndarray) -> np.ndarray:
    """Joules per prompt of `model` stopped after its first generated token: what a cascade
    stage judged on its first token costs when it is not kept. Fitted on the table's own calls
    as joules = a x prompt tokens + b x generated tokens (least squares, a, b >= 0), then
    a x prompt tokens + b, at most the whole call's joules. Without token counts nothing is
    known about the prefill, so the whole call's joules."""
    prompt, generated = table.prompt_tokens.get(model), table.completion_tokens.get(model)
    if prompt is None or generated is None or len(joules) < 2:
        return joules
    tokens = np.column_stack([prompt, generated]).astype(float)
    (a, b), *_ = np.linalg.lstsq(tokens, joules, rcond=None)
    if a < 0 or b < 0:  # one kind explains nothing: fit the other alone
        only = 1 if a < 0 else 0
        column = tokens[:, only]
        slope = max(float(column @ joules / (column @ column)), 0.0) if column.any() else 0.0
        a, b = (0.0, slope) if only else (slope, 0.0)
    return np.asarray(np.minimum(a * prompt + b, joules), dtype=float)
