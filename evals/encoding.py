"""Which encoder `greenroute train` and `greenroute eval` embed prompts with, and the cache that
keeps those embeddings between runs (embedding a 14k-prompt table with MiniLM takes minutes)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from greenroute.routers.encoders import (
    DEFAULT_MODEL,
    EmbeddingCache,
    Encoder,
    SentenceTransformerEncoder,
    StaticEncoder,
    distill,
)

ENCODER_HELP = ("static (the default: distilled from all-MiniLM-L6-v2, fast), minilm "
                "(all-MiniLM-L6-v2 through sentence-transformers), a static encoder directory, "
                "or a sentence-transformers name or path")

Embed = Callable[[Sequence[str]], np.ndarray]


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "greenroute"


def build_encoder(choice: str) -> Encoder:
    """The encoder named on the command line."""
    if choice == "static":
        directory = cache_root() / "encoders" / "static-all-MiniLM-L6-v2-256"
        if (directory / "encoder.json").exists():
            return StaticEncoder(directory)
        print(f"distilling a static encoder from {DEFAULT_MODEL} into {directory} (once)",
              file=sys.stderr)
        return distill(SentenceTransformerEncoder(DEFAULT_MODEL), directory)
    if choice == "minilm":
        return SentenceTransformerEncoder(DEFAULT_MODEL)
    if (Path(choice) / "encoder.json").exists():
        return StaticEncoder(choice)
    return SentenceTransformerEncoder(choice)


def embedder(encoder: Encoder) -> Embed:
    """`encoder` behind the embedding cache."""
    cache = EmbeddingCache(cache_root() / "embeddings")
    return lambda texts: cache.encode(encoder, list(texts))
