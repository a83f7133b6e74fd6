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

from backends.base import Backend, BackendError, Chunk, Completion, Endpoint
from backends.energy.sampler import Fleet
from backends.registry import build_backend
from gateway.accounting import Accounting, Attempt, RequestRecord, period_row, prompt_text, \
    with_energy
from gateway.config import RESERVED_MODEL, GatewayConfig
from gateway.errors import APIError, bad_request, server_error
from gateway.ledger import store
from gateway.ledger.writer import LedgerWriter
from gateway.metrics import render_metrics
from gateway.plan import Planner
from gateway.schemas import ChatCompletionRequest, CompletionRequest, validate
from gateway.streaming import (
    ClientGone,
    EventStreamResponse,
    sse_events,
    until_disconnect,
    watch_disconnect,
)

log = logging.getLogger("greenroute.gateway")

HEADER_MODEL = "x-greenroute-model"
HEADER_ROUTE = "x-greenroute-route"
HEADER_REQUEST_ID = "x-request-id"
HEADER_ENERGY = "x-greenroute-energy-joules"
HEADER_ENERGY_SOURCE = "x-greenroute-energy-source"
# Status for a client that left before its answer (nginx's convention); never seen by the client.
CLIENT_CLOSED_REQUEST = 499


class Gateway:
    """Request handling, with the state it needs: config, backends, planner, keys."""

    def __init__(self, config: GatewayConfig, backends: Mapping[str, Backend],
                 fleet: Fleet | None = None, writer: LedgerWriter | None = None) -> None:
        self.config = config
        self.backends = dict(backends)
        self.fleet = fleet or Fleet(())
        self.writer = writer
        self.accounting = Accounting(self.fleet, writer, config.ledger.store_text)
        self.planner = Planner(config, self.backends)
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
            if name != RESERVED_MODEL:
                name = self.planner.plan(name).tier
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
            card["greenroute"] = {"route": "router", "available": False}
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
    gateway = Gateway(config, backends, fleet, writer)

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
