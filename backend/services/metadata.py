"""The metadata job: read date, place and camera again from the stored originals' EXIF.

Images stored before these columns existed have none of them; this job fills them in (and mends any that a
later reader would read better). Only the EXIF block is read, never the pixels, in the executor, a batch at
a time; a file that cannot be read is a failure with its reason, the rest go on.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import update
from sqlmodel import col, select

from backend.context import AppContext
from backend.models import Image, Job
from backend.services.catalog import get_images_by_ids
from backend.services.jobs import Failures, JobCancelled, JobHandle
from backend.services.originals import original_paths
from backend.services.photo_metadata import PhotoMetadata, read_file_metadata

BATCH = 200


async def start_metadata(ctx: AppContext, *, missing_only: bool = True) -> Job:
    """Queue reading EXIF metadata again: of images without any (default), or of all of them."""

    async def run(handle: JobHandle) -> dict[str, Any]:
        return await _run(ctx, handle, missing_only)

    return await ctx.jobs.submit("metadata", {"missing_only": missing_only}, run)


async def _run(ctx: AppContext, handle: JobHandle, missing_only: bool) -> dict[str, Any]:
    query = select(Image.id).order_by(col(Image.id))
    if missing_only:
        query = query.where(
            col(Image.taken_at).is_(None), col(Image.latitude).is_(None), col(Image.camera_model).is_(None)
        )
    async with ctx.sessions() as session:
        ids = [int(i) for i in (await session.exec(query)).all() if i is not None]
    failures = Failures()
    found = 0
    await handle.progress(0, len(ids), "reading EXIF")
    for start in range(0, len(ids), BATCH):
        batch = ids[start : start + BATCH]
        async with ctx.sessions() as session:
            rows = await get_images_by_ids(session, batch)
            where = dict(zip(rows, await original_paths(ctx, session, list(rows.values())), strict=True))
        read: list[tuple[int, PhotoMetadata]] = []
        for image_id in batch:
            image = rows.get(image_id)
            if image is None:  # deleted meanwhile
                continue
            try:
                metadata = await handle.unless_cancelled(ctx.executor.run(read_file_metadata, str(where[image_id])))
            except JobCancelled:
                raise
            except OSError as exc:
                failures.add(image_id=image_id, detail=f"the stored original cannot be read: {exc.strerror or exc}")
                continue
            except Exception as exc:  # a file Pillow no longer opens: that image fails, not the job
                failures.add(image_id=image_id, detail=f"the stored original cannot be read: {exc}"[:200])
                continue
            read.append((image_id, metadata))
        async with ctx.write_lock, ctx.sessions() as session:
            for image_id, metadata in read:
                await session.exec(update(Image).where(col(Image.id) == image_id).values(**metadata.columns()))
            await session.commit()
        found += sum(metadata != PhotoMetadata() for _, metadata in read)
        await handle.progress(start + len(batch), len(ids), "reading EXIF")
    return {
        "read": len(ids) - failures.count,
        "with_metadata": found,
        "failed": failures.count,
        "failures": failures.listed,
    }
