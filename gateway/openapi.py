"""`GET /openapi.json`: an OpenAPI 3.1 description of the gateway's public endpoints.

The generation and model endpoints are OpenAI's, so their request and response schemas are
OpenAI's own: copied from the official spec into `openapi_schemas.json` (package data, made by
bench/openapi_schemas.py; tests/test_openapi.py checks the copy is in sync), with the same
operation ids. What is the gateway's own (`/health`, `/metrics`, this document, the error
statuses it answers with) is written here. The document is built once per process.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
from importlib import resources
from typing import Any

ERROR = {"$ref": "#/components/responses/Error"}
# The statuses a generation request may get besides 200 (docs/gateway.md's error mapping).
GENERATION_ERRORS = ("400", "401", "404", "413", "429", "500", "502", "503", "504")


def _json_response(description: str, schema: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def stream_events(chunk: dict[str, Any]) -> dict[str, Any]:
    """The schema of each server-sent event of a stream whose chunks have the schema `chunk`.

    A `text/event-stream` schema describes one event's fields, with the JSON payload a string
    in `data` (`contentMediaType` and `contentSchema`), as OpenAPI 3.2 specifies and tools such
    as schemathesis read 3.1 documents. The payload is a chunk, the error event that ends a
    stream cut after its first byte, or the closing `[DONE]`."""
    payload = {"anyOf": [chunk, {"$ref": "#/components/schemas/ErrorResponse"}]}
    return {"type": "object", "required": ["data"], "properties": {
        "data": {"type": "string", "if": {"const": "[DONE]"},
                 "else": {"contentMediaType": "application/json", "contentSchema": payload}},
        "event": {"type": "string"}, "id": {"type": "string"},
        "retry": {"type": "integer", "minimum": 0}}}


def _generation(operation_id: str, summary: str, request: str, response: str,
                stream: str | None) -> dict[str, Any]:
    ok = _json_response("The answer; with `stream: true`, server-sent events ending with "
                        "`data: [DONE]`.", response)
    # OpenAI's spec has no chunk schema for text completions (their chunks are
    # CreateCompletionResponse-like, but with `finish_reason: null` until the last one).
    chunk = {"type": "object"} if stream is None else {"$ref": f"#/components/schemas/{stream}"}
    ok["content"]["text/event-stream"] = {"schema": stream_events(chunk)}
    return {"post": {
        "operationId": operation_id, "summary": summary, "tags": ["OpenAI"],
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{request}"}}}},
        "responses": {"200": ok, **{status: ERROR for status in GENERATION_ERRORS}}}}


HEALTH = {
    "type": "object", "required": ["status", "tiers"],
    "properties": {
        "status": {"type": "string", "enum": ["ok", "degraded"]},
        "tiers": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["ok", "breaker"],
            "properties": {
                "ok": {"type": ["boolean", "null"],
                       "description": "The last health check's verdict (null: not checked)"},
                "breaker": {"type": "string", "enum": ["closed", "half_open", "open"]},
                "checked_at": {"type": ["number", "null"],
                               "description": "Unix time of the last check"},
                "error": {"type": "string"}}}},
        "ledger": {"type": "object", "additionalProperties": {"type": "integer"}}}}


def _version() -> str:
    try:
        return importlib.metadata.version("greenroute")
    except importlib.metadata.PackageNotFoundError:
        return "0"


@functools.cache
def openapi_document() -> dict[str, Any]:
    """The document (built once; callers must not change it)."""
    package = resources.files("greenroute.gateway")
    schemas: dict[str, Any] = json.loads(
        package.joinpath("openapi_schemas.json").read_text(encoding="utf-8"))["schemas"]
    schemas = {**schemas, "HealthResponse": HEALTH}
    return {
        "openapi": "3.1.0",
        "info": {"title": "GreenRoute", "version": _version(),
                 "description": "OpenAI-compatible gateway: each request goes to the smallest "
                                "model tier that answers it well (model `green`), or to the "
                                "tier it names; every answer carries its energy."},
        "security": [{}, {"ApiKeyAuth": []}],  # a key only when the gateway has keys
        "paths": {
            "/v1/chat/completions": _generation(
                "createChatCompletion", "Creates a model response for the given chat "
                "conversation.", "CreateChatCompletionRequest", "CreateChatCompletionResponse",
                "CreateChatCompletionStreamResponse"),
            "/v1/completions": _generation(
                "createCompletion", "Creates a completion for the provided prompt.",
                "CreateCompletionRequest", "CreateCompletionResponse", None),
            "/v1/models": {"get": {
                "operationId": "listModels", "summary": "The tiers, and model `green`.",
                "tags": ["OpenAI"],
                "responses": {"200": _json_response("The models", "ListModelsResponse"),
                              "401": ERROR}}},
            "/v1/models/{model}": {"get": {
                "operationId": "retrieveModel", "summary": "One model's card.",
                "tags": ["OpenAI"],
                "parameters": [{"in": "path", "name": "model", "required": True,
                                "schema": {"type": "string"},
                                "description": "A tier's name, alias or upstream id, or "
                                               "`green`"}],
                "responses": {"200": _json_response("The model", "Model"),
                              "400": ERROR, "401": ERROR, "404": ERROR}}},
            "/health": {"get": {
                "operationId": "health", "summary": "Each tier's health check and circuit "
                "breaker, and the ledger writer's counts.", "tags": ["GreenRoute"],
                "security": [{}],
                "responses": {
                    "200": _json_response("Every tier is healthy", "HealthResponse"),
                    "503": _json_response("A tier is not", "HealthResponse")}}},
            "/metrics": {"get": {
                "operationId": "metrics", "summary": "Prometheus metrics (text format).",
                "tags": ["GreenRoute"], "security": [{}],
                "responses": {"200": {"description": "The metrics", "content": {
                    "text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {
                "operationId": "openapi", "summary": "This document.", "tags": ["GreenRoute"],
                "security": [{}],
                "responses": {"200": {"description": "OpenAPI 3.1", "content": {
                    "application/json": {"schema": {"type": "object"}}}}}}},
        },
        "components": {
            "schemas": schemas,
            "responses": {"Error": _json_response("An error, in OpenAI's shape",
                                                  "ErrorResponse")},
            "securitySchemes": {"ApiKeyAuth": {"type": "http", "scheme": "bearer"}},
        },
    }


@functools.cache
def openapi_json() -> bytes:
    """The document as served: the standard library's JSON, since the spec holds integers
    wider than 64 bits (`seed`'s bounds) that orjson refuses."""
    return json.dumps(openapi_document(), ensure_ascii=False).encode()
