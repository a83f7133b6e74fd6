"""Keys and budgets shared by replicas, end to end: `greenroute keys` makes and revokes keys in
the ledger database, and two real `greenroute serve` processes (two replicas) share it, on one
SQLite file and on a real PostgreSQL cluster (tests/test_ledger_postgres.py's). A revoked key
gets 401 on the next request on each replica; a key's energy budget, spent on one replica, is
refused with a 429 and the remaining-budget header on both, and still after a restart. Also:
serving a non-loopback address with no key is refused unless --no-auth says so."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import GREENROUTE, REPO, Gateway, start_gateway, stop_gateway
from sqlalchemy import create_engine, text
from test_ledger_postgres import Cluster, cluster  # noqa: F401 (the fixture)
from waiting import wait_until

from greenroute.backends.fake_openai import FakeUpstream, free_port

CONFIG_KEY = "sk-config-ops-0123456789"  # an admin key from the config file
BUDGET_J = 0.5  # joules per day for the budgeted key: one request spends it
TIER = ('[[tiers]]\nname = "small"\nbackend = "openai"\nurl = "{url}"\nmodel = "echo"\n'
        # 10 kW per busy core: the gateway's ~1 ms of CPU per request is joules, not mJ
        'meter = {{ kind = "estimate", watts_per_core = 10000 }}\n')


def keys_cli(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([GREENROUTE, "keys", *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done


@dataclass
class Fleet:
    db: str  # what `--db` takes: a SQLite file or a URL
    ledger: str  # the config's [ledger] line
    tmp: Path
    upstream: FakeUpstream

    def config(self) -> str:
        return (f"[ledger]\n{self.ledger}\nflush_interval_s = 0.1\n\n"
                "[limits]\nsync_interval_s = 0.1\n\n"
                "[energy]\ninterval_ms = 20\nperiod_s = 0.5\n\n"
                f'[[keys]]\nid = "ops"\nkey = "{CONFIG_KEY}"\nadmin = true\n\n'
                + TIER.format(url=self.upstream.url))

    def replica(self, name: str) -> Gateway:
        return start_gateway(self.config(), self.tmp, name=name)


@pytest.fixture(params=["sqlite", "postgres"], scope="module")
def fleet(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp(f"keys-{request.param}")
    with FakeUpstream() as upstream:
        if request.param == "sqlite":
            db = tmp / "ledger.db"
            yield Fleet(str(db), f'path = "{db}"', tmp, upstream)
            return
        server: Cluster = request.getfixturevalue("cluster")  # skips without PostgreSQL
        admin = create_engine(server.url("postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text('DROP DATABASE IF EXISTS "keys"'))
            connection.execute(text('CREATE DATABASE "keys"'))
        admin.dispose()
        url = server.url("keys")
        yield Fleet(url, f'url = "{url}"', tmp, upstream)


def chat(gateway: Gateway, key: str) -> httpx.Response:
    return httpx.post(gateway.url + "/chat/completions", timeout=30,
                      headers={"authorization": f"Bearer {key}"},
                      json={"model": "small", "messages": [{"role": "user", "content": "hi"}]})


def test_keys_revocation_and_budgets_hold_on_every_replica(fleet: Fleet) -> None:
    team = keys_cli("create", "--id", "team", "--db", fleet.db).stdout.strip()
    budget = keys_cli("create", "--id", "budget", "--joules-per-day", str(BUDGET_J),
                      "--db", fleet.db).stdout.strip()
    assert team.startswith("gr-") and len(team) >= 40 and team != budget
    replicas = [fleet.replica("a"), fleet.replica("b")]
    try:
        for replica in replicas:  # a database key and a config key work on both
            assert chat(replica, team).status_code == 200
            assert chat(replica, CONFIG_KEY).status_code == 200
        keys_cli("revoke", "team", "--db", fleet.db)
        for replica in replicas:  # the very next request, on each replica
            refused = chat(replica, team)
            assert refused.status_code == 401, refused.text
            assert refused.json()["error"]["code"] == "invalid_api_key"
        assert chat(replicas[0], CONFIG_KEY).status_code == 200

        first = chat(replicas[0], budget)  # nothing spent yet: let in, and told the budget
        assert first.status_code == 200
        assert first.headers["x-greenroute-energy-budget-remaining"] == f"{BUDGET_J:.3f}"
        assert float(first.headers["x-greenroute-energy-joules"]) > BUDGET_J
        for replica in replicas:  # its energy reaches the other replica within a sync or two
            wait_until(lambda r=replica: chat(r, budget).status_code == 429, timeout=15)
            exhausted = chat(replica, budget)
            assert exhausted.status_code == 429
            assert exhausted.headers["x-greenroute-energy-budget-remaining"] == "0.000"
            assert int(exhausted.headers["retry-after"]) > 0
            error = exhausted.json()["error"]
            assert (error["type"], error["code"]) == ("energy", "energy_budget_exceeded")
        metrics = httpx.get(replicas[1].root + "/metrics", timeout=10,
                            headers={"authorization": f"Bearer {budget}"})
        assert metrics.status_code == 403  # not an admin key
    finally:
        for replica in replicas:
            stop_gateway(replica)

    restarted = fleet.replica("a-again")  # the state is the database's, not the process's
    try:
        again = chat(restarted, budget)
        assert again.status_code == 429
        assert again.headers["x-greenroute-energy-budget-remaining"] == "0.000"
        assert chat(restarted, team).status_code == 401
        assert chat(restarted, CONFIG_KEY).status_code == 200
    finally:
        stop_gateway(restarted)

    listed = keys_cli("list", "--format", "json", "--db", fleet.db).stdout
    by_id = {k["id"]: k for k in json.loads(listed)}
    assert set(by_id) == {"team", "budget"}
    assert by_id["team"]["revoked"] is not None and by_id["budget"]["revoked"] is None
    assert by_id["budget"]["joules_per_day"] == BUDGET_J
    table = keys_cli("list", "--db", fleet.db).stdout
    for secret in (team, budget):  # neither the keys nor their digests are ever shown
        assert secret not in listed + table
        assert hashlib.sha256(secret.encode()).hexdigest() not in listed + table


def test_creating_a_taken_id_or_revoking_an_unknown_one_fails(tmp_path: Path) -> None:
    db = str(tmp_path / "ledger.db")
    keys_cli("create", "--id", "team", "--db", db)
    for args in (("create", "--id", "team"), ("revoke", "nobody")):
        done = subprocess.run([GREENROUTE, "keys", *args, "--db", db], capture_output=True,
                              text=True, timeout=60, cwd=REPO)
        assert done.returncode == 1
        assert "team" in done.stderr or "nobody" in done.stderr


def test_a_public_address_with_no_key_is_refused_unless_no_auth(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    with FakeUpstream() as upstream:
        config = f'[ledger]\npath = "{db}"\n\n' + TIER.format(url=upstream.url)
        path = tmp_path / "open.toml"
        path.write_text(f"[server]\nport = {free_port()}\n{config}")
        refused = subprocess.run([GREENROUTE, "serve", "--config", str(path), "--host",
                                  "0.0.0.0"], capture_output=True, text=True, timeout=60,
                                 cwd=REPO)
        assert refused.returncode == 2
        assert "refusing to serve 0.0.0.0 with no API key" in refused.stderr
        assert "--no-auth" in refused.stderr

        open_on_purpose = start_gateway(config, tmp_path, name="open",
                                        server='host = "0.0.0.0"\nno_auth = true')
        try:
            assert chat(open_on_purpose, "anything").status_code == 200
        finally:
            stop_gateway(open_on_purpose)

        secret = keys_cli("create", "--id", "team", "--db", str(db)).stdout.strip()
        keyed = start_gateway(config, tmp_path, name="keyed", server='host = "0.0.0.0"')
        try:  # a key in the database is a key: no --no-auth needed, and it is enforced
            assert chat(keyed, "anything").status_code == 401
            assert chat(keyed, secret).status_code == 200
        finally:
            stop_gateway(keyed)


def test_the_no_auth_flag_is_the_config_setting(tmp_path: Path) -> None:
    from greenroute.gateway.cli import _with_overrides, build_parser
    from greenroute.gateway.config import default_config

    args = build_parser(["serve"]).parse_args(["serve", "--no-auth", "--host", "0.0.0.0"])
    server = _with_overrides(default_config(), args).server
    assert (server.no_auth, server.host) == (True, "0.0.0.0")
    args = build_parser(["serve"]).parse_args(["serve"])
    assert _with_overrides(default_config(), args).server.no_auth is False
