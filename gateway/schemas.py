"""The OpenAI request bodies the gateway accepts, validated with pydantic.

Only the fields whose shape the gateway or a backend relies on are declared; every other field
is allowed and passes through to the backend unchanged (`extra="allow"`), so new OpenAI or vLLM
parameters work without a gateway release. Validation reports the first bad field as OpenAI does.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from greenroute.gateway.errors import APIError, bad_request


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Open):
    include_usage: bool | None = None


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None


class _Sampling(_Open):
    model: str = Field(min_length=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1, le=128)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: int | None = None
    logit_bias: dict[str, float] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool | None = None
    suffix: str | None = None


_ADAPTERS: dict[type[_Sampling], TypeAdapter[Any]] = {
    ChatCompletionRequest: TypeAdapter(ChatCompletionRequest),
    CompletionRequest: TypeAdapter(CompletionRequest),
}


def validate(schema: type[_Sampling], body: Any) -> None:
    """Check `body` against `schema`; raise a 400 naming the first invalid field."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    try:
        _ADAPTERS[schema].validate_python(body)
    except ValidationError as exc:
        raise _first_error(exc) from None


def _first_error(exc: ValidationError) -> APIError:
    error = exc.errors(include_url=False)[0]
    param = ""
    for part in error["loc"]:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part in ("str", "list[str]", "list[int]", "list[list[int]]", "list[dict[str,any]]"):
            break  # union branch names, not fields
        else:
            param += f".{part}" if param else str(part)
    if error["type"] == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param=param,
                           code="missing_required_parameter")
    return bad_request(f"Invalid value for '{param}': {error['msg']}.", param=param,
                       code="invalid_value")
