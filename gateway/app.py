"""The ASGI application: OpenAI's endpoints over the configured backends, and the composition
root that builds them from the config.

Hot path of a pass-through request: read the body (bounded), parse it once (orjson), validate it
(pydantic), resolve a Plan, and hand the dict to the backend; the backend's answer goes back as
the bytes it produced. Nothing is re-validated or re-serialized on the way out. The calls and
the response are the Exchange's (gateway/exchange.py); model `green` is GreenRoute's
(gateway/green.py); what a request cost is its RequestRecord's (gateway/accounting.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson
from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from greenroute.backends.base import Backend, BackendError, Endpoint
from greenroute.backends.energy.attribution import PeriodEnergy
from greenroute.backends.energy.sampler import Fleet
from greenroute.backends.registry import build_backend
from greenroute.gateway import headers as h
from greenroute.gateway.accounting import (
    CLIENT_CLOSED_REQUEST,
    Accounting,
    period_row,
    reader_identity,
)
from greenroute.gateway.carbon import CarbonAwareTarget, GridIntensity
from greenroute.gateway.cards import ModelCards
from greenroute.gateway.config import RESERVED_MODEL, ConfigError, GatewayConfig
from greenroute.gateway.draining import Drain
from greenroute.gateway.errors import APIError, server_error, shutting_down
from greenroute.gateway.exchange import Answer, Exchange
from greenroute.gateway.fallback import DirectRoute
from greenroute.gateway.green import GreenRoute
from greenroute.gateway.health import HealthMonitor
from greenroute.gateway.keys import Key, KeyStore
from greenroute.gateway.ledger import store
from greenroute.gateway.ledger.writer import LedgerWriter
from greenroute.gateway.limits import Limits
from greenroute.gateway.logs import request_id
from greenroute.gateway.metrics import CONTENT_TYPE, GatewayMetrics
from greenroute.gateway.openapi import openapi_json
from greenroute.gateway.plan import Plan, Planner, RoutedPlan
from greenroute.gateway.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    parse_body,
    validate,
)
from greenroute.gateway.streaming import ClientGone, Stopped
from greenroute.routers.service import RouterService, load_router

log = logging.getLogger("greenroute.gateway")


class Gateway:
    """Request handling, with the state it needs: config, backends, planner, keys."""

    def __init__(self, config: GatewayConfig, backends: Mapping[str, Backend],
                 fleet: Fleet | None = None, writer: LedgerWriter | None = None,
                 router: RouterService | None = None, key_engine: Engine | None = None) -> None:
        self.config = config
        self.backends = dict(backends)
        self.fleet = fleet or Fleet(())
        self.writer = writer
        self.router = router
        self.health_monitor = HealthMonitor(config.health, self.backends)
        self.grid = GridIntensity.from_config(config.energy)  # gCO2/kWh over time
        self.green = None if router is None else GreenRoute(
            router, self.backends, default_target=config.router.default_target,
            cascade_max_tokens=config.router.cascade_max_tokens, health=self.health_monitor,
            carbon=CarbonAwareTarget.from_config(config.router, self.grid))
        self.accounting = Accounting(self.fleet, writer, config.ledger.store_text, self.grid)
        self.planner = Planner(config, self.backends, routed=router is not None)
        self.direct = DirectRoute(config, self.backends, self.health_monitor)
        self.metrics_registry = GatewayMetrics(self.fleet, writer, self.health_monitor,
                                               lambda: self.unauthenticated)
        self.accounting.observers.append(self.metrics_registry.observe)
        self.cards = ModelCards(config, self.backends, self.green)
        self.max_body = config.server.max_body_bytes
        # Config keys, and the ledger database's (`greenroute keys`) when key_engine is given.
        self.keys = KeyStore(config.keys, key_engine)
        self.limits = Limits(key_engine, config.limits.sync_interval_s,
                             on_sync=self.keys.refresh)
        self.accounting.observers.append(self.limits.observe)
        # Requests refused before authentication: counted, never written to the ledger (anyone
        # could fill it with them). A counter for /metrics can read this.
        self.unauthenticated = 0
        self.drain = Drain()  # the shutdown grace's end (gateway/draining.py)

    # -- endpoints ----------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, Endpoint.CHAT, ChatCompletionRequest)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, Endpoint.COMPLETIONS, CompletionRequest)

    async def list_models(self, request: Request) -> Response:
        try:
            await self._authorize(request)
        except APIError as exc:
            return exc.response()
        data = [self.cards.card(name) for name in (*self.planner.tier_names, RESERVED_MODEL)]
        return _json({"object": "list", "data": data})

    async def retrieve_model(self, request: Request) -> Response:
        try:
            await self._authorize(request)
            name = self.planner.card_name(request.path_params["model"])
        except APIError as exc:
            return exc.response()
        return _json(self.cards.card(name))

    async def health(self, request: Request) -> Response:
        # Concurrent, each bounded by [health] timeout_s; the background checks move breakers.
        await self.health_monitor.check_all(feed_breakers=False)
        tiers = self.health_monitor.snapshot()
        ok = all(t.get("ok") for t in tiers.values())
        content: dict[str, Any] = {"status": "ok" if ok else "degraded", "tiers": tiers}
        if self.writer is not None:
            content["ledger"] = self.writer.stats()
        if not await self._operator(request):  # tiers' addresses and errors are not for anyone
            content = {"status": content["status"]}
        return _json(content, status=200 if ok else 503)

    async def metrics(self, request: Request) -> Response:
        if self.keys.has_admins:  # then they are the admin keys' alone (else open to scrapers)
            try:
                key = await self._authorize(request)
            except APIError as exc:
                return exc.response()
            if key is None or not key.admin:
                return APIError(403, "/metrics needs an admin key.",
                                code="admin_key_required").response()
        return Response(self.metrics_registry.render(), media_type=CONTENT_TYPE)

    async def openapi(self, request: Request) -> Response:
        return Response(openapi_json(), media_type="application/json")

    # -- the generation path ------------------------------------------------------------------

    async def _generate(self, request: Request, endpoint: Endpoint,
                        schema: type[ChatCompletionRequest | CompletionRequest]) -> Response:
        headers = {h.REQUEST_ID: uuid.uuid4().hex}
        request_id.set(headers[h.REQUEST_ID])  # this request's log lines carry it
        try:
            key = await self._authorize(request)
        except APIError as exc:  # no ledger row: anyone could fill the ledger with these
            self.unauthenticated += 1
            return exc.response(headers)
        record = self.accounting.open(headers[h.REQUEST_ID], endpoint.value)
        record.key_id = key.id if key is not None else None
        try:
            if key is not None:  # its rate limits and energy budget: headers, or a 429
                self.limits.admit(key, headers)
            body = parse_body(await self._read_body(request))
            if isinstance(body, dict) and isinstance(body.get("model"), str):
                record.requested_model = body["model"]
            validate(schema, body)
            record.asked(body)
            plan = self.planner.plan(body["model"])
            exchange = Exchange(endpoint, body, record, headers, request.receive,
                                self.drain.ended)
            try:
                answer = await self._answer(request, exchange, plan)
            except BaseException:
                exchange.close()
                raise
            return exchange.respond(answer)
        except APIError as exc:
            record.fail(exc.status, exc.code)
            return exc.response(headers)
        except BackendError as exc:
            error = APIError.from_backend(exc)
            record.fail(error.status, error.code)
            return error.response(headers)
        except ClientGone:
            record.gone()
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except Stopped:  # the shutdown grace ended first
            error = shutting_down()
            record.fail(error.status, error.code)
            return error.response(headers)
        except Exception:
            log.exception("request %s failed", headers[h.REQUEST_ID])
            record.fail(500, "internal_error")
            return server_error().response(headers)
        except BaseException:  # cancelled (the server is stopping): nobody gets an answer
            record.gone()
            raise

    async def _answer(self, request: Request, exchange: Exchange,
                      plan: Plan | RoutedPlan) -> Answer:
        if isinstance(plan, RoutedPlan):
            assert self.green is not None  # the planner routes only when there is a router
            return await self.green.answer(exchange, plan, request.headers.get(h.TARGET))
        return await self.direct.answer(exchange, plan)  # with its retry and fallbacks

    # -- request parts ------------------------------------------------------------------------

    async def _authorize(self, request: Request) -> Key | None:
        """Return the caller's key, or None when the gateway has no keys (gateway/keys.py)."""
        if not self.keys.required:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        key = await self.keys.lookup(token.strip()) if scheme.lower() == "bearer" else None
        if key is None:
            raise APIError(401, "Incorrect API key provided. Pass it as 'Authorization: Bearer "
                                "<key>'.", code="invalid_api_key")
        return key

    async def _operator(self, request: Request) -> bool:
        """Whether the caller may see /health's details: anyone when no key is configured;
        with admin keys, an admin key; otherwise any valid key."""
        try:
            key = await self._authorize(request)
        except APIError:
            return False
        return key is None or key.admin or not self.keys.has_admins

    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise self._too_large()
        parts: list[bytes] = []
        size = 0
        try:
            async for part in request.stream():
                size += len(part)
                if size > self.max_body:
                    raise self._too_large()
                parts.append(part)
        except ClientDisconnect:
            raise ClientGone from None  # it left while sending: 499, nobody to answer
        return b"".join(parts)

    def _too_large(self) -> APIError:
        return APIError(413, f"The request body is larger than this gateway's limit of "
                             f"{self.max_body} bytes.", code="request_too_large")


