"""Trim OpenAI's OpenAPI spec to the schemas the gateway's `/openapi.json` refers to.

    .venv/bin/python bench/openapi_schemas.py [--spec ../shared/openai-openapi/openapi.json]

The gateway must not read the spec at run time (it is 3 MB, and not installed with it), so the
component schemas its endpoints use, and every schema they refer to, are copied verbatim into
`gateway/openapi_schemas.json`, package data read by `greenroute.gateway.openapi`, except
`default: null` on non-nullable schemas (see `_drop_null_defaults`).
tests/test_openapi.py runs `trimmed` over the spec again and checks the file is the same.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SPEC = REPO.parent / "shared/openai-openapi/openapi.json"
OUTPUT = REPO / "gateway/openapi_schemas.json"
# The operations the gateway implements, by the schemas their bodies use.
ROOTS = ("CreateChatCompletionRequest", "CreateChatCompletionResponse",
         "CreateChatCompletionStreamResponse", "CreateCompletionRequest",
         "CreateCompletionResponse", "ListModelsResponse", "Model", "ErrorResponse")
PREFIX = "#/components/schemas/"


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _drop_null_defaults(node: Any) -> int:
    """Remove `default: null` from schemas whose type does not allow null; return how many.

    The official spec has such defaults (e.g. `stream_options`), which OpenAPI validators
    refuse (a default must be valid against its schema). In OpenAPI 3.1 `default` is only an
    annotation, so dropping it changes no request or response the schemas accept."""
    dropped = 0
    if isinstance(node, dict):
        kind = node.get("type")
        allows_null = kind is None or kind == "null" or (isinstance(kind, list) and "null" in kind)
        if "default" in node and node["default"] is None and not allows_null:
            del node["default"]
            dropped += 1
        dropped += sum(_drop_null_defaults(value) for value in node.values())
    elif isinstance(node, list):
        dropped += sum(_drop_null_defaults(value) for value in node)
    return dropped


def trimmed(spec_bytes: bytes) -> dict[str, Any]:
    """The schemas reachable from ROOTS, sorted by name, with where they came from."""
    spec = json.loads(spec_bytes)
    schemas = spec["components"]["schemas"]
    kept: dict[str, Any] = {}
    todo = list(ROOTS)
    while todo:
        name = todo.pop()
        if name in kept:
            continue
        kept[name] = schemas[name]
        for ref in _refs(schemas[name]):
            if not ref.startswith(PREFIX):
                raise ValueError(f"{name} refers outside the component schemas: {ref}")
            todo.append(ref[len(PREFIX):])
    dropped = _drop_null_defaults(kept)
    return {"source": {"title": spec["info"]["title"], "version": spec["info"]["version"],
                       "sha256": hashlib.sha256(spec_bytes).hexdigest(),
                       "null_defaults_dropped": dropped},
            "schemas": dict(sorted(kept.items()))}


def render(spec_bytes: bytes) -> str:
    return json.dumps(trimmed(spec_bytes), indent=1, ensure_ascii=False) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=SPEC)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    text = render(args.spec.read_bytes())
    args.output.write_text(text)
    print(f"{args.output}: {len(json.loads(text)['schemas'])} schemas, {len(text)} bytes")


if __name__ == "__main__":
    main()
