"""`GET /metrics`: the gateway's requests, tokens, energy, routing, breakers and ledger, in
Prometheus' text format through `prometheus_client`.

Each app has its own `CollectorRegistry`, so several apps in one process (tests, workers
built in one interpreter) count apart. Requests are counted once each, when their ledger row is
ready (`observe`, called by the accounting; every track it used is final then, so the joules
are too): a few counter increments per request, nothing on the way in. What is state rather
than events (device energy, breaker states, the ledger's backlog) is read when Prometheus
scrapes (`_StateCollector`), so it costs nothing between scrapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import pairwise
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from greenroute.backends.energy.sampler import Fleet
from greenroute.gateway import shared_metrics
from greenroute.gateway.accounting import RequestRecord
from greenroute.gateway.health import HealthMonitor
from greenroute.gateway.ledger.writer import LedgerWriter

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds: from a cached pass-through answer (ms) to a long generation on a CPU tier (minutes).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0)
NO_LABEL = "none"  # a request refused before any tier was planned or tried
ROUTED = frozenset({"routed", "cascade"})  # model `green`'s routes

M = TypeVar("M", bound=MetricWrapperBase)


class _Children(Generic[M]):
    """A metric's labelled children, kept: `labels()` validates its arguments on each call,
    which made it most of a request's metrics cost (2.5 of 3.4 us per increment here)."""

    def __init__(self, metric: M) -> None:
        self.metric = metric
        self.children: dict[tuple[str, ...], M] = {}

    def __call__(self, *labels: str) -> M:
        child = self.children.get(labels)
        if child is None:  # setdefault: two threads may race to add it, one child wins
            child = self.children.setdefault(labels, self.metric.labels(*labels))
        return child


class GatewayMetrics:
    """One app's metrics: counters fed by finished requests, and the state read at scrape."""

    def __init__(self, fleet: Fleet, writer: LedgerWriter | None,
                 health: HealthMonitor | None,
                 unauthenticated: Callable[[], int] | None = None) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = _Children(Counter(
            "greenroute_requests_total", "Requests by the tier that answered (else the last "
            "tried), route and HTTP status", ["tier", "route", "status"], registry=registry))
        self.duration = _Children(Histogram(
            "greenroute_request_duration_seconds", "Time from the request to its last byte",
            ["tier", "route"], buckets=LATENCY_BUCKETS, registry=registry))
        self.ttft = _Children(Histogram(
            "greenroute_time_to_first_token_seconds", "Time from the request to its first "
            "output (a whole answer: its only write)", ["tier"], buckets=LATENCY_BUCKETS,
            registry=registry))
        self.tokens = _Children(Counter(
            "greenroute_tokens_total", "Tokens each tier processed (every model tried)",
            ["tier", "kind"], registry=registry))
        self.energy = _Children(Counter(
            "greenroute_tier_energy_joules_total", "Joules attributed to requests, by the "
            "tier that used them and the meter's source", ["tier", "source"], registry=registry))
        self.decisions = _Children(Counter(
            "greenroute_routing_decisions_total", "Model `green`: the router's first tier",
            ["tier"], registry=registry))
        self.escalations = _Children(Counter(
            "greenroute_escalations_total", "Model `green`: a request handed from one tier to "
            "another (not kept, failed or cut by the cascade's cap)", ["from_tier", "to_tier"],
            registry=registry))
        state = _StateCollector(fleet, writer, health, unauthenticated)
        self.registry.register(state)
        # `serve --workers N`: every worker's counts, added up (gateway/shared_metrics.py)
        self.shared = shared_metrics.SharedState(state) if shared_metrics.enabled() else None

    def observe(self, record: RequestRecord) -> None:
        """A request is over and its row is ready (any thread: prometheus_client locks)."""
        attempts = record.attempts
        answer = next((a for a in attempts if a.answered), attempts[-1] if attempts else None)
        tier = answer.tier if answer is not None else NO_LABEL
        route = record.route or NO_LABEL
        self.requests(tier, route, str(record.status)).inc()
        self.duration(tier, route).observe(record.latency_ms / 1000)
        if record.ttft_ms is not None:
            self.ttft(tier).observe(record.ttft_ms / 1000)
        for attempt in attempts:
            usage, track = attempt.usage, attempt.track
            if usage is not None:
                self.tokens(attempt.tier, "prompt").inc(usage.prompt_tokens)
                self.tokens(attempt.tier, "completion").inc(usage.completion_tokens)
            if track is not None:
                self.energy(attempt.tier, track.device.source).inc(track.joules)
        if route in ROUTED and attempts:
            self.decisions(attempts[0].tier).inc()
            for before, after in pairwise(attempts):
                if before.tier != after.tier:
                    self.escalations(before.tier, after.tier).inc()

    def render(self) -> bytes:
        if self.shared is not None:
            return self.shared.render()
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """Read at scrape time: devices' energy, breakers, the ledger writer's counts."""

    def __init__(self, fleet: Fleet, writer: LedgerWriter | None,
                 health: HealthMonitor | None,
                 unauthenticated: Callable[[], int] | None) -> None:
        self.fleet = fleet
        self.writer = writer
        self.health = health
        self.unauthenticated = unauthenticated

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        devices = self.fleet.distinct()
        for name, help_text, attribute in (
                ("greenroute_energy_measured_joules_total", "Energy the meter counted",
                 "measured_j"),
                ("greenroute_energy_attributed_joules_total", "Energy attributed to requests",
                 "attributed_j"),
                ("greenroute_energy_idle_joules_total", "Energy with no request in flight",
                 "idle_j"),
                ("greenroute_energy_other_joules_total", "Energy the server's other clients "
                 "used (other gateway processes, by the server's token counters)", "other_j"),
                ("greenroute_energy_meter_errors_total", "Failed meter reads", "read_errors")):
            family = CounterMetricFamily(name, help_text, labels=["device", "source"])
            for device in devices:
                family.add_metric([device.name, device.source], getattr(device, attribute))
            yield family
        if self.health is not None:
            breakers = GaugeMetricFamily(
                "greenroute_tier_breaker_state", "Each tier's circuit breaker: 0 closed, "
                "1 half-open (one trial request), 2 open (requests go to its fallbacks)",
                labels=["tier"])
            for name, tier in self.health.tiers.items():
                breakers.add_metric([name], int(tier.breaker.state))
            yield breakers
        if self.unauthenticated is not None:  # refused with no ledger row (gateway/app.py)
            yield CounterMetricFamily("greenroute_unauthenticated_requests_total",
                                      "Requests refused for a missing or wrong API key",
                                      value=self.unauthenticated())
        if self.writer is None:
            return
        stats = self.writer.stats()
        yield CounterMetricFamily("greenroute_ledger_rows_written_total", "Rows written",
                                  value=stats["written"])
        yield GaugeMetricFamily("greenroute_ledger_rows_buffered", "Rows waiting to be written",
                                value=stats["buffered"])
        yield CounterMetricFamily("greenroute_ledger_rows_dropped_total",
                                  "Rows refused because the buffer was full",
                                  value=stats["dropped"])
        yield CounterMetricFamily("greenroute_ledger_write_failures_total",
                                  "Failed batch writes", value=stats["write_failures"])
