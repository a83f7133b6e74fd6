"""Bad requests get OpenAI-shaped errors with the right status, and never hurt the gateway."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import MAX_BODY, Gateway, start_gateway, stop_gateway

CHAT = "/chat/completions"


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None,
                        param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


def test_malformed_json_is_400(gateway: Gateway) -> None:
    response = httpx.post(gateway.url + CHAT, content=b'{"model": "echo", "messages": [',
                          headers={"content-type": "application/json"})
    assert_openai_error(response, 400, code="invalid_json")


def test_body_that_is_not_an_object_is_400(gateway: Gateway) -> None:
    assert_openai_error(httpx.post(gateway.url + CHAT, json=[1, 2]), 400)


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "echo"}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "echo", "messages": []}, "messages"),
    ({"model": "echo", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"model": "echo", "messages": [{"role": "user", "content": "x"}], "temperature": 3},
     "temperature"),
    ({"model": "echo", "messages": [{"role": "user", "content": "x"}], "max_tokens": "many"},
     "max_tokens"),
])
def test_schema_errors_name_the_field(gateway: Gateway, body: dict, param: str) -> None:
    assert_openai_error(httpx.post(gateway.url + CHAT, json=body), 400, param=param)


def test_completions_schema_error(gateway: Gateway) -> None:
    response = httpx.post(gateway.url + "/completions", json={"model": "echo"})
    assert_openai_error(response, 400, code="missing_required_parameter", param="prompt")


def test_oversized_body_is_413(gateway: Gateway) -> None:
    big = {"model": "echo", "messages": [{"role": "user", "content": "x" * MAX_BODY}]}
    assert_openai_error(httpx.post(gateway.url + CHAT, json=big), 413, code="request_too_large")


def test_oversized_chunked_body_is_413(gateway: Gateway) -> None:
    """No content-length to trust: the limit holds while the body streams in."""
    def body() -> Iterator[bytes]:
        yield b'{"model": "echo", "messages": [{"role": "user", "content": "'
        for _ in range(MAX_BODY // 1024 + 1):
            yield b"x" * 1024
        yield b'"}]}'

    response = httpx.post(gateway.url + CHAT, content=body(),
                          headers={"content-type": "application/json"})
    assert_openai_error(response, 413)


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert caught.value.body["code"] == "model_not_found"
    assert caught.value.body["param"] == "model"


@pytest.mark.parametrize("model", ["green", "green-0.9"])
def test_green_is_reserved_and_refused_clearly(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
    assert caught.value.body["code"] == "router_not_configured"
    assert "router" in caught.value.body["message"]


def test_unknown_path_and_wrong_method(gateway: Gateway) -> None:
    assert_openai_error(httpx.get(gateway.url + "/embeddings"), 404)
    assert_openai_error(httpx.get(gateway.url + CHAT), 405)


def test_the_gateway_survives_abuse(gateway: Gateway, client: openai.OpenAI) -> None:
    """Garbage, truncated and abandoned requests leave the gateway serving."""
    import socket

    host, port = gateway.root.removeprefix("http://").split(":")
    for payload in (b"GARBAGE\r\n\r\n", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                    b"content-length: 100\r\n\r\n{\"model\":"):
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(payload)
    assert gateway.process.poll() is None
    reply = client.chat.completions.create(model="echo", messages=[{"role": "user",
                                                                    "content": "still up?"}])
    assert reply.choices[0].message.content == "echo: still up?"


@pytest.fixture(scope="module")
def keyed_gateway(tmp_path_factory: pytest.TempPathFactory, upstream) -> Iterator[Gateway]:
    config = (f'[[tiers]]\nname = "echo"\nbackend = "openai"\nurl = "{upstream.url}"\n'
              'model = "echo"\n\n[[keys]]\nid = "team-a"\nkey = "sk-team-a"\n')
    gw = start_gateway(config, Path(tmp_path_factory.mktemp("keyed")), name="keyed")
    yield gw
    stop_gateway(gw)


def test_keys_are_enforced(keyed_gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=keyed_gateway.url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}])
    assert caught.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    no_key = httpx.post(keyed_gateway.url + CHAT, json={"model": "echo", "messages": []})
    assert_openai_error(no_key, 401, code="invalid_api_key")  # auth comes before validation
    good = openai.OpenAI(base_url=keyed_gateway.url, api_key="sk-team-a", max_retries=0)
    assert good.chat.completions.create(model="echo", messages=[
        {"role": "user", "content": "x"}]).choices[0].message.content == "echo: x"
    assert httpx.get(keyed_gateway.root + "/health").status_code == 200  # health needs no key
