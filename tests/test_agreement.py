"""The cascade's extra signals: answer keys, agreement of samples, self-check, and a confidence
model that reads them, saved and loaded in an artifact."""

from __future__ import annotations

import asyncio
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from routing_fixtures import candidate, constant_router, static_encoder

from greenroute.backends.base import Completion, Endpoint, Usage
from greenroute.evals import graders, signals
from greenroute.evals.outcomes import OutcomeWriter, load_table, read_rows
from greenroute.evals.prompts import render
from greenroute.evals.tasks import Item
from greenroute.evals.training import TrainConfig, fit_steps, tier_data
from greenroute.gateway import cascade
from greenroute.routers import artifact, selfcheck
from greenroute.routers.agreement import agree
from greenroute.routers.answers import answer_key
from greenroute.routers.confidence import ConfidenceModel
from greenroute.routers.features import AGREEMENT, FEATURES, SELF_CHECK
from greenroute.routers.policy import CANDIDATES, RoutingPolicy, Step
from greenroute.routers.service import Decision, RouterService


@pytest.mark.parametrize(("output", "kind", "key"), [
    ("The answer is 42.", "number", "42"),
    ("#### 1,250", "number", "1250"),
    ("We get 3/4", "number", "0.75"),
    ("**B** Paris", "choice", "B"),
    ("Yes, it is.", "yesno", "yes"),
    ("False.", "yesno", "no"),
    ("B. Paris", None, "B"),
    ("No, never.", None, "no"),
    ("So she has 12 apples left.", None, "12"),
    ("Paris, of course", None, "paris of course"),
    ("", None, None),
])
def test_answer_keys_read_the_final_answer(output: str, kind: str | None, key: str | None
                                           ) -> None:
    assert answer_key(output, kind, ("London", "Paris", "Rome")) == key


def test_graders_and_agreement_read_answers_the_same_way() -> None:
    item = Item(id="t:1", task="t", kind="number", question="?", gold=("12",))
    outputs = ["12 apples", "Answer: 12", "I think 13", "#### 12", "twelve"]
    grades = [graders.grade(item, o) for o in outputs]
    keys = [answer_key(o, "number") for o in outputs]
    assert [g.answer for g in grades] == keys


def test_the_majority_answer_and_its_share() -> None:
    result = agree(["I get 13", "The answer is 12.", "#### 12", "no idea", "12"], "number")
    assert (result.index, result.answer, result.share) == (1, "12", 0.6)
    tie = agree(["yes", "no", "No.", "Yes!"], "yesno")
    assert (tie.index, tie.answer, tie.share) == (0, "yes", 0.5)  # a tie goes to the first
    assert agree(["", "   "]).share == 0.0
    with pytest.raises(ValueError):
        agree([])


def test_self_check_reads_yes_against_no_from_the_first_token() -> None:
    top = [{"token": "Yes", "logprob": math.log(0.6)}, {"token": " no", "logprob": math.log(0.2)},
           {"token": "The", "logprob": math.log(0.1)}]
    assert selfcheck.p_yes([{"token": "Yes", "logprob": math.log(0.6), "top_logprobs": top}]) \
        == pytest.approx(0.75)
    other = [{"token": "The", "logprob": -0.1, "top_logprobs": []}]
    assert selfcheck.p_yes(other) == 0.5  # neither word: no evidence either way
    assert selfcheck.p_yes([]) is None
    body = selfcheck.request("small", "What is 2+2?", "4")
    assert body["max_tokens"] == 1 and body["logprobs"] and body["temperature"] == 0
    assert "What is 2+2?" in body["messages"][0]["content"]


def test_keep_majority_returns_one_choice_and_leaves_usage_alone() -> None:
    answer = {"choices": [{"index": i, "message": {"role": "assistant", "content": text},
                           "finish_reason": "stop"} for i, text in
                          enumerate(["7", "It is 8", "8", "8.", "9"])],
              "usage": {"prompt_tokens": 20, "completion_tokens": 11, "total_tokens": 31}}
    assert cascade.keep_majority(Endpoint.CHAT, answer) == pytest.approx(0.6)
    assert answer["choices"] == [{"index": 0, "message": {"role": "assistant",
                                                          "content": "It is 8"},
                                  "finish_reason": "stop"}]
    assert answer["usage"]["completion_tokens"] == 11


def test_a_stage_body_with_samples_asks_for_n_at_the_sampling_temperature() -> None:
    body = {"model": "green", "messages": [], "temperature": 0, "stream": True, "max_tokens": 9}
    stage = cascade.stage_body(Endpoint.CHAT, body, 64, 5)
    assert (stage["n"], stage["temperature"], stage["max_tokens"]) == (5, 0.7, 9)
    assert "stream" not in stage and "n" not in cascade.stage_body(Endpoint.CHAT, body, 64)


