"""A reader for the metadata header of a GGUF file, enough to check what a weights file is.

Only the key/value header is read (tensors are never touched), so checking a 1 GB file costs
milliseconds. Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

MAGIC = b"GGUF"

# GGUF value types -> struct format of one scalar.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GGUFError(ValueError):
    """The file is not a readable GGUF file."""


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    tensor_count: int
    metadata: dict[str, Any]

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    @property
    def name(self) -> str | None:
        return self.metadata.get("general.name")

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")


def read_header(path: Path) -> GGUFHeader:
    """Read the GGUF header; arrays (the vocabulary) are skipped, their lengths kept."""
    with path.open("rb") as f:
        if f.read(4) != MAGIC:
            raise GGUFError(f"{path}: not a GGUF file (bad magic)")
        version = _unpack(f, "<I")
        if version < 2:
            raise GGUFError(f"{path}: GGUF version {version} is not supported")
        tensor_count = _unpack(f, "<Q")
        kv_count = _unpack(f, "<Q")
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = _read_string(f)
            metadata[key] = _read_value(f, _unpack(f, "<I"))
        return GGUFHeader(version, tensor_count, metadata)


def _unpack(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    raw = f.read(size)
    if len(raw) != size:
        raise GGUFError("truncated GGUF header")
    return struct.unpack(fmt, raw)[0]


def _read_string(f: BinaryIO) -> str:
    length = _unpack(f, "<Q")
    raw = f.read(length)
    if len(raw) != length:
        raise GGUFError("truncated GGUF string")
    return raw.decode("utf-8", errors="replace")


def _read_value(f: BinaryIO, kind: int) -> Any:
    if kind in _SCALARS:
        return _unpack(f, _SCALARS[kind])
    if kind == _STRING:
        return _read_string(f)
    if kind == _ARRAY:
        item_kind = _unpack(f, "<I")
        count = _unpack(f, "<Q")
        if item_kind in _SCALARS:
            f.seek(struct.calcsize(_SCALARS[item_kind]) * count, 1)
        else:
            for _ in range(count):
                _read_value(f, item_kind)
        return {"array_of": item_kind, "length": count}
    raise GGUFError(f"unknown GGUF value type {kind}")
