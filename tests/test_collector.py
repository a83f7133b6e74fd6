"""The garbage collector's serving settings (gateway/collector.py): applied once the server
has started, to every gateway process."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest
import uvicorn

from greenroute.gateway import collector
from greenroute.gateway.config import ServerConfig
from greenroute.gateway.draining import Drain
from greenroute.gateway.workers import DrainingServer


@pytest.fixture
def restored_collector() -> Iterator[None]:
    """The test process's collector as it was, whatever the test set."""
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


async def _empty_app(scope: object, receive: object, send: object) -> None:
    """An app with nothing to serve (its lifespan is switched off)."""


@pytest.mark.usefixtures("restored_collector")
def test_tuning_freezes_startup_objects_and_raises_the_youngest_threshold() -> None:
    gc.set_threshold(700, 11, 12)
    collector.tune_for_serving(5_000)
    assert gc.get_threshold() == (5_000, 11, 12)
    assert gc.get_freeze_count() > 0


@pytest.mark.usefixtures("restored_collector")
def test_the_server_applies_its_configured_threshold_once_started() -> None:
    settings = ServerConfig(port=0, gc_threshold=4_321)
    server = DrainingServer(uvicorn.Config(_empty_app, port=0, lifespan="off", log_config=None),
                            Drain(), settings)

    gc.set_threshold(700, 10, 10)

    async def start_and_stop() -> tuple[int, int]:
        server.config.load()
        server.lifespan = server.config.lifespan_class(server.config)
        before = gc.get_threshold()[0]
        await server.startup()
        after = gc.get_threshold()[0]
        await server.shutdown()
        return before, after

    before, after = asyncio.run(start_and_stop())
    assert (before, after) == (700, 4_321)
    assert ServerConfig().gc_threshold == 10_000