def _signal_policy(directory: Path) -> Path:
    encoder = static_encoder(directory / "encoder")
    confidence = ConfidenceModel(inputs=(*FEATURES, AGREEMENT, SELF_CHECK))
    confidence.w = np.zeros(len(FEATURES) + 3)
    confidence.w[len(FEATURES)] = 10.0  # agreement
    confidence.w[len(FEATURES) + 1] = 2.0  # self-check
    confidence.b = -8.0
    step = Step(tier="small", router=constant_router(0.6, encoder.dim), confidence=confidence,
                keep_edges=np.array([0.0]), keep_rates=np.full((len(CANDIDATES), 1), 0.9))
    policy = RoutingPolicy(tiers=["small", "large"], steps=[step], energy=np.array([1.0, 5.0]),
                           thresholds={0.9: candidate(0.5)})
    return artifact.save(directory / "router", policy, encoder, {"kind": "logistic"})


def test_an_artifact_keeps_which_signals_its_confidence_reads(tmp_path: Path) -> None:
    loaded = artifact.load(_signal_policy(tmp_path))
    model = loaded.policy.steps[0].confidence
    assert model is not None and model.signals == (AGREEMENT, SELF_CHECK)
    assert artifact.read_manifest(tmp_path / "router")["steps"][0]["signals"] == [
        AGREEMENT, SELF_CHECK]
    service = RouterService(loaded)
    assert service.signals("small") == (AGREEMENT, SELF_CHECK)
    decision = Decision(candidate=candidate(0.5), scores=(0.6,), plan=("small", "large"))
    content = [{"token": "8", "logprob": -0.1, "top_logprobs": []}]
    kept, c = service.keep(decision, "small", content, {AGREEMENT: 1.0, SELF_CHECK: 0.5})
    assert kept and c == pytest.approx(1 / (1 + math.exp(-3.0)))
    assert not service.keep(decision, "small", content, {AGREEMENT: 0.6, SELF_CHECK: 0.5})[0]
    assert service.keep(decision, "small", content, {AGREEMENT: 1.0}) == (False, None)


def test_an_artifact_without_inputs_reads_the_logprob_features() -> None:
    state = ConfidenceModel().state()
    del state["inputs"]
    assert ConfidenceModel.from_state(state).inputs == FEATURES
    with pytest.raises(ValueError, match="unknown"):
        ConfidenceModel(inputs=("lp_mean", "vibes"))


class _ScriptedModel:
    """A Backend's `create` over the wire shape: k sampled outputs per question for `n`, and a
    self-check that says Yes with probability 0.8 (chat logprobs)."""

    model_id = "scripted"

    def __init__(self, samples: dict[str, list[str]]) -> None:
        self.samples = samples
        self.calls: list[dict[str, Any]] = []

    async def create(self, endpoint: Endpoint, body: dict[str, Any]) -> Completion:
        self.calls.append(body)
        text = body["messages"][0]["content"]
        if body.get("n"):
            outputs = next(v for k, v in self.samples.items() if k in text)[:body["n"]]
            choices = [{"index": i, "message": {"role": "assistant", "content": o},
                        "finish_reason": "stop"} for i, o in enumerate(outputs)]
            usage = {"prompt_tokens": 10, "completion_tokens": 3 * len(outputs),
                     "total_tokens": 10 + 3 * len(outputs)}
        else:
            top = [{"token": "Yes", "logprob": math.log(0.8)},
                   {"token": "No", "logprob": math.log(0.2)}]
            choices = [{"index": 0, "message": {"role": "assistant", "content": "Yes"},
                        "finish_reason": "length", "logprobs": {"content": [
                            {"token": "Yes", "logprob": math.log(0.8), "top_logprobs": top}]}}]
            usage = {"prompt_tokens": 30, "completion_tokens": 1, "total_tokens": 31}
        data = {"choices": choices, "usage": usage}
        return Completion(orjson.dumps(data), Usage.from_openai(usage))


