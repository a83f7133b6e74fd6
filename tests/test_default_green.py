"""The README's first command, as a user runs it: `greenroute serve` with no config serves the
embedded tiers and model `green` with the router shipped in the package."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from greenroute.backends import weights
from greenroute.backends.fake_openai import free_port
from greenroute.routers.artifact import read_manifest
from greenroute.routers.service import DEFAULT_ARTIFACT

GREENROUTE = str(Path(sys.executable).parent / "greenroute")


@pytest.fixture(scope="module")
def default_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    for name in ("small", "large"):
        weights.ensure(name)
    port = free_port()
    log = tmp_path_factory.mktemp("default") / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "GREENROUTE_CONFIG"}
    process = subprocess.Popen([GREENROUTE, "serve", "--port", str(port), "--no-fetch"],
                               stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while not _ready(url):
            assert process.poll() is None, log.read_text()
            if time.monotonic() > deadline:
                pytest.fail(f"greenroute serve did not answer within 120 s:\n{log.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/models", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def test_the_shipped_router_is_trained_for_the_default_tiers() -> None:
    manifest = read_manifest(DEFAULT_ARTIFACT)
    assert manifest["tiers"] == ["small", "large"]
    assert manifest["encoder"]["kind"] == "static"
    assert manifest["training"]["outcomes"].endswith("evals/outcomes/embedded.jsonl")


def test_green_answers_out_of_the_box(default_gateway: str) -> None:
    client = openai.OpenAI(base_url=default_gateway, api_key="unused", max_retries=0,
                           timeout=120)
    assert "green" in [m.id for m in client.models.list()]
    raw = client.chat.completions.with_raw_response.create(
        model="green", messages=[{"role": "user", "content": "What is 2 + 3? Answer: "}],
        max_tokens=12, temperature=0)
    assert raw.headers["x-greenroute-route"] in ("routed", "cascade")
    tried = raw.headers["x-greenroute-models-tried"].split(",")
    assert set(tried) <= {"small", "large"} and raw.headers["x-greenroute-model"] == tried[-1]
    assert float(raw.headers["x-greenroute-quality-target"]) == 0.95
    reply = raw.parse()
    assert reply.choices[0].message.content.strip() and reply.usage.total_tokens > 0
    chunks = list(client.chat.completions.create(
        model="green-0.8", messages=[{"role": "user", "content": "Name a primary color."}],
        max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    assert chunks[-1].usage.completion_tokens > 0
