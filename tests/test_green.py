"""Model `green` end to end: a real gateway process, the real `openai` client, the real SmolLM2
model as the cascade stage (its own token logprobs are what the router judges) and the fake vLLM
upstream as the largest tier, and the energy of a discarded answer in the real ledger.

The session's gateway (tests/conftest.py) routes `green` over `tiny` (confidence always 0.5)
and `echo`: target 0.5 (the default) keeps tiny's answer, 0.9 escalates it to echo. Every
routing, failover and error branch is tested in process, faster, in tests/test_app_green.py.
"""

from __future__ import annotations

import sqlite3
import time

import openai
import pytest
from conftest import Gateway

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _chat(client: openai.OpenAI, model: str = "green", **kwargs):  # noqa: ANN202
    return client.chat.completions.with_raw_response.create(
        model=model, messages=QUESTION, max_tokens=8, temperature=0, **kwargs)


def test_a_confident_small_answer_is_kept(client: openai.OpenAI) -> None:
    raw = _chat(client)  # the configured default target, 0.5
    headers = raw.headers
    assert headers["x-greenroute-route"] == "cascade"
    assert headers["x-greenroute-model"] == "tiny"
    assert headers["x-greenroute-models-tried"] == "tiny"
    assert headers["x-greenroute-quality-target"] == "0.5"
    assert headers["x-greenroute-router-score"] == "0.6000"
    assert headers["x-greenroute-confidence"] == "0.5000"  # judged on the model's logprobs
    completion = raw.parse()
    assert completion.model == "smollm2-135m-instruct-q4_1"
    assert completion.choices[0].message.content.strip()
    assert completion.choices[0].logprobs is None  # asked for by the stage, not by the client
    assert completion.usage.completion_tokens <= 8


def test_an_unsure_small_answer_escalates_to_the_large_tier(client: openai.OpenAI) -> None:
    raw = _chat(client, model="green-0.9")
    assert raw.headers["x-greenroute-route"] == "cascade"
    assert raw.headers["x-greenroute-models-tried"] == "tiny,echo"
    assert raw.headers["x-greenroute-model"] == "echo"
    assert raw.parse().choices[0].message.content == "echo: What is the capital of France?"


def test_streams_kept_and_escalated(client: openai.OpenAI) -> None:
    whole = _chat(client).parse().choices[0].message.content
    with client.chat.completions.with_streaming_response.create(
            model="green", messages=QUESTION, max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True}) as response:
        assert response.headers["x-greenroute-models-tried"] == "tiny"
        chunks = list(response.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert chunks[-1].usage.model_extra["energy_joules"] > 0
    with client.chat.completions.with_streaming_response.create(
            model="green-0.9", messages=QUESTION, max_tokens=8, stream=True) as response:
        assert response.headers["x-greenroute-models-tried"] == "tiny,echo"
        text = "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices)
    assert text.split() == ["echo:", "What", "is", "the", "capital", "of", "France?"]


def test_the_ledger_records_routes_targets_and_every_model_tried(
        client: openai.OpenAI, gateway: Gateway) -> None:
    raw = _chat(client, model="green-0.9")
    request_id = raw.headers["x-request-id"]
    assert gateway.ledger is not None
    deadline = time.monotonic() + 10
    row = None
    while row is None and time.monotonic() < deadline:
        time.sleep(0.2)
        with sqlite3.connect(gateway.ledger) as db:
            row = db.execute("SELECT route, quality_target, router_score, models_tried, "
                             "answered_by, joules FROM requests WHERE id = ?",
                             (request_id,)).fetchone()
            attempts = db.execute("SELECT tier, answered, joules FROM request_models WHERE "
                                  "request_id = ? ORDER BY position", (request_id,)).fetchall()
    assert row is not None
    route, target, score, tried, answered_by, joules = row
    assert (route, target, tried, answered_by) == ("cascade", 0.9, 2, "echo")
    assert score == pytest.approx(0.6)
    assert [(tier, bool(answered)) for tier, answered, _ in attempts] == [("tiny", False),
                                                                         ("echo", True)]
    assert attempts[0][2] > 0 and joules >= attempts[0][2]  # the discarded answer's energy counts
