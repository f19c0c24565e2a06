"""Zero-shot tag scoring: shares of a softmax over the vocabulary, best first."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ml.embedder import ClipEmbedder
from ml.tagging import DEFAULT_TAGS, TagVocabulary


@pytest.fixture(scope="module")
def vocabulary(tiny_clip_dir: Path) -> TagVocabulary:
    return TagVocabulary.build(ClipEmbedder.load(str(tiny_clip_dir), "cpu"), ["dog", "cat", "beach", "dog ", ""])


def test_vocabulary_is_embedded_once_per_unique_name(vocabulary: TagVocabulary) -> None:
    assert vocabulary.names == ("dog", "cat", "beach")
    assert vocabulary.vectors.shape == (3, 16)
    assert np.allclose(np.linalg.norm(vocabulary.vectors, axis=1), 1.0, atol=1e-5)


def test_top_tags_are_ordered_shares(vocabulary: TagVocabulary) -> None:
    rng = np.random.default_rng(0)
    images = rng.normal(size=(5, 16)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    every = vocabulary.top(images, k=3)
    for row in every:
        assert [name for name, _ in row] != [] and len(row) == 3
        scores = [score for _, score in row]
        assert scores == sorted(scores, reverse=True)
        assert sum(scores) == pytest.approx(1.0, abs=1e-4)
    assert vocabulary.top(images, k=1) == [row[:1] for row in every]
    assert vocabulary.top(images, k=10) == every  # bounded by the vocabulary
    assert vocabulary.top(images, k=3, min_score=1.01) == [[] for _ in range(5)]
    assert vocabulary.top(images, k=0) == [[] for _ in range(5)]
    assert vocabulary.top(np.empty((0, 16), dtype=np.float32), k=3) == []


def test_the_vector_closest_to_a_tag_gets_it_first(vocabulary: TagVocabulary) -> None:
    # An image vector equal to a tag's text vector scores that tag highest (cosine 1 beats every other).
    assert [row[0][0] for row in vocabulary.top(vocabulary.vectors, k=1)] == list(vocabulary.names)


def test_default_vocabulary_has_no_repeats() -> None:
    assert len(DEFAULT_TAGS) == len(set(DEFAULT_TAGS)) >= 50
