"""`greenroute train` chooses the plan family (prompt-only or cascade) on cross-fitted outcomes,
at delta / m per family so that the chosen one keeps the guarantee; on synthetic outcomes whose
ground truth is known, and through the real command."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from routing_fixtures import WORDS, static_encoder

from greenroute.evals.plan_choice import CASCADE, PROMPT_ONLY, families, fit_chosen
from greenroute.evals.training import TierData, TrainConfig, fit_policy
from greenroute.routers.artifact import read_manifest
from greenroute.routers.features import FEATURES, FIRST_TOKEN
from greenroute.routers.policy import simulate
from greenroute.routers.service import DEFAULT_ARTIFACT

GREENROUTE = str(Path(sys.executable).parent / "greenroute")
LP_FIRST = FEATURES.index("lp_first")


def _outcomes(n: int, seed: int, *, prompt_signal: bool, answer_signal: bool
              ) -> tuple[np.ndarray, TierData]:
    """n prompts; the small tier is right with a probability the prompt reveals (coordinate 0)
    or not, and its answers' first-token logprob tells right from wrong answers or not."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 24))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    p_small = 1 / (1 + np.exp(-8 * x[:, 0])) if prompt_signal else np.full(n, 0.6)
    small = (rng.random(n) < p_small).astype(float)
    large = (rng.random(n) < 0.9).astype(float)
    features = rng.normal(0, 0.3, (n, len(FEATURES)))
    if answer_signal:
        features[:, LP_FIRST] += np.where(small == 1, -0.1, -1.5)
    return x, TierData(["small", "large"], np.column_stack([small, large]),
                       np.column_stack([np.full(n, 1.0), np.full(n, 4.0)]), [features, None],
                       {"small": "test", "large": "test"})


def _prompts(n: int) -> list[str]:
    return [f"p{i}" for i in range(n)]


CONFIG = TrainConfig(kind="logistic", targets=(0.9, 0.95))


def test_a_cascade_is_chosen_where_only_the_answers_tell_right_from_wrong() -> None:
    x, data = _outcomes(2000, seed=1, prompt_signal=False, answer_signal=True)
    policy, calibrated, plan = fit_chosen(x, _prompts(2000), data, CONFIG)
    assert plan.family == CASCADE
    saved = {c.family: c.energy_saved for c in plan.candidates}
    assert saved[CASCADE] > saved[PROMPT_ONLY] + 0.1  # the measured reason, in the manifest
    assert policy.steps[0].confidence is not None  # what is served is the cascade
    assert plan.delta_each == pytest.approx(0.05)  # two families: delta / 2 each
    assert set(policy.by_delta) == {0.1}  # stored under the guarantee's delta, not the split
    # exactly the thresholds the cascade family gets when calibrated alone at delta / 2
    alone, _ = fit_policy(x, _prompts(2000), data, replace(CONFIG, delta=0.05))
    assert policy.thresholds == alone.thresholds
    assert calibrated.choices[0.95].quality_ratio >= 0.95


def test_a_judge_on_the_first_token_alone_finds_the_cascade_too() -> None:
    """`--judge first-token`: the confidence models read lp_first and entropy_first only (here
    the answers' signal is in lp_first), which the gateway can judge on a stream's first token."""
    x, data = _outcomes(2000, seed=1, prompt_signal=False, answer_signal=True)
    first = data.select(FIRST_TOKEN)
    assert first.inputs == FIRST_TOKEN
    assert first.features[0] is not None and first.features[0].shape == (2000, 2)
    policy, _, plan = fit_chosen(x, _prompts(2000), first, CONFIG)
    assert plan.family == CASCADE
    confidence = policy.steps[0].confidence
    assert confidence is not None and confidence.inputs == FIRST_TOKEN
    with pytest.raises(ValueError, match="agreement"):
        data.select((*FIRST_TOKEN, "agreement"))


def test_prompt_only_is_chosen_where_the_answers_say_nothing() -> None:
    x, data = _outcomes(2000, seed=2, prompt_signal=True, answer_signal=False)
    policy, _, plan = fit_chosen(x, _prompts(2000), data, CONFIG)
    assert plan.family == PROMPT_ONLY
    saved = {c.family: c.energy_saved for c in plan.candidates}
    assert saved[PROMPT_ONLY] >= saved[CASCADE]
    assert saved[PROMPT_ONLY] > 0.1  # it routes
    assert policy.steps[0].confidence is None
    manifest = plan.manifest()
    assert manifest["family"] == PROMPT_ONLY and set(manifest["candidates"]) == {
        PROMPT_ONLY, CASCADE}
    assert "Bonferroni" in manifest["chosen_by"]


def test_cascade_only_serves_the_cascade_where_prompt_only_would_win() -> None:
    x, data = _outcomes(2000, seed=2, prompt_signal=True, answer_signal=False)
    policy, _, plan = fit_chosen(x, _prompts(2000), data, replace(CONFIG, cascade_only=True))
    assert plan.family == CASCADE and [c.family for c in plan.candidates] == [CASCADE]
    assert plan.delta_each == CONFIG.delta  # one family: nothing split
    assert policy.steps[0].confidence is not None
    no_features = replace(data, features=[None, None])
    with pytest.raises(ValueError, match="logprob features"):
        fit_chosen(x, _prompts(2000), no_features, replace(CONFIG, cascade_only=True))


