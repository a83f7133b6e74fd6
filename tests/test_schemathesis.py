"""schemathesis over the gateway (issue 13, item 5): generated and mutated requests against the
gateway's own `/openapi.json`, and against the four operations it implements from the official
OpenAI spec. For every input: no 5xx, and a response that conforms to the operation's schema
(a JSON body, or each event of a stream).

The app runs in this process (schemathesis' ASGI transport, with the app's lifespan), in front
of fake tiers that answer as an OpenAI server does, down to the `message.refusal: null` that the
spec requires. Each request names one of the gateway's models (a tier, an alias, its upstream id
or `green`, which runs the router and the cascade), since a random model name would only test
the 404. The bounds (examples per operation, phases) keep the whole file well under a minute.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import orjson
import pytest
import schemathesis
from fake_backends import FakeBackend, build_app, gateway_config, serve, tier
from hypothesis import HealthCheck, Phase, given, settings
from routing_fixtures import three_tier_artifact
from schemathesis.checks import CheckFunction, not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.applications import Starlette

from greenroute.backends.base import Completion, Endpoint
from greenroute.gateway.openapi import stream_events

Case = schemathesis.Case[Any]  # a case of any operation

OPENAI_SPEC = Path(__file__).resolve().parent.parent.parent / "shared/openai-openapi/openapi.json"
OPERATIONS = ("createChatCompletion", "createCompletion", "listModels", "retrieveModel")
# The models a generated request may name: tiers, an alias, an upstream id, and model `green`.
MODELS = ("small", "large", "big", "large-upstream", "green", "green-0.9")
CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance,
          content_type_conformance]
# Per operation and generation mode; a deeper run: GREENROUTE_FUZZ_EXAMPLES=400 (2 minutes).
EXAMPLES = int(os.environ.get("GREENROUTE_FUZZ_EXAMPLES", "40"))
# No shrinking: a failure is reported as found, with its curl line (shrinking a big body took
# minutes on 2 cores).
PHASES = (Phase.explicit, Phase.generate)


class OpenAITier(FakeBackend):
    """A fake tier whose chat answers carry `refusal: null` in each choice's message and
    logprobs, as OpenAI's do (the spec makes both required and nullable)."""

    async def create(self, endpoint: Endpoint, body: dict[str, Any]) -> Completion:
        completion = await super().create(endpoint, body)
        if endpoint is not Endpoint.CHAT:
            return completion
        answer = orjson.loads(completion.body)
        for choice in answer["choices"]:
            choice["message"]["refusal"] = None
        return Completion(orjson.dumps(answer), completion.usage)

    def _logprobs(self, endpoint: Endpoint, body: dict[str, Any], tokens: list[str]
                  ) -> dict[str, Any] | None:
        logprobs = super()._logprobs(endpoint, body, tokens)
        if endpoint is Endpoint.CHAT and logprobs is not None:
            logprobs["refusal"] = None
        return logprobs


def gateway(router: Path, small: FakeBackend | None = None) -> Starlette:
    config = gateway_config(
        tier("small", 1.0), tier("mid", 2.0), tier("large", 5.0, aliases=["big"]),
        router={"path": str(router), "default_target": 0.5, "cascade_max_tokens": 4},
        health={"interval_s": 0})
    return build_app(config, small or OpenAITier("small"), OpenAITier("mid"),
                     OpenAITier("large"))


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return three_tier_artifact(tmp_path_factory.mktemp("router"))


@pytest.fixture
def app(router: Path) -> Starlette:
    """A fresh app per test: schemathesis' pytest plugin ends the app's lifespan (which it
    started on the first call) when the test ends."""
    return gateway(router)


def name_a_model(case: Case) -> None:
    """Point the case at one of the gateway's models, chosen from the body so that a replayed
    case names the same one. A case whose `model` is not a string keeps it (that is the
    mistake it tests)."""
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        body["model"] = MODELS[len(json.dumps(body, default=str)) % len(MODELS)]
    if case.path_parameters and "model" in case.path_parameters:
        model = case.path_parameters["model"]
        case.path_parameters["model"] = MODELS[len(str(model)) % len(MODELS)]


def run(case: Case, checks: list[CheckFunction]) -> None:
    name_a_model(case)
    case.call_and_validate(checks=checks)


def fuzz(schema: Any, operation_id: str, checks: list[CheckFunction]) -> None:
    """Valid inputs, then (for an operation with a body) invalid ones, EXAMPLES of each."""
    operation = schema.find_operation_by_id(operation_id)
    modes = [schemathesis.GenerationMode.POSITIVE]
    if operation.body:
        modes.append(schemathesis.GenerationMode.NEGATIVE)
    for mode in modes:
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=PHASES,
                  suppress_health_check=list(HealthCheck))
        def check(case: Case) -> None:
            run(case, checks)

        check()


def assert_generation_reached_the_tiers(app: Starlette, operation_id: str) -> None:
    """Valid generated requests got past validation to the models (the fuzzing tested more
    than the gateway's 400s)."""
    if operation_id in ("createChatCompletion", "createCompletion"):
        backends = app.state.gateway.backends.values()
        assert sum(len(backend.calls) for backend in backends) >= EXAMPLES // 4


