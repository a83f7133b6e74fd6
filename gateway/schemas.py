"""The OpenAI request bodies the gateway accepts, validated with pydantic.

Only the fields whose shape the gateway or a backend relies on are declared; every other field
is allowed and passes through to the backend unchanged (`extra="allow"`), so new OpenAI or vLLM
parameters work without a gateway release. Validation reports the first bad field as OpenAI does,
and writes the validated value of each declared option back into the body, so that the gateway
and the backends read what was validated (`"stream": "false"` is False), not the raw JSON.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from greenroute.gateway.errors import APIError, bad_request


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Open):
    include_usage: bool | None = None


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _text_parts_have_text(cls, content: Any) -> Any:
        """A text part's `text` is a string: the router and the backends join them (any other
        part passes through, for the backend to take or refuse)."""
        if isinstance(content, list):
            for part in content:
                if part.get("type") == "text" and not isinstance(part.get("text"), str):
                    raise ValueError("a content part of type 'text' needs a string 'text'")
        return content


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


# What a null prompt means (OpenAI's spec: nullable, "<|endoftext|>" by default, so that the
# model generates as if from the beginning of a new document).
DEFAULT_PROMPT = "<|endoftext|>"

# Deeper bodies are refused as they are parsed. orjson reads 1,024 levels but writes 254, so a
# body between the two could not be forwarded; no OpenAI request needs more than a handful.
MAX_DEPTH = 64

# Left as they came: the conversation or prompt itself (can be large, and is never coerced).
_AS_SENT = frozenset({"model", "messages", "prompt"})


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] | None  # required, but nullable
    max_tokens: int | None = Field(default=None, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool | None = None
    suffix: str | None = None


_ADAPTERS: dict[type[_Sampling], TypeAdapter[Any]] = {
    ChatCompletionRequest: TypeAdapter(ChatCompletionRequest),
    CompletionRequest: TypeAdapter(CompletionRequest),
}
# The declared options of each schema, whose validated values replace the raw ones.
_OPTIONS = {schema: tuple(sorted(schema.model_fields.keys() - _AS_SENT)) for schema in _ADAPTERS}


def parse_body(raw: bytes) -> Any:
    """The JSON body, parsed; a 400 if it is not JSON or is nested deeper than MAX_DEPTH."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise bad_request("We could not parse the JSON body of your request. The body must be "
                          "valid JSON.", code="invalid_json") from None
    if _brackets_exceed(raw, MAX_DEPTH) and _deeper_than(body, MAX_DEPTH):
        raise bad_request(f"The JSON body of your request is nested deeper than {MAX_DEPTH} "
                          "levels.", code="invalid_json")
    return body


def _brackets_exceed(raw: bytes, limit: int) -> bool:
    """Whether `raw` has more than `limit` opening brackets, which a body nested deeper than
    `limit` needs: at most `limit` + 1 memchr-fast finds, so most bodies skip the walk (a
    20 kB chat body: about 3 us, where counting every bracket takes 15)."""
    found = 0
    for bracket in (b"[", b"{"):
        at = raw.find(bracket)
        while at != -1:
            found += 1
            if found > limit:
                return True
            at = raw.find(bracket, at + 1)
    return False


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether `value` nests objects and arrays more than `limit` levels (a walk with its own
    stack, not recursion: about 0.2 us per object or array)."""
    stack = [(value, 1)] if type(value) in (dict, list) else []
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        for child in (item.values() if type(item) is dict else item):
            kind = type(child)
            if kind is dict or kind is list:
                stack.append((child, depth + 1))
    return False


def validate(schema: type[_Sampling], body: Any) -> None:
    """Check `body` against `schema`; raise a 400 naming the first invalid field. Then put the
    validated value of every declared option the body sets back into it (a null prompt
    becomes DEFAULT_PROMPT)."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    try:
        request = _ADAPTERS[schema].validate_python(body)
    except ValidationError as exc:
        raise _first_error(exc) from None
    for name in _OPTIONS[schema]:
        if name in body:
            value = getattr(request, name)
            body[name] = value.model_dump(exclude_unset=True) if isinstance(value, BaseModel) \
                else value
    if "prompt" in body and body["prompt"] is None:
        body["prompt"] = DEFAULT_PROMPT


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
