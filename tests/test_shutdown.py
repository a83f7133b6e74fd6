"""SIGTERM to a real `greenroute serve` process: what the shutdown grace
(`[server] shutdown_grace_s`) cannot finish is ended with OpenAI-shaped errors, a final error
event for a stream and a 503 for a whole answer, and the ledger keeps both rows with a clear
error code (and a stream's tokens so far). The in-process tests of the same path are in
tests/test_app_hardening.py.
"""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
from conftest import start_gateway

from greenroute.backends.fake_openai import FakeUpstream

GRACE_S = 1.0


def test_sigterm_ends_what_the_grace_cannot_finish_with_openai_errors(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    db = tmp_path / "ledger.db"
    config = (f'[[tiers]]\nname = "slow"\nbackend = "openai"\nurl = "{upstream.url}"\n'
              f'model = "slow"\n\n'  # 100 chunks, one every 0.1 s: 10 s in all
              f'[[tiers]]\nname = "hang"\nbackend = "openai"\nurl = "{upstream.url}"\n'
              f'model = "hang"\ntimeout_s = 60\n\n'
              f'[router]\nenabled = false\n\n'
              f'[ledger]\npath = "{db}"\nflush_interval_s = 0.1\n')
    gateway = start_gateway(config, tmp_path, server=f"shutdown_grace_s = {GRACE_S}",
                            ledger=db)
    results: dict[str, Any] = {}
    first_chunk = threading.Event()

    def stream() -> None:
        body = {"model": "slow", "stream": True, "messages": [{"role": "user", "content": "x"}]}
        with httpx.stream("POST", gateway.url + "/chat/completions", json=body,
                          timeout=30) as response:
            results["stream_id"] = response.headers["x-request-id"]
            events = []
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: "):])
                    first_chunk.set()
            results["events"] = events

    def whole() -> None:
        body = {"model": "hang", "messages": [{"role": "user", "content": "x"}]}
        results["whole"] = httpx.post(gateway.url + "/chat/completions", json=body, timeout=30)

    threads = [threading.Thread(target=stream), threading.Thread(target=whole)]
    try:
        for thread in threads:
            thread.start()
        assert first_chunk.wait(10)
        time.sleep(0.3)  # both requests are in flight
        stopping = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(15)
        # uvicorn re-raises the signal once it has shut down cleanly
        assert gateway.process.wait(15) in (0, -signal.SIGTERM)
        stopped_in = time.monotonic() - stopping
    finally:
        if gateway.process.poll() is None:
            gateway.process.kill()
    assert GRACE_S <= stopped_in < GRACE_S + 3, stopped_in

    events = results["events"]
    assert "[DONE]" not in events
    assert orjson.loads(events[1])["choices"][0]["delta"]["content"] == "tick"
    error = orjson.loads(events[-1])["error"]
    assert (error["type"], error["code"]) == ("server_error", "server_shutting_down")

    whole_response = results["whole"]
    assert whole_response.status_code == 503
    assert whole_response.headers["content-type"] == "application/json"
    assert whole_response.json()["error"]["code"] == "server_shutting_down"

    with sqlite3.connect(db) as ledger:
        rows = {row[0]: row[1:] for row in ledger.execute(
            "SELECT id, status, error, completion_tokens, answered_by FROM requests")}
    status, code, tokens, answered_by = rows[results["stream_id"]]
    assert (status, code, answered_by) == (503, "server_shutting_down", "slow")
    assert tokens is not None and tokens >= 5  # the chunks relayed in the second or so
    status, code, tokens, _ = rows[whole_response.headers["x-request-id"]]
    assert (status, code, tokens) == (503, "server_shutting_down", None)
