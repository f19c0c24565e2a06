"""Re-embedding: after CLIP_MODEL_NAME changes, give every image a vector (and tags) from the current model.

Images are re-read from their stored originals in batches; each batch is committed and added to the
current model's index on its own, so search keeps answering throughout and sees more images as it goes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sqlalchemy import update
from sqlmodel import col, select

from backend.context import AppContext
from backend.errors import DomainError
from backend.models import Image, Job
from backend.services.catalog import get_images_by_ids
from backend.services.index import vector_to_blob
from backend.services.jobs import Failures, JobHandle
from backend.services.originals import original_paths
from backend.services.pipeline import PreparedImage
from backend.services.tagging import replace_tags
from ml.embedder import ClipEmbedder


async def start_reindex(ctx: AppContext, *, all_images: bool = False) -> Job:
    """Queue re-embedding of the images another model embedded (all of them with `all_images`)."""
    embedder = await ctx.clip.get()  # unavailable now when the current model cannot load

    async def run(handle: JobHandle) -> dict[str, Any]:
        return await _run(ctx, handle, all_images)

    return await ctx.jobs.submit("reindex", {"model": embedder.embedding_model, "all": all_images}, run)


async def _run(ctx: AppContext, handle: JobHandle, all_images: bool) -> dict[str, Any]:
    embedder = await ctx.clip.get()
    query = select(Image.id).order_by(col(Image.id))
    if not all_images:
        query = query.where(Image.embedding_model != embedder.embedding_model)
    async with ctx.sessions() as session:
        ids = [int(i) for i in (await session.exec(query)).all() if i is not None]
    done = 0
    failures = Failures()
    await handle.progress(0, len(ids), "re-embedding")
    for start in range(0, len(ids), ctx.settings.embed_batch_size):
        batch = ids[start : start + ctx.settings.embed_batch_size]
        updated, failed = await _reembed_batch(ctx, embedder, batch)
        done += updated
        for failure in failed:
            failures.add(**failure)
        await handle.progress(start + len(batch), len(ids), "re-embedding")
    model = embedder.embedding_model
    return {"model": model, "reembedded": done, "failed": failures.count, "failures": failures.listed}


async def reembed_images(ctx: AppContext, ids: list[int]) -> tuple[int, list[dict[str, Any]]]:
    """Give these images a vector and tags from the current model now, from their originals; (images
    re-embedded, failures with their reasons). `image-organizer check --repair` mends broken vectors so."""
    embedder = await ctx.clip.get()
    done = 0
    failures: list[dict[str, Any]] = []
    for start in range(0, len(ids), ctx.settings.embed_batch_size):
        updated, failed = await _reembed_batch(ctx, embedder, ids[start : start + ctx.settings.embed_batch_size])
        done += updated
        failures += failed
    return done, failures


async def _reembed_batch(ctx: AppContext, embedder: ClipEmbedder, batch: list[int]) -> tuple[int, list[dict[str, Any]]]:
    """Re-read, embed and tag one batch, commit it and add it to the index; (rows updated, failures)."""
    failures: list[dict[str, Any]] = []
    async with ctx.sessions() as session:
        rows = await get_images_by_ids(session, batch)
        images = [rows[i] for i in batch if i in rows]  # deleted meanwhile: nothing to do
        paths = await original_paths(ctx, session, images)
    readable: list[tuple[Image, PreparedImage]] = []
    for image, outcome in zip(images, await ctx.pipeline.prepare(paths, embedder.preprocess), strict=True):
        if isinstance(outcome, DomainError):
            failures.append({"image_id": image.id, "detail": outcome.detail})
        else:
            readable.append((image, outcome))
    vectors = await ctx.pipeline.embed(embedder, [p for _, p in readable])
    tags = await ctx.tags.tag(embedder, vectors)
    updated: list[int] = []
    async with ctx.write_lock, ctx.sessions() as session:
        for row, ((image, _), vector) in enumerate(zip(readable, vectors, strict=True)):
            assert image.id is not None
            result = await session.exec(
                update(Image)
                .where(col(Image.id) == image.id)
                .values(
                    embedding=vector_to_blob(vector),
                    embedding_dim=int(vector.shape[0]),
                    embedding_model=embedder.embedding_model,
                )
            )
            if result.rowcount:
                await replace_tags(session, image.id, tags[row])
                updated.append(row)
        await session.commit()
        if updated:
            added = np.array([readable[row][0].id for row in updated], dtype=np.int64)
            await ctx.index.add(added, vectors[updated])
    return len(updated), failures
