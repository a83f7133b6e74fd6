"""What checking a database key costs per request: the primary-key read by digest
(gateway/ledger/keys.py `find`), alone and as the gateway does it (`KeyStore.lookup`, on a
worker thread), on a SQLite file and, with --url, on PostgreSQL.

    .venv/bin/python bench/key_lookup.py [--url postgresql+psycopg://...] [-n 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from greenroute.gateway.keys import KeyStore
from greenroute.gateway.ledger import keys as stored
from greenroute.gateway.ledger import store


def measure(url: str, n: int) -> dict[str, float]:
    engine = store.open_engine(url)
    store.migrate(engine)
    for i in range(100):  # a table with more than one row
        stored.create(engine, f"bench-{time.time_ns()}-{i}")
    secret = stored.create(engine, f"bench-{time.time_ns()}")
    digest = stored.digest_of(secret)
    direct = []
    with engine.connect() as connection:
        for _ in range(n):
            start = time.perf_counter()
            assert stored.find(connection, digest) is not None
            direct.append(time.perf_counter() - start)
    keys = KeyStore((), engine)
    keys.refresh()

    async def through_the_gateway() -> list[float]:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            assert await keys.lookup(secret) is not None
            times.append(time.perf_counter() - start)
        return times

    gateway = asyncio.run(through_the_gateway())
    engine.dispose()
    return {"find_median_us": statistics.median(direct) * 1e6,
            "find_p99_us": sorted(direct)[int(n * 0.99)] * 1e6,
            "lookup_median_us": statistics.median(gateway) * 1e6,
            "lookup_p99_us": sorted(gateway)[int(n * 0.99)] * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a PostgreSQL (or other) SQLAlchemy URL to measure too")
    parser.add_argument("-n", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        targets = {"sqlite": store.database_url(Path(tmp) / "ledger.db")}
        if args.url:
            targets["postgres"] = args.url
        for name, url in targets.items():
            figures = measure(url, args.n)
            print(f"{name:8} " + "  ".join(f"{k} {v:7.1f}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
