"""The embedded llama.cpp backend's known defects (issue 13), through the in-process app on
the real SmolLM2-135M model: client mistakes are 400s, not 502s (under `green` a 5xx would
escalate); `logit_bias` ids outside the vocabulary are refused, not ignored with a traceback
per token; chat answers carry `message.refusal`, which the spec requires (nullable).

Generations are a few tokens: on 2 cores the time is model time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_backends import gateway_config
from starlette.testclient import TestClient

from greenroute.backends.llamacpp import LlamaCppBackend
from greenroute.gateway.app import create_app

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HELLO = [{"role": "user", "content": "Say hello."}]
VOCAB = 49152  # SmolLM2's vocabulary


@pytest.fixture(scope="module")
def backend(tiny_weights: Path) -> LlamaCppBackend:
    return LlamaCppBackend("tiny", tiny_weights, "smollm2", context=512, max_queue=4)


@pytest.fixture(scope="module")
def http(backend: LlamaCppBackend) -> Iterator[TestClient]:
    config = gateway_config({"name": "tiny", "backend": "llamacpp", "weights": "tiny"})
    with TestClient(create_app(config, backends={"tiny": backend}),
                    base_url="http://gateway.test") as client:
        yield client


def _chat(http: TestClient, **extra: Any) -> Any:
    return http.post(CHAT, json={"model": "tiny", "messages": HELLO, "max_tokens": 3,
                                 "temperature": 0, **extra})


def test_max_tokens_as_a_numeric_string_is_honoured_not_a_502(http: TestClient) -> None:
    response = _chat(http, max_tokens="5")
    assert response.status_code == 200, response.text
    assert 0 < response.json()["usage"]["completion_tokens"] <= 5
    response = http.post(COMPLETIONS, json={"model": "tiny", "prompt": "Once upon a",
                                            "max_tokens": "2", "temperature": 0})
    assert response.status_code == 200, response.text
    assert 0 < response.json()["usage"]["completion_tokens"] <= 2


@pytest.mark.parametrize("prompt", ["", [""]])
def test_an_empty_completions_prompt_is_answered_not_a_502(http: TestClient,
                                                            prompt: Any) -> None:
    response = http.post(COMPLETIONS, json={"model": "tiny", "prompt": prompt, "max_tokens": 3,
                                            "temperature": 0})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert isinstance(answer["choices"][0]["text"], str)
    assert answer["usage"]["completion_tokens"] <= 3


@pytest.mark.parametrize("token", [str(VOCAB), "100000000", "-1", "-5", "hello"])
def test_a_logit_bias_id_outside_the_vocabulary_is_refused_naming_the_parameter(
        http: TestClient, token: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    for path, body in ((CHAT, {"messages": HELLO}), (COMPLETIONS, {"prompt": "Hi"})):
        for stream in (False, True):
            response = http.post(path, json={"model": "tiny", "max_tokens": 3, "stream": stream,
                                             "logit_bias": {token: 5}, **body})
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["param"] == "logit_bias" and token in error["message"]
    assert "Traceback" not in caplog.text


def test_a_logit_bias_inside_the_vocabulary_is_applied(http: TestClient,
                                                       backend: LlamaCppBackend) -> None:
    """Banning the first token of the greedy answer changes how the answer starts."""
    answer = _chat(http, max_tokens=1, logprobs=True).json()["choices"][0]
    first = bytes(answer["logprobs"]["content"][0]["bytes"])
    (token,) = backend._llm.tokenize(first, add_bos=False, special=True)
    response = _chat(http, logit_bias={str(token): -100})
    assert response.status_code == 200, response.text
    assert not response.json()["choices"][0]["message"]["content"].encode().startswith(first)


def test_chat_answers_carry_a_null_refusal(http: TestClient) -> None:
    message = _chat(http).json()["choices"][0]["message"]
    assert "refusal" in message and message["refusal"] is None
    samples = _chat(http, n=2, temperature=0.8).json()["choices"]
    assert [c["message"]["refusal"] for c in samples] == [None, None]
