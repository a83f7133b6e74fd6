"""A directly named tier, with its retry and its fallbacks.

The named tier answers unless its breaker is open or it fails before its first byte: a
connection error is retried on the same tier (`[health] retries` times, at once: the upstream
never saw the request), and then a 5xx or an open breaker hands the request to the tier's
`fallbacks`, in order. A 4xx is the request's own fault and goes back at once. The ledger's
`route` says what happened: `direct`, `direct>retry`, `direct>fallback`,
`direct>retry>fallback`; `request_models` has one row per call, `answered_by` the tier that
answered, and the `x-greenroute-models-tried` header lists the tiers called.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import aiohttp

from greenroute.backends.base import Backend, BackendError
from greenroute.gateway import headers as h
from greenroute.gateway.config import GatewayConfig
from greenroute.gateway.exchange import Answer, Exchange
from greenroute.gateway.health import BreakerOpen, HealthMonitor
from greenroute.gateway.plan import Plan

log = logging.getLogger("greenroute.gateway")


def is_connection_error(exc: BackendError) -> bool:
    """A failure to reach the upstream at all (refused, reset, connect timeout) rather than a
    failed answer: safe to send again, since the upstream did not start on it."""
    return exc.status in (502, 503) and isinstance(
        exc.__cause__, (OSError, TimeoutError, aiohttp.ClientConnectionError))


class DirectRoute:
    """Answers direct plans; built once from the config's `fallbacks`."""

    def __init__(self, config: GatewayConfig, backends: Mapping[str, Backend],
                 health: HealthMonitor) -> None:
        self.health = health
        self.retries = config.health.retries
        self.candidates: dict[str, tuple[tuple[str, Backend], ...]] = {
            tier.name: tuple((name, backends[name]) for name in (tier.name, *tier.fallbacks))
            for tier in config.tiers}

    async def answer(self, exchange: Exchange, plan: Plan) -> Answer:
        record, headers = exchange.record, exchange.headers
        tried: list[str] = []
        retried = fell_back = False
        error: BackendError | None = None
        record.route = headers[h.ROUTE] = plan.route
        headers[h.MODEL] = plan.tier
        for position, (tier, backend) in enumerate(self.candidates[plan.tier]):
            for call in range(self.retries + 1):
                try:
                    with self.health.guard(tier):
                        fell_back = fell_back or position > 0
                        retried = retried or call > 0
                        record.route = headers[h.ROUTE] = _route(plan.route, retried, fell_back)
                        headers[h.MODEL] = tier
                        tried.append(tier)
                        if len(tried) > 1:
                            headers[h.TRIED] = ",".join(tried)
                        return await exchange.answer(tier, backend, dict(exchange.body))
                except BreakerOpen as exc:
                    error = error if error is not None else exc
                    break  # not called: the next candidate
                except BackendError as exc:
                    if exc.status < 500:
                        raise  # the request is at fault: no other tier will do better
                    error = exc
                    log.warning("tier %s failed before its first byte (%s)", tier, exc.code)
                    if not is_connection_error(exc):
                        break
        assert error is not None  # every candidate was refused or failed
        raise error


def _route(route: str, retried: bool, fell_back: bool) -> str:
    return route + (">retry" if retried else "") + (">fallback" if fell_back else "")
