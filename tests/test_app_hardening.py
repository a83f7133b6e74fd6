"""The gateway's known defects (issue 13), each pinned by a test, in process over the ASGI app
with fake backends: a tier's own limits escalate under `green`; config errors and /health keep
secrets; `store_text` on every path; /health bounded and concurrent; deep JSON, a client that
leaves mid-body, validated `stream`, `GET /v1/models/green`, `prompt: null`; keys (no ledger
row before authentication, unset key_env, one secret twice); the shutdown grace ending in-flight
requests with OpenAI-shaped errors. The real-process shutdown test is in
tests/test_shutdown.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from fake_backends import (
    Exchange,
    FakeBackend,
    Reply,
    asgi_call,
    build_app,
    gateway_config,
    ledger,
    ledger_ids,
    serve,
    tier,
)
from routing_fixtures import handmade_artifact
from starlette.testclient import TestClient

from greenroute.backends.base import InvalidRequest
from greenroute.gateway.app import create_app
from greenroute.gateway.cli import main as cli_main
from greenroute.gateway.config import ConfigError, GatewayConfig, load_config

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "hello there"}]
SMALL_TEXT = "small thinks Paris"
LARGE_TEXT = "large knows it is Paris"


def events(text: str) -> list[dict[str, Any]]:
    """An event stream's JSON payloads, checking that it ends with [DONE]."""
    lines = [line[len("data: "):] for line in text.split("\n\n") if line]
    assert lines[-1] == "[DONE]", text
    return [orjson.loads(line) for line in lines[:-1]]


def streamed_text(payloads: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in payloads
                   if c["choices"])


# -- 1. under `green`, a tier's own limits escalate ----------------------------------------

@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`small` a cascade stage (confidence 0.5), `mid` a router-only step, `large` the
    largest; target 0.5 keeps small's answer, 0.2 sends to mid, 1.0 to large."""
    return handmade_artifact(tmp_path_factory.mktemp("router"),
                             steps=[("small", 0.6, 0.5), ("mid", 0.1, None)], largest="large",
                             energy=[1.0, 2.0, 5.0],
                             thresholds={0.2: 0.05, 0.5: 0.3, 0.9: 0.7, 1.0: None},
                             never_keep=(0.05,))


@contextmanager
def green(router: Path, db: Path, *backends: FakeBackend,
          store_text: bool = False) -> Iterator[TestClient]:
    config = gateway_config(
        tier("small", 1.0), tier("mid", 2.0), tier("large", 5.0),
        router={"path": str(router), "default_target": 0.5, "cascade_max_tokens": 4},
        ledger={"path": str(db), "store_text": store_text})
    with serve(config, *backends) as http:
        yield http


def three_tiers() -> tuple[FakeBackend, FakeBackend, FakeBackend]:
    return (FakeBackend("small", reply=Reply(text=SMALL_TEXT, logprob=-0.05)),
            FakeBackend("mid", reply=Reply(text="mid answer")),
            FakeBackend("large", reply=Reply(text=LARGE_TEXT)))


@pytest.mark.parametrize("stream", [False, True])
def test_a_stage_that_cannot_take_the_request_hands_it_to_a_larger_tier(
        router: Path, tmp_path: Path, stream: bool) -> None:
    small, mid, large = three_tiers()
    small.reply = Reply(fail=InvalidRequest("the embedded backend generates one choice (n=1)",
                                            param="n"))
    with green(router, tmp_path / "l.db", small, mid, large) as http:
        response = http.post(CHAT, json={"model": "green", "messages": HELLO, "n": 2,
                                         "stream": stream})
    assert response.status_code == 200, response.text
    assert response.headers["x-greenroute-models-tried"] == "small,large"
    assert response.headers["x-greenroute-model"] == "large"
    if stream:
        assert streamed_text(events(response.text)) == LARGE_TEXT
    else:
        assert response.json()["choices"][0]["message"]["content"] == LARGE_TEXT
    row, models = ledger(tmp_path / "l.db", response.headers["x-request-id"])
    assert row is not None and (row["status"], row["answered_by"]) == (200, "large")
    assert [(m["tier"], m["answered"]) for m in models] == [("small", 0), ("large", 1)]


