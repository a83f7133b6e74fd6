"""The direct path in process: a request that names a tier (its name, an alias or its upstream
id) goes to that tier's backend and its answer comes back as the backend made it, with the
gateway's headers, energy, and one ledger row.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_backends import (
    PROMPT_TOKENS,
    FakeBackend,
    Reply,
    gateway_config,
    ledger,
    openai_client,
    serve,
    tier,
)

from greenroute.backends.base import Endpoint
from greenroute.gateway.config import GatewayConfig

HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def fakes() -> tuple[FakeBackend, FakeBackend]:
    return (FakeBackend("small", reply=Reply(text="small says hi")),
            FakeBackend("large", model_id="org/large-v2", reply=Reply(text="large says hi")))


def config(tmp_path: Path, **sections: object) -> GatewayConfig:
    return gateway_config(tier("small", 1.0), tier("large", 5.0, aliases=["gpt-4o"],
                                                    model="org/large-v2"),
                          ledger={"path": str(tmp_path / "ledger.db")}, **sections)


def test_chat_goes_to_the_named_tier_with_the_gateways_headers(
        tmp_path: Path, fakes: tuple[FakeBackend, FakeBackend]) -> None:
    small, large = fakes
    with serve(config(tmp_path), small, large) as http:
        raw = openai_client(http).chat.completions.with_raw_response.create(
            model="small", messages=HELLO, max_tokens=8, extra_body={"guided_choice": ["a"]})
    assert small.started and small.closed and large.closed  # the lifespan ran both ways
    assert raw.headers["x-greenroute-model"] == "small"
    assert raw.headers["x-greenroute-route"] == "direct"
    assert len(raw.headers["x-request-id"]) == 32
    assert "x-greenroute-energy-joules" not in raw.headers  # the tier has no meter
    completion = raw.parse()
    assert completion.model == "small-upstream"
    assert completion.choices[0].message.content == "small says hi"
    assert completion.usage.completion_tokens == 3
    assert completion.usage.prompt_tokens == PROMPT_TOKENS
    assert large.calls == []
    (endpoint, sent), = small.calls
    assert endpoint is Endpoint.CHAT
    assert sent["guided_choice"] == ["a"] and sent["max_tokens"] == 8  # unknown fields pass
    row, models = ledger(tmp_path / "ledger.db", raw.headers["x-request-id"])
    assert row is not None
    assert (row["endpoint"], row["route"], row["requested_model"], row["answered_by"],
            row["upstream_model"], row["status"], row["error"], row["stream"]) == (
        "chat/completions", "direct", "small", "small", "small-upstream", 200, None, 0)
    assert (row["prompt_tokens"], row["completion_tokens"], row["models_tried"]) == (5, 3, 1)
    assert row["joules"] is None and row["energy_source"] is None
    assert row["latency_ms"] > 0 and row["ttft_ms"] is not None
    assert row["prompt_text"] is None and row["answer_text"] is None  # privacy by default
    assert [(m["tier"], m["answered"], m["completion_tokens"]) for m in models] == [
        ("small", 1, 3)]


@pytest.mark.parametrize("name", ["gpt-4o", "org/large-v2", "large"])
def test_aliases_and_upstream_ids_resolve_to_their_tier(
        tmp_path: Path, fakes: tuple[FakeBackend, FakeBackend], name: str) -> None:
    small, large = fakes
    with serve(config(tmp_path), small, large) as http:
        response = http.post("/v1/chat/completions", json={"model": name, "messages": HELLO})
        card = http.get(f"/v1/models/{name}").json()
    assert response.status_code == 200
    assert response.headers["x-greenroute-model"] == "large"
    assert response.json()["choices"][0]["message"]["content"] == "large says hi"
    assert len(large.calls) == 1 and small.calls == []
    assert card["id"] == "large"
    assert card["greenroute"] == {"backend": "openai", "upstream_model": "org/large-v2",
                                  "energy_hint": 5.0}


def test_text_completion_whole_and_streamed(tmp_path: Path,
                                            fakes: tuple[FakeBackend, FakeBackend]) -> None:
    small, large = fakes
    with serve(config(tmp_path), small, large) as http:
        client = openai_client(http)
        raw = client.completions.with_raw_response.create(model="small", prompt="hi")
        chunks = list(client.completions.create(model="small", prompt="hi", stream=True))
    assert raw.headers["x-greenroute-model"] == "small"
    assert raw.parse().choices[0].text == "small says hi"
    assert [endpoint for endpoint, _ in small.calls] == [Endpoint.COMPLETIONS] * 2
    assert all(c.choices for c in chunks)  # no usage chunk: the client did not ask
    assert "".join(c.choices[0].text for c in chunks) == "small says hi"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_stream_forwards_usage_only_when_asked(
        tmp_path: Path, fakes: tuple[FakeBackend, FakeBackend]) -> None:
    small, large = fakes
    with serve(config(tmp_path), small, large) as http:
        client = openai_client(http)
        plain = list(client.chat.completions.create(model="small", messages=HELLO, stream=True))
        with client.chat.completions.with_streaming_response.create(
                model="small", messages=HELLO, stream=True,
                stream_options={"include_usage": True}) as response:
            headers = response.headers
            with_usage = list(response.parse())
    assert all(c.choices for c in plain)
    assert "".join(c.choices[0].delta.content or "" for c in plain) == "small says hi"
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens == 3
    assert all(c.usage is None for c in with_usage[:-1])
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-cache" and headers["x-accel-buffering"] == "no"
    row, models = ledger(tmp_path / "ledger.db", headers["x-request-id"])
    assert row is not None
    assert (row["stream"], row["status"], row["completion_tokens"], row["answered_by"]) == (
        1, 200, 3, "small")
    assert row["ttft_ms"] is not None and row["ttft_ms"] <= row["latency_ms"]


def test_a_metered_tier_reports_its_energy_in_headers_usage_and_ledger(tmp_path: Path) -> None:
    """The estimate meter reads this process's CPU time: the same number reaches the header,
    `usage.energy_joules` and the ledger."""
    metered = FakeBackend("cpu", reply=Reply(text="one two"))
    cfg = gateway_config(tier("cpu", meter={"kind": "estimate"}),
                         ledger={"path": str(tmp_path / "ledger.db")},
                         energy={"interval_ms": 10})
    with serve(cfg, metered) as http:
        client = openai_client(http)
        raw = client.chat.completions.with_raw_response.create(model="cpu", messages=HELLO)
        chunks = list(client.chat.completions.create(
            model="cpu", messages=HELLO, stream=True, stream_options={"include_usage": True}))
    joules = float(raw.headers["x-greenroute-energy-joules"])
    assert joules >= 0
    assert raw.headers["x-greenroute-energy-source"] == "estimate"
    assert raw.parse().usage.model_extra["energy_joules"] == pytest.approx(joules, abs=1e-6)
    assert chunks[-1].usage.model_extra["energy_joules"] >= 0
    row, models = ledger(tmp_path / "ledger.db", raw.headers["x-request-id"])
    assert row is not None and row["energy_source"] == "estimate"
    assert row["joules"] >= joules - 1e-6  # final energy: at least what was known at answer
    assert models[0]["device"] == "cpu:process"


def test_store_text_keeps_prompt_and_answer(tmp_path: Path) -> None:
    backend = FakeBackend("small", reply=Reply(text="kept text"))
    cfg = gateway_config(tier("small"), ledger={"path": str(tmp_path / "l.db"),
                                                "store_text": True})
    with serve(cfg, backend) as http:
        chat = http.post("/v1/chat/completions", json={"model": "small", "messages": HELLO})
        text = http.post("/v1/completions", json={"model": "small", "prompt": "say it"})
    row, _ = ledger(tmp_path / "l.db", chat.headers["x-request-id"])
    assert row is not None
    assert row["prompt_text"] == '[{"role":"user","content":"hello there"}]'
    assert row["answer_text"] == "kept text"
    row, _ = ledger(tmp_path / "l.db", text.headers["x-request-id"])
    assert row is not None and (row["prompt_text"], row["answer_text"]) == ('"say it"',
                                                                           "kept text")


def test_models_list_health_and_metrics(tmp_path: Path,
                                        fakes: tuple[FakeBackend, FakeBackend]) -> None:
    small, large = fakes
    with serve(config(tmp_path), large, small) as http:
        models = openai_client(http).models.list()
        health = http.get("/health")
        large.healthy = False
        degraded = http.get("/health")
        metrics = http.get("/metrics")
    assert [m.id for m in models] == ["small", "large", "green"]  # cheapest first, then green
    green = models.data[-1].model_extra["greenroute"]
    assert green == {"route": "router", "available": False}
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert set(health.json()["tiers"]) == {"small", "large"}
    assert "ledger" in health.json()
    assert degraded.status_code == 503 and degraded.json()["status"] == "degraded"
    assert degraded.json()["tiers"]["large"]["ok"] is False
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith(
        "text/plain")


def test_a_health_check_that_raises_is_reported_not_raised(tmp_path: Path) -> None:
    class Broken(FakeBackend):
        async def health(self) -> dict[str, object]:
            raise RuntimeError("no health here")

    with serve(gateway_config(tier("small")), Broken("small")) as http:
        response = http.get("/health")
    assert response.status_code == 503
    small = response.json()["tiers"]["small"]
    assert (small["ok"], small["error"]) == (False, "RuntimeError('no health here')")


def test_a_backend_error_maps_to_its_status_and_openai_shape(tmp_path: Path) -> None:
    from greenroute.backends.base import BackendTimeout

    backend = FakeBackend("small", reply=Reply(fail=BackendTimeout("upstream took too long")))
    with serve(config(tmp_path), backend, FakeBackend("large")) as http:
        whole = http.post("/v1/chat/completions", json={"model": "small", "messages": HELLO})
        stream = http.post("/v1/chat/completions", json={"model": "small", "messages": HELLO,
                                                         "stream": True})
    for response in (whole, stream):
        assert response.status_code == 504
        assert response.headers["content-type"] == "application/json"
        assert response.json() == {"error": {"message": "upstream took too long",
                                             "type": "api_error", "param": None,
                                             "code": "backend_timeout"}}
        assert response.headers["x-greenroute-model"] == "small"
    assert backend.streams_closed == 1  # the failed stream was closed
    row, models = ledger(tmp_path / "ledger.db", stream.headers["x-request-id"])
    assert row is not None and (row["status"], row["error"]) == (504, "backend_timeout")
    assert row["answered_by"] is None and models[0]["answered"] == 0


def test_an_unexpected_exception_is_a_500_without_details(tmp_path: Path) -> None:
    class Crashing(FakeBackend):
        async def create(self, endpoint: Endpoint, body: dict[str, object]) -> object:
            raise RuntimeError("secret internals sk-123")

    with serve(config(tmp_path), Crashing("small"), FakeBackend("large")) as http:
        response = http.post("/v1/chat/completions", json={"model": "small", "messages": HELLO})
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"
    assert response.json()["error"]["code"] == "internal_error"
    assert "sk-123" not in response.text
    row, _ = ledger(tmp_path / "ledger.db", response.headers["x-request-id"])
    assert row is not None and (row["status"], row["error"]) == (500, "internal_error")



def test_an_unexpected_failure_mid_stream_ends_with_a_server_error_event(tmp_path: Path) -> None:
    backend = FakeBackend("small", reply=Reply(text="one two three",
                                                fail_midstream=RuntimeError("boom sk-123")))
    with serve(config(tmp_path), backend, FakeBackend("large")) as http:
        response = http.post("/v1/chat/completions", json={"model": "small", "messages": HELLO,
                                                           "stream": True})
    assert response.status_code == 200  # the stream had begun
    events = [line for line in response.text.split("\n\n") if line]
    assert b"[DONE]" not in response.content and "sk-123" not in response.text
    assert events[-1] == ('data: {"error":{"message":"The gateway hit an unexpected error.",'
                          '"type":"server_error","param":null,"code":"internal_error"}}')
    assert backend.streams_closed == 1
    row, _ = ledger(tmp_path / "ledger.db", response.headers["x-request-id"])
    assert row is not None and (row["status"], row["error"]) == (500, "internal_error")
