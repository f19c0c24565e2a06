"""The trash: where every delete goes first.

A trashed image keeps its row, its vector and its files; `trashed_at` takes it out of every listing,
search, cluster, map and export (`filters.in_collection`) and its vector out of the search index. Restoring
clears the date and puts the vector back. After `TRASH_DAYS` (or on `DELETE /trash`) it is purged: the row,
the vector and the files the service stored go for good. A library image's original is never touched: the
trash only hides its record, and purging forgets it and remembers its bytes (`library_dismissed`) so that
the next scan of that library does not index the same file again.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta

import numpy as np
from sqlalchemy import func, update
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from backend.context import AppContext
from backend.errors import NotInTrash
from backend.models import DismissedFile, Image, LibraryFile, TrashedImage, TrashPublic, utcnow
from backend.services.catalog import forget_images, load_image, publish
from backend.services.index import stored_vector

log = logging.getLogger(__name__)

PURGE_EVERY_SECONDS = 3600.0
PURGE_BATCH = 500


async def trash_images(ctx: AppContext, session: AsyncSession, images: list[Image]) -> list[int]:
    """Move these rows to the trash and commit; their vectors leave the index. Called under the write lock.
    The ids that were moved (those in the trash already stay as they are)."""
    ids = [image.id for image in images if image.trashed_at is None and image.id is not None]
    if not ids:
        return []
    await session.exec(update(Image).where(col(Image.id).in_(ids)).values(trashed_at=utcnow()))
    await session.commit()
    await ctx.index.remove(np.array(ids, dtype=np.int64))
    return ids


async def trash_image(ctx: AppContext, image_id: int) -> None:
    """DELETE /images/{id}: into the trash (ImageNotFound when there is no such image)."""
    async with ctx.write_lock, ctx.sessions() as session:
        await trash_images(ctx, session, [await load_image(session, image_id)])


async def revive(ctx: AppContext, session: AsyncSession, images: list[Image]) -> list[tuple[int, np.ndarray]]:
    """Take these rows out of the trash and commit; the current model's vectors go back into the index.
    Called under the write lock. The (id, vector) pairs put back, for duplicates.link_new once the lock is
    released: an image that arrived while these lay in the trash was never paired with them."""
    back = [image for image in images if image.trashed_at is not None and image.id is not None]
    if not back:
        return []
    ids = [int(image.id) for image in back if image.id is not None]
    await session.exec(update(Image).where(col(Image.id).in_(ids)).values(trashed_at=None))
    await session.commit()
    searchable: list[tuple[int, np.ndarray]] = []
    for image in back:
        vector = stored_vector(image.embedding, image.embedding_dim)
        if image.embedding_model == ctx.settings.embedding_model and vector is not None and image.id is not None:
            searchable.append((image.id, vector))
        image.trashed_at = None
    if searchable:
        await ctx.index.add(np.array([i for i, _ in searchable], dtype=np.int64), np.stack([v for _, v in searchable]))
    return searchable


async def restore_image(ctx: AppContext, image_id: int) -> TrashedImage:
    """POST /trash/{id}/restore: back in every listing and search. NotInTrash when it is not there."""
    from backend.services.duplicates import link_new  # duplicates trashes through this module

    async with ctx.write_lock, ctx.sessions() as session:
        image = await load_image(session, image_id)
        if image.trashed_at is None:
            raise NotInTrash(f"image {image_id} is not in the trash")
        back = await revive(ctx, session, [image])
        (restored,) = await _publish_trashed(ctx, session, [image])
    if back:
        await link_new(ctx, [i for i, _ in back], np.stack([v for _, v in back]))
    return restored


def purge_date(ctx: AppContext, trashed_at: datetime | None) -> datetime | None:
    if trashed_at is None or ctx.settings.trash_days <= 0:
        return None
    return trashed_at + timedelta(days=ctx.settings.trash_days)


async def _publish_trashed(ctx: AppContext, session: AsyncSession, images: list[Image]) -> list[TrashedImage]:
    """The public records (catalog.publish), each with the date it is purged."""
    return [
        TrashedImage.model_validate({**public.model_dump(), "purge_at": purge_date(ctx, image.trashed_at)})
        for image, public in zip(images, await publish(session, images), strict=True)
    ]


async def list_trash(ctx: AppContext, *, offset: int = 0, limit: int = 50) -> TrashPublic:
    """GET /trash: the most recently trashed first, each with the date it is purged."""
    trashed = col(Image.trashed_at).is_not(None)
    async with ctx.sessions() as session:
        count = (await session.exec(select(func.count()).select_from(Image).where(trashed))).one()
        rows = list(
            (
                await session.exec(
                    select(Image)
                    .where(trashed)
                    .order_by(col(Image.trashed_at).desc(), col(Image.id).desc())
                    .offset(offset)
                    .limit(limit)
                )
            ).all()
        )
        data = await _publish_trashed(ctx, session, rows)
    return TrashPublic(data=data, count=count, offset=offset, limit=limit)


async def purge_images(ctx: AppContext, session: AsyncSession, images: list[Image]) -> int:
    """Delete these rows for good and commit. A library image's bytes are remembered for each library
    that holds them, so its scans skip that file; the file itself stays. Called under the write lock."""
    if not images:
        return 0
    ids = [image.id for image in images if image.id is not None]
    places = (
        await session.exec(
            select(LibraryFile.library_id, LibraryFile.image_id).where(col(LibraryFile.image_id).in_(ids))
        )
    ).all()
    sha_of = {image.id: image.sha256 for image in images}
    dismissed = {(library_id, sha_of[image_id]) for library_id, image_id in places}
    dismissed |= {(image.library_id, image.sha256) for image in images if image.library_id is not None}
    known = set(
        (
            await session.exec(
                select(DismissedFile.library_id, DismissedFile.sha256).where(
                    col(DismissedFile.sha256).in_({sha for _, sha in dismissed})
                )
            )
        ).all()
    )
    session.add_all(DismissedFile(library_id=lib, sha256=sha) for lib, sha in dismissed - known)
    await session.flush()
    await forget_images(ctx, session, images)
    return len(images)


async def _purge_where(ctx: AppContext, condition: object) -> int:
    purged = 0
    while True:
        async with ctx.write_lock, ctx.sessions() as session:
            rows = list(
                (
                    await session.exec(
                        select(Image).where(condition).order_by(col(Image.id)).limit(PURGE_BATCH)  # type: ignore[arg-type]
                    )
                ).all()
            )
            if not rows:
                return purged
            purged += await purge_images(ctx, session, rows)


async def purge_image(ctx: AppContext, image_id: int) -> None:
    """DELETE /images/{id}?purge=true: gone at once, trash or not."""
    async with ctx.write_lock, ctx.sessions() as session:
        await purge_images(ctx, session, [await load_image(session, image_id)])


async def empty_trash(ctx: AppContext) -> int:
    """DELETE /trash: purge everything in it now."""
    return await _purge_where(ctx, col(Image.trashed_at).is_not(None))


async def purge_expired(ctx: AppContext) -> int:
    """Purge what has lain in the trash for over TRASH_DAYS (0: nothing ever is)."""
    if ctx.settings.trash_days <= 0:
        return 0
    cutoff = utcnow() - timedelta(days=ctx.settings.trash_days)
    purged = await _purge_where(ctx, col(Image.trashed_at) < cutoff)
    if purged:
        log.info("collection %s: purged %d images that lay in the trash over TRASH_DAYS", ctx.collection, purged)
    return purged


async def purge_in_background(ctx: AppContext, every: float = PURGE_EVERY_SECONDS) -> None:
    """Purge the expired trash now and then every `every` seconds, until cancelled."""
    while True:
        try:
            await purge_expired(ctx)
        except Exception:  # housekeeping must never take the service down
            log.exception("purging the trash failed")
        await asyncio.sleep(every)