def test_a_last_tier_that_cannot_take_the_request_hands_it_to_the_next_larger(
        router: Path, tmp_path: Path) -> None:
    small, mid, large = three_tiers()
    mid.reply = Reply(fail=InvalidRequest("prompt longer than the context", code="context"))
    with green(router, tmp_path / "l.db", small, mid, large) as http:
        response = http.post(CHAT, json={"model": "green-0.2", "messages": HELLO})
    assert response.status_code == 200, response.text
    assert response.headers["x-greenroute-models-tried"] == "mid,large"
    assert response.json()["choices"][0]["message"]["content"] == LARGE_TEXT


def test_a_request_no_tier_can_take_gets_the_last_tiers_4xx(router: Path,
                                                            tmp_path: Path) -> None:
    small, mid, large = three_tiers()
    small.reply = Reply(fail=InvalidRequest("small: tools are not supported", param="tools"))
    large.reply = Reply(fail=InvalidRequest("large: tools are not supported", param="tools"))
    with green(router, tmp_path / "l.db", small, mid, large) as http:
        response = http.post(CHAT, json={"model": "green", "messages": HELLO})
    assert response.status_code == 400
    assert response.json()["error"] == {"message": "large: tools are not supported",
                                        "type": "invalid_request_error", "param": "tools",
                                        "code": "unsupported_parameter"}
    assert response.headers["x-greenroute-models-tried"] == "small,large"
    assert "x-greenroute-degraded" not in response.headers
    row, _ = ledger(tmp_path / "l.db", response.headers["x-request-id"])
    assert row is not None and (row["status"], row["error"]) == (400, "unsupported_parameter")


# -- 2. config errors name fields, never values --------------------------------------------

