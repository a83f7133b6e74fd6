"""Fallbacks and health (issue 13, item 3): the circuit breaker, background health checks, a
directly named tier's retry and fallbacks, and what the ledger says happened.

The breaker is tested on its own with a clock the test moves; the rest runs the real app in
process over fake backends (tests/fake_backends.py), with a real SQLite ledger.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from fake_backends import FakeBackend, Reply, gateway_config, ledger, openai_client, serve, tier
from routing_fixtures import handmade_artifact
from waiting import wait_until

from greenroute.backends.base import BackendUnavailable, BadGateway, InvalidRequest
from greenroute.gateway.config import GatewayConfig, HealthConfig
from greenroute.gateway.health import BreakerState, CircuitBreaker, HealthMonitor

HELLO = [{"role": "user", "content": "hello"}]
CHAT = "/v1/chat/completions"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def refused() -> BackendUnavailable:
    """What the HTTP backend raises when the upstream's port refuses the connection."""
    error = BackendUnavailable("backend 'small' is unreachable")
    error.__cause__ = ConnectionRefusedError(111, "Connection refused")
    return error


def config(tmp_path: Path, fallbacks: tuple[str, ...] = ("large",), **health: Any
           ) -> GatewayConfig:
    return gateway_config(tier("small", 1.0, fallbacks=list(fallbacks)), tier("large", 5.0),
                          ledger={"path": str(tmp_path / "ledger.db")},
                          health={"interval_s": 0, "failure_threshold": 2, **health})


def chat(http: Any, stream: bool = False) -> Any:
    return http.post(CHAT, json={"model": "small", "messages": HELLO, "stream": stream})


# -- the breaker ----------------------------------------------------------------------------------

def test_breaker_opens_after_consecutive_failures_then_half_opens_for_one_trial() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=3, cooldown_s=30, clock=clock)
    breaker.failure()
    breaker.failure()
    breaker.success()  # a success in between resets the count
    breaker.failure()
    breaker.failure()
    assert breaker.state is BreakerState.CLOSED and breaker.allow()
    breaker.failure()
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    clock.now += 29.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()  # the one trial
    assert not breaker.allow()  # the others wait for its verdict
    breaker.failure()  # the trial failed: open for another cooldown
    assert breaker.state is BreakerState.OPEN
    clock.now += 30
    assert breaker.allow()
    breaker.release()  # the trial's client left: no verdict, the next request is the trial
    assert breaker.allow()
    breaker.success()
    assert breaker.state is BreakerState.CLOSED and breaker.allow() and breaker.allow()


def test_a_failed_health_check_opens_the_breaker_and_a_passed_one_after_cooldown_closes_it(
        ) -> None:
    clock = Clock()
    backend = FakeBackend("small", healthy=False)
    monitor = HealthMonitor(HealthConfig(cooldown_s=10), {"small": backend}, clock=clock)
    asyncio.run(monitor.check_all())
    assert monitor.breaker("small").state is BreakerState.OPEN
    assert monitor.snapshot()["small"]["breaker"] == "open"
    backend.healthy = True
    asyncio.run(monitor.check_all())
    assert monitor.breaker("small").state is BreakerState.OPEN  # still cooling down
    clock.now += 10
    asyncio.run(monitor.check_all())
    assert monitor.breaker("small").state is BreakerState.CLOSED
    assert monitor.snapshot()["small"]["ok"] is True


def test_checks_run_concurrently_and_a_hung_one_is_cut_at_its_timeout() -> None:
    class Hung(FakeBackend):
        async def health(self) -> dict[str, Any]:
            await asyncio.sleep(60)
            return {"ok": True}

    class Slow(FakeBackend):
        async def health(self) -> dict[str, Any]:
            await asyncio.sleep(0.2)
            return {"ok": True}

    backends = {"hung": Hung("hung"), **{f"s{i}": Slow(f"s{i}") for i in range(4)}}
    monitor = HealthMonitor(HealthConfig(timeout_s=0.5, max_concurrent=8), backends)
    started = time.perf_counter()
    asyncio.run(monitor.check_all())
    took = time.perf_counter() - started
    assert took < 0.9  # one after another would be 0.5 + 4 * 0.2
    snapshot = monitor.snapshot()
    assert snapshot["hung"]["ok"] is False and "0.5 s" in snapshot["hung"]["error"]
    assert all(snapshot[f"s{i}"]["ok"] for i in range(4))


