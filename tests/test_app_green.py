"""Model `green` in process: routed and cascaded (kept, escalated, cut by the cap), every
failover branch, whole and streamed, and the ledger rows they leave.

The router artifact is made by hand (tests/routing_fixtures.py) so that every decision is known:
`small` is a cascade stage whose answers always have confidence 0.5, `mid` a router-only step
with score 0.1, `large` the largest tier. Thresholds per target:
  0.2 -> 0.05  `mid` answers directly (the skip rule never keeps `small` there)
  0.5 -> 0.3   cascade: small answers, 0.5 >= 0.3, kept (the configured default target)
  0.9 -> 0.7   cascade: small answers, 0.5 < 0.7, escalated to large
  1.0 -> none  everything to large
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from fake_backends import FakeBackend, Reply, gateway_config, ledger, openai_client, serve, tier
from routing_fixtures import three_tier_artifact
from starlette.testclient import TestClient

from greenroute.backends.base import BackendUnavailable, BadGateway, InvalidRequest

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
CAP = 4  # cascade_max_tokens: a stage answer of more tokens escalates unjudged
SMALL_TEXT = "small thinks Paris"
LARGE_TEXT = "large knows it is Paris"


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return three_tier_artifact(tmp_path_factory.mktemp("router"))


class Tiers:
    """The three fake tiers of one test, and the ledger their gateway writes."""

    def __init__(self, db: Path) -> None:
        self.small = FakeBackend("small", reply=Reply(text=SMALL_TEXT, logprob=-0.05))
        self.mid = FakeBackend("mid", reply=Reply(text="mid answer"))
        self.large = FakeBackend("large", reply=Reply(text=LARGE_TEXT))
        self.db = db

    def tried(self) -> list[str]:
        return [b.name for b in (self.small, self.mid, self.large) if b.calls]


@pytest.fixture
def tiers(tmp_path: Path) -> Tiers:
    return Tiers(tmp_path / "ledger.db")


@contextmanager
def green(router: Path, tiers: Tiers) -> Iterator[TestClient]:
    config = gateway_config(
        tier("small", 1.0), tier("mid", 2.0), tier("large", 5.0),
        router={"path": str(router), "default_target": 0.5, "cascade_max_tokens": CAP},
        ledger={"path": str(tiers.db)})
    with serve(config, tiers.small, tiers.mid, tiers.large) as http:
        yield http


def chat(http: TestClient, model: str = "green", headers: dict[str, str] | None = None,
         **fields: Any) -> Any:
    return http.post("/v1/chat/completions", headers=headers or {},
                     json={"model": model, "messages": QUESTION, **fields})


def events(text: str) -> list[dict[str, Any]]:
    """The JSON payloads of an event stream, checking it ends with [DONE]."""
    lines = [line[len("data: "):] for line in text.split("\n\n") if line]
    assert lines[-1] == "[DONE]"
    return [orjson.loads(line) for line in lines[:-1]]


def streamed_text(payloads: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in payloads
                   if c["choices"])


# -- routed and cascaded --------------------------------------------------------------------

def test_a_confident_small_answer_is_kept(router: Path, tiers: Tiers) -> None:
    with green(router, tiers) as http:
        raw = openai_client(http).chat.completions.with_raw_response.create(
            model="green", messages=QUESTION, max_tokens=8, temperature=0)
    headers = raw.headers
    assert headers["x-greenroute-route"] == "cascade"
    assert headers["x-greenroute-model"] == "small"
    assert headers["x-greenroute-models-tried"] == "small"
    assert headers["x-greenroute-quality-target"] == "0.5"
    assert headers["x-greenroute-router-score"] == "0.6000,0.1000"
    assert headers["x-greenroute-confidence"] == "0.5000"
    completion = raw.parse()
    assert completion.model == "small-upstream"
    assert completion.choices[0].message.content == SMALL_TEXT
    assert completion.choices[0].logprobs is None  # asked for by the stage, not by the client
    assert completion.usage.completion_tokens == 3
    stage, = tiers.small.bodies
    assert stage["logprobs"] is True and stage["top_logprobs"] == 5
    assert stage["max_tokens"] == CAP  # min(the client's 8, the cap)
    assert "stream" not in stage
    assert tiers.tried() == ["small"]
    row, models = ledger(tiers.db, headers["x-request-id"])
    assert row is not None
    assert (row["route"], row["quality_target"], row["answered_by"], row["models_tried"],
            row["status"], row["requested_model"]) == ("cascade", 0.5, "small", 1, 200, "green")
    assert row["router_score"] == pytest.approx(0.6)
    assert [(m["tier"], m["answered"]) for m in models] == [("small", 1)]


def test_the_client_gets_the_stage_logprobs_when_it_asks(router: Path, tiers: Tiers) -> None:
    with green(router, tiers) as http:
        completion = openai_client(http).chat.completions.create(
            model="green", messages=QUESTION, logprobs=True, top_logprobs=2)
    content = completion.choices[0].logprobs.content
    assert [t.token for t in content] == ["small", " thinks", " Paris"]
    assert content[0].logprob == pytest.approx(-0.05) and content[0].top_logprobs
    assert tiers.small.bodies[0]["top_logprobs"] == 5  # never fewer than the router reads


def test_an_unsure_small_answer_escalates_to_the_large_tier(router: Path, tiers: Tiers) -> None:
    with green(router, tiers) as http:
        raw = openai_client(http).chat.completions.with_raw_response.create(
            model="green-0.9", messages=QUESTION, max_tokens=8)
    assert raw.headers["x-greenroute-route"] == "cascade"
    assert raw.headers["x-greenroute-models-tried"] == "small,large"
    assert raw.headers["x-greenroute-model"] == "large"
    assert raw.headers["x-greenroute-confidence"] == "0.5000"
    assert raw.parse().choices[0].message.content == LARGE_TEXT
    last, = tiers.large.bodies
    assert "logprobs" not in last and last["max_tokens"] == 8  # the client's own request
    row, models = ledger(tiers.db, raw.headers["x-request-id"])
    assert row is not None
    assert (row["route"], row["quality_target"], row["models_tried"], row["answered_by"],
            row["upstream_model"]) == ("cascade", 0.9, 2, "large", "large-upstream")
    assert row["completion_tokens"] == 5  # the answer's tokens, not the discarded stage's
    assert [(m["tier"], m["answered"], m["completion_tokens"]) for m in models] == [
        ("small", 0, 3), ("large", 1, 5)]


def test_a_target_the_small_tier_cannot_meet_goes_straight_to_the_large_one(
        router: Path, tiers: Tiers) -> None:
    with green(router, tiers) as http:
        response = chat(http, headers={"x-greenroute-quality-target": "1"})
    assert response.status_code == 200
    assert response.headers["x-greenroute-route"] == "routed"
    assert response.headers["x-greenroute-models-tried"] == "large"
    assert response.headers["x-greenroute-quality-target"] == "1"
    assert "x-greenroute-confidence" not in response.headers
    assert tiers.tried() == ["large"]


def test_a_router_only_step_answers_directly(router: Path, tiers: Tiers) -> None:
    with green(router, tiers) as http:
        response = chat(http, "green-0.2")
    assert response.headers["x-greenroute-route"] == "routed"
    assert response.headers["x-greenroute-model"] == "mid"
    assert response.json()["choices"][0]["message"]["content"] == "mid answer"
    assert "logprobs" not in tiers.mid.bodies[0]  # a routed tier is asked as the client asked
    row, _ = ledger(tiers.db, response.headers["x-request-id"])
    assert row is not None and (row["route"], row["quality_target"]) == ("routed", 0.2)


def test_a_stage_answer_cut_by_the_cap_escalates_unjudged(router: Path, tiers: Tiers) -> None:
    tiers.small.reply = Reply(text="a long answer that goes on and on")
    with green(router, tiers) as http:
        response = chat(http)  # no max_tokens: the stage stops at the cap
    assert tiers.small.bodies[0]["max_tokens"] == CAP
    assert response.headers["x-greenroute-models-tried"] == "small,large"
    assert response.headers["x-greenroute-model"] == "large"
    assert "x-greenroute-confidence" not in response.headers  # not judged


def test_a_text_completion_stage_cut_by_the_cap_escalates(router: Path, tiers: Tiers) -> None:
    tiers.small.reply = Reply(text="a long answer that goes on and on")
    with green(router, tiers) as http:
        response = http.post("/v1/completions", json={"model": "green", "prompt": "Go"})
    assert tiers.small.bodies[0]["max_tokens"] == CAP  # OpenAI's default 16, capped
    assert response.headers["x-greenroute-models-tried"] == "small,large"
    assert response.json()["choices"][0]["text"] == LARGE_TEXT


def test_a_stage_answer_without_logprobs_cannot_be_judged_so_it_escalates(
        router: Path, tiers: Tiers) -> None:
    tiers.small.reply = Reply(text=SMALL_TEXT, gives_logprobs=False)
    with green(router, tiers) as http:
        response = chat(http)  # at 0.5 a judged answer would be kept
    assert tiers.small.bodies[0]["logprobs"] is True
    assert response.headers["x-greenroute-models-tried"] == "small,large"
    assert "x-greenroute-confidence" not in response.headers


def test_a_stage_stopped_by_the_clients_own_limit_is_judged(router: Path, tiers: Tiers) -> None:
    tiers.small.reply = Reply(text="a long answer that goes on and on")
    with green(router, tiers) as http:
        response = chat(http, max_tokens=2)
    assert tiers.small.bodies[0]["max_tokens"] == 2
    assert response.headers["x-greenroute-models-tried"] == "small"
    assert response.json()["choices"][0]["finish_reason"] == "length"
    assert response.json()["choices"][0]["message"]["content"] == "a long"


def test_text_completions_route_and_drop_unasked_logprobs(router: Path, tiers: Tiers) -> None:
    with green(router, tiers) as http:
        client = openai_client(http)
        raw = client.completions.with_raw_response.create(model="green", prompt="The sky is",
                                                          max_tokens=3)
        asked = client.completions.create(model="green", prompt="The sky is", logprobs=1)
    assert raw.headers["x-greenroute-models-tried"] == "small"
    assert raw.parse().choices[0].logprobs is None
    assert raw.parse().choices[0].text == SMALL_TEXT
    stage = tiers.small.bodies[0]
    assert stage["logprobs"] == 5 and stage["max_tokens"] == 3
    assert tiers.small.bodies[1]["max_tokens"] == CAP  # 16 by default, capped
    assert asked.choices[0].logprobs.tokens == ["small", " thinks", " Paris"]


# -- failover -------------------------------------------------------------------------------

def test_a_failing_stage_hands_over_to_the_next_tier(router: Path, tiers: Tiers) -> None:
    tiers.small.reply = Reply(fail=BadGateway("small fell over"))
    with green(router, tiers) as http:
        response = chat(http)
    assert response.status_code == 200
    assert response.headers["x-greenroute-models-tried"] == "small,large"
    assert response.headers["x-greenroute-model"] == "large"
    assert "x-greenroute-degraded" not in response.headers
    row, models = ledger(tiers.db, response.headers["x-request-id"])
    assert row is not None and (row["status"], row["answered_by"]) == (200, "large")
    assert [(m["tier"], m["answered"], m["completion_tokens"]) for m in models] == [
        ("small", 0, None), ("large", 1, 5)]


@pytest.mark.parametrize("stream", [False, True])
def test_a_failing_last_tier_hands_over_to_the_next_larger(router: Path, tiers: Tiers,
                                                           stream: bool) -> None:
    tiers.mid.reply = Reply(fail=BackendUnavailable("mid is down"))
    with green(router, tiers) as http:
        response = chat(http, "green-0.2", stream=stream)
    assert response.status_code == 200
    assert response.headers["x-greenroute-models-tried"] == "mid,large"
    assert response.headers["x-greenroute-model"] == "large"
    if stream:
        assert streamed_text(events(response.text)) == LARGE_TEXT
        assert tiers.mid.streams_closed == 1
    else:
        assert response.json()["choices"][0]["message"]["content"] == LARGE_TEXT
    row, models = ledger(tiers.db, response.headers["x-request-id"])
    assert row is not None and (row["route"], row["answered_by"], row["models_tried"]) == (
        "routed", "large", 2)


@pytest.mark.parametrize("stream", [False, True])
def test_when_the_largest_tier_is_down_the_best_answer_so_far_comes_back_marked(
        router: Path, tiers: Tiers, stream: bool) -> None:
    tiers.large.reply = Reply(fail=BackendUnavailable("large is down"))
    with green(router, tiers) as http:
        response = chat(http, "green-0.9", stream=stream,
                        stream_options={"include_usage": True} if stream else None)
    assert response.status_code == 200
    assert response.headers["x-greenroute-models-tried"] == "small,large"
    assert response.headers["x-greenroute-model"] == "small"
    assert response.headers["x-greenroute-degraded"] == "large failed (backend_unavailable)"
    if stream:
        payloads = events(response.text)
        assert streamed_text(payloads) == SMALL_TEXT
        assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 3
        assert all(c["choices"][0]["logprobs"] is None for c in payloads if c["choices"])
    else:
        choice = response.json()["choices"][0]
        assert choice["message"]["content"] == SMALL_TEXT and choice["logprobs"] is None
    row, models = ledger(tiers.db, response.headers["x-request-id"])
    assert row is not None
    assert (row["status"], row["answered_by"], row["completion_tokens"]) == (200, "small", 3)
    assert [(m["tier"], m["answered"]) for m in models] == [("small", 1), ("large", 0)]


@pytest.mark.parametrize(("model", "failing"), [("green-1", ("large",)),
                                                ("green", ("small", "large"))])
def test_with_nothing_larger_and_no_answer_kept_the_error_reaches_the_client(
        router: Path, tiers: Tiers, model: str, failing: tuple[str, ...]) -> None:
    for name in failing:
        getattr(tiers, name).reply = Reply(fail=BackendUnavailable(f"{name} is down"))
    with green(router, tiers) as http:
        response = chat(http, model)
    assert response.status_code == 503
    assert response.json() == {"error": {"message": "large is down", "type": "api_error",
                                         "param": None, "code": "backend_unavailable"}}
    assert response.headers["x-greenroute-models-tried"] == ",".join(failing)
    row, models = ledger(tiers.db, response.headers["x-request-id"])
    assert row is not None and (row["status"], row["error"], row["answered_by"]) == (
        503, "backend_unavailable", None)
    assert [m["tier"] for m in models] == list(failing)


@pytest.mark.parametrize("stream", [False, True])
def test_a_4xx_from_every_tier_is_the_answer(router: Path, tiers: Tiers, stream: bool) -> None:
    """A stage's 4xx hands the request to a larger tier (tests/test_app_hardening.py); the
    last tier's 4xx goes back when every tier refused."""
    tiers.small.reply = Reply(fail=InvalidRequest("n must be 1", param="n"))
    tiers.large.reply = Reply(fail=InvalidRequest("n must be 1", param="n"))
    with green(router, tiers) as http:
        response = chat(http, stream=stream)
    assert response.status_code == 400
    assert response.json()["error"] == {"message": "n must be 1",
                                        "type": "invalid_request_error", "param": "n",
                                        "code": "unsupported_parameter"}
    assert tiers.tried() == ["small", "large"]
    row, _ = ledger(tiers.db, response.headers["x-request-id"])
    assert row is not None and (row["status"], row["error"]) == (400, "unsupported_parameter")


