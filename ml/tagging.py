"""Zero-shot tags: a vocabulary embedded once by CLIP's text tower, scored against image vectors.

Tagging a batch of images costs one matrix product and a softmax. Synchronous; knows nothing of HTTP
or databases.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ml.embedder import ClipEmbedder

# Everyday subjects and scenes of personal photo collections.
DEFAULT_TAGS: tuple[str, ...] = (
    "person", "group of people", "selfie", "baby", "child", "wedding", "party", "concert", "sports",
    "dog", "cat", "bird", "horse", "fish", "insect", "wild animal", "farm animal",
    "flower", "tree", "forest", "garden", "grass field", "mountain", "hill", "desert", "snow", "beach",
    "sea", "lake", "river", "waterfall", "sky", "clouds", "sunset", "night", "rain",
    "city", "street", "building", "house", "interior", "kitchen", "bedroom", "office", "church", "bridge",
    "road", "car", "bicycle", "motorcycle", "bus", "train", "airplane", "boat",
    "food", "drink", "fruit", "cake", "restaurant", "market",
    "document", "screenshot", "text", "book", "computer", "phone", "toy", "clothing", "shoes",
    "art", "painting", "drawing", "sculpture", "museum", "statue", "monument", "park", "playground",
    "christmas", "birthday", "holiday", "travel", "landscape", "portrait", "close-up",
)  # fmt: skip
PROMPT = "a photo of {}."


@dataclass(frozen=True)
class TagVocabulary:
    names: tuple[str, ...]
    vectors: np.ndarray  # (len(names), dim) unit vectors
    scale: float  # CLIP's learned logit scale (100 for the released models)
    model_name: str

    @classmethod
    def build(cls, embedder: ClipEmbedder, names: Sequence[str] = DEFAULT_TAGS) -> TagVocabulary:
        unique = tuple(dict.fromkeys(name.strip() for name in names if name.strip()))
        vectors = embedder.embed_texts([PROMPT.format(name) for name in unique])
        return cls(names=unique, vectors=vectors, scale=embedder.logit_scale, model_name=embedder.embedding_model)

    def top(self, image_vectors: np.ndarray, k: int, min_score: float = 0.0) -> list[list[tuple[str, float]]]:
        """For each image, up to k (tag, softmax share) pairs, best first, each at least min_score."""
        image_vectors = np.atleast_2d(image_vectors).astype(np.float32, copy=False)
        if not self.names or k <= 0 or len(image_vectors) == 0:
            return [[] for _ in range(len(image_vectors))]
        logits = self.scale * (image_vectors @ self.vectors.T)
        logits -= logits.max(axis=1, keepdims=True)
        shares = np.exp(logits)
        shares /= shares.sum(axis=1, keepdims=True)
        k = min(k, len(self.names))
        # Stable sort on the negated shares: ties keep vocabulary order, so results are deterministic.
        best = np.argsort(-shares, axis=1, kind="stable")[:, :k]
        return [
            [(self.names[j], round(float(row[j]), 6)) for j in order if row[j] >= min_score]
            for row, order in zip(shares, best, strict=True)
        ]
