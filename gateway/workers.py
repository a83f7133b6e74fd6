"""`greenroute serve --workers N`: N gateway processes behind one listening socket.

The process model is uvicorn's (a supervisor binds the socket once and starts N spawned
processes that each accept on it), written out here rather than taken from
`uvicorn.run(workers=N)` because each worker must run the gateway's own server class: its
shutdown starts the drain (gateway/draining.py), and uvicorn's supervisor would build a plain
`uvicorn.Server` in each worker instead. The supervisor:

- checks that every tier's energy is right per process (`shared_device_tiers`), migrates the
  ledger once (so N workers do not race to create it), and points prometheus_client's
  multiprocess mode at a fresh directory (gateway/shared_metrics.py);
- starts the workers: each builds its own app from the same config (its own backends, energy
  samplers and ledger writer; one ledger database) and says when it is serving;
- on SIGTERM or SIGINT, passes SIGTERM to each worker (each drains as a single gateway does)
  and waits for them; a worker that dies while serving is replaced, one that fails to start
  stops the whole server.

Energy per worker: an `estimate` meter reads its own process's CPU time, and a `prometheus`
meter on a vLLM tier divides the device's energy by the server's own token counters
(backends/energy/sampler.py, `server_tokens`), so each worker is one client among others. A
meter that reads a device every worker sees, with no such denominator (`nvml`, `rapl`, or
`prometheus` with `server_metrics = "off"`), would have each worker split all of it among its
own requests: N times the energy. Such a config is refused; serve the GPU's counter through
`greenroute agent` (or the DCGM exporter) and a `prometheus` meter beside the vLLM server's
counters instead (docs/energy.md, "Several workers").
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.context import SpawnProcess
from multiprocessing.synchronize import Event
from pathlib import Path
from types import FrameType

import uvicorn
from starlette.types import ASGIApp

from greenroute.backends.energy.registry import NO_METER
from greenroute.backends.energy.select import meter_config
from greenroute.gateway import collector
from greenroute.gateway.carbon import GridIntensity
from greenroute.gateway.config import ConfigError, GatewayConfig, ServerConfig
from greenroute.gateway.draining import Drain
from greenroute.gateway.ledger import store
from greenroute.gateway.shared_metrics import MULTIPROC_ENV

log = logging.getLogger("greenroute.workers")

# After the shutdown grace, the time the error answers it starts get to reach their clients.
SHUTDOWN_MARGIN_S = 1.0
STOP_WAIT_S = 15.0  # past grace and margin: then a worker that has not exited is killed
POLL_S = 0.2
PER_PROCESS_METERS = frozenset({"estimate"})  # each process reads only its own energy


class DrainingServer(uvicorn.Server):
    """uvicorn's server; its shutdown also starts the gateway's grace, and its startup can
    signal that it is serving (to the supervisor of several workers)."""

    def __init__(self, config: uvicorn.Config, drain: Drain, server: ServerConfig,
                 ready: Event | None = None) -> None:
        super().__init__(config)
        self.drain = drain
        self.grace_s = server.shutdown_grace_s
        self.gc_threshold = server.gc_threshold
        self.ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.started:
            return
        collector.tune_for_serving(self.gc_threshold)
        if self.ready is not None:
            self.ready.set()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.drain.begin(self.grace_s)
        await super().shutdown(sockets)


def uvicorn_config(app: ASGIApp, server: ServerConfig) -> uvicorn.Config:
    """How every gateway process runs uvicorn."""
    return uvicorn.Config(
        app, host=server.host, port=server.port,
        log_level=server.log_level, access_log=False, http="httptools",
        log_config=None,  # uvicorn's lines go through logs.configure's handler too
        loop="uvloop" if sys.platform != "win32" else "asyncio",
        # uvicorn cuts what is left only after the gateway has answered it with errors
        timeout_graceful_shutdown=math.ceil(server.shutdown_grace_s + SHUTDOWN_MARGIN_S))


def shared_device_tiers(config: GatewayConfig) -> list[str]:
    """Tiers whose meter would be counted once per worker (see the module's docstring)."""
    shared = []
    for tier in config.tiers:
        meter = meter_config(tier)
        if meter is None or meter.kind == NO_METER or meter.kind in PER_PROCESS_METERS:
            continue
        if meter.kind == "prometheus" and tier.backend == "openai" \
                and meter.server_metrics != "off":
            continue  # divided by the server's own token counters
        shared.append(f"{tier.name} ({meter.kind})")
    return shared


def check(config: GatewayConfig, workers: int) -> None:
    """Refuse a config whose energy several workers would count more than once, or whose
    grid-intensity file cannot be read (before N workers each fail on it)."""
    GridIntensity.from_config(config.energy)
    shared = shared_device_tiers(config)
    if shared:
        raise ConfigError(
            f"--workers {workers}: the meters of {', '.join(shared)} read a device every "
            "worker sees, so each worker would attribute all of its energy to its own "
            "requests. Serve these tiers with one worker, or read the GPU with a prometheus "
            "meter (greenroute agent or the DCGM exporter) on a vLLM tier, whose token "
            "counters divide it between the workers (docs/energy.md, \"Several workers\").")


def serve(config: GatewayConfig, workers: int) -> int:
    """Run `workers` gateway processes until SIGTERM or SIGINT; the exit status."""
    check(config, workers)
    if config.ledger.enabled:  # once, here: N workers would race to create the tables
        engine = store.open_engine(store.database_url(config.ledger.path, config.ledger.url))
        try:
            store.migrate(engine)
        finally:
            engine.dispose()
    metrics_dir, made = _metrics_dir()
    os.environ[MULTIPROC_ENV] = str(metrics_dir)  # inherited by the spawned workers
    multiprocessing.allow_connection_pickling()  # the listening socket goes to each worker
    listener = uvicorn.Config(_unused_app, host=config.server.host,
                              port=config.server.port).bind_socket()
    stopping: list[int] = []

    def stop(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    supervisor = _Supervisor(config, listener)
    try:
        return supervisor.run(workers, lambda: bool(stopping))
    finally:
        supervisor.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        listener.close()
        if made:
            shutil.rmtree(metrics_dir, ignore_errors=True)


class _Worker:
    def __init__(self, process: SpawnProcess, ready: Event) -> None:
        self.process = process
        self.ready = ready
        self.serving = False


class _Supervisor:
    """Starts, watches, replaces and stops the worker processes."""

    def __init__(self, config: GatewayConfig, listener: socket.socket) -> None:
        self.config = config
        self.listener = listener
        self.context = multiprocessing.get_context("spawn")
        self.workers: list[_Worker] = []

    def start_one(self) -> _Worker:
        ready = self.context.Event()
        process = self.context.Process(target=run_worker, name="greenroute-worker",
                                       args=(self.config, self.listener, ready))
        process.start()
        log.info("worker %s starting", process.pid)
        return _Worker(process, ready)

    def run(self, count: int, stopping: Callable[[], bool]) -> int:
        self.workers = [self.start_one() for _ in range(count)]
        announced = False
        while not stopping():
            time.sleep(POLL_S)
            for index, worker in enumerate(self.workers):
                if worker.ready.is_set():
                    worker.serving = True
                if worker.process.is_alive():
                    continue
                code = worker.process.exitcode
                if not worker.serving:
                    log.error("worker %s exited with status %s before serving; stopping",
                              worker.process.pid, code)
                    return 1
                log.error("worker %s exited with status %s while serving; starting another",
                          worker.process.pid, code)
                _mark_dead(worker.process.pid)
                self.workers[index] = self.start_one()
            if not announced and all(w.serving for w in self.workers):
                announced = True
                server = self.config.server
                log.info("%d workers serving http://%s:%d", count, server.host, server.port)
        return 0

    def stop(self) -> None:
        """SIGTERM to each worker (each drains), then wait; kill what outlives the wait."""
        for worker in self.workers:
            if worker.process.is_alive() and worker.process.pid is not None:
                os.kill(worker.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.server.shutdown_grace_s \
            + SHUTDOWN_MARGIN_S + STOP_WAIT_S
        for worker in self.workers:
            worker.process.join(max(deadline - time.monotonic(), 0.1))
            if worker.process.is_alive():
                log.error("worker %s did not stop in time; killing it", worker.process.pid)
                worker.process.kill()
                worker.process.join()
            _mark_dead(worker.process.pid)


def run_worker(config: GatewayConfig, listener: socket.socket, ready: Event) -> None:
    """One worker process: the gateway app on the shared socket, until SIGTERM."""
    from greenroute.backends.energy.meter import MeterError
    from greenroute.gateway import logs
    from greenroute.gateway.app import create_app
    from greenroute.routers.artifact import ArtifactError
    from greenroute.routers.encoders import EncoderError

    logs.configure(config.server.log_level, config.server.log_format)
    try:
        app = create_app(config)
    except (MeterError, ArtifactError, EncoderError, ConfigError) as exc:
        print(f"greenroute serve: worker {os.getpid()}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    gateway = app.state.gateway
    server = DrainingServer(uvicorn_config(app, config.server), gateway.drain, config.server,
                            ready)
    server.run(sockets=[listener])
    if gateway.metrics_registry.shared is not None:
        gateway.metrics_registry.shared.close()  # this worker's final counts stay in the files


def _metrics_dir() -> tuple[Path, bool]:
    """prometheus_client's directory: $PROMETHEUS_MULTIPROC_DIR emptied of an earlier run's
    files (they would be added to this run's), else a new temporary one (True: made here)."""
    configured = os.environ.get(MULTIPROC_ENV)
    if not configured:
        return Path(tempfile.mkdtemp(prefix="greenroute-metrics-")), True
    path = Path(configured)
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()
    return path, False


def _mark_dead(pid: int | None) -> None:
    """A worker is gone: its live gauges leave the sums (its counters stay)."""
    if pid is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


async def _unused_app(scope: object, receive: object, send: object) -> None:
    """uvicorn.Config needs an app to bind a socket; the workers serve their own."""
    raise RuntimeError("the supervisor serves nothing")
