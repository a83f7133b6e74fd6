"""The real encoders: all-MiniLM-L6-v2 from its PyPI package (offline, on torch), and a static
encoder distilled from it, which must keep MiniLM's sense of which prompts are alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from greenroute.routers.encoders import (
    EmbeddingCache,
    SentenceTransformerEncoder,
    StaticEncoder,
    distill,
)
from greenroute.routers.routing_text import routing_text

TOPICS = {
    "math": ["What is 17 times 23?", "Solve for x: 2x + 6 = 14.",
             "Compute the derivative of x squared plus three x.",
             "How much is a quarter of 360?", "Add 1,250 and 3,470."],
    "cooking": ["How long should I boil an egg for a runny yolk?",
                "What can I use instead of butter when baking a cake?",
                "How do I make a simple tomato pasta sauce?",
                "What temperature should I roast a chicken at?",
                "Give me a recipe for pancakes."],
    "code": ["How do I reverse a list in Python?", "Write a SQL query that counts rows per day.",
             "What does git rebase do?", "Explain a segmentation fault in C.",
             "How do I read a JSON file in JavaScript?"],
}


@pytest.fixture(scope="module")
def minilm() -> SentenceTransformerEncoder:
    return SentenceTransformerEncoder()


def _separation(rows: np.ndarray, labels: list[str]) -> float:
    """Mean cosine similarity within a topic minus across topics."""
    similarity = rows @ rows.T
    same = np.equal.outer(labels, labels)
    off_diagonal = ~np.eye(len(labels), dtype=bool)
    return float(similarity[same & off_diagonal].mean() - similarity[~same].mean())


def _pairs(rows: np.ndarray) -> np.ndarray:
    return (rows @ rows.T)[np.triu_indices(len(rows), k=1)]


def test_minilm_loads_offline_from_pypi_and_distills_a_static_encoder(
        minilm: SentenceTransformerEncoder, tmp_path: Path) -> None:
    texts = [t for group in TOPICS.values() for t in group]
    labels = [name for name, group in TOPICS.items() for _ in group]
    full = minilm.encode(texts)
    assert full.shape == (15, 384) and minilm.dim == 384
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1.0, atol=1e-5)
    assert _separation(full, labels) > 0.1

    static = distill(minilm, tmp_path / "static", dims=64)
    fast = static.encode(texts)
    assert fast.shape == (15, 64)
    assert _separation(fast, labels) > 0.05  # the distilled table keeps the topics apart
    assert np.corrcoef(_pairs(full), _pairs(fast))[0, 1] > 0.3  # and MiniLM's sense of alike
    again = StaticEncoder(tmp_path / "static")
    assert again.fingerprint == static.fingerprint
    np.testing.assert_array_equal(again.encode(texts), fast)
    assert static.encode([""]).shape == (1, 64)  # an empty prompt is a zero vector, not a crash


def test_embedding_cache_returns_what_the_encoder_gave(minilm: SentenceTransformerEncoder,
                                                      tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path)
    texts = ["one prompt", "another prompt", "one prompt"]
    first = cache.encode(minilm, texts)
    np.testing.assert_allclose(first, minilm.encode(texts), atol=1e-6)
    np.testing.assert_array_equal(cache.encode(minilm, texts[::-1]), first[::-1])
    assert len(list(tmp_path.iterdir())) == 1


def test_routing_text_is_the_last_user_turn_with_bounded_context() -> None:
    body = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Name a French painter."},
                         {"role": "assistant", "content": "Claude Monet."},
                         {"role": "user",
                          "content": [{"type": "text", "text": "And a Dutch one?"}]}]}
    text = routing_text(body)
    assert text.endswith("And a Dutch one?") and "assistant: Claude Monet." in text
    long = {"messages": [{"role": "user", "content": "x" * 5000},
                         {"role": "assistant", "content": "y" * 5000},
                         {"role": "user", "content": "the question"}]}
    assert len(routing_text(long)) <= 600 + len("the question") + 1
    assert routing_text({"prompt": ["The sky is"]}) == "The sky is"