def test_a_4xx_from_the_last_tier_is_not_replaced_by_a_degraded_answer(
        router: Path, tiers: Tiers) -> None:
    tiers.large.reply = Reply(fail=InvalidRequest("prompt too long", code="context_length"))
    with green(router, tiers) as http:
        response = chat(http, "green-0.9")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length"
    assert "x-greenroute-degraded" not in response.headers


# -- streams --------------------------------------------------------------------------------

def test_a_kept_stream_arrives_in_one_piece_with_usage_and_energy_fields(
        router: Path, tiers: Tiers) -> None:
    with green(router, tiers) as http:
        client = openai_client(http)
        with client.chat.completions.with_streaming_response.create(
                model="green", messages=QUESTION, max_tokens=8, stream=True,
                stream_options={"include_usage": True}) as response:
            headers = response.headers
            chunks = list(response.parse())
    assert headers["x-greenroute-models-tried"] == "small"
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-cache"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == SMALL_TEXT
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert "stream" not in tiers.small.bodies[0]  # the stage is asked for a whole answer
    row, _ = ledger(tiers.db, headers["x-request-id"])
    assert row is not None and (row["stream"], row["answered_by"], row["status"]) == (
        1, "small", 200)


def test_a_kept_stream_without_include_usage_has_no_usage_chunk(router: Path,
                                                                tiers: Tiers) -> None:
    with green(router, tiers) as http:
        response = chat(http, stream=True)
    payloads = events(response.text)
    assert all(c["choices"] for c in payloads)
    assert payloads[0]["object"] == "chat.completion.chunk"


