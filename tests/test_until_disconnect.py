"""`until_disconnect` (gateway/streaming.py): the work runs in the request's own task, which a
client leaving or the end of the shutdown grace cancels; nothing else is cancelled by it."""

from __future__ import annotations

import asyncio

import pytest

from greenroute.gateway.streaming import ClientGone, Stopped, until_disconnect


def _run(coroutine):  # type: ignore[no-untyped-def]
    return asyncio.run(coroutine)


def test_a_client_leaving_cancels_the_work_and_raises_client_gone() -> None:
    cleaned = []

    async def work() -> str:
        try:
            await asyncio.sleep(10)
        finally:
            cleaned.append(True)
        return "never"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        watcher, stop = loop.create_future(), loop.create_future()
        loop.call_later(0.01, watcher.set_result, None)
        with pytest.raises(ClientGone):
            await until_disconnect(watcher, work(), stop)
        assert cleaned == [True]  # the work saw its cancellation before ClientGone
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]

    _run(main())


def test_the_grace_ending_raises_stopped() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        watcher, stop = loop.create_future(), loop.create_future()
        loop.call_later(0.01, stop.set_result, None)
        with pytest.raises(Stopped):
            await until_disconnect(watcher, asyncio.sleep(10), stop)

    _run(main())


def test_work_that_ends_first_returns_and_a_later_disconnect_cancels_nothing() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        watcher = loop.create_future()

        async def work() -> int:
            await asyncio.sleep(0)
            watcher.set_result(None)  # the client leaves as the answer is ready
            return 7

        assert await until_disconnect(watcher, work()) == 7
        await asyncio.sleep(0.01)  # the watcher's callbacks have run: this task goes on
        assert await until_disconnect(loop.create_future(), asyncio.sleep(0, "next")) == "next"

    _run(main())


def test_a_client_already_gone_never_starts_the_work() -> None:
    started = []

    async def work() -> None:
        started.append(True)

    async def main() -> None:
        watcher = asyncio.get_running_loop().create_future()
        watcher.set_result(None)
        with pytest.raises(ClientGone):
            await until_disconnect(watcher, work())

    _run(main())
    assert started == []


def test_a_cancellation_from_outside_goes_through_unchanged() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        inner = asyncio.ensure_future(until_disconnect(loop.create_future(), asyncio.sleep(10),
                                                       loop.create_future()))
        await asyncio.sleep(0.01)
        inner.cancel()  # the server stopping the request's task
        with pytest.raises(asyncio.CancelledError):
            await inner

    _run(main())


def test_work_that_swallows_the_cancellation_leaves_the_task_not_cancelling() -> None:
    """A call that catches its cancellation and answers anyway: its answer is used, and the
    request's task is not left with a cancellation pending (later awaits run normally)."""
    async def stubborn() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return "answered anyway"
        return "never"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        watcher = loop.create_future()
        loop.call_later(0.01, watcher.set_result, None)
        assert await until_disconnect(watcher, stubborn()) == "answered anyway"
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
        await asyncio.sleep(0.01)

    _run(main())
