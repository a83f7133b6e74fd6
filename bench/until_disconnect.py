"""What racing a call against the client's disconnect costs (gateway/streaming.py's
`until_disconnect`), per call, beside the call itself: a pass-through request makes one such
call, a stream one per batch.

    .venv/bin/python bench/until_disconnect.py [--calls 20000]

The call is a coroutine that yields to the loop once; the watcher and the shutdown grace's
future never complete. uvloop, as `greenroute serve` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import uvloop

from greenroute.gateway.streaming import until_disconnect


async def _work() -> int:
    await asyncio.sleep(0)
    return 1


async def _measure(calls: int) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    watcher, stop = loop.create_future(), loop.create_future()
    started = time.perf_counter()
    for _ in range(calls):
        await _work()
    alone = (time.perf_counter() - started) / calls
    started = time.perf_counter()
    for _ in range(calls):
        await until_disconnect(watcher, _work(), stop)
    raced = (time.perf_counter() - started) / calls
    return alone, raced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20_000)
    args = parser.parse_args()
    alone, raced = uvloop.run(_measure(args.calls))
    print(f"the call alone {alone * 1e6:.1f} us; raced by until_disconnect {raced * 1e6:.1f} us "
          f"({args.calls} calls)")


if __name__ == "__main__":
    main()