def _json(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


async def _not_found(request: Request, exc: Exception) -> Response:
    return APIError(404, f"Unknown path {request.url.path}; this gateway serves the OpenAI API "
                         "under /v1.", code="not_found").response()


async def _method_not_allowed(request: Request, exc: Exception) -> Response:
    return APIError(405, f"Method {request.method} is not allowed on {request.url.path}.",
                    code="method_not_allowed").response()


def create_app(config: GatewayConfig, backends: Mapping[str, Backend] | None = None) -> Starlette:
    """Build the app; backends are built from the config unless given, and started on startup."""
    if backends is None:
        backends = {tier.name: build_backend(tier) for tier in config.tiers}
    writer = None
    if config.ledger.enabled:
        ledger = config.ledger
        writer = LedgerWriter(store.database_url(ledger.path, ledger.url),
                              batch_size=ledger.batch_size,
                              flush_interval_s=ledger.flush_interval_s,
                              max_buffer=ledger.max_buffer, retry_s=ledger.retry_s,
                              spool=ledger.spool)
    on_period = None
    if writer is not None:
        host, reader = reader_identity()

        def on_period(period: PeriodEnergy) -> None:
            writer.put("device_energy", period_row(period, host, reader))
    fleet = Fleet(config.tiers, interval_s=config.energy.interval_ms / 1000,
                  period_s=config.energy.period_s, on_period=on_period)
    router = load_router(config)
    key_engine = None
    if config.ledger.enabled:  # keys and limits' counters live in the ledger database
        try:
            key_engine = store.open_engine(store.database_url(config.ledger.path,
                                                              config.ledger.url))
        except ImportError as exc:  # the URL's driver (psycopg, ...) is not installed
            raise ConfigError(f"ledger: the database driver is missing: {exc}") from None
    gateway = Gateway(config, backends, fleet, writer, router, key_engine)
    gateway.keys.refresh()  # before serving: whether requests need a key (cli reads it too)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            if writer is not None:
                writer.start()
                log.info("ledger: %s", writer.shown_url)
            fleet.start()
            for name, backend in gateway.backends.items():
                log.info("starting tier %s (%s)", name, backend.model_id)
                await backend.start()
            gateway.health_monitor.start()  # after the backends: a check before opens breakers
            await asyncio.to_thread(gateway.limits.start)  # the fleet's counts, then syncing
            yield
        finally:
            await gateway.health_monitor.stop()
            for backend in gateway.backends.values():
                await backend.aclose()
            if router is not None:
                router.close()
            await asyncio.to_thread(fleet.stop)  # the last readings: every row becomes final
            await asyncio.to_thread(gateway.limits.stop)  # their counts go to the database
            if key_engine is not None:
                key_engine.dispose()
            if writer is not None:
                await asyncio.to_thread(writer.close)

    routes = [
        Route("/v1/chat/completions", gateway.chat_completions, methods=["POST"]),
        Route("/v1/completions", gateway.completions, methods=["POST"]),
        Route("/v1/models", gateway.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", gateway.retrieve_model, methods=["GET"]),
        Route("/health", gateway.health, methods=["GET"]),
        Route("/metrics", gateway.metrics, methods=["GET"]),
        Route("/openapi.json", gateway.openapi, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={404: _not_found, 405: _method_not_allowed})
    app.state.gateway = gateway
    return app
