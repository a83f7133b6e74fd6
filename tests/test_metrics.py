"""`/metrics` (issue 13, item 4): what a few requests leave in it, parsed with
prometheus_client's own parser, and the dashboard's names among them."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_backends import FakeBackend, Reply, gateway_config, ledger, serve, tier
from prometheus_client.parser import text_string_to_metric_families
from test_deploy import PLANNED_METRICS
from waiting import wait_until

from greenroute.backends.base import BadGateway, Endpoint
from greenroute.backends.energy.sampler import Fleet
from greenroute.gateway.accounting import Accounting
from greenroute.gateway.metrics import GatewayMetrics

HELLO = [{"role": "user", "content": "hello"}]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(parsed: Samples, name: str, **labels: str) -> float | None:
    return parsed.get((name, frozenset(labels.items())))


def test_requests_tokens_latency_breakers_and_ledger_after_a_few_requests(tmp_path: Path
                                                                          ) -> None:
    small = FakeBackend("small", reply=Reply(text="one two three"))
    broken = FakeBackend("broken", reply=Reply(fail=BadGateway("down")))
    config = gateway_config(tier("small", 1.0), tier("broken", 2.0),
                            ledger={"path": str(tmp_path / "ledger.db")},
                            health={"interval_s": 0, "failure_threshold": 1})
    with serve(config, small, broken) as http:
        for stream in (False, True):
            assert http.post("/v1/chat/completions", json={
                "model": "small", "messages": HELLO, "stream": stream}).status_code == 200
        assert http.post("/v1/completions", json={"model": "broken", "prompt": "x"}
                         ).status_code == 502
        assert http.post("/v1/completions", json={"model": "nope", "prompt": "x"}
                         ).status_code == 404
        response = http.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    parsed = samples(response.text)
    requests = "greenroute_requests_total"
    assert value(parsed, requests, tier="small", route="direct", status="200") == 2
    assert value(parsed, requests, tier="broken", route="direct", status="502") == 1
    assert value(parsed, requests, tier="none", route="none", status="404") == 1
    assert value(parsed, "greenroute_tokens_total", tier="small", kind="completion") == 6
    assert value(parsed, "greenroute_tokens_total", tier="small", kind="prompt") == 10
    assert value(parsed, "greenroute_request_duration_seconds_count", tier="small",
                 route="direct") == 2
    assert value(parsed, "greenroute_request_duration_seconds_bucket", tier="small",
                 route="direct", le="+Inf") == 2
    assert value(parsed, "greenroute_time_to_first_token_seconds_count", tier="small") == 2
    assert value(parsed, "greenroute_tier_breaker_state", tier="small") == 0
    assert value(parsed, "greenroute_tier_breaker_state", tier="broken") == 2  # open
    assert value(parsed, "greenroute_ledger_rows_buffered") is not None
    assert value(parsed, "greenroute_ledger_rows_dropped_total") == 0
    assert value(parsed, "greenroute_ledger_write_failures_total") == 0
    names = {name for name, _ in parsed}
    dashboard = {n for n in PLANNED_METRICS if not n.endswith("_seconds")}
    dashboard |= {"greenroute_request_duration_seconds_bucket",
                  "greenroute_time_to_first_token_seconds_bucket"}
    missing = dashboard - names - {"greenroute_tier_energy_joules_total",  # no metered tier
                                   "greenroute_routing_decisions_total",  # no `green` request
                                   "greenroute_escalations_total"}
    assert not missing


def test_green_requests_count_the_routers_choice_escalations_and_each_tiers_energy() -> None:
    metrics = GatewayMetrics(Fleet(()), None, None)
    accounting = Accounting(Fleet(()), None, store_text=False)
    accounting.observers.append(metrics.observe)
    record = accounting.open("r1", Endpoint.CHAT.value)
    record.route = "cascade"
    for name in ("small", "medium", "large"):
        attempt = record.attempt(name, FakeBackend(name))
        attempt.done(None)
    record.fail(200, None)  # the last model tried answered (as a stream's end does)
    direct = accounting.open("r2", Endpoint.CHAT.value)
    direct.route = "direct>fallback"
    direct.attempt("small", FakeBackend("small"))
    direct.attempt("large", FakeBackend("large"))
    direct.fail(200, None)
    parsed = samples(metrics.render().decode())
    assert value(parsed, "greenroute_routing_decisions_total", tier="small") == 1
    assert value(parsed, "greenroute_escalations_total", from_tier="small",
                 to_tier="medium") == 1
    assert value(parsed, "greenroute_escalations_total", from_tier="medium",
                 to_tier="large") == 1
    assert value(parsed, "greenroute_escalations_total", from_tier="small",
                 to_tier="large") is None  # a direct fallback is not an escalation
    assert value(parsed, "greenroute_requests_total", tier="large", route="cascade",
                 status="200") == 1
    assert value(parsed, "greenroute_requests_total", tier="large", route="direct>fallback",
                 status="200") == 1


def test_each_app_counts_in_its_own_registry(tmp_path: Path) -> None:
    config = gateway_config(tier("small"), health={"interval_s": 0})
    with serve(config, FakeBackend("small")) as first, \
            serve(config, FakeBackend("small")) as second:
        first.post("/v1/completions", json={"model": "small", "prompt": "x"})
        one, other = samples(first.get("/metrics").text), samples(second.get("/metrics").text)
    key = {"tier": "small", "route": "direct", "status": "200"}
    assert value(one, "greenroute_requests_total", **key) == 1
    assert value(other, "greenroute_requests_total", **key) is None


def test_a_metered_tiers_joules_match_its_ledger_rows(tmp_path: Path) -> None:
    config = gateway_config(tier("cpu", meter={"kind": "estimate"}),
                            ledger={"path": str(tmp_path / "ledger.db")},
                            energy={"interval_ms": 10}, health={"interval_s": 0})
    with serve(config, FakeBackend("cpu", reply=Reply(text="one two"))) as http:
        ids = [http.post("/v1/chat/completions", json={"model": "cpu", "messages": HELLO}
                         ).headers["x-request-id"] for _ in range(3)]
        gateway = http.app.state.gateway  # type: ignore[attr-defined]
        wait_until(lambda: value(samples(gateway.metrics_registry.render().decode()),
                                 "greenroute_requests_total", tier="cpu", route="direct",
                                 status="200") == 3)
        parsed = samples(http.get("/metrics").text)
    rows = [ledger(tmp_path / "ledger.db", i)[0] for i in ids]
    joules = value(parsed, "greenroute_tier_energy_joules_total", tier="cpu", source="estimate")
    assert joules is not None
    assert joules == pytest.approx(sum(row["joules"] for row in rows if row is not None),
                                   abs=1e-9)
    attributed = value(parsed, "greenroute_energy_attributed_joules_total", device="cpu:process",
                       source="estimate")
    assert attributed is not None and attributed >= 0
    # A local meter has no other clients (a vLLM server's counters give them: test_fleet_...)
    assert value(parsed, "greenroute_energy_other_joules_total", device="cpu:process",
                 source="estimate") == 0


def test_requests_refused_for_their_key_are_counted_apart() -> None:
    config = gateway_config(tier("small"), keys=[{"id": "team", "key": "sk-0123456789abcdef"}],
                            health={"interval_s": 0})
    with serve(config, FakeBackend("small")) as http:
        assert http.post("/v1/completions", json={"model": "small", "prompt": "x"}
                         ).status_code == 401
        parsed = samples(http.get("/metrics").text)
    assert value(parsed, "greenroute_unauthenticated_requests_total") == 1
    assert not [name for name, labels in parsed if name == "greenroute_requests_total"]
