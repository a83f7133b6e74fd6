"""The ASGI application: OpenAI's endpoints over the configured backends.

Hot path of a pass-through request: read the body (bounded), parse it once (orjson), validate it
(pydantic), resolve a Plan, and hand the dict to the backend; the backend's answer goes back as
the bytes it produced. Nothing is re-validated or re-serialized on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from greenroute.backends.base import Backend, BackendError, Chunk, Completion, Endpoint, Usage
from greenroute.backends.energy.sampler import Fleet
from greenroute.backends.registry import build_backend
from greenroute.gateway import cascade
from greenroute.gateway.accounting import (
    Accounting,
    Attempt,
    RequestRecord,
    period_row,
    prompt_text,
    with_energy,
)
from greenroute.gateway.config import RESERVED_MODEL, GatewayConfig
from greenroute.gateway.errors import APIError, bad_request, server_error
from greenroute.gateway.ledger import store
from greenroute.gateway.ledger.writer import LedgerWriter
from greenroute.gateway.metrics import render_metrics
from greenroute.gateway.plan import Planner, RoutedPlan, parse_target
from greenroute.gateway.schemas import ChatCompletionRequest, CompletionRequest, validate
from greenroute.gateway.streaming import (
    ClientGone,
    EventStreamResponse,
    sse_events,
    until_disconnect,
    watch_disconnect,
)
from greenroute.routers.routing_text import routing_text
from greenroute.routers.service import RouterService, load_router

log = logging.getLogger("greenroute.gateway")

HEADER_MODEL = "x-greenroute-model"
HEADER_ROUTE = "x-greenroute-route"
HEADER_REQUEST_ID = "x-request-id"
HEADER_ENERGY = "x-greenroute-energy-joules"
HEADER_ENERGY_SOURCE = "x-greenroute-energy-source"
HEADER_TARGET = "x-greenroute-quality-target"
HEADER_TRIED = "x-greenroute-models-tried"
HEADER_SCORE = "x-greenroute-router-score"
HEADER_CONFIDENCE = "x-greenroute-confidence"
HEADER_DEGRADED = "x-greenroute-degraded"
# Status for a client that left before its answer (nginx's convention); never seen by the client.
CLIENT_CLOSED_REQUEST = 499


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
        self.accounting = Accounting(self.fleet, writer, config.ledger.store_text)
        self.planner = Planner(config, self.backends, routed=router is not None)
        self.max_body = config.server.max_body_bytes
        self.keys = {key.secret(): key.id for key in config.keys}
        self.created = int(time.time())

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
        data = [self._model_card(name) for name in (*self.planner.tier_names, RESERVED_MODEL)]
        return _json({"object": "list", "data": data})

    async def retrieve_model(self, request: Request) -> Response:
        try:
            self._authorize(request)
            name = request.path_params["model"]
            plan = self.planner.plan(name)
            name = RESERVED_MODEL if isinstance(plan, RoutedPlan) else plan.tier
        except APIError as exc:
            return exc.response()
        return _json(self._model_card(name))

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
        headers = {HEADER_REQUEST_ID: uuid.uuid4().hex}
        record = self.accounting.open(headers[HEADER_REQUEST_ID], endpoint.value)
        streaming = False  # once the stream's response exists, it finishes the record
        try:
            record.key_id = self._authorize(request)
            body = _parse_json(await self._read_body(request))
            if isinstance(body, dict) and isinstance(body.get("model"), str):
                record.requested_model = body["model"]
            validate(schema, body)
            record.stream = bool(body.get("stream"))
            if record.store_text:
                record.prompt_text = prompt_text(body)
            plan = self.planner.plan(body["model"])
            if isinstance(plan, RoutedPlan):
                response, streaming = await self._green(request, endpoint, body, plan, record,
                                                        headers)
                return response
            record.route = plan.route
            headers[HEADER_MODEL] = plan.tier
            headers[HEADER_ROUTE] = plan.route
            attempt = record.attempt(plan.tier, plan.backend)
            watcher = watch_disconnect(request.receive)
            if body.get("stream"):
                response = await self._stream(watcher, attempt, plan.backend, endpoint, body,
                                              headers, record)
                streaming = True
                return response
            try:
                with attempt.running():
                    completion = await until_disconnect(watcher,
                                                        plan.backend.create(endpoint, body))
            finally:
                watcher.cancel()
            return self._answer(completion, attempt, record, headers)
        except APIError as exc:
            record.finish(exc.status, exc.code)
            return exc.response(headers)
        except BackendError as exc:
            error = APIError.from_backend(exc)
            record.finish(error.status, error.code)
            return error.response(headers)
        except ClientGone:
            record.finish(CLIENT_CLOSED_REQUEST, "client_closed")
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except Exception:
            log.exception("request %s failed", headers[HEADER_REQUEST_ID])
            record.finish(500, "internal_error")
            return server_error().response(headers)
        finally:
            if not streaming:
                record.finish(CLIENT_CLOSED_REQUEST, "client_closed")  # no-op if finished

    def _answer(self, completion: Completion, attempt: Attempt, record: RequestRecord,
                headers: dict[str, str]) -> Response:
        """The whole answer, with its energy in a header and in `usage` when it is metered."""
        attempt.done(completion.usage)
        record.answered_whole()
        if record.store_text:
            record.answer_text = _answer_text(completion.body)
        record.finish(200)
        body = completion.body
        joules = record.joules()
        if joules is not None:
            headers[HEADER_ENERGY] = f"{joules:.6f}"
            headers[HEADER_ENERGY_SOURCE] = record.energy_source() or ""
            body = with_energy(body, joules)
        return Response(body, media_type="application/json", headers=headers)

    async def _stream(self, watcher: asyncio.Future[None], attempt: Attempt, backend: Backend,
                      endpoint: Endpoint, body: dict[str, Any], headers: dict[str, str],
                      record: RequestRecord) -> Response:
        options = body.get("stream_options")
        include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
        with attempt.running():
            chunks = backend.stream(endpoint, body)
            try:
                # Wait for the first chunk before answering, so that failing to start is an
                # HTTP error.
                first = await until_disconnect(watcher, anext(chunks, None))
            except BaseException:
                watcher.cancel()
                await chunks.aclose()
                raise
        record.output_started()
        headers["cache-control"] = "no-cache"
        headers["x-accel-buffering"] = "no"  # nginx: do not buffer the event stream
        observer = _StreamAccounting(record, attempt)
        return EventStreamResponse(sse_events(first, chunks, include_usage, observer), watcher,
                                   headers)

    # -- model `green` ------------------------------------------------------------------------

    async def _green(self, request: Request, endpoint: Endpoint, body: dict[str, Any],
                     plan: RoutedPlan, record: RequestRecord, headers: dict[str, str]
                     ) -> tuple[Response, bool]:
        """Route a `green` request: the router plans the tiers; every tier but the last of the
        plan is a cascade stage whose answer is kept only if the router trusts it. A tier that
        fails hands the request on to the next (or, past the plan's end, the next larger)."""
        assert self.router is not None
        target = self._target(request, plan)
        decision = await self.router.decide(routing_text(body), target)
        record.route = "cascade" if len(decision.plan) > 1 else "routed"
        record.quality_target = target
        record.router_score = decision.scores[0] if decision.scores else None
        headers[HEADER_ROUTE] = record.route
        headers[HEADER_TARGET] = f"{target:g}"
        headers[HEADER_SCORE] = ",".join(f"{s:.4f}" for s in decision.scores)
        cap = self.config.router.cascade_max_tokens
        stages = list(decision.plan)
        fallback: tuple[dict[str, Any], Attempt, Usage | None] | None = None
        watcher = watch_disconnect(request.receive)
        streaming = False
        try:
            for position, tier in enumerate(stages):  # `stages` may grow: see the fallback
                backend = self.backends[tier]
                headers[HEADER_MODEL] = tier
                headers[HEADER_TRIED] = ",".join(stages[:position + 1])
                attempt = record.attempt(tier, backend)
                try:
                    if position == len(stages) - 1:  # the plan's last tier answers as asked
                        if body.get("stream"):
                            response = await self._stream(watcher, attempt, backend, endpoint,
                                                          dict(body), headers, record)
                            streaming = True
                            return response, True
                        with attempt.running():
                            completion = await until_disconnect(
                                watcher, backend.create(endpoint, dict(body)))
                        return self._answer(completion, attempt, record, headers), False
                    with attempt.running():
                        completion = await until_disconnect(
                            watcher, backend.create(endpoint, cascade.stage_body(endpoint, body,
                                                                                 cap)))
                except BackendError as exc:
                    attempt.done(None)
                    if exc.status < 500:
                        raise  # the request itself is at fault: no other tier will do better
                    log.warning("request %s: tier %s failed (%s); trying the next",
                                headers[HEADER_REQUEST_ID], tier, exc.code)
                    if position == len(stages) - 1:
                        larger = self._next_larger(tier, stages)
                        if larger is not None:
                            stages.append(larger)
                        elif fallback is not None:
                            answer, kept, usage = fallback
                            headers[HEADER_DEGRADED] = f"{tier} failed ({exc.code})"
                            headers[HEADER_MODEL] = kept.tier
                            return self._kept(endpoint, body, answer, usage, kept, record,
                                              headers), False
                        else:
                            raise
                    continue
                attempt.done(completion.usage)
                answer = orjson.loads(completion.body)
                if cascade.cut_by_cap(endpoint, body, answer, cap):
                    continue
                keep, confidence = self.router.keep(decision, tier,
                                                    cascade.logprob_content(endpoint, answer))
                if confidence is not None:
                    headers[HEADER_CONFIDENCE] = f"{confidence:.4f}"
                if keep:
                    return self._kept(endpoint, body, answer, completion.usage, attempt, record,
                                      headers), False
                fallback = (answer, attempt, completion.usage)
            raise AssertionError("a plan always ends with a tier that answers")
        finally:
            if not streaming:
                watcher.cancel()

    def _kept(self, endpoint: Endpoint, body: dict[str, Any], answer: dict[str, Any],
              usage: Usage | None, attempt: Attempt, record: RequestRecord,
              headers: dict[str, str]) -> Response:
        """A cascade stage's answer goes back: whole, or as the events a stream expects (the
        stage was buffered to be judged, so it arrives at once)."""
        answer = cascade.client_view(endpoint, body, answer)
        attempt.answered = True  # it may not be the last tier tried (a later one failed)
        if not body.get("stream"):
            return self._answer(Completion(orjson.dumps(answer), usage), attempt, record,
                                headers)
        attempt.done(usage)
        record.answered_whole()
        record.finish(200)
        joules = record.joules()
        if joules is not None:
            headers[HEADER_ENERGY] = f"{joules:.6f}"
            headers[HEADER_ENERGY_SOURCE] = record.energy_source() or ""
            if isinstance(answer.get("usage"), dict):
                answer["usage"]["energy_joules"] = round(joules, 6)
        options = body.get("stream_options")
        include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
        headers["cache-control"] = "no-cache"
        return Response(cascade.as_event_stream(endpoint, answer, include_usage),
                        media_type="text/event-stream", headers=headers)

    def _next_larger(self, tier: str, tried: list[str]) -> str | None:
        assert self.router is not None
        order = self.router.policy.tiers
        return next((t for t in order[order.index(tier) + 1:] if t not in tried), None)

    def _target(self, request: Request, plan: RoutedPlan) -> float:
        """The request's quality target: its header, else its model name (green-0.9), else
        the configured default, else the artifact's."""
        header = request.headers.get(HEADER_TARGET)
        if header is not None:
            return parse_target(header, HEADER_TARGET)
        return plan.target if plan.target is not None else self._default_target()

    def _default_target(self) -> float:
        assert self.router is not None
        return self.config.router.default_target or self.router.default_target

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

    def _model_card(self, name: str) -> dict[str, Any]:
        card: dict[str, Any] = {"id": name, "object": "model", "created": self.created,
                                "owned_by": "greenroute"}
        if name == RESERVED_MODEL:
            card["greenroute"] = {"route": "router", "available": self.router is not None}
            if self.router is not None:
                manifest = self.router.router.manifest
                card["greenroute"] |= {"tiers": manifest["tiers"], "kind": manifest["kind"],
                                       "default_target": self._default_target(),
                                       "targets": sorted(self.router.policy.thresholds)}
            return card
        tier = next(t for t in self.config.tiers if t.name == name)
        card["greenroute"] = {"backend": tier.backend, "upstream_model":
                              self.backends[name].model_id, "energy_hint": tier.energy_hint}
        return card


class _StreamAccounting:
    """Puts the energy into a stream's usage chunk, and finishes its record when it ends."""

    def __init__(self, record: RequestRecord, attempt: Attempt) -> None:
        self.record = record
        self.attempt = attempt
        self.texts: list[bytes] | None = [] if record.store_text else None

    def usage_chunk(self, chunk: Chunk) -> bytes:
        self.attempt.done(chunk.usage)
        joules = self.record.joules()
        return chunk.data if joules is None else with_energy(chunk.data, joules)

    def ended(self, status: int, code: str | None) -> None:
        self.record.finish(status, code)


def _answer_text(body: bytes) -> str | None:
    try:
        choice = orjson.loads(body)["choices"][0]
        return choice.get("text") if "text" in choice else choice["message"].get("content")
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        return None


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
    on_period = (lambda period: writer.put("device_energy", period_row(period))) \
        if writer is not None else None
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