def test_an_escalated_stream_streams_from_the_large_tier(router: Path, tiers: Tiers) -> None:
    with green(router, tiers) as http:
        response = chat(http, "green-0.9", stream=True, stream_options={"include_usage": True})
    assert response.headers["x-greenroute-models-tried"] == "small,large"
    payloads = events(response.text)
    assert streamed_text(payloads) == LARGE_TEXT
    assert payloads[-1]["usage"]["completion_tokens"] == 5
    assert tiers.large.bodies[0]["stream"] is True


def test_a_kept_text_completion_stream(router: Path, tiers: Tiers) -> None:
    with green(router, tiers) as http:
        response = http.post("/v1/completions", json={"model": "green", "prompt": "Sky?",
                                                      "stream": True})
    payloads = events(response.text)
    assert payloads[0]["object"] == "text_completion"
    assert "".join(c["choices"][0]["text"] for c in payloads) == SMALL_TEXT
    assert payloads[-1]["choices"][0]["finish_reason"] == "stop"


def test_a_last_tier_failing_mid_stream_ends_with_an_error_event(router: Path,
                                                                 tiers: Tiers) -> None:
    tiers.large.reply = Reply(text=LARGE_TEXT, fail_midstream=BadGateway("cut off"))
    with green(router, tiers) as http:
        response = chat(http, "green-1", stream=True)
    assert response.status_code == 200  # the stream had begun
    payloads = events(response.text + "data: [DONE]\n\n")  # no [DONE] after an error
    assert "[DONE]" not in response.text
    assert streamed_text(payloads[:-1]) == "large"
    assert payloads[-1] == {"error": {"message": "cut off", "type": "api_error", "param": None,
                                      "code": "bad_gateway"}}
    assert tiers.large.streams_closed == 1
    row, _ = ledger(tiers.db, response.headers["x-request-id"])
    assert row is not None and (row["status"], row["error"]) == (502, "bad_gateway")


