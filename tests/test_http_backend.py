"""The OpenAI-compatible HTTP backend (vLLM and kin), against a local upstream that speaks the
same wire protocol, over real loopback HTTP; and the litellm backend against the same upstream.
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from conftest import Gateway

from greenroute.backends.fake_openai import FakeUpstream

HELLO = [{"role": "user", "content": "hello there"}]


def test_chat_passes_through(client: openai.OpenAI, upstream: FakeUpstream) -> None:
    raw = client.chat.completions.with_raw_response.create(model="echo", messages=HELLO)
    assert raw.headers["x-greenroute-model"] == "echo"
    assert raw.headers["x-greenroute-route"] == "direct"
    completion = raw.parse()
    assert completion.choices[0].message.content == "echo: hello there"
    assert completion.usage.completion_tokens == 3


def test_unknown_fields_and_logprobs_reach_the_upstream(client: openai.OpenAI,
                                                        upstream: FakeUpstream) -> None:
    client.chat.completions.create(model="echo", messages=HELLO, logprobs=True, top_logprobs=2,
                                   extra_body={"guided_choice": ["yes", "no"], "top_k": 5})
    sent = upstream.record.bodies[-1]
    assert sent["model"] == "echo"
    assert sent["logprobs"] is True and sent["top_logprobs"] == 2
    assert sent["guided_choice"] == ["yes", "no"] and sent["top_k"] == 5


def test_alias_and_upstream_id_resolve_to_the_tier(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HELLO)
    assert raw.headers["x-greenroute-model"] == "echo"


def test_stream_always_asks_upstream_for_usage(client: openai.OpenAI,
                                               upstream: FakeUpstream) -> None:
    chunks = list(client.chat.completions.create(model="echo", messages=HELLO, stream=True))
    assert upstream.record.bodies[-1]["stream_options"] == {"include_usage": True}
    # The client did not ask for usage, so the usage-only chunk is not forwarded.
    assert all(c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "echo: hello there"


def test_stream_with_usage(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="echo", messages=HELLO, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3


def test_text_completion_and_stream(client: openai.OpenAI) -> None:
    assert client.completions.create(model="echo", prompt="hi").choices[0].text == "echo: hi"
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="echo", prompt="hi", stream=True) if c.choices)
    assert text == "echo: hi"


def test_hanging_upstream_is_a_504(client: openai.OpenAI) -> None:
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="hang", messages=HELLO)
    assert caught.value.status_code == 504
    assert caught.value.body["code"] == "backend_timeout"
    assert time.monotonic() - started < 5  # the tier's timeout_s is 1


def test_hanging_upstream_stream_is_a_504(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="hang", messages=HELLO, stream=True)
    assert caught.value.status_code == 504


def test_upstream_that_dies_is_a_502(client: openai.OpenAI) -> None:
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model="dies", messages=HELLO, stream=stream)
        assert caught.value.status_code == 502
        assert caught.value.body["code"] == "bad_gateway"


def test_upstream_that_dies_mid_stream_ends_with_an_error_event(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="dies-midstream", messages=HELLO, stream=True)
    seen = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            seen.append(chunk.choices[0].delta.content)
    assert seen == ["partial"]
    assert "failed mid-response" in caught.value.message


def test_unreachable_upstream_is_a_503(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="refused", messages=HELLO)
    assert caught.value.status_code == 503
    assert caught.value.body["code"] == "backend_unavailable"


@pytest.mark.parametrize(("tier", "status"), [("e500", 502), ("e503", 503), ("e400", 400),
                                              ("legacy", 400)])
def test_upstream_error_statuses(client: openai.OpenAI, tier: str, status: int) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=tier, messages=HELLO)
    assert caught.value.status_code == status
    assert set(caught.value.body) >= {"message", "type", "param", "code"}
    if status == 400:  # the upstream's own message reaches the client
        assert "fake upstream error" in caught.value.body["message"]


def test_client_disconnect_mid_stream_cancels_upstream(client: openai.OpenAI,
                                                       upstream: FakeUpstream) -> None:
    aborted_before = upstream.record.streams_aborted
    stream = client.chat.completions.create(model="slow", messages=HELLO, stream=True)
    iterator = iter(stream)
    for _ in range(3):
        next(iterator)
    stream.close()  # the slow stream has ~9 s to go
    deadline = time.monotonic() + 3
    while upstream.record.streams_aborted == aborted_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream.record.streams_aborted == aborted_before + 1


def test_client_disconnect_before_answer_cancels_upstream(gateway: Gateway,
                                                          upstream: FakeUpstream) -> None:
    """A non-streamed request whose client leaves: the gateway drops the upstream request at
    once, not when the tier's 1 s timeout would have."""
    abandoned = len(upstream.record.hangs_abandoned)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gateway.url + "/chat/completions", timeout=0.3,
                   json={"model": "hang", "messages": HELLO})
    deadline = time.monotonic() + 3
    while len(upstream.record.hangs_abandoned) == abandoned and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(upstream.record.hangs_abandoned) == abandoned + 1
    assert upstream.record.hangs_abandoned[-1] < 0.8


def test_health_reports_each_tier(gateway: Gateway) -> None:
    response = httpx.get(gateway.root + "/health")
    assert response.status_code == 503  # the `refused` tier is down
    tiers = response.json()["tiers"]
    assert tiers["echo"]["ok"] is True and tiers["tiny"]["ok"] is True
    assert tiers["refused"]["ok"] is False


def test_litellm_cloud_tier(client: openai.OpenAI, upstream: FakeUpstream) -> None:
    raw = client.chat.completions.with_raw_response.create(model="cloud", messages=HELLO,
                                                           max_tokens=5)
    assert raw.headers["x-greenroute-model"] == "cloud"
    completion = raw.parse()
    assert completion.choices[0].message.content == "echo: hello there"
    assert completion.usage.completion_tokens == 3
    assert upstream.record.headers[-1]["authorization"] == "Bearer sk-fake"
    chunks = list(client.chat.completions.create(model="cloud", messages=HELLO, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) \
        == "echo: hello there"
    assert any(c.usage and c.usage.completion_tokens == 3 for c in chunks)


def test_litellm_upstream_failure_is_a_gateway_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="cloud-failing", messages=HELLO)
    assert caught.value.status_code == 502
    assert set(caught.value.body) >= {"message", "type", "param", "code"}
