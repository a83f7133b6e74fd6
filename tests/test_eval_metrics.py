"""Routing metrics on real and synthetic outcomes, checked against direct computation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from shared_data import SHARED_MMLU

from greenroute.evals import metrics
from greenroute.evals.evaluate import group_folds
from greenroute.evals.metrics import Pair
from greenroute.evals.outcomes import OutcomeTable


def _shared_mmlu() -> tuple[np.ndarray, np.ndarray]:
    lines = SHARED_MMLU.read_text(encoding="utf-8").split("\n")  # prompts hold U+2028
    rows = [json.loads(line) for line in lines if line.strip()]
    weak = np.array([float(r["mixtral_8x7b_correct"] in (True, "True")) for r in rows])
    strong = np.array([float(r["gpt4_1106_correct"] in (True, "True")) for r in rows])
    return weak, strong


def _pair(weak: np.ndarray, strong: np.ndarray) -> Pair:
    return Pair(weak, strong, np.full(len(weak), 0.095), np.full(len(weak), 0.563))


def test_oracle_matches_direct_computation_on_shared_mmlu() -> None:
    weak, strong = _shared_mmlu()
    n = len(weak)
    assert n == 14042
    only_strong = int(((strong == 1) & (weak == 0)).sum())
    assert only_strong == 2497
    # Reaching half the gap needs ceil(gap / 2) prompts that only the strong model gets right.
    needed = math.ceil((strong.sum() - weak.sum()) / 2)
    pair = _pair(weak, strong)
    curve = metrics.ranking_curve(pair, metrics.oracle_scores(pair))
    assert metrics.cpt(pair, curve, 0.5) == pytest.approx(needed / n)
    assert round(100 * metrics.cpt(pair, curve, 0.5), 2) == 6.25
    # At 95% of GPT-4's quality the oracle sends the fewest prompts possible to GPT-4.
    target = 0.95 * strong.mean()
    least = math.ceil(target * n - weak.sum())
    saving = metrics.energy_saved(pair, curve, 0.95)
    assert saving.share == pytest.approx(least / n)
    expected = 1 - ((n - least) * 0.095 + least * 0.563) / (n * 0.563)
    assert saving.saved == pytest.approx(expected)


def test_random_policy_recovers_half_the_gap() -> None:
    weak, strong = _shared_mmlu()
    pair = _pair(weak, strong)
    assert metrics.apgr(pair, metrics.random_curve(pair)) == pytest.approx(0.5)
    rng = np.random.default_rng(7)
    sampled = [metrics.apgr(pair, metrics.ranking_curve(pair, rng.random(len(weak))))
               for _ in range(5)]
    assert abs(np.mean(sampled) - 0.5) < 0.01
    assert all(abs(a - 0.5) < 0.03 for a in sampled)


def test_metrics_on_a_hand_computed_example() -> None:
    # Four prompts: the large model is right on 0, 1, 2; the small one on 0 and 3.
    pair = Pair(np.array([1.0, 0, 0, 1]), np.array([1.0, 1, 1, 0]),
                np.full(4, 1.0), np.full(4, 3.0))
    scores = np.array([0.9, 0.1, 0.2, 0.8])  # a router that ranks 1 and 2 as hard
    curve = metrics.ranking_curve(pair, scores)
    np.testing.assert_allclose(curve.share, [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(curve.quality, [0.5, 0.75, 1.0, 0.75, 0.75])
    np.testing.assert_allclose(curve.energy, [1.0, 1.5, 2.0, 2.5, 3.0])
    # The gap is 0.75 - 0.5 = 0.25, so PGR along the curve is 0, 1, 2, 1, 1.
    np.testing.assert_allclose(metrics.pgr(pair, curve.quality), [0, 1, 2, 1, 1])
    assert metrics.apgr(pair, curve) == pytest.approx((0.5 + 1.5 + 1.5 + 1) / 4)
    assert metrics.cpt(pair, curve, 0.5) == 0.25
    # Hull over [1, 3] J: up from (1, .5) to (2, 1), then flat: mean quality 0.875.
    assert metrics.aiq(pair, curve) == pytest.approx(0.875, abs=1e-3)
    saving = metrics.energy_saved(pair, curve, 1.0)  # 0.75 is reached at share 0.25, 1.5 J
    assert saving.share == 0.25 and saving.saved == pytest.approx(0.5)
    saving = metrics.energy_saved(pair, curve, 4 / 3)  # quality 1.0 needs share 0.5, 2 J
    assert saving.share == 0.5 and saving.saved == pytest.approx(1 - 2.0 / 3.0)
    assert metrics.energy_saved(pair, curve, 1.5).saved is None


def test_a_large_model_that_is_no_better_has_no_gap() -> None:
    pair = Pair(np.ones(3), np.ones(3), np.ones(3), np.full(3, 2.0))
    with pytest.raises(ValueError, match="gap"):
        metrics.apgr(pair, metrics.random_curve(pair))


def test_a_small_plan_that_costs_more_than_the_large_model_has_no_aiq() -> None:
    """A cascade stage with k samples and a self-check can cost more than the large model:
    AIQ's energy range is then empty, and the summary says None instead of failing."""
    pair = Pair(np.array([1.0, 0.0, 1.0]), np.array([1.0, 1.0, 1.0]), np.full(3, 0.9),
                np.full(3, 0.5))
    curve = metrics.ranking_curve(pair, metrics.oracle_scores(pair))
    summary = metrics.summarize(pair, curve, 0.9)
    assert summary["aiq"] is None and summary["apgr"] is not None
    with pytest.raises(ValueError, match="does not use more energy"):
        metrics.aiq(pair, curve)


def test_folds_keep_identical_prompts_together_and_balance_the_rest() -> None:
    prompts = [f"q{i}" for i in range(40)] + ["same"] * 5
    table = OutcomeTable(ids=[str(i) for i in range(45)], tasks=["t"] * 45, prompts=prompts,
                         models=["s", "l"], quality={"s": np.zeros(45), "l": np.ones(45)})
    folds = group_folds(table.prompts, 5, seed=3)
    assert sorted(np.concatenate(folds).tolist()) == list(range(45))
    holding = [i for i, f in enumerate(folds) if 40 in f]
    assert len(holding) == 1 and set(range(40, 45)) <= set(folds[holding[0]].tolist())
    assert max(map(len, folds)) - min(map(len, folds)) <= 5
    again = group_folds(table.prompts, 5, seed=3)
    assert [f.tolist() for f in again] == [f.tolist() for f in folds]
