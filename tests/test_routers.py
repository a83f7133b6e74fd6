"""Router models, calibration, the cascade policy and the artifact, on synthetic outcomes whose
ground truth is known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from routing_fixtures import WORDS, static_encoder

from greenroute.evals.training import TierData, TrainConfig, fit_policy
from greenroute.gateway.config import GatewayConfig
from greenroute.routers import artifact
from greenroute.routers.artifact import ArtifactError
from greenroute.routers.calibration import betting_lower_bound, choose
from greenroute.routers.confidence import ConfidenceModel
from greenroute.routers.encoders import StaticEncoder
from greenroute.routers.features import FEATURES, logprob_features
from greenroute.routers.models import KINDS, Target, make
from greenroute.routers.policy import CANDIDATES, RoutingPolicy, Step, simulate
from greenroute.routers.service import load_router


def _planted(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Embeddings where one direction decides whether the small tier is right (a planted
    signal), with outcomes drawn from known probabilities."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 24))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    p_small = 1 / (1 + np.exp(-8 * x[:, 0]))  # the signal: coordinate 0
    small = (rng.random(n) < p_small).astype(float)
    large = (rng.random(n) < 0.9).astype(float)
    return x, small, large, p_small


@pytest.mark.parametrize("kind", KINDS)
def test_every_router_kind_finds_a_planted_signal(kind: str) -> None:
    x, small, large, p_small = _planted(1500, seed=1)
    router = make(kind)
    router.fit(x[:1000], Target(small[:1000], large[:1000]))
    scores = router.predict(x[1000:])
    assert scores.shape == (500,) and np.all((scores >= 0) & (scores <= 1))
    # Ranked by score, the prompts the router trusts most must be the ones the small tier
    # really gets right most often.
    order = np.argsort(scores)
    assert p_small[1000:][order[-100:]].mean() > p_small[1000:][order[:100]].mean() + 0.5
    restored = type(router).from_state(router.state())
    np.testing.assert_allclose(restored.predict(x[1000:]), scores, atol=1e-3)


def test_labels_follow_the_quality_gap() -> None:
    target = Target(np.array([1.0, 0, 1, 0, 0.5]), np.array([1.0, 1, 0, 0, 1]))
    np.testing.assert_allclose(target.labels(), [0.5, 0.0, 1.0, 0.5, 0.25])
    np.testing.assert_allclose(Target(target.quality_small, target.quality_large,
                                      scheme="only-large").labels(), [1, 0, 1, 1, 0])


def test_betting_bound_is_valid_and_tight() -> None:
    rng = np.random.default_rng(0)
    misses = 0
    for trial in range(200):  # a mean of 0.1 on [-1, 1], 400 draws
        values = rng.choice([-1.0, 0.0, 1.0], size=400, p=[0.15, 0.6, 0.25])
        bound = betting_lower_bound(values, -1, 1, delta=0.1, seed=trial)
        misses += bound > 0.1
        assert bound < values.mean()
    assert misses <= 0.1 * 200  # holds with the stated confidence
    values = rng.choice([-1.0, 0.0, 1.0], size=2000, p=[0.15, 0.6, 0.25])
    # Not vacuous: within about sqrt(2 var ln(1/delta) / n) (0.03 here) of the sample mean.
    assert 0 < values.mean() - betting_lower_bound(values, -1, 1, delta=0.1) < 0.04


def test_calibrated_thresholds_meet_their_target_on_new_traffic() -> None:
    """Synthetic world: the small tier is right with probability p(x), the large one with 0.9,
    independently. Calibrate on 800 prompts; check the expected quality of the chosen threshold
    on the whole population (known exactly from the probabilities)."""
    failures = 0
    for trial in range(20):
        x, small, large, p_small = _planted(800, seed=100 + trial)
        scores = p_small + np.random.default_rng(trial).normal(0, 0.05, 800)  # a good router
        candidates = np.linspace(1.0, 0.0, 101)  # conservative first
        quality = [np.where(scores >= c, small, large) for c in candidates]
        energy = [np.where(scores >= c, 1.0, 5.0) for c in candidates]
        choice = choose(quality, energy, large, np.full(800, 5.0), target=0.95, delta=0.1)
        assert choice.index is not None and choice.energy_ratio < 0.9  # it saves energy
        xs, _, _, ps = _planted(200_000, seed=999)
        routed = ps + np.random.default_rng(1).normal(0, 0.05, len(ps)) >= candidates[choice.index]
        expected_quality = np.where(routed, ps, 0.9).mean()
        failures += expected_quality < 0.95 * 0.9
    assert failures <= 4  # delta = 0.1 allows 2 of 20 on average


def _with_confidence(n: int, seed: int) -> tuple[np.ndarray, TierData]:
    """Planted prompts whose small-tier answers carry a confidence signal (lp_first)."""
    x, small, large, _ = _planted(n, seed=seed)
    features = np.zeros((n, len(FEATURES)))
    noise = np.random.default_rng(seed + 100).normal(0, 0.3, n)
    features[:, 2] = np.where(small == 1, -0.1, -1.5) + noise  # lp_first
    return x, TierData(["small", "large"], np.column_stack([small, large]),
                       np.column_stack([np.full(n, 1.0), np.full(n, 4.0)]), [features, None],
                       {"small": "test", "large": "test"})


def test_cascade_keeps_confident_answers_and_skips_hopeless_small_calls() -> None:
    """Two tiers; the small tier's answer confidence tells right from wrong. The policy should
    keep confident small answers, escalate the rest, and not call the small tier at all for
    prompts its router says it will fail."""
    x, data = _with_confidence(3000, seed=5)
    policy, calibrated = fit_policy(x, [f"prompt {i}" for i in range(3000)], data,
                                    TrainConfig(kind="logistic", targets=(0.9, 0.95)))
    assert policy.steps[0].confidence is not None
    assert calibrated.prompts == 3000  # every prompt calibrates, out of fold
    for target in (0.9, 0.95):
        assert calibrated.choices[target].index is not None
        assert calibrated.choices[target].quality_ratio >= target
    x, new = _with_confidence(3000, seed=6)  # new traffic
    small = new.quality[:, 0]
    p = policy.scores(x)
    outcome = simulate(policy, p, new.features, new.quality, new.energy,
                       policy.candidate_for(0.95))
    plans = policy.plans(p, policy.candidate_for(0.95))
    skipped = ~plans[:, 0]
    assert 0 < skipped.mean() < 1  # some prompts skip the small call, not all
    assert p[skipped, 0].max() < p[~skipped, 0].max()  # the ones the router distrusts
    assert outcome.energy.mean() < 4.0  # cheaper than everything to the large tier
    kept = outcome.answered_by == 0
    assert small[kept].mean() > small.mean() + 0.25  # kept answers: mostly right
    assert outcome.quality.mean() >= 0.95 * new.quality[:, 1].mean() - 0.01



def test_a_stage_that_stops_at_its_first_token_costs_that_and_is_tried_more(
        tmp_path: Path) -> None:
    """A first-token stage not kept costs its prefill and a token (`stopped`), not its whole
    answer: the replay charges that, and the skip rule, priced with it, tries the small tier
    on more prompts; which answers are kept does not change."""
    x, data = _with_confidence(3000, seed=5)
    policy, _ = fit_policy(x, [f"prompt {i}" for i in range(3000)], data,
                           TrainConfig(kind="logistic", targets=(0.9,)))
    p, candidate = policy.scores(x), policy.candidate_for(0.9)
    stopped = data.energy * [0.1, 1.0]
    whole = simulate(policy, p, data.features, data.quality, data.energy, candidate)
    cut = simulate(policy, p, data.features, data.quality, data.energy, candidate, stopped)
    np.testing.assert_array_equal(whole.answered_by, cut.answered_by)
    escalated = policy.plans(p, candidate)[:, 0] & (whole.answered_by == 1)
    assert escalated.any()
    np.testing.assert_allclose(whole.energy - cut.energy, 0.9 * escalated)  # small costs 1 J
    tried = policy.plans(p, candidate)[:, 0].mean()
    policy.stop_energy = stopped.mean(axis=0)
    assert policy.plans(p, candidate)[:, 0].mean() > tried
    encoder = static_encoder(tmp_path / "encoder")
    saved = artifact.load(artifact.save(tmp_path / "router", policy, encoder, {"kind": "logistic"}))
    np.testing.assert_allclose(saved.policy.stop_energy, policy.stop_energy)


def test_cross_fitted_calibration_keeps_its_guarantee_on_new_traffic() -> None:
    """Calibrated on the out-of-fold outcomes of all its training prompts and served by routers
    refitted on all of them, the policy still meets its target on new traffic in at least
    1 - delta of trainings (here: 20 trainings, delta 0.1, each checked on 100,000 prompts)."""
    x_new, small_new, large_new, _ = _planted(100_000, seed=999)
    new = TierData(["small", "large"], np.column_stack([small_new, large_new]),
                   np.column_stack([np.full(len(x_new), 1.0), np.full(len(x_new), 4.0)]),
                   [None, None], {})
    misses, saved = 0, []
    for trial in range(20):
        x, small, large, _ = _planted(1000, seed=2000 + trial)
        data = TierData(["small", "large"], np.column_stack([small, large]),
                        np.column_stack([np.full(1000, 1.0), np.full(1000, 4.0)]),
                        [None, None], {})
        policy, _ = fit_policy(x, [f"p{i}" for i in range(1000)], data,
                               TrainConfig(kind="logistic", targets=(0.95,), seed=trial))
        outcome = simulate(policy, policy.scores(x_new), new.features, new.quality, new.energy,
                           policy.candidate_for(0.95))
        misses += outcome.quality.mean() < 0.95 * large_new.mean()
        saved.append(1 - outcome.energy.mean() / 4.0)
    assert misses <= 2
    assert np.mean(saved) > 0.1  # and it does route: the guarantee is not met by doing nothing


def test_three_tiers_route_without_special_cases() -> None:
    n = 2000
    x, small, large, _ = _planted(n, seed=8)
    tiny = (np.random.default_rng(1).random(n) < 0.3 * (x[:, 1] > 0)).astype(float)
    data = TierData(["tiny", "small", "large"], np.column_stack([tiny, small, large]),
                    np.column_stack([np.full(n, 0.3), np.full(n, 1.0), np.full(n, 4.0)]),
                    [None, None, None], {})
    policy, calibrated = fit_policy(x, [f"p{i}" for i in range(n)], data,
                                    TrainConfig(kind="logistic", targets=(0.9,)))
    assert len(policy.steps) == 2
    outcome = simulate(policy, policy.scores(x), data.features, data.quality, data.energy,
                       policy.candidate_for(0.9))
    assert set(np.unique(outcome.answered_by)) >= {1, 2}
    assert calibrated.choices[0.9].quality_ratio >= 0.9


def _trained(tmp_path: Path) -> tuple[RoutingPolicy, StaticEncoder]:
    encoder = static_encoder(tmp_path / "enc")
    rng = np.random.default_rng(0)
    prompts = [" ".join(rng.choice(WORDS, 6)) for _ in range(600)]
    x = encoder.encode(prompts)
    small = (x[:, 0] > 0).astype(float)
    features = rng.normal(size=(600, len(FEATURES)))
    data = TierData(["small", "large"], np.column_stack([small, np.ones(600)]),
                    np.column_stack([np.ones(600), np.full(600, 3.0)]), [features, None], {})
    policy, _ = fit_policy(x, prompts, data, TrainConfig(kind="knn", targets=(0.8, 0.95)))
    return policy, encoder


def test_artifact_round_trips(tmp_path: Path) -> None:
    policy, encoder = _trained(tmp_path)
    path = artifact.save(tmp_path / "router", policy, encoder, {"kind": "knn"})
    router = artifact.load(path)
    texts = ["w1 w2 w3", "w40 w41", "w7 w7 w9 w50"]
    x = encoder.encode(texts)
    np.testing.assert_allclose(router.policy.scores(router.encoder.encode(texts)),
                               policy.scores(x), atol=1e-3)
    assert router.policy.thresholds == policy.thresholds
    assert router.encoder.fingerprint == encoder.fingerprint
    for candidate in (None, *set(policy.thresholds.values())):
        np.testing.assert_array_equal(router.policy.plans(policy.scores(x), candidate),
                                      policy.plans(policy.scores(x), candidate))


def test_artifact_serves_the_thresholds_of_the_delta_asked_for(tmp_path: Path) -> None:
    x, small, large, _ = _planted(2000, seed=11)
    data = TierData(["small", "large"], np.column_stack([small, large]),
                    np.column_stack([np.full(2000, 1.0), np.full(2000, 4.0)]), [None, None], {})
    policy, _ = fit_policy(x, [f"p{i}" for i in range(2000)], data,
                           TrainConfig(kind="logistic", targets=(0.9, 0.95), delta=0.1,
                                       also_deltas=(0.01, 0.3)))
    encoder = static_encoder(tmp_path / "enc")
    path = artifact.save(tmp_path / "router", policy, encoder, {"kind": "logistic",
                                                                 "delta": 0.1})
    served = artifact.load(path).policy.thresholds
    assert served == policy.by_delta[0.1] == artifact.load(path, delta=0.1).policy.thresholds
    strict = artifact.load(path, delta=0.01).policy.thresholds
    loose = artifact.load(path, delta=0.3).policy.thresholds
    for target in (0.9, 0.95):
        # a smaller delta asks for more confidence: a threshold at least as conservative
        # (a lower candidate index: CANDIDATES run from "all to large" to "all to small")
        assert (strict[target] or 0) <= (served[target] or 0) <= (loose[target] or 0)
    assert strict != loose
    with pytest.raises(ArtifactError, match="no thresholds calibrated at delta 0.2 "
                                            r"\(calibrated: 0.01, 0.1, 0.3\)"):
        artifact.load(path, delta=0.2)

    def gateway(router: dict[str, object]) -> GatewayConfig:
        tiers = [{"name": name, "backend": "openai", "url": "http://fake.invalid/v1",
                  "model": name} for name in ("small", "large")]
        return GatewayConfig.model_validate({"tiers": tiers, "router": router})

    service = load_router(gateway({"path": str(path), "delta": 0.3}))  # `[router] delta`
    assert service is not None and service.policy.thresholds == loose
    service = load_router(gateway({"path": str(path)}))
    assert service is not None and service.policy.thresholds == served
    with pytest.raises(ArtifactError, match="delta 0.2"):
        load_router(gateway({"path": str(path), "delta": 0.2}))


def test_artifact_for_another_encoder_or_version_is_refused(tmp_path: Path) -> None:
    policy, encoder = _trained(tmp_path)
    path = artifact.save(tmp_path / "router", policy, encoder, {"kind": "knn"})
    other = static_encoder(tmp_path / "other", seed=1)
    with pytest.raises(ArtifactError, match="trained with encoder .*fingerprint"):
        artifact.load(path, encoder=other)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["version"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="version 99"):
        artifact.load(path)
    with pytest.raises(ArtifactError, match="no router artifact"):
        artifact.load(tmp_path / "nothing")


def test_logprob_features_of_a_real_answer_shape() -> None:
    content = [{"token": "B", "logprob": -0.2, "top_logprobs": [
        {"token": "B", "logprob": -0.2}, {"token": "A", "logprob": -1.9}]},
        {"token": ".", "logprob": -0.05, "top_logprobs": []}]
    features = logprob_features(content)
    assert features is not None
    assert features["lp_first"] == -0.2 and features["lp_min"] == -0.2
    assert features["lp_mean"] == pytest.approx(-0.125)
    assert features["entropy_first"] > 0
    assert logprob_features([]) is None
    model = ConfidenceModel()
    rows = np.random.default_rng(0).normal(size=(200, len(FEATURES)))
    right = (rows[:, 0] > 0).astype(float)
    model.fit(rows, np.full(200, 0.5), Target(right, np.ones(200)))
    assert model.predict(rows[:1] * 0 + 3, np.array([0.5]))[0] > model.predict(
        rows[:1] * 0 - 3, np.array([0.5]))[0]
    assert CANDIDATES[0] == np.inf and CANDIDATES[-1] == 0.0
    assert Step("s", make("logistic")).keep_rate(3, np.array([0.5]))[0] == 0.0
