"""Re-embedding: after CLIP_MODEL_NAME changes, give every image a vector (and tags) from the current model.

Images are re-read from their stored originals in batches; each batch is committed and added to the
current model's index on its own, so search keeps answering throughout and sees more images as it goes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from sqlalchemy import update
from sqlmodel import col, select

from backend.context import AppContext
from backend.errors import AppError
from backend.models import Image, Job
from backend.services.catalog import get_images_by_ids
from backend.services.ingest import PreparedImage, embed_prepared, prepare_image
from backend.services.jobs import JobHandle
from backend.services.tagging import replace_tags
from backend.services.vectors import vector_to_blob

MAX_LISTED_FAILURES = 1000


async def start_reindex(ctx: AppContext, *, all_images: bool) -> Job:
    embedder = await ctx.models.get()  # 503 now when the current model cannot load

    async def run(handle: JobHandle) -> dict[str, Any]:
        return await _run(ctx, handle, all_images)

    return await ctx.jobs.submit("reindex", {"model": embedder.model_name, "all": all_images}, run)


async def _run(ctx: AppContext, handle: JobHandle, all_images: bool) -> dict[str, Any]:
    embedder = await ctx.models.get()
    query = select(Image.id).order_by(col(Image.id))
    if not all_images:
        query = query.where(Image.embedding_model != embedder.model_name)
    async with ctx.sessions() as session:
        ids = [int(i) for i in (await session.exec(query)).all() if i is not None]
    done = 0
    failures: list[dict[str, Any]] = []
    await handle.progress(0, len(ids), "re-embedding")
    for start in range(0, len(ids), ctx.settings.embed_batch_size):
        batch = ids[start : start + ctx.settings.embed_batch_size]
        async with ctx.sessions() as session:
            rows = await get_images_by_ids(session=session, ids=batch)
        images = [rows[i] for i in batch if i in rows]  # deleted meanwhile: nothing to do
        prepared = await asyncio.gather(
            *(
                ctx.executor.run(
                    prepare_image,
                    ctx.store.path(image.storage_key),
                    max_pixels=ctx.settings.max_image_pixels,
                    thumbnail_size=None,
                    embedder=embedder,
                )
                for image in images
            ),
            return_exceptions=True,
        )
        readable: list[tuple[Image, PreparedImage]] = []
        for image, outcome in zip(images, prepared, strict=True):
            if isinstance(outcome, PreparedImage):
                readable.append((image, outcome))
            else:
                detail = outcome.detail if isinstance(outcome, AppError) else f"{type(outcome).__name__}: {outcome}"
                failures.append({"image_id": image.id, "detail": detail})
        async with ctx.bulk_forward:
            vectors = await ctx.executor.run(embed_prepared, embedder, [p.pixels for _, p in readable])
        tags = await ctx.tags.tag(embedder, vectors)
        updated: list[int] = []
        async with ctx.write_lock, ctx.sessions() as session:
            for row, ((image, _), vector) in enumerate(zip(readable, vectors, strict=True)):
                assert image.id is not None
                result = await session.exec(
                    update(Image)  # type: ignore[call-overload]
                    .where(col(Image.id) == image.id)
                    .values(
                        embedding=vector_to_blob(vector),
                        embedding_dim=int(vector.shape[0]),
                        embedding_model=embedder.model_name,
                    )
                )
                if result.rowcount:
                    await replace_tags(session, image.id, tags[row])
                    updated.append(row)
            await session.commit()
            if updated:
                await ctx.vectors.add(
                    np.array([readable[row][0].id for row in updated], dtype=np.int64), vectors[updated]
                )
        done += len(updated)
        await handle.progress(start + len(batch), len(ids), "re-embedding")
    return {
        "model": embedder.model_name,
        "reembedded": done,
        "failed": len(failures),
        "failures": failures[:MAX_LISTED_FAILURES],
    }