def test_one_family_splits_nothing() -> None:
    x, data = _outcomes(1000, seed=3, prompt_signal=True, answer_signal=True)
    for table, config in ((replace(data, features=[None, None]), CONFIG),
                          (data, replace(CONFIG, cascade=False))):
        assert families(table, config) == [PROMPT_ONLY]
        policy, _, plan = fit_chosen(x, _prompts(1000), table, config)
        assert plan.delta_each == config.delta
        alone, _ = fit_policy(x, _prompts(1000), table, replace(config, cascade=False))
        assert policy.thresholds == alone.thresholds


def test_with_signals_prompt_only_is_priced_as_plain_calls() -> None:
    """A table with signals: the cascade's stage samples k answers (here 5 times a plain
    call's joules), but a plan without a cascade makes one plain call to the small tier, and is
    fitted, calibrated and compared at that cost, not at the stage's."""
    x, plain = _outcomes(2000, seed=2, prompt_signal=True, answer_signal=False)
    staged = replace(plain, energy=plain.energy * np.array([5.0, 1.0]), plain=plain)
    assert staged.for_plan(cascade=False) is plain and staged.for_plan(cascade=True) is staged
    assert staged.subset(np.arange(10)).for_plan(cascade=False).energy.shape == (10, 2)
    _, _, plan = fit_chosen(x, _prompts(2000), staged, CONFIG)
    _, _, alone = fit_chosen(x, _prompts(2000), plain, CONFIG)
    saved = {c.family: c.energy_saved for c in plan.candidates}
    assert saved[PROMPT_ONLY] == pytest.approx(
        next(c.energy_saved for c in alone.candidates if c.family == PROMPT_ONLY))
    assert saved[PROMPT_ONLY] > 0.1 and plan.family == PROMPT_ONLY
    assert saved[CASCADE] < saved[PROMPT_ONLY]  # its stage costs 5 J of the largest's 4


@pytest.mark.timeout(900)  # 40 cross-fitted calibrations
def test_the_chosen_plan_keeps_its_guarantee_on_new_traffic() -> None:
    """Chosen and calibrated on the same prompts, the served plan still meets its target on
    new traffic in at least 1 - delta of trainings (20 trainings, delta 0.1, both families
    plausible: the prompt and the answers both carry signal)."""
    x_new, new = _outcomes(100_000, seed=999, prompt_signal=True, answer_signal=True)
    misses, chosen = 0, set()
    for trial in range(20):
        x, data = _outcomes(600, seed=3000 + trial, prompt_signal=True, answer_signal=True)
        policy, _, plan = fit_chosen(x, _prompts(600), data,
                                     replace(CONFIG, targets=(0.95,), seed=trial))
        chosen.add(plan.family)
        outcome = simulate(policy, policy.scores(x_new), new.features, new.quality, new.energy,
                           policy.candidate_for(0.95))
        misses += outcome.quality.mean() < 0.95 * new.quality[:, 1].mean()
    assert misses <= 2
    assert CASCADE in chosen


def _table_with_logprobs(path: Path, n: int = 600) -> Path:
    """A JSONL outcome table, as `collect` writes it, whose small answers' logprobs tell right
    from wrong and whose prompts say nothing."""
    rng = np.random.default_rng(0)
    with path.open("w") as out:
        for i in range(n):
            small = bool(rng.random() < 0.6)
            features = {name: float(rng.normal(-0.5, 0.3)) for name in FEATURES}
            features["lp_first"] = (-0.1 if small else -1.5) + float(rng.normal(0, 0.3))
            prompt = f"p{i} " + " ".join(rng.choice(WORDS, 5))
            row = {"v": 1, "id": f"t:{i}", "task": "t", "kind": "choice", "prompt": prompt,
                   "gold": ["A"], "models": {
                       "small": {"quality": float(small), "joules": 1.0,
                                 "energy_source": "estimate", "completion_tokens": 3,
                                 "features": features},
                       "large": {"quality": float(rng.random() < 0.9), "joules": 4.0,
                                 "energy_source": "estimate", "completion_tokens": 3}}}
            out.write(json.dumps(row) + "\n")
    return path


def test_train_records_the_chosen_family_and_why(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    table = _table_with_logprobs(tmp_path / "outcomes.jsonl")
    encoder = static_encoder(tmp_path / "encoder")
    done = subprocess.run([GREENROUTE, "train", "--outcomes", str(table), "--kind", "logistic",
                           "--encoder", str(encoder.directory), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "plan: cascade" in done.stdout
    manifest = json.loads((tmp_path / "r/manifest.json").read_text())
    plan = manifest["plan"]
    assert plan["family"] == "cascade" and plan["delta_each"] == pytest.approx(0.05)
    assert plan["candidates"]["cascade"]["energy_saved"] > \
        plan["candidates"]["prompt-only"]["energy_saved"]
    assert manifest["training"]["cascade"] == [True]
    assert manifest["delta"] == 0.1 and set(manifest["thresholds_by_delta"]) == {"0.1"}


def test_the_shipped_router_says_which_family_train_chose_and_why() -> None:
    manifest = read_manifest(DEFAULT_ARTIFACT)
    plan = manifest["plan"]
    saved = {family: c["energy_saved"] for family, c in plan["candidates"].items()}
    assert set(saved) == {PROMPT_ONLY, CASCADE}  # the embedded table carries logprobs
    assert plan["family"] == max(saved, key=lambda f: (saved[f], f == PROMPT_ONLY))
    assert manifest["training"]["cascade"] == [plan["family"] == CASCADE]
    assert plan["delta_each"] == pytest.approx(manifest["delta"] / 2)
    assert manifest["training"]["calibration_prompts"] == manifest["training"]["prompts"]
