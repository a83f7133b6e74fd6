"""Router artifacts for tests: a real static encoder over a made-up vocabulary, and hand-set
policies whose every decision is known in advance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers

from greenroute.routers import artifact
from greenroute.routers.confidence import ConfidenceModel
from greenroute.routers.encoders import StaticEncoder
from greenroute.routers.features import FEATURES
from greenroute.routers.models import LogisticRouter
from greenroute.routers.policy import CANDIDATES, RoutingPolicy, Step

WORDS = [f"w{i}" for i in range(60)]


def static_encoder(directory: Path, seed: int = 0, dims: int = 16) -> StaticEncoder:
    """A real static encoder (tokenizer, int8 table) over WORDS; no model download needed."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))
    table = np.random.default_rng(seed).normal(size=(len(vocab), dims))
    scales = np.abs(table).max(axis=1) / 127
    np.save(directory / "embeddings.npy", np.round(table / scales[:, None]).astype(np.int8))
    np.save(directory / "scales.npy", scales.astype(np.float32))
    (directory / "encoder.json").write_text(json.dumps({"kind": "static", "name": "test"}))
    return StaticEncoder(directory)


def candidate(threshold: float) -> int:
    return int(np.flatnonzero(np.isclose(CANDIDATES, threshold))[0])


def _logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def constant_router(p: float, dims: int) -> LogisticRouter:
    router = LogisticRouter()
    router.w, router.b = np.zeros(dims), _logit(p)
    return router


def constant_confidence(c: float) -> ConfidenceModel:
    model = ConfidenceModel()
    model.w, model.b = np.zeros(len(FEATURES) + 1), _logit(c)
    return model


def handmade_artifact(directory: Path, steps: list[tuple[str, float, float | None]],
                      largest: str, energy: list[float], thresholds: dict[float, float | None],
                      keep_rate: float = 0.9, never_keep: tuple[float, ...] = ()) -> Path:
    """An artifact whose routers give constant scores p and whose cascade stages (confidence
    c, or None for a router-only step) always judge answers the same way, so a test knows
    each decision: `steps` is (tier, p, c) per tier but the largest. Thresholds below which
    the skip rule expects no kept answer are listed in `never_keep`."""
    encoder = static_encoder(directory / "encoder-source")
    policy_steps = []
    for tier, p, c in steps:
        step = Step(tier=tier, router=constant_router(p, encoder.dim))
        if c is not None:
            step.confidence = constant_confidence(c)
            step.keep_edges = np.array([0.0])
            step.keep_rates = np.full((len(CANDIDATES), 1), keep_rate)
            for threshold in never_keep:
                step.keep_rates[candidate(threshold)] = 0.0
        policy_steps.append(step)
    policy = RoutingPolicy(
        tiers=[*(tier for tier, _, _ in steps), largest], steps=policy_steps,
        energy=np.asarray(energy, dtype=float),
        thresholds={t: None if b is None else candidate(b) for t, b in thresholds.items()})
    return artifact.save(directory / "router", policy, encoder,
                         {"kind": "logistic", "default_target": 0.95})


def three_tier_artifact(directory: Path) -> Path:
    """small -> mid -> large, as the in-process app tests serve it: small's router says 0.6 and
    its stage's confidence 0.5, mid's router 0.1 (no stage); each target's threshold known."""
    return handmade_artifact(directory, steps=[("small", 0.6, 0.5), ("mid", 0.1, None)],
                             largest="large", energy=[1.0, 2.0, 5.0],
                             thresholds={0.2: 0.05, 0.5: 0.3, 0.9: 0.7, 1.0: None},
                             never_keep=(0.05,))


def judged_artifact(directory: Path, inputs: tuple[str, ...], slopes: dict[str, float],
                    offset: float) -> Path:
    """small -> large, small always tried and kept at target 0.9 when its confidence,
    sigmoid(sum of slope x input + offset) over the named inputs (the rest weigh 0), is at
    least 0.5. The confidence model reads `inputs`, so the gateway gathers those."""
    encoder = static_encoder(directory / "encoder-source")
    confidence = ConfidenceModel(inputs=inputs)
    confidence.w = np.zeros(len(inputs) + 1)  # the last: the router's score
    for name, slope in slopes.items():
        confidence.w[inputs.index(name)] = slope
    confidence.b = offset
    step = Step(tier="small", router=constant_router(0.6, encoder.dim), confidence=confidence,
                keep_edges=np.array([0.0]), keep_rates=np.full((len(CANDIDATES), 1), 0.9))
    policy = RoutingPolicy(tiers=["small", "large"], steps=[step],
                           energy=np.array([1.0, 5.0]), thresholds={0.9: candidate(0.5)})
    return artifact.save(directory / "router", policy, encoder,
                         {"kind": "logistic", "default_target": 0.9})
