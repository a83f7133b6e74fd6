"""Two embedded tiers on one CPU, through a real gateway: concurrent requests of the small and
the large tier are charged what each one's worker thread used (the kernel's per-thread CPU
clocks), close to what a token of each costs alone (docs/energy.md, *Cost-weighted shares*),
not the same joules per token."""

from __future__ import annotations

import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import start_gateway, stop_gateway

from greenroute.backends.energy.estimate import DEFAULT_WATTS_PER_CORE
from greenroute.evals.load import thread_cpu_s

TIERS = ('[[tiers]]\nname = "tiny"\nbackend = "llamacpp"\nweights = "tiny"\ncontext = 512\n'
         'threads = 1\nenergy_hint = 1.0\n\n'
         '[[tiers]]\nname = "small"\nbackend = "llamacpp"\nweights = "small"\ncontext = 512\n'
         'threads = 1\nenergy_hint = 3.7\n')
MAX_TOKENS = 48
ROUNDS = 10
SETTLE_S = 0.3


def _ask(client: httpx.Client, tier: str, index: int) -> str:
    response = client.post("/chat/completions", json={
        "model": tier, "max_tokens": MAX_TOKENS, "temperature": 0,
        "messages": [{"role": "user",
                      "content": f"Name fruits that start with the letter {chr(65 + index)}."}]})
    assert response.status_code == 200, response.text
    return response.headers["x-request-id"]


def _sums(db: Path, ids: list[str]) -> tuple[float, float]:
    """(joules, prompt + completion tokens) of these requests, from the ledger."""
    marks = ",".join("?" * len(ids))
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
        joules, tokens = connection.execute(
            f"SELECT sum(joules), sum(prompt_tokens + completion_tokens) FROM request_models "
            f"WHERE request_id IN ({marks})", ids).fetchone()
    return float(joules), float(tokens)


def _joules_per_token(db: Path, ids: list[str]) -> float:
    joules, tokens = _sums(db, ids)
    return joules / tokens


def _tokens(db: Path, ids: list[str]) -> float:
    return _sums(db, ids)[1]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads threads from /proc")
@pytest.mark.timeout(300)
def test_concurrent_embedded_tiers_keep_their_solo_joules_per_token(tmp_path: Path) -> None:
    """The `estimate` meter counts this process's CPU time; each tier's generations run on its
    own worker thread, so the kernel's per-thread CPU time is the truth to compare with."""
    db = tmp_path / "ledger.db"
    gateway = start_gateway(f'[ledger]\npath = "{db}"\nflush_interval_s = 0.1\n\n'
                            f'[energy]\ninterval_ms = 50\n\n{TIERS}', tmp_path)
    pid = gateway.process.pid
    solo: dict[str, list[str]] = {"tiny": [], "small": []}
    both: dict[str, list[str]] = {"tiny": [], "small": []}
    worker: dict[str, str] = {}  # tier -> its worker thread's id
    true_cpu_s = {"tiny": 0.0, "small": 0.0}  # each worker's CPU time in the concurrent rounds

    def together(index: int) -> dict[str, str]:
        futures = {tier: pool.submit(_ask, client, tier, index) for tier in ("tiny", "small")}
        return {tier: future.result() for tier, future in futures.items()}

    try:
        with httpx.Client(base_url=gateway.url, timeout=120) as client, \
                ThreadPoolExecutor(2) as pool:
            # Warm-up, not measured: first-call allocations, and the first time both models
            # run at once (that round cost both tiers 20-50% more than any later one). A
            # tier's worker is the thread that worked most during its request alone.
            for tier in ("tiny", "small"):
                before = thread_cpu_s(pid)
                _ask(client, tier, 24)
                after = thread_cpu_s(pid)
                worker[tier] = max(after, key=lambda t: after[t] - before.get(t, 0.0))
            assert worker["tiny"] != worker["small"]
            together(25)
            # Each tier alone (the device learns its costs from these), then both at once;
            # interleaved, so that the machine's changing load weighs on both alike. Every
            # prompt differs from its tier's previous one in one letter, so llama.cpp reuses
            # the same prefix of its KV cache for each and prefill costs alike (a concurrent
            # request repeating the solo one's prompt computed 1 prompt token, not 8: tiny's
            # true J/token fell 11% by that alone). The pauses let each request's bookkeeping
            # finish before the next begins, so it is not charged to the next.
            for index in range(ROUNDS):
                for tier in ("tiny", "small"):
                    time.sleep(SETTLE_S)
                    solo[tier].append(_ask(client, tier, 2 * index))
                time.sleep(SETTLE_S)
                before = thread_cpu_s(pid)
                for tier, request in together(2 * index + 1).items():
                    both[tier].append(request)
                after = thread_cpu_s(pid)
                for tier, thread in worker.items():
                    true_cpu_s[tier] += after[thread] - before[thread]
    finally:
        stop_gateway(gateway)
    for tier in ("tiny", "small"):
        alone, shared = _joules_per_token(db, solo[tier]), _joules_per_token(db, both[tier])
        truth = true_cpu_s[tier] * DEFAULT_WATTS_PER_CORE / _tokens(db, both[tier])
        print(f"\n{tier}: solo {alone:.4f} J/token; concurrent {shared:.4f} J/token attributed "
              f"({shared / alone - 1:+.1%} against solo), {truth:.4f} used by its thread "
              f"({shared / truth - 1:+.1%} against that)")
        # What the split decides: each tier gets what its own thread used. Plain token counts
        # give tiny about +80% and small -30% here.
        assert shared == pytest.approx(truth, rel=0.15)
        # Against solo, the measure: two models running at once on this 2-core VM
        # really do cost 0-25% more CPU time per token (their threads' own clocks say so:
        # shared cache and memory bandwidth), which the split rightly passes on; a
        # neighbour's burst adds to it (docs/energy.md, *Cost-weighted shares*). Within 15%
        # in 17 of 20 tier-runs, up to +22.3% seen; the bound leaves a loaded CI machine room.
        assert shared == pytest.approx(alone, rel=0.35)