@pytest.fixture
def gateway_document(app: Starlette) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture(scope="module")
def openai_spec() -> dict[str, Any]:
    if not OPENAI_SPEC.exists():
        pytest.skip(f"the official OpenAI spec is not in this checkout ({OPENAI_SPEC})")
    document: dict[str, Any] = json.loads(OPENAI_SPEC.read_text(encoding="utf-8"))
    # Two gaps of the spec, filled as the gateway's own document does (gateway/openapi.py): it
    # gives the chat chunk schema as the stream's `schema`, which OpenAPI 3.2 (and schemathesis)
    # read as the schema of each event's fields, where each event's `data` is a chunk; and it
    # documents no stream at all for text completions.
    paths = document["paths"]
    chat = paths["/chat/completions"]["post"]["responses"]["200"]["content"]
    chat["text/event-stream"]["schema"] = stream_events(chat["text/event-stream"]["schema"])
    text = paths["/completions"]["post"]["responses"]["200"]["content"]
    text["text/event-stream"] = {"schema": stream_events({"type": "object"})}
    return document


@pytest.fixture
def openai_document(openai_spec: dict[str, Any], app: Starlette) -> Any:
    schema = schemathesis.openapi.from_dict(openai_spec).include(operation_id=list(OPERATIONS))
    schema.app = app
    return schema


@pytest.mark.parametrize("operation_id", [*OPERATIONS, "health", "metrics", "openapi"])
def test_the_gateways_own_document(app: Starlette, gateway_document: Any,
                                   operation_id: str) -> None:
    fuzz(gateway_document, operation_id, CHECKS)
    assert_generation_reached_the_tiers(app, operation_id)


@pytest.mark.parametrize("operation_id", OPERATIONS)
def test_the_official_openai_spec(app: Starlette, openai_document: Any,
                                  operation_id: str) -> None:
    # Not status_code_conformance: OpenAI's spec documents only 200 (and 429 for generation),
    # so every refused request would be "undocumented"; the gateway's document has them all.
    fuzz(openai_document, operation_id, [not_a_server_error, response_schema_conformance,
                                         content_type_conformance])
    assert_generation_reached_the_tiers(app, operation_id)


def test_the_stateful_phase_follows_the_models_list_to_each_card(app: Starlette) -> None:
    """schemathesis infers the link from `GET /v1/models` (`data[].id`) to
    `GET /v1/models/{model}`: every model the list names has its card (before the fix,
    `green` was listed and its card was a 400, which this phase hit thousands of times)."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    machine = schema.as_state_machine()
    cards: dict[str, int] = {}

    class Workflow(machine):  # type: ignore[misc,valid-type]  # schemathesis makes the class
        def validate_response(self, response: schemathesis.Response, case: Case,
                              additional_checks: list[CheckFunction] | None = None,
                              **kwargs: Any) -> None:
            if case.path_parameters:  # the card of a model the list gave
                cards[case.path_parameters["model"]] = response.status_code
            super().validate_response(response, case, additional_checks, **kwargs)

    Workflow.run(settings=settings(max_examples=10, stateful_step_count=4, deadline=None,
                                   database=None, phases=PHASES,
                                   suppress_health_check=list(HealthCheck)))
    listed = {"small", "mid", "large", "green"}
    assert listed & set(cards), cards  # the link from the list was followed
    # A listed model's card is a 200; a name schemathesis made up is a 404, never a 400 or 5xx.
    assert {name: status for name, status in cards.items()} == {
        name: 200 if name in listed else 404 for name in cards}


def test_the_schema_check_is_on_and_fails_an_answer_without_refusal(router: Path) -> None:
    """The control: a tier whose chat answers lack `message.refusal` fails the fuzzing, so a
    passing run means the answers were checked."""
    app = gateway(router, small=FakeBackend("small"))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    case = schema.find_operation_by_id("createChatCompletion").Case(
        body={"model": "small", "messages": [{"role": "user", "content": "hi"}]},
        media_type="application/json")
    with pytest.raises(FailureGroup) as failed:
        case.call_and_validate(checks=CHECKS)
    assert '"refusal" is a required property' in str(failed.value)


@pytest.mark.parametrize("part", [{"type": "text", "text": 0.5}, {"type": "text"}])
def test_a_text_part_without_string_text_is_a_400_not_a_500(router: Path, part: Any) -> None:
    """Found by the fuzzing: under `green`, the router joined the parts' texts and raised
    TypeError on a number (a 500)."""
    with serve(gateway_config(tier("small", 1.0), tier("mid", 2.0), tier("large", 5.0),
                              router={"path": str(router)}),
               OpenAITier("small"), OpenAITier("mid"), OpenAITier("large")) as http:
        response = http.post("/v1/chat/completions", json={
            "model": "green", "messages": [{"role": "user", "content": [part]}]})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("messages[0].content", "invalid_value")
    assert "needs a string 'text'" in error["message"]
