"""Text -> image and image -> image search over the FAISS index, answered with database records."""

from __future__ import annotations

import numpy as np
from sqlmodel.ext.asyncio.session import AsyncSession

from backend.context import AppContext
from backend.errors import AppError
from backend.models import SearchHit, SearchResults
from backend.services.catalog import get_image, get_images_by_ids, to_public
from backend.services.tagging import load_tags
from backend.services.vectors import blob_to_vector


async def search_text(*, ctx: AppContext, session: AsyncSession, query: str, top_k: int) -> SearchResults:
    embedder = await ctx.models.get()
    vectors = await ctx.executor.run_query(embedder.embed_texts, [query])
    hits = await _hits(ctx, session, vectors[0], top_k)
    return SearchResults(query=query, count=len(hits), results=hits)


async def search_similar(*, ctx: AppContext, session: AsyncSession, image_id: int, top_k: int) -> SearchResults:
    """Neighbours of a stored image's own vector; the image itself is left out."""
    image = await get_image(session=session, image_id=image_id)
    if image.embedding_model != ctx.settings.clip_model_name:
        raise AppError(
            f"image {image_id} was embedded by {image.embedding_model!r}, not by the current model "
            f"{ctx.settings.clip_model_name!r}",
            code="stale_embedding",
            status_code=409,
        )
    hits = await _hits(ctx, session, blob_to_vector(image.embedding), top_k + 1)
    hits = [hit for hit in hits if hit.image.id != image_id][:top_k]
    return SearchResults(image_id=image_id, count=len(hits), results=hits)


async def search_by_vector(*, ctx: AppContext, session: AsyncSession, vector: np.ndarray, top_k: int) -> SearchResults:
    hits = await _hits(ctx, session, vector, top_k)
    return SearchResults(count=len(hits), results=hits)


async def _hits(ctx: AppContext, session: AsyncSession, vector: np.ndarray, top_k: int) -> list[SearchHit]:
    ranked = (await ctx.vectors.search(vector[np.newaxis, :], top_k))[0]
    ids = [image_id for image_id, _ in ranked]
    records = await get_images_by_ids(session=session, ids=ids)
    tags = await load_tags(session, ids)
    # An id deleted between the index lookup and the row fetch is simply left out.
    return [
        SearchHit(image=to_public(records[image_id], tags.get(image_id)), score=score)
        for image_id, score in ranked
        if image_id in records
    ]
