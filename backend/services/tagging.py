"""Zero-shot tags for images: the vocabulary is embedded once per CLIP model, then tagging is a matrix product."""

from __future__ import annotations

import asyncio

import numpy as np
from sqlalchemy import delete
from sqlmodel import col, func, select
from sqlmodel.ext.asyncio.session import AsyncSession

from backend.executor import Executor
from backend.models import Image, ImageTag, TagCount, TagScore, TagsPublic
from backend.services.filters import in_collection
from ml.embedder import ClipEmbedder
from ml.tagging import DEFAULT_TAGS, TagVocabulary

Tags = list[tuple[str, float]]


class TagService:
    def __init__(self, *, names: list[str], per_image: int, min_score: float, executor: Executor) -> None:
        self.names = tuple(names) or DEFAULT_TAGS
        self.per_image = per_image
        self.min_score = min_score
        self._executor = executor
        self._vocabulary: TagVocabulary | None = None
        self._lock = asyncio.Lock()

    async def vocabulary(self, embedder: ClipEmbedder) -> TagVocabulary:
        async with self._lock:
            if self._vocabulary is None or self._vocabulary.model_name != embedder.embedding_model:
                self._vocabulary = await self._executor.run(TagVocabulary.build, embedder, self.names)
            return self._vocabulary

    def canonical(self, name: str) -> str:
        """The vocabulary's spelling of a tag asked for in any letter case (unknown names stay as given)."""
        folded = name.strip().casefold()
        return next((known for known in self.names if known.casefold() == folded), name)

    async def tag(self, embedder: ClipEmbedder, vectors: np.ndarray) -> list[Tags]:
        if self.per_image == 0 or len(vectors) == 0:
            return [[] for _ in range(len(vectors))]
        vocabulary = await self.vocabulary(embedder)
        return await self._executor.run(vocabulary.top, vectors, self.per_image, self.min_score)


def tag_rows(image_id: int, tags: Tags) -> list[ImageTag]:
    return [ImageTag(image_id=image_id, tag=name, score=score) for name, score in tags]


async def replace_tags(session: AsyncSession, image_id: int, tags: Tags) -> None:
    """Swap an image's tags inside the caller's transaction."""
    await session.exec(delete(ImageTag).where(col(ImageTag.image_id) == image_id))
    session.add_all(tag_rows(image_id, tags))


async def tag_counts(session: AsyncSession, names: tuple[str, ...]) -> TagsPublic:
    """Every vocabulary tag with how many images carry it, plus tags stored under an earlier vocabulary."""
    stored = dict(
        (
            await session.exec(
                select(ImageTag.tag, func.count())
                .join(Image, col(Image.id) == ImageTag.image_id)
                .where(in_collection())
                .group_by(col(ImageTag.tag))
            )
        ).all()
    )
    counts = dict.fromkeys(names, 0) | stored
    data = [TagCount(tag=tag, count=count) for tag, count in counts.items()]
    data.sort(key=lambda item: -item.count)  # stable: vocabulary order among equals
    return TagsPublic(data=data, vocabulary_size=len(names))


async def load_tags(session: AsyncSession, ids: list[int]) -> dict[int, list[TagScore]]:
    """Tags of many images in one query, best first."""
    found: dict[int, list[TagScore]] = {}
    if not ids:
        return found
    rows = (
        await session.exec(
            select(ImageTag)
            .where(col(ImageTag.image_id).in_(ids))
            .order_by(col(ImageTag.image_id), col(ImageTag.score).desc(), col(ImageTag.tag))
        )
    ).all()
    for row in rows:
        found.setdefault(row.image_id, []).append(TagScore(tag=row.tag, score=row.score))
    return found