# -- targets and the model card -------------------------------------------------------------

def test_bad_targets_are_clear_errors(router: Path, tiers: Tiers) -> None:
    with green(router, tiers) as http:
        by_name = chat(http, "green-fast")
        by_header = chat(http, headers={"x-greenroute-quality-target": "1.5"})
        zero = chat(http, "green-0")
    assert by_name.status_code == 400
    assert by_name.json()["error"]["code"] == "invalid_value"
    assert by_name.json()["error"]["param"] == "model"
    assert by_header.status_code == 400
    assert by_header.json()["error"]["param"] == "x-greenroute-quality-target"
    assert zero.status_code == 400
    assert tiers.tried() == []


def test_models_lists_green_with_its_targets(router: Path, tiers: Tiers) -> None:
    with green(router, tiers) as http:
        card = openai_client(http).models.retrieve("green")
        by_target = http.get("/v1/models/green-0.9").json()
        listed = http.get("/v1/models").json()["data"]
    extra = card.model_extra["greenroute"]
    assert extra["available"] is True and extra["route"] == "router"
    assert extra["tiers"] == ["small", "mid", "large"]
    assert extra["kind"] == "logistic"
    assert extra["default_target"] == 0.5
    assert extra["targets"] == [0.2, 0.5, 0.9, 1.0]
    assert by_target["id"] == "green"
    assert [m["id"] for m in listed] == ["small", "mid", "large", "green"]


def test_the_artifacts_default_target_applies_when_none_is_configured(
        router: Path, tiers: Tiers) -> None:
    config = gateway_config(tier("small", 1.0), tier("mid", 2.0), tier("large", 5.0),
                            router={"path": str(router)})
    with serve(config, tiers.small, tiers.mid, tiers.large) as http:
        response = chat(http)
        card = http.get("/v1/models/green").json()
    assert response.headers["x-greenroute-quality-target"] == "0.95"
    assert card["greenroute"]["default_target"] == 0.95
