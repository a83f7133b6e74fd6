"""Per-key rate limits and energy budgets in process: OpenAI's 429s and x-ratelimit-* headers
from the real app, database keys looked up per request (and not looked up when there are
none), and the counters shared by two replicas' `Limits` through one real SQLite file.

The real gateway processes, on SQLite and PostgreSQL, are tests/test_keys.py's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import pytest
from fake_backends import BASE_URL, FakeBackend, build_app, gateway_config, ledger, tier
from starlette.testclient import TestClient

from greenroute.gateway.config import ConfigError, GatewayConfig
from greenroute.gateway.errors import APIError
from greenroute.gateway.keys import Key, KeyStore
from greenroute.gateway.ledger import keys as stored
from greenroute.gateway.ledger import store
from greenroute.gateway.limits import Limits

NOW = 1_800_000_000.0 + 5  # 5 s into a UTC minute (and day)
HELLO = {"model": "small", "messages": [{"role": "user", "content": "hi"}]}
# Each fake answer: 5 prompt tokens + 3 completion tokens ("a fake answer").
TOKENS_PER_ANSWER = 8


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@contextmanager
def gateway(config: GatewayConfig, clock: Clock) -> Iterator[TestClient]:
    app = build_app(config, FakeBackend("small"))
    app.state.gateway.limits.clock = clock
    with TestClient(app, base_url=BASE_URL) as http:
        yield http


def keyed(tmp_path: Path, **limits: Any) -> GatewayConfig:
    return gateway_config(tier("small"), keys=[{"id": "team", "key": "sk-team", **limits},
                                               {"id": "ops", "key": "sk-ops", "admin": True}],
                          ledger={"path": str(tmp_path / "ledger.db")})


def ask(http: TestClient, key: str = "sk-team") -> Any:
    return http.post("/v1/chat/completions", json=HELLO, headers={"authorization": f"Bearer {key}"})


def test_requests_per_minute_get_openais_429_and_headers(tmp_path: Path) -> None:
    clock = Clock()
    with gateway(keyed(tmp_path, rpm=2), clock) as http:
        first, second, third = ask(http), ask(http), ask(http)
        client = openai.OpenAI(base_url=BASE_URL + "/v1", api_key="sk-team", http_client=http,
                               max_retries=0)
        with pytest.raises(openai.RateLimitError) as raised:  # the real client's own error
            client.chat.completions.create(model="small", messages=HELLO["messages"])
        clock.now += 60  # the next minute
        fourth = ask(http)
        other = ask(http, "sk-ops")  # another key, no limit: no headers
    assert [r.status_code for r in (first, second, third, fourth)] == [200, 200, 429, 200]
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert second.headers["x-ratelimit-remaining-requests"] == "0"
    assert first.headers["x-ratelimit-reset-requests"] == "55s"
    assert third.json()["error"] == {
        "message": "Rate limit reached for requests per min (RPM) on key 'team': Limit 2, Used 2, "
                   "Requested 1. Please try again in 55s.",
        "type": "requests", "param": None, "code": "rate_limit_exceeded"}
    assert third.headers["x-ratelimit-remaining-requests"] == "0"
    assert third.headers["retry-after"] == "55"
    assert raised.value.status_code == 429
    assert fourth.headers["x-ratelimit-remaining-requests"] == "1"
    assert "x-ratelimit-limit-requests" not in other.headers
    row, _ = ledger(tmp_path / "ledger.db", third.headers["x-request-id"])
    assert row is not None and (row["key_id"], row["status"], row["error"]) == (
        "team", 429, "rate_limit_exceeded")


def test_tokens_per_minute_count_the_answers_tokens(tmp_path: Path) -> None:
    clock = Clock()
    with gateway(keyed(tmp_path, tpm=20), clock) as http:
        answers = [ask(http) for _ in range(4)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    assert [r.headers["x-ratelimit-remaining-tokens"] for r in answers] == [
        "20", str(20 - TOKENS_PER_ANSWER), str(20 - 2 * TOKENS_PER_ANSWER), "0"]
    assert answers[0].headers["x-ratelimit-limit-tokens"] == "20"
    assert answers[0].headers["x-ratelimit-reset-tokens"] == "55s"
    error = answers[3].json()["error"]
    assert (error["type"], error["code"]) == ("tokens", "rate_limit_exceeded")
    assert "Limit 20, Used 24" in error["message"]


def test_a_budgeted_key_sees_its_remaining_energy_on_every_answer(tmp_path: Path) -> None:
    with gateway(keyed(tmp_path, joules_per_day=250), Clock()) as http:
        answer = ask(http)
        refused = http.post("/v1/chat/completions", json={"model": "nope", "messages": []},
                            headers={"authorization": "Bearer sk-team"})
    assert answer.status_code == 200
    assert answer.headers["x-greenroute-energy-budget-remaining"] == "250.000"  # unmetered tier
    assert refused.status_code == 400
    assert refused.headers["x-greenroute-energy-budget-remaining"] == "250.000"


def test_database_keys_are_looked_up_per_request_and_revoked_at_once(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    engine = store.open_engine(store.database_url(db))
    store.migrate(engine)
    secret = stored.create(engine, "db-team", rpm=100)
    config = gateway_config(tier("small"), ledger={"path": str(db)})  # no config key
    with gateway(config, Clock()) as http:
        assert ask(http, "sk-wrong").status_code == 401
        answer = ask(http, secret)
        assert answer.status_code == 200 and answer.headers["x-ratelimit-limit-requests"] == "100"
        stored.revoke(engine, "db-team")
        assert ask(http, secret).status_code == 401  # the next request: no cache to expire
    engine.dispose()
    row, _ = ledger(db, answer.headers["x-request-id"])
    assert row is not None and row["key_id"] == "db-team"


def test_no_database_keys_means_no_database_lookup(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def no_lookup(self: KeyStore, digest: str) -> Key | None:
        raise AssertionError("the database was asked for a key")

    monkeypatch.setattr(KeyStore, "_find", no_lookup)
    config = keyed(tmp_path)  # config keys, an empty key table
    with gateway(config, Clock()) as http:
        assert ask(http).status_code == 200
        assert ask(http, "sk-wrong").status_code == 401
    open_config = gateway_config(tier("small"), ledger={"path": str(tmp_path / "l2.db")})
    with gateway(open_config, Clock()) as http:
        assert ask(http, "anything").status_code == 200  # no key at all: open, no lookup


def test_with_admin_keys_health_details_and_metrics_are_theirs(tmp_path: Path) -> None:
    with gateway(keyed(tmp_path), Clock()) as http:
        def get(path: str, key: str | None) -> Any:
            headers = {"authorization": f"Bearer {key}"} if key else {}
            return http.get(path, headers=headers)

        assert get("/metrics", None).status_code == 401
        assert get("/metrics", "sk-team").status_code == 403
        assert get("/metrics", "sk-ops").status_code == 200
        assert set(get("/health", "sk-team").json()) == {"status"}
        assert "tiers" in get("/health", "sk-ops").json()
    no_admin = gateway_config(tier("small"), keys=[{"id": "team", "key": "sk-team"}])
    with gateway(no_admin, Clock()) as http:  # no admin key: scrapers need none, as before
        assert http.get("/metrics").status_code == 200
        assert "tiers" in http.get("/health", headers={"authorization": "Bearer sk-team"}).json()
        assert set(http.get("/health").json()) == {"status"}


def test_two_replicas_share_their_counts_through_the_database(tmp_path: Path) -> None:
    url = store.database_url(tmp_path / "ledger.db")
    engines = [store.open_engine(url), store.open_engine(url)]
    clock = Clock()
    key = Key("team", rpm=10)
    replicas = [Limits(engine, 1.0, clock=clock) for engine in engines]
    for replica in replicas:
        replica.sync()
    for _ in range(6):
        replicas[0].admit(key, {})
    # Not synced yet: replica 1 sees only its own (the stated tolerance).
    assert replicas[1].used("team", "minute").requests == 0
    replicas[0].sync()
    replicas[1].sync()
    assert replicas[1].used("team", "minute").requests == 6
    for _ in range(4):
        replicas[1].admit(key, {})
    headers: dict[str, str] = {}
    with pytest.raises(APIError) as raised:
        replicas[1].admit(key, headers)
    assert raised.value.status == 429 and raised.value.type == "requests"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    for replica in replicas:
        replica.stop()  # the last sync: the database holds every admitted request
    restarted = Limits(store.open_engine(url), 1.0, clock=clock)
    restarted.start()  # a restart reads the fleet's counts before serving
    try:
        assert restarted.used("team", "minute").requests == 10
        assert restarted.used("team", "day").requests == 10
        clock.now += 60
        assert restarted.used("team", "minute").requests == 0  # a new minute
    finally:
        restarted.stop()
        for engine in engines:
            engine.dispose()


def test_a_ledger_url_without_its_driver_stops_the_start_without_the_password() -> None:
    config = gateway_config(tier("small"), ledger={
        "url": "postgresql+asyncpg://greenroute:hunter2@127.0.0.1:1/ledger"})  # not installed
    with pytest.raises(ConfigError, match="driver is missing") as raised:
        build_app(config, FakeBackend("small"))
    assert "hunter2" not in str(raised.value)