def test_background_checks_open_a_breaker_without_any_request(tmp_path: Path) -> None:
    small, large = FakeBackend("small"), FakeBackend("large")
    with serve(config(tmp_path, interval_s=0.05), small, large) as http:
        small.healthy = False
        gateway = http.app.state.gateway  # type: ignore[attr-defined]
        wait_until(lambda: gateway.health_monitor.breaker("small").state is BreakerState.OPEN,
                   timeout=5)
        answer = chat(http)
    assert answer.status_code == 200 and answer.headers["x-greenroute-model"] == "large"
    assert small.calls == []  # its breaker sent the request straight to its fallback


# -- a direct request's retry and fallbacks -------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_a_tier_that_fails_before_its_first_byte_hands_the_request_to_its_fallback(
        tmp_path: Path, stream: bool) -> None:
    small = FakeBackend("small", reply=Reply(fail=BadGateway("upstream said 500")))
    large = FakeBackend("large", reply=Reply(text="large answers"))
    with serve(config(tmp_path), small, large) as http:
        answer = chat(http, stream)
    assert answer.status_code == 200
    assert '"large"' in answer.text or '"large answers"' in answer.text  # its first word
    assert answer.headers["x-greenroute-model"] == "large"
    assert answer.headers["x-greenroute-route"] == "direct>fallback"
    assert answer.headers["x-greenroute-models-tried"] == "small,large"
    assert len(small.calls) == 1  # a 502 is not a connection error: no retry
    row, models = ledger(tmp_path / "ledger.db", answer.headers["x-request-id"])
    assert row is not None
    assert (row["route"], row["answered_by"], row["models_tried"], row["status"]) == (
        "direct>fallback", "large", 2, 200)
    assert [(m["tier"], m["answered"]) for m in models] == [("small", 0), ("large", 1)]


def test_a_connection_error_is_retried_once_on_the_same_tier(tmp_path: Path) -> None:
    small = FakeBackend("small", reply=Reply(text="small answers", fail=refused(),
                                             fail_calls=1))
    large = FakeBackend("large")
    with serve(config(tmp_path), small, large) as http:
        answer = openai_client(http).chat.completions.with_raw_response.create(
            model="small", messages=HELLO)  # type: ignore[arg-type]
    assert answer.parse().choices[0].message.content == "small answers"
    assert answer.headers["x-greenroute-route"] == "direct>retry"
    assert len(small.calls) == 2 and large.calls == []
    row, models = ledger(tmp_path / "ledger.db", answer.headers["x-request-id"])
    assert row is not None and (row["route"], row["answered_by"]) == ("direct>retry", "small")
    assert [(m["tier"], m["answered"]) for m in models] == [("small", 0), ("small", 1)]


def test_a_tier_still_refusing_after_its_retry_goes_to_its_fallback(tmp_path: Path) -> None:
    small = FakeBackend("small", reply=Reply(fail=refused()))
    large = FakeBackend("large")
    with serve(config(tmp_path, retries=1), small, large) as http:
        answer = chat(http, stream=True)
    assert answer.status_code == 200 and answer.text.endswith("data: [DONE]\n\n")
    assert answer.headers["x-greenroute-route"] == "direct>retry>fallback"
    assert answer.headers["x-greenroute-models-tried"] == "small,small,large"
    row, _ = ledger(tmp_path / "ledger.db", answer.headers["x-request-id"])
    assert row is not None and (row["route"], row["models_tried"]) == ("direct>retry>fallback", 3)


def test_an_open_breaker_skips_the_tier_until_its_cooldown_ends(tmp_path: Path) -> None:
    small = FakeBackend("small", reply=Reply(fail=BadGateway("down")))
    large = FakeBackend("large")
    with serve(config(tmp_path, failure_threshold=2, cooldown_s=0.3), small, large) as http:
        for _ in range(2):
            assert chat(http).status_code == 200
        assert len(small.calls) == 2  # the breaker is open now
        for _ in range(3):
            skipped = chat(http)
            assert skipped.status_code == 200
        assert len(small.calls) == 2 and len(large.calls) == 5
        assert skipped.headers["x-greenroute-route"] == "direct>fallback"
        assert "x-greenroute-models-tried" not in skipped.headers  # only large was called
        small.reply = Reply(text="small is back")
        time.sleep(0.3)  # half-open: the next request is the trial, and it closes the breaker
        assert "small is back" in chat(http).text
        assert "small is back" in chat(http).text
        health = http.get("/health").json()
    assert health["tiers"]["small"]["breaker"] == "closed"
    row, models = ledger(tmp_path / "ledger.db", skipped.headers["x-request-id"])
    assert row is not None and (row["route"], row["models_tried"]) == ("direct>fallback", 1)


