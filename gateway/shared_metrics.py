"""`/metrics` across the workers of `greenroute serve --workers N`: prometheus_client's
multiprocess mode.

The supervisor (gateway/workers.py) sets `PROMETHEUS_MULTIPROC_DIR` before it starts the
workers, so in each worker prometheus_client keeps every counter and histogram value in a file
of that directory, and a scrape of any worker reads and adds up all of them
(`MultiProcessCollector`). A request is thus counted once, by the worker that served it, and
seen by whichever worker answers the scrape.

What `_StateCollector` reads at scrape time (device energy, breakers, the ledger writer's
counts) lives in one worker's memory, where a scrape of another cannot reach it. Each worker
therefore publishes its own into multiprocess metrics of the same names: counters as increments
(so a worker that has exited still counts), gauges in a mode chosen per metric (`GAUGE_MODES`).
It publishes every `PUBLISH_INTERVAL_S`, when it answers a scrape, and once more when it stops,
so another worker's state is at most that old in a scrape.

Single-process serving never imports this module's behaviour: without the variable,
`GatewayMetrics` renders its own registry as before.
"""

from __future__ import annotations

import os
import threading
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
PUBLISH_INTERVAL_S = 1.0
GaugeMode = Literal["livesum", "livemax", "max", "sum"]
# Each worker has its own breakers and its own ledger buffer: the worst breaker of the live
# workers, and the rows all live workers hold.
GAUGE_MODES: dict[str, GaugeMode] = {"greenroute_tier_breaker_state": "livemax"}
DEFAULT_GAUGE_MODE: GaugeMode = "livesum"


def enabled() -> bool:
    """Whether this process is a worker of a multi-process gateway."""
    return bool(os.environ.get(MULTIPROC_ENV))


class SharedState:
    """Publishes one worker's scrape-time state into multiprocess metrics, and renders the
    sum over every worker."""

    def __init__(self, state: Collector) -> None:
        self.state = state
        self._counters: dict[str, Counter] = {}
        self._gauges: dict[str, Gauge] = {}
        self._published: dict[tuple[str, tuple[str, ...]], float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-publisher",
                                        daemon=True)
        self._thread.start()

    def publish(self) -> None:
        """Copy the state as read now into this worker's multiprocess files."""
        with self._lock:
            for family in self.state.collect():
                for sample in family.samples:
                    labels = tuple(sample.labels)
                    values = tuple(sample.labels[name] for name in labels)
                    if family.type == "counter":
                        self._count(family.name, family.documentation, labels, values,
                                    sample.value)
                    elif family.type == "gauge":
                        gauge = self._gauge(family.name, family.documentation, labels)
                        (gauge.labels(*values) if labels else gauge).set(sample.value)

    def render(self) -> bytes:
        """Every worker's metrics, added up (this one's state published first)."""
        self.publish()
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)

    def close(self) -> None:
        """The worker stops: publish its final state, which its files keep."""
        self._stop.set()
        self._thread.join(timeout=5)
        self.publish()

    def _run(self) -> None:
        while not self._stop.wait(PUBLISH_INTERVAL_S):
            self.publish()

    def _count(self, name: str, documentation: str, labels: tuple[str, ...],
               values: tuple[str, ...], value: float) -> None:
        """A counter that stands at `value` now: add what it gained since the last publish."""
        counter = self._counters.get(name)
        if counter is None:
            counter = self._counters[name] = Counter(name, documentation, labels,
                                                     registry=None)
        key = (name, values)
        gained = value - self._published.get(key, 0.0)
        if gained <= 0:
            return  # unchanged (a counter never goes down)
        self._published[key] = value
        (counter.labels(*values) if labels else counter).inc(gained)

    def _gauge(self, name: str, documentation: str, labels: tuple[str, ...]) -> Gauge:
        gauge = self._gauges.get(name)
        if gauge is None:
            mode = GAUGE_MODES.get(name, DEFAULT_GAUGE_MODE)
            gauge = self._gauges[name] = Gauge(name, documentation, labels, registry=None,
                                               multiprocess_mode=mode)
        return gauge
