"""Text -> image and image -> image search over the collection's index, answered with its records."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
from sqlmodel import select

from backend.context import AppContext
from backend.errors import DomainError, StaleEmbedding
from backend.models import Image, SearchHit, SearchResults
from backend.services.catalog import canonical_filter, get_images_by_ids, image_public, image_vector, load_image
from backend.services.filters import ImageFilter, ImageSort, sort_images
from backend.services.storage import Receive
from backend.services.tagging import load_tags

# Recent queries' vectors, per model key: a repeated query (paging, a refreshed page) skips the text tower.
QUERY_CACHE_SIZE = 256
_query_vectors: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()


async def query_vector(ctx: AppContext, query: str) -> np.ndarray:
    """The text tower's vector for `query`, from the cache of recent queries when it is there."""
    embedder = await ctx.clip.get()
    key = (embedder.embedding_model, query)
    cached = _query_vectors.get(key)
    if cached is not None:
        _query_vectors.move_to_end(key)
        return cached
    vector: np.ndarray = (await ctx.executor.run_query(embedder.embed_texts, [query]))[0]
    vector.setflags(write=False)
    _query_vectors[key] = vector
    while len(_query_vectors) > QUERY_CACHE_SIZE:
        _query_vectors.popitem(last=False)
    return vector


@dataclass(frozen=True)
class Narrowing:
    """What a search keeps besides the score: the images the filter allows (chosen before the top k is
    taken), a minimum score, and the order the top k are shown in (by score unless `sort` says a date)."""

    image_filter: ImageFilter = field(default_factory=ImageFilter)
    min_score: float | None = None
    sort: ImageSort | None = None


async def search_text(ctx: AppContext, query: str, *, top_k: int, narrowing: Narrowing | None = None) -> SearchResults:
    """The images whose CLIP vectors lie closest to the sentence's, best first."""
    hits = await _hits(ctx, await query_vector(ctx, query), top_k, narrowing or Narrowing())
    return SearchResults(query=query, count=len(hits), results=hits)


async def search_similar(
    ctx: AppContext, image_id: int, *, top_k: int, narrowing: Narrowing | None = None
) -> SearchResults:
    """Neighbours of a stored image's own vector; the image itself is left out."""
    async with ctx.sessions() as session:
        image = await load_image(session, image_id)
    if image.embedding_model != ctx.settings.embedding_model:
        raise StaleEmbedding(
            f"image {image_id} was embedded by {image.embedding_model!r}, not by the current model "
            f"{ctx.settings.embedding_model!r}"
        )
    hits = await _hits(ctx, image_vector(image), top_k, narrowing or Narrowing(), exclude=image_id)
    return SearchResults(image_id=image_id, count=len(hits), results=hits)


async def search_by_upload(
    ctx: AppContext, receive: Receive, *, top_k: int, narrowing: Narrowing | None = None
) -> SearchResults:
    """Images that look like a query image received with the request; it is embedded, then discarded.
    The CLIP model is checked before the body is read."""
    embedder = await ctx.clip.get()
    async with receive() as received:
        query = received[0]
        if query.error is not None:
            raise query.error
        assert query.staged is not None
        (prepared,) = await ctx.pipeline.prepare([query.staged.path], embedder.preprocess, query=True)
        if isinstance(prepared, DomainError):
            raise prepared
        vector = (await ctx.pipeline.embed(embedder, [prepared], query=True))[0]
    hits = await _hits(ctx, vector, top_k, narrowing or Narrowing())
    return SearchResults(count=len(hits), results=hits)


async def _allowed(ctx: AppContext, image_filter: ImageFilter, exclude: int | None) -> np.ndarray | None:
    """The current model's image ids the filter keeps, or None when it keeps everything."""
    if not image_filter.active:
        return None  # the index holds exactly the current model's images outside the trash
    query = select(Image.id).where(image_filter.where(), Image.embedding_model == ctx.settings.embedding_model)
    if exclude is not None:
        query = query.where(Image.id != exclude)
    async with ctx.sessions() as session:
        ids = (await session.exec(query)).all()
    return np.fromiter((int(i) for i in ids if i is not None), dtype=np.int64)


async def _hits(
    ctx: AppContext, vector: np.ndarray, top_k: int, narrowing: Narrowing, *, exclude: int | None = None
) -> list[SearchHit]:
    allowed = await _allowed(ctx, canonical_filter(ctx, narrowing.image_filter), exclude)
    wanted = top_k + 1 if exclude is not None and allowed is None else top_k
    ranked = (await ctx.index.search(vector[np.newaxis, :], wanted, allowed))[0]
    ranked = [(image_id, score) for image_id, score in ranked if image_id != exclude][:top_k]
    if narrowing.min_score is not None:
        ranked = [(image_id, score) for image_id, score in ranked if score >= narrowing.min_score]
    ids = [image_id for image_id, _ in ranked]
    async with ctx.sessions() as session:
        records = await get_images_by_ids(session, ids)
        tags = await load_tags(session, ids)
    # An id deleted between the index lookup and the row fetch is simply left out.
    found = [(records[image_id], score) for image_id, score in ranked if image_id in records]
    if narrowing.sort is not None:
        found = sort_images(found, narrowing.sort)
    return [SearchHit(image=image_public(image, tags.get(image.id or 0)), score=score) for image, score in found]
