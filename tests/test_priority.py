"""The saving priority of a prompt-only step (routers/priority.py), on synthetic outcomes whose
ground truth is known: half the prompts cost ten times the joules of the other half, and
whether the small tier is right does not depend on which half a prompt is in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from routing_fixtures import static_encoder

from greenroute.evals.training import TierData, TrainConfig, fit_policy
from greenroute.routers import artifact
from greenroute.routers.policy import simulate
from greenroute.routers.priority import SavingPriority


def _world(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                         np.ndarray]:
    """Embeddings whose coordinate 0 decides how often the small tier is right and coordinate 1
    how much every tier's answer costs; the large tier is right with probability 0.9."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    p_small = 1 / (1 + np.exp(-8 * x[:, 0]))
    small = (rng.random(n) < p_small).astype(float)
    large = (rng.random(n) < 0.9).astype(float)
    energy_large = np.where(x[:, 1] > 0, 40.0, 4.0) * rng.uniform(0.8, 1.2, n)
    return x, small, large, energy_large, p_small


def _data(small: np.ndarray, large: np.ndarray, energy_large: np.ndarray) -> TierData:
    return TierData(["small", "large"], np.column_stack([small, large]),
                    np.column_stack([energy_large / 4, energy_large]), [None, None], {})


def test_of_two_prompts_the_router_scores_alike_the_dearer_one_goes_small_first() -> None:
    x, small, large, energy_large, _ = _world(2000, seed=1)
    scores = np.clip(0.5 + 0.4 * x[:, 0], 0, 1)  # a router's scores: coordinate 0 only
    priority = SavingPriority.fit(x, scores, small, large, energy_large / 4, energy_large)
    assert priority is not None
    probe = np.zeros((2, 16))
    probe[:, 0], probe[:, 1] = 0.3, [0.6, -0.6]  # same p, the first in the dear half
    p = np.full(2, 0.62)
    high, low = priority.score(probe, p)
    assert 0.0 <= low < high <= 1.0
    # and where the saving is the same, a higher router score ranks higher
    same = np.repeat(probe[:1], 2, axis=0)
    lower, higher = priority.score(same, np.array([0.4, 0.8]))
    assert lower < higher


def test_where_every_prompt_costs_the_same_the_priority_keeps_the_routers_order() -> None:
    x, small, large, _, _ = _world(1000, seed=2)
    noise = np.random.default_rng(3).normal(0, 0.1, 1000)
    scores = np.clip(0.5 + 0.4 * x[:, 0] + noise, 0, 1)
    priority = SavingPriority.fit(x, scores, small, large, np.full(1000, 1.0),
                                  np.full(1000, 5.0))
    assert priority is not None
    ranked = priority.raw(x, scores)
    order = np.argsort(scores, kind="stable")
    assert np.all(np.diff(ranked[order]) >= -1e-9 * np.abs(ranked).max())


def test_scores_that_carry_no_sign_of_the_loss_give_no_priority() -> None:
    x, small, large, energy_large, _ = _world(500, seed=4)
    backwards = 1 / (1 + np.exp(8 * x[:, 0]))  # high where the small tier is mostly wrong
    assert SavingPriority.fit(x, backwards, small, large, energy_large / 4, energy_large) is None


def test_ranking_by_saving_saves_more_at_the_same_target_on_new_traffic(tmp_path: Path) -> None:
    """Trained both ways on the same prompts, calibrated at 0.9; on 20,000 new prompts (whose
    expected quality is known) both meet the target and the saving-ranked policy spends less.
    Saved and loaded, the artifact serves the same scores."""
    x, small, large, energy_large, _ = _world(3000, seed=5)
    prompts = [f"prompt {i}" for i in range(3000)]
    data = _data(small, large, energy_large)
    by_saving, _ = fit_policy(x, prompts, data, TrainConfig(kind="logistic", targets=(0.9,)))
    by_score, _ = fit_policy(x, prompts, data, TrainConfig(kind="logistic", targets=(0.9,),
                                                           rank_by_saving=False))
    assert by_saving.steps[0].priority is not None and by_score.steps[0].priority is None
    new_x, _, _, new_energy, new_p = _world(20_000, seed=6)
    expected = TierData(["small", "large"], np.column_stack([new_p, np.full(20_000, 0.9)]),
                        np.column_stack([new_energy / 4, new_energy]), [None, None], {})
    spent = {}
    for name, policy in (("saving", by_saving), ("score", by_score)):
        outcome = simulate(policy, policy.scores(new_x), expected.features, expected.quality,
                           expected.energy, policy.candidate_for(0.9))
        assert outcome.quality.mean() >= 0.9 * 0.9
        spent[name] = outcome.energy.sum() / new_energy.sum()
    assert spent["saving"] < spent["score"] - 0.03
    path = artifact.save(tmp_path / "router", by_saving, static_encoder(tmp_path / "encoder"),
                         {"kind": "logistic"})
    loaded = artifact.load(path).policy
    assert loaded.steps[0].priority is not None
    np.testing.assert_allclose(loaded.scores(new_x[:50]), by_saving.scores(new_x[:50]))


def test_a_table_priced_per_call_is_ranked_by_score_as_before() -> None:
    """Where each tier costs the same on every prompt (RouteLLM's tables), there is nothing to
    rank by saving: no priority is fitted and the thresholds are those of ranking by score."""
    x, small, large, _, _ = _world(1500, seed=7)
    prompts = [f"prompt {i}" for i in range(1500)]
    data = _data(small, large, np.full(1500, 4.0))
    default, _ = fit_policy(x, prompts, data, TrainConfig(kind="logistic", targets=(0.9,)))
    by_score, _ = fit_policy(x, prompts, data, TrainConfig(kind="logistic", targets=(0.9,),
                                                           rank_by_saving=False))
    assert default.steps[0].priority is None
    assert default.thresholds == by_score.thresholds