def test_an_open_breaker_with_no_fallback_is_a_clean_503(tmp_path: Path) -> None:
    small = FakeBackend("small", reply=Reply(fail=BadGateway("down")))
    large = FakeBackend("large")
    with serve(config(tmp_path, fallbacks=(), failure_threshold=1), small, large) as http:
        first = chat(http)
        second = chat(http)
    assert first.status_code == 502 and first.json()["error"]["code"] == "bad_gateway"
    assert second.status_code == 503
    assert second.json()["error"]["code"] == "backend_unavailable"
    assert "circuit breaker" in second.json()["error"]["message"]
    assert len(small.calls) == 1 and large.calls == []
    row, _ = ledger(tmp_path / "ledger.db", second.headers["x-request-id"])
    assert row is not None and (row["route"], row["status"], row["models_tried"]) == (
        "direct", 503, 0)


def test_a_refusal_is_the_requests_fault_not_a_reason_to_fall_back(tmp_path: Path) -> None:
    small = FakeBackend("small", reply=Reply(fail=InvalidRequest("n > 1 is not supported")))
    large = FakeBackend("large")
    with serve(config(tmp_path, failure_threshold=1), small, large) as http:
        refused_ = chat(http)
        health = http.get("/health").json()
    assert refused_.status_code == 400 and large.calls == []
    assert health["tiers"]["small"]["breaker"] == "closed"  # a 400 is no sign of ill health


def test_fallbacks_must_name_other_tiers() -> None:
    with pytest.raises(ValueError, match="fallback 'nope'"):
        gateway_config(tier("small", fallbacks=["nope"]))
    with pytest.raises(ValueError, match="fallback 'small'"):
        gateway_config(tier("small", fallbacks=["small"]))


def test_health_reports_a_failed_check_but_only_background_checks_move_breakers(
        tmp_path: Path) -> None:
    small, large = FakeBackend("small"), FakeBackend("large")
    with serve(config(tmp_path), small, large) as http:  # interval_s = 0: no background checks
        small.healthy = False
        health = http.get("/health")
        answer = chat(http)
    assert health.status_code == 503
    assert health.json()["tiers"]["small"] | {"checked_at": 0} == {
        "ok": False, "model": "small-upstream", "breaker": "closed", "checked_at": 0}
    assert answer.headers["x-greenroute-model"] == "small"  # a probe does not change routing


def test_model_green_skips_a_tier_whose_breaker_is_open(tmp_path: Path) -> None:
    """The cascade's first stage is `small`; with its breaker open the request goes to the
    next tier without calling it, and a 5xx from `small` counts towards opening it."""
    router = handmade_artifact(tmp_path, steps=[("small", 0.6, 0.5)], largest="large",
                               energy=[1.0, 5.0], thresholds={0.5: 0.3, 1.0: None})
    small = FakeBackend("small", reply=Reply(fail=BadGateway("down")))
    large = FakeBackend("large", reply=Reply(text="large answers"))
    config = gateway_config(tier("small", 1.0), tier("large", 5.0),
                            router={"path": str(router), "default_target": 0.5},
                            ledger={"path": str(tmp_path / "ledger.db")},
                            health={"interval_s": 0, "failure_threshold": 2})
    with serve(config, small, large) as http:
        answers = [http.post(CHAT, json={"model": "green", "messages": HELLO})
                   for _ in range(3)]
        breakers = http.get("/health").json()["tiers"]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert all(a.headers["x-greenroute-model"] == "large" for a in answers)
    assert len(small.calls) == 2 and len(large.calls) == 3  # the third skipped small
    assert breakers["small"]["breaker"] == "open" and breakers["large"]["breaker"] == "closed"
    _, models = ledger(tmp_path / "ledger.db", answers[2].headers["x-request-id"])
    assert [m["tier"] for m in models] == ["large"]
