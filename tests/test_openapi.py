"""`/openapi.json` (issue 13, item 4): a valid OpenAPI 3.1 document whose OpenAI operations use
OpenAI's own schemas, copied in sync with the official spec; and the gateway's answers match
the schemas it declares for its own endpoints."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
from fake_backends import FakeBackend, gateway_config, serve, tier
from openapi_spec_validator import validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

from greenroute.gateway.openapi import openapi_document

REPO = Path(__file__).resolve().parent.parent
OPENAI_OPERATIONS = {"createChatCompletion": ("/chat/completions", "post"),
                     "createCompletion": ("/completions", "post"),
                     "listModels": ("/models", "get"),
                     "retrieveModel": ("/models/{model}", "get")}


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("openapi_schemas",
                                                  REPO / "bench/openapi_schemas.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def operations(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {op["operationId"]: op for path in document["paths"].values()
            for op in path.values() if isinstance(op, dict) and "operationId" in op}


def schema_validator(document: dict[str, Any], name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}",
                                            "components": document["components"]})


def test_the_document_is_valid_openapi_3_1_and_served_as_is() -> None:
    document = openapi_document()
    validate(document)  # raises on an invalid document
    broken = json.loads(json.dumps(document))
    broken["paths"]["/health"]["get"]["responses"]["200"] = {"content": "none"}
    with pytest.raises(OpenAPIValidationError):
        validate(broken)
    with serve(gateway_config(tier("small"), health={"interval_s": 0}),
               FakeBackend("small")) as http:
        served = http.get("/openapi.json")
    assert served.status_code == 200 and served.json() == document
    assert set(document["paths"]) == {"/v1/chat/completions", "/v1/completions", "/v1/models",
                                      "/v1/models/{model}", "/health", "/metrics",
                                      "/openapi.json"}


def test_the_embedded_schemas_are_in_sync_with_the_official_spec() -> None:
    module = generator()
    if not module.SPEC.exists():
        pytest.skip(f"the official spec is not on this machine ({module.SPEC})")
    official_bytes = module.SPEC.read_bytes()
    assert module.OUTPUT.read_text() == module.render(official_bytes), (
        "gateway/openapi_schemas.json is stale: run .venv/bin/python bench/openapi_schemas.py")
    official = json.loads(official_bytes)
    ours = operations(openapi_document())
    for operation_id, (path, method) in OPENAI_OPERATIONS.items():
        theirs = official["paths"][path][method]
        assert theirs["operationId"] == operation_id
        mine = ours[operation_id]
        if "requestBody" in theirs:
            assert mine["requestBody"] == theirs["requestBody"]
        assert mine["responses"]["200"]["content"]["application/json"] == \
            theirs["responses"]["200"]["content"]["application/json"]
        for ref in _refs(theirs["responses"]["200"]):
            name = ref.rsplit("/", 1)[-1]
            assert openapi_document()["components"]["schemas"][name] == \
                official["components"]["schemas"][name]


def test_the_gateways_own_answers_match_their_declared_schemas() -> None:
    document = openapi_document()
    small = FakeBackend("small")
    with serve(gateway_config(tier("small"), tier("large", 2.0), health={"interval_s": 0}),
               small, FakeBackend("large")) as http:
        healthy = http.get("/health")
        small.healthy = False
        degraded = http.get("/health")
        models = http.get("/v1/models")
        missing = http.get("/v1/models/nope")
    assert (healthy.status_code, degraded.status_code) == (200, 503)
    for response in (healthy, degraded):
        schema_validator(document, "HealthResponse").validate(response.json())
    schema_validator(document, "ListModelsResponse").validate(models.json())
    schema_validator(document, "ErrorResponse").validate(missing.json())
    with pytest.raises(jsonschema.ValidationError):
        schema_validator(document, "HealthResponse").validate({"status": "fine", "tiers": {}})


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [
            r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []
