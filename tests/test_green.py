"""Model `green` through a real gateway, with the real `openai` client: routed, cascaded (kept
and escalated), streamed, failing over, and recorded in the ledger.

The router artifact is made by hand (tests/routing_fixtures.py) so that every decision is known:
the `tiny` stage (real SmolLM2) always has confidence 0.5, `dead` is a tier nobody listens to,
and `echo` (the fake vLLM upstream) is the largest. Thresholds per target:
  0.2 -> 0.05  `dead` answers directly (router score 0.1 >= 0.05); it fails, `echo` takes over
  0.5 -> 0.3   cascade: tiny answers, 0.5 >= 0.3, kept
  0.9 -> 0.7   cascade: tiny answers, 0.5 < 0.7, escalated to echo
  1.0 -> none  everything to echo
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import Gateway, start_gateway, stop_gateway
from routing_fixtures import handmade_artifact

from greenroute.backends.fake_openai import FakeUpstream, free_port

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def green(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path,
          upstream: FakeUpstream) -> Iterator[tuple[Gateway, Path]]:
    tmp = tmp_path_factory.mktemp("green")
    router = handmade_artifact(tmp, steps=[("tiny", 0.6, 0.5), ("dead", 0.1, None)],
                               largest="echo", energy=[1.0, 2.0, 5.0],
                               thresholds={0.2: 0.05, 0.5: 0.3, 0.9: 0.7, 1.0: None},
                               never_keep=(0.05,))
    ledger = tmp / "ledger.db"
    dead = f"http://127.0.0.1:{free_port()}/v1"
    tiers = (f'[[tiers]]\nname = "tiny"\nbackend = "llamacpp"\nweights = "tiny"\n'
             f'context = 2048\nenergy_hint = 0.1\n\n'
             f'[[tiers]]\nname = "dead"\nbackend = "openai"\nurl = "{dead}"\nmodel = "x"\n'
             f'connect_timeout_s = 1.0\nenergy_hint = 1.0\n\n'
             f'[[tiers]]\nname = "echo"\nbackend = "openai"\nurl = "{upstream.url}"\n'
             f'model = "echo"\nenergy_hint = 5.0\n\n'
             f'[router]\npath = "{router}"\ndefault_target = 0.5\ncascade_max_tokens = 64\n\n'
             f'[ledger]\npath = "{ledger}"\nflush_interval_s = 0.1\n')
    gateway = start_gateway(tiers, tmp, name="green")
    try:
        yield gateway, ledger
    finally:
        stop_gateway(gateway)


@pytest.fixture(scope="module")
def client(green: tuple[Gateway, Path]) -> openai.OpenAI:
    return openai.OpenAI(base_url=green[0].url, api_key="unused", max_retries=0, timeout=60)


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
    assert headers["x-greenroute-router-score"] == "0.6000,0.1000"
    assert headers["x-greenroute-confidence"] == "0.5000"
    completion = raw.parse()
    assert completion.model == "smollm2-135m-instruct-q4_1"
    assert completion.choices[0].message.content.strip()
    assert completion.choices[0].logprobs is None  # asked for by the stage, not by the client
    assert completion.usage.completion_tokens <= 8


def test_the_client_gets_logprobs_when_it_asks(client: openai.OpenAI) -> None:
    completion = _chat(client, logprobs=True, top_logprobs=2).parse()
    assert completion.choices[0].logprobs.content[0].top_logprobs


def test_an_unsure_small_answer_escalates_to_the_large_tier(client: openai.OpenAI) -> None:
    raw = _chat(client, model="green-0.9")
    assert raw.headers["x-greenroute-route"] == "cascade"
    assert raw.headers["x-greenroute-models-tried"] == "tiny,echo"
    assert raw.headers["x-greenroute-model"] == "echo"
    assert raw.parse().choices[0].message.content == "echo: What is the capital of France?"


def test_a_target_the_small_tier_cannot_meet_goes_straight_to_the_large_one(
        client: openai.OpenAI) -> None:
    raw = _chat(client, extra_headers={"x-greenroute-quality-target": "1"})
    assert raw.headers["x-greenroute-route"] == "routed"
    assert raw.headers["x-greenroute-models-tried"] == "echo"
    assert raw.headers["x-greenroute-quality-target"] == "1"


def test_a_failing_tier_hands_over_to_the_next(client: openai.OpenAI) -> None:
    raw = _chat(client, model="green-0.2")
    assert raw.headers["x-greenroute-models-tried"] == "dead,echo"
    assert raw.headers["x-greenroute-model"] == "echo"
    assert raw.parse().choices[0].message.content


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
    assert text.split() == "echo: What is the capital of France?".split()


def test_text_completions_route_too(client: openai.OpenAI) -> None:
    raw = client.completions.with_raw_response.create(model="green", prompt="The sky is",
                                                      max_tokens=4, temperature=0)
    assert raw.headers["x-greenroute-models-tried"] == "tiny"
    assert raw.parse().choices[0].logprobs is None


def test_bad_targets_are_clear_errors(client: openai.OpenAI, green: tuple[Gateway, Path]
                                      ) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        _chat(client, model="green-fast")
    assert caught.value.code == "invalid_value" and caught.value.param == "model"
    response = httpx.post(green[0].url + "/chat/completions", timeout=30,
                          headers={"x-greenroute-quality-target": "1.5"},
                          json={"model": "green", "messages": QUESTION})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "x-greenroute-quality-target"


def test_models_lists_green_with_its_targets(client: openai.OpenAI) -> None:
    card = client.models.retrieve("green")
    assert card.model_extra["greenroute"]["available"] is True
    assert card.model_extra["greenroute"]["tiers"] == ["tiny", "dead", "echo"]
    assert card.model_extra["greenroute"]["default_target"] == 0.5


def test_the_ledger_records_routes_targets_and_every_model_tried(
        client: openai.OpenAI, green: tuple[Gateway, Path]) -> None:
    raw = _chat(client, model="green-0.9")
    request_id = raw.headers["x-request-id"]
    deadline = time.monotonic() + 10
    row = None
    while row is None and time.monotonic() < deadline:
        time.sleep(0.2)
        with sqlite3.connect(green[1]) as db:
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


@pytest.fixture(scope="module")
def degraded(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path) -> Iterator[str]:
    """`tiny` is judged unsure at target 0.9, and the largest tier, `gone`, is down."""
    tmp = tmp_path_factory.mktemp("degraded")
    router = handmade_artifact(tmp, steps=[("tiny", 0.6, 0.5)], largest="gone",
                               energy=[1.0, 5.0], thresholds={0.9: 0.7})
    gone = f"http://127.0.0.1:{free_port()}/v1"
    tiers = (f'[[tiers]]\nname = "tiny"\nbackend = "llamacpp"\nweights = "tiny"\n'
             f'context = 2048\nenergy_hint = 0.1\n\n'
             f'[[tiers]]\nname = "gone"\nbackend = "openai"\nurl = "{gone}"\nmodel = "x"\n'
             f'connect_timeout_s = 1.0\nenergy_hint = 5.0\n\n'
             f'[router]\npath = "{router}"\n\n[ledger]\nenabled = false\n')
    gateway = start_gateway(tiers, tmp, name="degraded")
    try:
        yield gateway.url
    finally:
        stop_gateway(gateway)


def test_when_the_largest_tier_is_down_the_best_answer_so_far_comes_back_marked(
        degraded: str) -> None:
    client = openai.OpenAI(base_url=degraded, api_key="unused", max_retries=0, timeout=60)
    raw = _chat(client, model="green-0.9")
    assert raw.headers["x-greenroute-models-tried"] == "tiny,gone"
    assert raw.headers["x-greenroute-model"] == "tiny"
    assert raw.headers["x-greenroute-degraded"] == "gone failed (backend_unavailable)"
    assert raw.parse().choices[0].message.content.strip()