def test_config_errors_show_where_and_what_but_never_the_values(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text('[[tiers]]\nname = "cloud"\nbackend = "openai"\nmodel = "m"\n'
                    'api_key = "sk-very-secret-1"\n\n'
                    '[[tiers]]\nname = "x"\nbackend = "openai"\nurl = "http://h/v1"\n'
                    'model = "m"\napikey = "sk-very-secret-2"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "sk-very-secret" not in message
    assert "input_value" not in message
    assert str(path) in message
    assert "tiers.1.apikey" in message  # the typo's location
    assert "tiers.0" in message  # the tier with no url


# -- 3. store_text keeps prompt and answer on every path, and nothing when off ---------------

def text_row(db: Path, response: Any) -> tuple[str | None, str | None]:
    row, _ = ledger(db, response.headers["x-request-id"])
    assert row is not None
    return row["prompt_text"], row["answer_text"]


@pytest.mark.parametrize("stream", [False, True])
def test_store_text_keeps_the_direct_answer(tmp_path: Path, stream: bool) -> None:
    db = tmp_path / "l.db"
    config = gateway_config(tier("echo"), ledger={"path": str(db), "store_text": True})
    with serve(config, FakeBackend("echo")) as http:
        response = http.post(CHAT, json={"model": "echo", "messages": HELLO, "stream": stream})
    assert response.status_code == 200
    prompt, answer = text_row(db, response)
    assert prompt is not None and orjson.loads(prompt) == HELLO
    assert answer == "a fake answer"


@pytest.mark.parametrize(("model", "answer"), [("green", SMALL_TEXT), ("green-0.9", LARGE_TEXT),
                                               ("green-0.2", "mid answer")])
def test_store_text_keeps_green_answers_kept_escalated_or_routed_streamed(
        router: Path, tmp_path: Path, model: str, answer: str) -> None:
    db = tmp_path / "l.db"
    with green(router, db, *three_tiers(), store_text=True) as http:
        response = http.post(CHAT, json={"model": model, "messages": HELLO, "stream": True})
    assert streamed_text(events(response.text)) == answer
    assert text_row(db, response) == (orjson.dumps(HELLO).decode(), answer)


def test_store_text_keeps_a_completions_stream(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    config = gateway_config(tier("echo"), ledger={"path": str(db), "store_text": True})
    with serve(config, FakeBackend("echo")) as http:
        response = http.post("/v1/completions", json={"model": "echo", "prompt": "Say",
                                                      "stream": True})
    assert text_row(db, response) == ('"Say"', "a fake answer")


@pytest.mark.parametrize("stream", [False, True])
def test_without_store_text_no_text_is_kept(router: Path, tmp_path: Path, stream: bool) -> None:
    db = tmp_path / "l.db"
    with green(router, db, *three_tiers()) as http:
        responses = [http.post(CHAT, json={"model": model, "messages": HELLO,
                                           "stream": stream})
                     for model in ("green", "green-0.9", "small")]
    for response in responses:
        assert text_row(db, response) == (None, None)


# -- 4. /health: concurrent, bounded, details only for a caller with a key -------------------

class HungHealth(FakeBackend):
    """A backend whose health check never answers."""

    async def health(self) -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


def test_health_checks_tiers_at_once_and_bounds_a_hung_one(tmp_path: Path) -> None:
    config = gateway_config(tier("a"), tier("b"), tier("c"),
                            health={"timeout_s": 0.5, "interval_s": 0})
    with serve(config, HungHealth("a"), HungHealth("b"), FakeBackend("c")) as http:
        started = time.monotonic()
        response = http.get("/health")
        elapsed = time.monotonic() - started
    assert response.status_code == 503
    tiers = response.json()["tiers"]
    assert tiers["c"]["ok"] is True
    assert tiers["a"]["ok"] is False and tiers["b"]["ok"] is False
    assert elapsed < 0.9  # 0.5 s for both at once, not 0.5 s each


def test_health_shows_details_only_to_a_caller_with_a_key(tmp_path: Path) -> None:
    config = gateway_config(tier("echo"), keys=[{"id": "ops", "key": "sk-ops"}],
                            ledger={"path": str(tmp_path / "l.db")})
    with serve(config, FakeBackend("echo")) as http:
        anonymous = http.get("/health")
        wrong = http.get("/health", headers={"authorization": "Bearer nope"})
        keyed = http.get("/health", headers={"authorization": "Bearer sk-ops"})
    assert anonymous.status_code == wrong.status_code == keyed.status_code == 200
    assert anonymous.json() == wrong.json() == {"status": "ok"}
    assert set(keyed.json()) == {"status", "tiers", "ledger"}
    assert keyed.json()["tiers"]["echo"]["ok"] is True


def test_health_shows_details_to_everyone_when_no_key_is_configured(tmp_path: Path) -> None:
    with serve(gateway_config(tier("echo")), FakeBackend("echo")) as http:
        assert http.get("/health").json()["tiers"]["echo"]["ok"] is True


# -- 5. deep JSON is refused when it is parsed ----------------------------------------------

def deep_body(depth: int) -> bytes:
    """A chat body whose extra field nests lists so that the whole body is `depth` deep
    (written by hand: orjson writes at most 254 levels)."""
    lists = depth - 1
    return (b'{"model": "echo", "messages": [{"role": "user", "content": "x"}], "metadata": '
            + b"[" * lists + b"1" + b"]" * lists + b"}")


@pytest.fixture
def echo_app(tmp_path: Path) -> Iterator[tuple[TestClient, FakeBackend, Path]]:
    db = tmp_path / "l.db"
    echo = FakeBackend("echo")
    with serve(gateway_config(tier("echo"), ledger={"path": str(db)}), echo) as http:
        yield http, echo, db


@pytest.mark.parametrize("depth", [65, 300, 1000])
def test_a_body_nested_too_deep_is_a_clean_400(echo_app: tuple[TestClient, FakeBackend, Path],
                                                depth: int) -> None:
    http, echo, _ = echo_app
    response = http.post(CHAT, content=deep_body(depth),
                         headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_json" and "64" in error["message"]
    assert echo.calls == []


def test_a_body_nested_64_deep_passes(echo_app: tuple[TestClient, FakeBackend, Path]) -> None:
    http, echo, _ = echo_app
    assert orjson.loads(deep_body(64))  # 64 levels: the object, then 63 of lists
    assert http.post(CHAT, content=deep_body(64)).status_code == 200
    assert len(echo.calls) == 1


# -- 6. a client that leaves while its body is read -----------------------------------------

def test_a_client_that_leaves_mid_body_is_recorded_as_499_without_a_traceback(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "l.db"
    app = build_app(gateway_config(tier("echo"), ledger={"path": str(db)}), FakeBackend("echo"))
    sent: list[dict[str, Any]] = []
    messages = iter([{"type": "http.request", "body": b'{"model": "echo", ', "more_body": True},
                     {"type": "http.disconnect"}])

    async def receive() -> Any:
        return next(messages)

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": CHAT, "raw_path": CHAT.encode(),
             "query_string": b"", "root_path": "", "server": ("testserver", 80),
             "client": ("127.0.0.1", 1), "headers": [(b"content-type", b"application/json")]}

    async def main() -> None:
        async with app.router.lifespan_context(app):
            await app(scope, receive, send)

    with caplog.at_level(logging.WARNING, logger="greenroute"):
        asyncio.run(main())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    [request_id] = ledger_ids(db)
    row, _ = ledger(db, request_id)
    assert row is not None and (row["status"], row["error"]) == (499, "client_closed")


# -- 8. the validated value of `stream` (and friends) is the one used ------------------------

def test_stream_false_as_a_string_is_not_a_stream(
        echo_app: tuple[TestClient, FakeBackend, Path]) -> None:
    http, echo, db = echo_app
    response = http.post(CHAT, json={"model": "echo", "messages": HELLO, "stream": "false",
                                     "n": "1", "max_tokens": "50"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json()["choices"][0]["message"]["content"] == "a fake answer"
    body = echo.bodies[0]
    assert (body["stream"], body["n"], body["max_tokens"]) == (False, 1, 50)  # as validated


def test_include_usage_as_a_string_is_honoured(
        echo_app: tuple[TestClient, FakeBackend, Path]) -> None:
    http, _, _ = echo_app
    response = http.post(CHAT, json={"model": "echo", "messages": HELLO, "stream": "true",
                                     "stream_options": {"include_usage": "true"}})
    payloads = events(response.text)
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 3


# -- 9. spec conformance: retrieve what is listed; prompt null ------------------------------

def test_green_is_retrievable_as_listed_without_a_router(
        echo_app: tuple[TestClient, FakeBackend, Path]) -> None:
    http, _, _ = echo_app
    listed = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    response = http.get("/v1/models/green")
    assert response.status_code == 200
    assert response.json() == listed["green"]
    assert response.json()["greenroute"]["available"] is False
    assert http.get("/v1/models/green-0.9").status_code == 404  # not listed


def test_prompt_null_is_the_specs_default_prompt(
        echo_app: tuple[TestClient, FakeBackend, Path]) -> None:
    http, echo, _ = echo_app
    response = http.post("/v1/completions", json={"model": "echo", "prompt": None})
    assert response.status_code == 200, response.text
    assert echo.bodies[0]["prompt"] == "<|endoftext|>"
    missing = http.post("/v1/completions", json={"model": "echo"})
    assert missing.json()["error"]["code"] == "missing_required_parameter"


# -- 10. keys -------------------------------------------------------------------------------

def test_requests_refused_before_authentication_write_no_ledger_row(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    config = gateway_config(tier("echo"), keys=[{"id": "team", "key": "sk-team"}],
                            ledger={"path": str(db)})
    with serve(config, FakeBackend("echo")) as http:
        for _ in range(5):
            refused = http.post(CHAT, json={"model": "echo", "messages": HELLO},
                                headers={"authorization": "Bearer sk-wrong"})
            assert refused.status_code == 401
            assert refused.headers["x-request-id"]
        good = http.post(CHAT, json={"model": "echo", "messages": HELLO},
                         headers={"authorization": "Bearer sk-team"})
        assert good.status_code == 200
        assert http.app.state.gateway.unauthenticated == 5  # type: ignore[attr-defined]
    assert ledger_ids(db) == [good.headers["x-request-id"]]


def test_an_unset_key_env_is_a_clear_error_at_start(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("GREENROUTE_TEST_UNSET_KEY", raising=False)
    keys = [{"id": "team", "key_env": "GREENROUTE_TEST_UNSET_KEY"}]
    with pytest.raises(ConfigError, match="GREENROUTE_TEST_UNSET_KEY"):
        create_app(gateway_config(tier("echo"), keys=keys), backends={"echo": FakeBackend("e")})
    path = tmp_path / "gw.toml"
    path.write_text('[[tiers]]\nname = "echo"\nbackend = "openai"\nurl = "http://h/v1"\n'
                    'model = "m"\n[[keys]]\nid = "team"\nkey_env = "GREENROUTE_TEST_UNSET_KEY"\n'
                    '[ledger]\nenabled = false\n[router]\nenabled = false\n')
    assert cli_main(["serve", "--config", str(path), "--no-fetch"]) == 2
    err = capsys.readouterr().err
    assert "GREENROUTE_TEST_UNSET_KEY" in err and "Traceback" not in err


def test_two_keys_with_one_secret_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="same secret"):
        gateway_config(tier("echo"), keys=[{"id": "a", "key": "sk-same"},
                                           {"id": "b", "key": "sk-same"}])
    monkeypatch.setenv("GREENROUTE_TEST_KEY", "sk-same")
    config = gateway_config(tier("echo"), keys=[{"id": "a", "key": "sk-same"},
                                                {"id": "b", "key_env": "GREENROUTE_TEST_KEY"}])
    with pytest.raises(ConfigError, match="same secret"):
        create_app(config, backends={"echo": FakeBackend("echo")})


def test_the_gateway_holds_only_digests_of_the_keys() -> None:
    config = gateway_config(tier("echo"), keys=[{"id": "team", "key": "sk-team"}])
    gateway = create_app(config, backends={"echo": FakeBackend("echo")}).state.gateway
    assert all(isinstance(k, bytes) and len(k) == 32 for k in gateway.keys.by_digest)
    assert "sk-team" not in repr(gateway.keys.by_digest)


# -- 7. the shutdown grace ends what is still running with an OpenAI-shaped error ------------

def run_until_drained(config: GatewayConfig, backend: FakeBackend, body: dict[str, Any],
                      after_first_bytes: bool) -> Exchange:
    """One request; once the backend is working on it, the shutdown grace ends."""
    async def main() -> Exchange:
        app = build_app(config, backend)
        gateway = app.state.gateway
        exchange = Exchange()

        async def end_grace() -> None:
            while not backend.calls:
                await asyncio.sleep(0.005)
            if after_first_bytes:
                await exchange.first_body.wait()
            await asyncio.sleep(0.02)
            gateway.drain.end()

        async with app.router.lifespan_context(app):
            await asyncio.wait_for(asyncio.gather(
                asgi_call(app, CHAT, orjson.dumps(body), asyncio.Event(), exchange),
                end_grace()), timeout=10)
        return exchange

    return asyncio.run(main())


def test_a_whole_answer_still_waited_for_at_the_grace_end_is_a_503(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    backend = FakeBackend("echo", reply=Reply(hang=True))
    exchange = run_until_drained(gateway_config(tier("echo"), ledger={"path": str(db)}), backend,
                                 {"model": "echo", "messages": HELLO}, after_first_bytes=False)
    assert exchange.status == 503
    assert orjson.loads(exchange.body)["error"]["code"] == "server_shutting_down"
    assert backend.cancelled == 1
    row, _ = ledger(db, exchange.headers["x-request-id"])
    assert row is not None and (row["status"], row["error"]) == (503, "server_shutting_down")


def test_a_stream_still_running_at_the_grace_end_ends_with_an_error_event(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    backend = FakeBackend("echo", reply=Reply(text="one two three", hang_midstream=True))
    exchange = run_until_drained(gateway_config(tier("echo"), ledger={"path": str(db)}), backend,
                                 {"model": "echo", "messages": HELLO, "stream": True},
                                 after_first_bytes=True)
    assert exchange.status == 200
    parts = [p[len("data: "):] for p in exchange.body.decode().split("\n\n") if p]
    assert b"[DONE]" not in exchange.body
    assert orjson.loads(parts[0])["choices"][0]["delta"]["content"] == "one"
    assert orjson.loads(parts[-1])["error"]["code"] == "server_shutting_down"
    assert backend.streams_closed == 1
    row, models = ledger(db, exchange.headers["x-request-id"])
    assert row is not None
    assert (row["status"], row["error"], row["completion_tokens"]) == (
        503, "server_shutting_down", 1)
    assert models[0]["answered"] == 1
