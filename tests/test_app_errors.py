"""Bad requests in process: OpenAI-shaped errors (message, type, param, code) with the right
status, through raw HTTP and the real `openai` client; API keys; the body limit; and a ledger
row for every refused request.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fake_backends import FakeBackend, gateway_config, ledger, openai_client, serve, tier
from starlette.testclient import TestClient

CHAT = "/v1/chat/completions"
MAX_BODY = 64 * 1024
HELLO = [{"role": "user", "content": "x"}]


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None,
                        param: str | None = None, type: str = "invalid_request_error"
                        ) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["type"] == type
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


@pytest.fixture
def echo() -> FakeBackend:
    return FakeBackend("echo")


@pytest.fixture
def http(tmp_path: Path, echo: FakeBackend) -> Iterator[TestClient]:
    config = gateway_config(tier("echo"), server={"max_body_bytes": MAX_BODY},
                            ledger={"path": str(tmp_path / "ledger.db")})
    with serve(config, echo) as client:
        yield client


def test_malformed_json_is_400(http: TestClient, echo: FakeBackend) -> None:
    response = http.post(CHAT, content=b'{"model": "echo", "messages": [',
                         headers={"content-type": "application/json"})
    assert_openai_error(response, 400, code="invalid_json")
    assert echo.calls == []


def test_body_that_is_not_an_object_is_400(http: TestClient) -> None:
    assert_openai_error(http.post(CHAT, json=[1, 2]), 400, code="invalid_json")


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"model": "echo"}, "messages", "missing_required_parameter"),
    ({"messages": HELLO}, "model", "missing_required_parameter"),
    ({"model": "echo", "messages": []}, "messages", "invalid_value"),
    ({"model": "echo", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role",
     "invalid_value"),
    ({"model": "echo", "messages": HELLO, "temperature": 3}, "temperature", "invalid_value"),
    ({"model": "echo", "messages": HELLO, "max_tokens": "many"}, "max_tokens", "invalid_value"),
    ({"model": "echo", "messages": HELLO, "top_logprobs": 21}, "top_logprobs", "invalid_value"),
    ({"model": "", "messages": HELLO}, "model", "invalid_value"),
])
def test_schema_errors_name_the_field(http: TestClient, echo: FakeBackend, body: dict[str, Any],
                                      param: str, code: str) -> None:
    assert_openai_error(http.post(CHAT, json=body), 400, param=param, code=code)
    assert echo.calls == []


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "echo"}, "prompt"),
    ({"model": "echo", "prompt": 3}, "prompt"),
    ({"model": "echo", "prompt": "x", "logprobs": 9}, "logprobs"),
])
def test_completions_schema_errors(http: TestClient, body: dict[str, Any], param: str) -> None:
    response = http.post("/v1/completions", json=body)
    assert_openai_error(response, 400, param=param)


def test_completions_missing_prompt_is_named(http: TestClient) -> None:
    response = http.post("/v1/completions", json={"model": "echo"})
    assert_openai_error(response, 400, code="missing_required_parameter", param="prompt")


def test_oversized_body_is_413(http: TestClient) -> None:
    big = {"model": "echo", "messages": [{"role": "user", "content": "x" * MAX_BODY}]}
    error = assert_openai_error(http.post(CHAT, json=big), 413, code="request_too_large")
    assert str(MAX_BODY) in error["message"]


def test_oversized_chunked_body_is_413(http: TestClient) -> None:
    """No content-length to trust: the limit holds while the body streams in."""
    def body() -> Iterator[bytes]:
        yield b'{"model": "echo", "messages": [{"role": "user", "content": "'
        for _ in range(MAX_BODY // 1024 + 1):
            yield b"x" * 1024
        yield b'"}]}'

    response = http.post(CHAT, content=body(), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert_openai_error(response, 413, code="request_too_large")


def test_a_body_under_the_limit_passes(http: TestClient, echo: FakeBackend) -> None:
    body = {"model": "echo", "messages": [{"role": "user", "content": "x" * (MAX_BODY // 2)}]}
    assert http.post(CHAT, json=body).status_code == 200
    assert len(echo.calls) == 1


def test_unknown_model_is_404(http: TestClient) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        openai_client(http).chat.completions.create(model="gpt-9", messages=HELLO)
    assert caught.value.body["code"] == "model_not_found"
    assert caught.value.body["param"] == "model"
    assert "echo" in caught.value.body["message"]  # it names what is available
    assert_openai_error(http.get("/v1/models/gpt-9"), 404, code="model_not_found")


@pytest.mark.parametrize("model", ["green", "green-0.9"])
def test_green_is_reserved_and_refused_clearly(http: TestClient, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client(http).chat.completions.create(model=model, messages=HELLO)
    assert caught.value.body["code"] == "router_not_configured"
    assert caught.value.body["param"] == "model"
    assert "router" in caught.value.body["message"]


def test_unknown_path_and_wrong_method(http: TestClient) -> None:
    assert_openai_error(http.get("/v1/embeddings"), 404, code="not_found")
    assert_openai_error(http.get(CHAT), 405, code="method_not_allowed")


def test_every_refused_request_has_a_ledger_row(tmp_path: Path, echo: FakeBackend) -> None:
    config = gateway_config(tier("echo"), ledger={"path": str(tmp_path / "ledger.db")})
    with serve(config, echo) as http:
        bad = http.post(CHAT, json={"model": "echo", "messages": []})
        unknown = http.post(CHAT, json={"model": "gpt-9", "messages": HELLO})
    row, models = ledger(tmp_path / "ledger.db", bad.headers["x-request-id"])
    assert row is not None
    assert (row["status"], row["error"], row["requested_model"], row["models_tried"]) == (
        400, "invalid_value", "echo", 0)
    assert models == []
    row, _ = ledger(tmp_path / "ledger.db", unknown.headers["x-request-id"])
    assert row is not None and (row["status"], row["error"], row["requested_model"]) == (
        404, "model_not_found", "gpt-9")


def test_keys_are_enforced(tmp_path: Path, echo: FakeBackend) -> None:
    config = gateway_config(tier("echo"), keys=[{"id": "team-a", "key": "sk-team-a"}],
                            ledger={"path": str(tmp_path / "ledger.db")})
    with serve(config, echo) as keyed:
        wrong = openai_client(keyed, api_key="wrong")
        with pytest.raises(openai.AuthenticationError) as caught:
            wrong.chat.completions.create(model="echo", messages=HELLO)
        assert caught.value.body["code"] == "invalid_api_key"
        assert "wrong" not in caught.value.body["message"]  # never echo a secret back
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        with pytest.raises(openai.AuthenticationError):
            wrong.models.retrieve("echo")
        no_key = keyed.post(CHAT, json={"model": "echo", "messages": []})
        assert_openai_error(no_key, 401, code="invalid_api_key")  # auth before validation
        basic = keyed.post(CHAT, json={"model": "echo", "messages": HELLO},
                           headers={"authorization": "Basic sk-team-a"})
        assert_openai_error(basic, 401, code="invalid_api_key")
        assert echo.calls == []
        good = openai_client(keyed, api_key="sk-team-a")
        raw = good.chat.completions.with_raw_response.create(model="echo", messages=HELLO)
        assert raw.parse().choices[0].message.content == "a fake answer"
        assert [m.id for m in good.models.list()] == ["echo", "green"]
        assert keyed.get("/health").status_code == 200  # health needs no key
        assert keyed.get("/metrics").status_code == 200
    row, _ = ledger(tmp_path / "ledger.db", raw.headers["x-request-id"])
    assert row is not None and row["key_id"] == "team-a"  # the id, never the secret
    row, _ = ledger(tmp_path / "ledger.db", no_key.headers["x-request-id"])
    assert row is None  # refused before authentication: no row (anyone could send these)
