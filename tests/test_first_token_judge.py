"""A cascade stage judged on its first token (`train --judge first-token`), in-process: a
streaming client gets a kept stage's answer live, token by token, and a stage that is not kept
stops after its first token while the next tier streams."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from fake_backends import FakeBackend, Reply, gateway_config, ledger, serve, tier
from routing_fixtures import judged_artifact
from starlette.testclient import TestClient

from greenroute.backends.base import Endpoint
from greenroute.routers.features import FEATURES, FIRST_TOKEN

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# confidence = sigmoid(4 x lp_first + 2), kept at 0.5: a first token of logprob -0.1 (0.83) is
# kept, one of -2 (0.002) is not
SURE, UNSURE = -0.1, -2.0
SMALL_TEXT = "small thinks it is Paris , the capital"
LARGE_TEXT = "large knows it is Paris"


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return judged_artifact(tmp_path_factory.mktemp("router"), FIRST_TOKEN,
                           {"lp_first": 4.0}, 2.0)


@contextmanager
def green(router: Path, db: Path, logprob: float
          ) -> Iterator[tuple[TestClient, FakeBackend, FakeBackend]]:
    small = FakeBackend("small", reply=Reply(text=SMALL_TEXT, logprob=logprob))
    large = FakeBackend("large", reply=Reply(text=LARGE_TEXT))
    config = gateway_config(tier("small", 1.0), tier("large", 5.0),
                            router={"path": str(router), "cascade_max_tokens": 4},
                            ledger={"path": str(db)})
    with serve(config, small, large) as http:
        yield http, small, large


def stream(http: TestClient, **fields: Any) -> tuple[dict[str, str], list[dict[str, Any]]]:
    response = http.post("/v1/chat/completions", json={
        "model": "green", "messages": QUESTION, "stream": True,
        "stream_options": {"include_usage": True}, "max_tokens": 32, **fields})
    assert response.status_code == 200, response.text
    lines = [line[len("data: "):] for line in response.text.split("\n\n") if line]
    assert lines[-1] == "[DONE]"
    return dict(response.headers), [orjson.loads(line) for line in lines[:-1]]


def text_of(payloads: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in payloads
                   if c["choices"])


def test_a_kept_first_token_streams_the_rest_of_the_stage_live(router: Path,
                                                                tmp_path: Path) -> None:
    with green(router, tmp_path / "l.db", SURE) as (http, small, large):
        headers, payloads = stream(http)
    assert headers["x-greenroute-model"] == "small"
    assert float(headers["x-greenroute-confidence"]) == pytest.approx(0.832, abs=0.001)
    assert not large.calls
    (endpoint, body), = small.calls
    # streamed with logprobs, and not capped at cascade_max_tokens: the answer is the client's
    assert endpoint is Endpoint.CHAT and body["stream"] and body["logprobs"]
    assert body["max_tokens"] == 32
    # token by token, as the stage produced it, not one piece; no logprobs the client did
    # not ask for
    tokens = [p for p in payloads if p["choices"] and p["choices"][0]["delta"].get("content")]
    assert len(tokens) == len(SMALL_TEXT.split()) > 1
    assert text_of(payloads) == SMALL_TEXT
    assert all(p["choices"][0]["logprobs"] is None for p in payloads if p["choices"])
    usage = payloads[-1]["usage"]
    assert usage["completion_tokens"] == len(SMALL_TEXT.split())
    row, models = ledger(tmp_path / "l.db", headers["x-request-id"])
    assert row is not None and row["answered_by"] == "small" and row["route"] == "cascade"
    assert [(m["tier"], m["answered"]) for m in models] == [("small", 1)]


def test_a_client_that_asks_for_logprobs_keeps_them(router: Path, tmp_path: Path) -> None:
    with green(router, tmp_path / "l.db", SURE) as (http, _, _):
        _, payloads = stream(http, logprobs=True, top_logprobs=2)
    tokens = [p for p in payloads if p["choices"] and p["choices"][0]["delta"].get("content")]
    assert all(p["choices"][0]["logprobs"]["content"][0]["logprob"] == SURE for p in tokens)


def test_an_unsure_first_token_stops_the_stage_and_the_large_tier_streams(
        router: Path, tmp_path: Path) -> None:
    with green(router, tmp_path / "l.db", UNSURE) as (http, small, large):
        headers, payloads = stream(http)
    assert headers["x-greenroute-model"] == "large"
    assert headers["x-greenroute-models-tried"] == "small,large"
    assert text_of(payloads) == LARGE_TEXT
    assert small.streams_closed == 1  # stopped after its first token, not run to its end
    row, models = ledger(tmp_path / "l.db", headers["x-request-id"])
    assert row is not None and row["answered_by"] == "large"
    # the stage is in the ledger with what it produced before it was stopped
    assert [(m["tier"], m["answered"], m["completion_tokens"]) for m in models] == [
        ("small", 0, 1), ("large", 1, len(LARGE_TEXT.split()))]


def test_a_client_that_does_not_stream_gets_the_kept_answer_whole(router: Path,
                                                                 tmp_path: Path) -> None:
    """The stage streams for the gateway alone: kept, it is read to its end and goes back as one
    answer (uncapped, as the client asked); not kept, it stops after its first token."""
    for logprob, answered_by in ((SURE, "small"), (UNSURE, "large")):
        db = tmp_path / f"{logprob}.db"
        with green(router, db, logprob) as (http, small, _):
            response = http.post("/v1/chat/completions", json={
                "model": "green", "messages": QUESTION, "max_tokens": 32})
        assert response.status_code == 200, response.text
        assert response.headers["x-greenroute-model"] == answered_by
        (_, body), = small.calls
        assert body["stream"] and body["max_tokens"] == 32
        answer = response.json()
        assert answer["object"] == "chat.completion"
        choice = answer["choices"][0]
        assert choice["logprobs"] is None and choice["finish_reason"] == "stop"
        row, models = ledger(db, response.headers["x-request-id"])
        assert row is not None and row["answered_by"] == answered_by
        if answered_by == "small":
            assert choice["message"] == {"role": "assistant", "content": SMALL_TEXT}
            assert answer["usage"]["completion_tokens"] == len(SMALL_TEXT.split())
            assert [m["tier"] for m in models] == ["small"]
        else:
            assert choice["message"]["content"] == LARGE_TEXT
            assert small.streams_closed == 1
            assert [(m["tier"], m["completion_tokens"]) for m in models] == [
                ("small", 1), ("large", len(LARGE_TEXT.split()))]


def test_only_a_model_that_reads_nothing_but_the_first_token_streams_early(
        tmp_path: Path) -> None:
    whole = judged_artifact(tmp_path / "whole", FEATURES, {"lp_first": 4.0}, 2.0)
    with green(whole, tmp_path / "l.db", SURE) as (http, small, _):
        headers, payloads = stream(http, max_tokens=4)
    assert headers["x-greenroute-model"] == "small"
    (_, body), = small.calls
    assert not body.get("stream")  # judged on its whole (capped) answer, sent in one piece
    assert len([p for p in payloads if p["choices"]
                and p["choices"][0]["delta"].get("content")]) == 1


def test_a_stage_whose_stream_has_no_logprobs_stops_at_its_first_text(tmp_path: Path,
                                                                      router: Path) -> None:
    small = FakeBackend("small", reply=Reply(text=SMALL_TEXT, gives_logprobs=False))
    large = FakeBackend("large", reply=Reply(text=LARGE_TEXT))
    config = gateway_config(tier("small", 1.0), tier("large", 5.0),
                            router={"path": str(router)}, ledger={"path": str(tmp_path / "l")})
    with serve(config, small, large) as http:
        headers, payloads = stream(http)
    assert headers["x-greenroute-model"] == "large" and text_of(payloads) == LARGE_TEXT
    assert small.streams_closed == 1  # not generated to its end and then thrown away