def test_collect_adds_signals_beside_the_greedy_answers_and_resumes(tmp_path: Path) -> None:
    items = [Item(id=f"svamp:{i}", task="svamp", kind="number", question=f"question {i}?",
                  gold=("12",)) for i in range(3)]
    out = tmp_path / "outcomes.jsonl"
    writer = OutcomeWriter(out)
    for item, greedy in zip(items, ["Answer: 12", "Answer: 13", "Answer: 12"], strict=True):
        grade = graders.grade(item, greedy)
        writer.append({"id": item.id, "task": item.task, "kind": item.kind,
                       "prompt": render(item).text, "gold": list(item.gold),
                       "models": {"small": {"output": greedy, "quality": grade.quality,
                                            "answer": grade.answer, "graded_by": "rule"}}})
    model = _ScriptedModel({"question 0": ["12", "12", "12", "13", "12"],
                            "question 1": ["13", "14", "12", "12", "15"]})
    plan = signals.SignalPlan((AGREEMENT, SELF_CHECK), samples=5, temperature=0.7)
    asyncio.run(signals.collect(model, "small", items[:2], writer, plan, None, io.StringIO()))
    rows = read_rows(out)
    sampled = rows["svamp:1"]["models"]["small"]
    assert sampled["output"] == "Answer: 13" and sampled["quality"] == 0.0  # greedy kept
    assert sampled["samples"]["agreement"] == pytest.approx(0.4)  # "12" twice of five
    assert sampled["samples"]["majority_quality"] == 1.0  # the majority is right where greedy
    assert sampled["samples"]["qualities"] == [0.0, 0.0, 1.0, 1.0, 0.0]  # was wrong
    assert sampled["samples"]["completion_tokens"] == 15
    assert sampled["self_check"]["p_yes"] == pytest.approx(0.8)
    assert "Answer: 13" in model.calls[-1]["messages"][0]["content"]  # checks the greedy one
    assert [c.get("n") for c in model.calls] == [5, None, 5, None]
    assert all(c.get("temperature") == 0.7 for c in model.calls if c.get("n"))

    model.samples["question 2"] = ["12"] * 5
    model.calls.clear()
    asyncio.run(signals.collect(model, "small", items, writer, plan, None, io.StringIO()))
    writer.close()
    assert len(model.calls) == 2  # only the prompt without signals
    assert signals.pending(items, read_rows(out), "small", plan) == []
    report = signals.report(str(out), "small")
    assert "| svamp | 3 | 0.67 | 1.00 |" in report


def _planted_table(path: Path, n: int = 240) -> None:
    """A small tier whose samples agree exactly when its majority answer is right (agreement
    5/5 or 2/5), whose greedy answer is right half the time, and a large tier always right."""
    rng = np.random.default_rng(0)
    writer = OutcomeWriter(path)
    for i in range(n):
        right = bool(rng.random() < 0.5)
        features = {name: float(rng.normal()) for name in FEATURES}
        small = {"quality": float(rng.random() < 0.5), "joules": 2.0, "features": features,
                 "samples": {"agreement": 1.0 if right else 0.4,
                             "majority_quality": float(right), "joules": 7.0},
                 "self_check": {"p_yes": 0.5, "joules": 0.5}}
        large = {"quality": 1.0, "joules": 10.0, "features": features}
        writer.append({"id": f"t:{i}", "task": "t", "kind": "number",
                       "prompt": " ".join(f"w{rng.integers(60)}" for _ in range(5)), "gold": [],
                       "models": {"small": small, "large": large}})
    writer.close()


def test_training_with_signals_judges_the_majority_answer_at_the_samples_cost(
        tmp_path: Path) -> None:
    _planted_table(tmp_path / "t.jsonl")
    table = load_table(tmp_path / "t.jsonl", ["small", "large"])
    plain = tier_data(table, ["small", "large"])
    data = tier_data(table, ["small", "large"], signals=(AGREEMENT, SELF_CHECK))
    assert data.inputs == (*FEATURES, AGREEMENT, SELF_CHECK)
    assert np.array_equal(data.quality[:, 0], table.signals["small"]["majority_quality"])
    assert not np.array_equal(plain.quality[:, 0], data.quality[:, 0])
    assert np.allclose(data.energy[:, 0], 7.5)  # k samples + the self-check, no greedy answer
    features = data.features[0]
    assert features is not None and features.shape == (len(table), len(FEATURES) + 2)
    x = np.random.default_rng(1).normal(size=(len(table), 8))
    policy = fit_steps(x, table.prompts, data,
                       TrainConfig(kind="logistic", signals=(AGREEMENT, SELF_CHECK)))
    model = policy.steps[0].confidence
    assert model is not None and model.signals == (AGREEMENT, SELF_CHECK)
    weights = dict(zip(model.inputs, model.w, strict=False))
    assert weights[AGREEMENT] > 1.0 > max(abs(weights[name]) for name in FEATURES)
    with pytest.raises(ValueError, match="collect --signals"):
        tier_data(table.subset(np.arange(3)), ["large", "small"], signals=(AGREEMENT,))
