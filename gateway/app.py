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
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from greenroute.backends.base import Backend, BackendError, Endpoint
from greenroute.backends.energy.attribution import PeriodEnergy
from greenroute.backends.energy.sampler import Fleet
from greenroute.backends.registry import build_backend
from greenroute.gateway import headers as h
from greenroute.gateway.accounting import CLIENT_CLOSED_REQUEST, Accounting, period_row
from greenroute.gateway.cards import ModelCards
from greenroute.gateway.config import RESERVED_MODEL, GatewayConfig
from greenroute.gateway.errors import APIError, bad_request, server_error
from greenroute.gateway.exchange import Answer, Exchange
from greenroute.gateway.green import GreenRoute
from greenroute.gateway.ledger import store
from greenroute.gateway.ledger.writer import LedgerWriter
from greenroute.gateway.metrics import render_metrics
from greenroute.gateway.plan import Plan, Planner, RoutedPlan
from greenroute.gateway.schemas import ChatCompletionRequest, CompletionRequest, validate
from greenroute.gateway.streaming import ClientGone
from greenroute.routers.service import RouterService, load_router

log = logging.getLogger("greenroute.gateway")


class Gateway:
    """Request handling, with the state it needs: config, backends, planner, keys."""

    def __init__(self, config: GatewayConfig, backends: Mapping[str, Backend],
                 fleet: Fleet | None = None, writer: LedgerWriter | None = None,
                 router: RouterService | None = None) -> None:
        self.config = config
        self.backends = dict(backends)
        self.fleet = fleet or Fleet(())
        self.writer = writer
        self.router = router
        self.green = None if router is None else GreenRoute(
            router, self.backends, default_target=config.router.default_target,
            cascade_max_tokens=config.router.cascade_max_tokens)
        self.accounting = Accounting(self.fleet, writer, config.ledger.store_text)
        self.planner = Planner(config, self.backends, routed=router is not None)
        self.cards = ModelCards(config, self.backends, self.green)
        self.max_body = config.server.max_body_bytes
        self.keys = {key.secret(): key.id for key in config.keys}

    # -- endpoints ----------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, Endpoint.CHAT, ChatCompletionRequest)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, Endpoint.COMPLETIONS, CompletionRequest)

    async def list_models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except APIError as exc:
            return exc.response()
        data = [self.cards.card(name) for name in (*self.planner.tier_names, RESERVED_MODEL)]
        return _json({"object": "list", "data": data})

    async def retrieve_model(self, request: Request) -> Response:
        try:
            self._authorize(request)
            name = request.path_params["model"]
            plan = self.planner.plan(name)
            name = RESERVED_MODEL if isinstance(plan, RoutedPlan) else plan.tier
        except APIError as exc:
            return exc.response()
        return _json(self.cards.card(name))

    async def health(self, request: Request) -> Response:
        tiers = {}
        for name, backend in self.backends.items():
            try:
                tiers[name] = await backend.health()
            except Exception as exc:  # a health check must answer, whatever the backend does
                tiers[name] = {"ok": False, "error": repr(exc)}
        ok = all(t.get("ok") for t in tiers.values())
        content: dict[str, Any] = {"status": "ok" if ok else "degraded", "tiers": tiers}
        if self.writer is not None:
            content["ledger"] = self.writer.stats()
        return _json(content, status=200 if ok else 503)

    async def metrics(self, request: Request) -> Response:
        return Response(render_metrics(self.fleet, self.writer),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- the generation path ------------------------------------------------------------------

    async def _generate(self, request: Request, endpoint: Endpoint,
                        schema: type[ChatCompletionRequest | CompletionRequest]) -> Response:
        headers = {h.REQUEST_ID: uuid.uuid4().hex}
        record = self.accounting.open(headers[h.REQUEST_ID], endpoint.value)
        try:
            record.key_id = self._authorize(request)
            body = _parse_json(await self._read_body(request))
            if isinstance(body, dict) and isinstance(body.get("model"), str):
                record.requested_model = body["model"]
            validate(schema, body)
            record.asked(body)
            plan = self.planner.plan(body["model"])
            exchange = Exchange(endpoint, body, record, headers, request.receive)
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
        exchange.record.route = plan.route
        exchange.headers[h.MODEL] = plan.tier
        exchange.headers[h.ROUTE] = plan.route
        return await exchange.answer(plan.tier, plan.backend, exchange.body)

    # -- request parts ------------------------------------------------------------------------

    def _authorize(self, request: Request) -> str | None:
        """Return the key id, or None when the gateway has no keys configured."""
        if not self.keys:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        key_id = self.keys.get(token.strip()) if scheme.lower() == "bearer" else None
        if key_id is None:
            raise APIError(401, "Incorrect API key provided. Pass it as 'Authorization: Bearer "
                                "<key>'.", code="invalid_api_key")
        return key_id

    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise self._too_large()
        parts: list[bytes] = []
        size = 0
        async for part in request.stream():
            size += len(part)
            if size > self.max_body:
                raise self._too_large()
            parts.append(part)
        return b"".join(parts)

    def _too_large(self) -> APIError:
        return APIError(413, f"The request body is larger than this gateway's limit of "
                             f"{self.max_body} bytes.", code="request_too_large")


def _parse_json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise bad_request("We could not parse the JSON body of your request. The body must be "
                          "valid JSON.", code="invalid_json") from None


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
                              max_buffer=ledger.max_buffer, retry_s=ledger.retry_s)
    on_period = None
    if writer is not None:
        def on_period(period: PeriodEnergy) -> None:
            writer.put("device_energy", period_row(period))
    fleet = Fleet(config.tiers, interval_s=config.energy.interval_ms / 1000,
                  period_s=config.energy.period_s, on_period=on_period)
    router = load_router(config)
    gateway = Gateway(config, backends, fleet, writer, router)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            if writer is not None:
                writer.start()
                log.info("ledger: %s", writer.url)
            fleet.start()
            for name, backend in gateway.backends.items():
                log.info("starting tier %s (%s)", name, backend.model_id)
                await backend.start()
            yield
        finally:
            for backend in gateway.backends.values():
                await backend.aclose()
            if router is not None:
                router.close()
            await asyncio.to_thread(fleet.stop)  # the last readings: every row becomes final
            if writer is not None:
                await asyncio.to_thread(writer.close)

    routes = [
        Route("/v1/chat/completions", gateway.chat_completions, methods=["POST"]),
        Route("/v1/completions", gateway.completions, methods=["POST"]),
        Route("/v1/models", gateway.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", gateway.retrieve_model, methods=["GET"]),
        Route("/health", gateway.health, methods=["GET"]),
        Route("/metrics", gateway.metrics, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={404: _not_found, 405: _method_not_allowed})
    app.state.gateway = gateway
    return app
