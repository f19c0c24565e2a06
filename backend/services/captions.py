"""BLIP captions for stored images: cached per image in SQLite, made in batches when missing."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import torch
from sqlalchemy import update
from sqlmodel import col

from backend.context import AppContext
from backend.errors import DomainError, InTrash, NothingToDo, OriginalUnreadable
from backend.models import Image, ImagePublic, Job
from backend.services.catalog import get_images_by_ids, load_image, publish
from backend.services.jobs import JobHandle
from backend.services.originals import original_paths

log = logging.getLogger(__name__)
Progress = Callable[[int, int], Awaitable[None]]


async def caption_stored(
    ctx: AppContext, ids: list[int], *, refresh: bool = False, progress: Progress | None = None
) -> dict[int, str]:
    """Captions of stored images by id. Cached captions of the current BLIP model are reused unless
    `refresh`; the rest are made in batches and saved. Images that are gone or unreadable are left out."""
    captioner = await ctx.blip.get()
    async with ctx.sessions() as session:
        rows = await get_images_by_ids(session, ids)
        where = dict(zip(rows, await original_paths(ctx, session, list(rows.values())), strict=True))
    captions: dict[int, str] = {}
    todo: list[Image] = []
    for image_id in dict.fromkeys(ids):
        row = rows.get(image_id)
        if row is None:
            continue
        if not refresh and row.caption is not None and row.caption_model == captioner.model_name:
            captions[image_id] = row.caption
        else:
            todo.append(row)
    total = len(captions) + len(todo)
    if progress is not None:
        await progress(len(captions), total)
    for start in range(0, len(todo), captioner.batch_size):
        batch = todo[start : start + captioner.batch_size]
        inputs = await ctx.pipeline.prepare([where[row.id or 0] for row in batch], captioner.preprocess)
        readable: list[tuple[Image, torch.Tensor]] = []
        for row, prepared in zip(batch, inputs, strict=True):
            if isinstance(prepared, DomainError):
                log.warning("image %s could not be read for captioning: %s", row.id, prepared.detail)
            else:
                readable.append((row, prepared.pixels))
        if readable:
            texts = await ctx.executor.run(captioner.caption_pixels, torch.stack([pixels for _, pixels in readable]))
            async with ctx.sessions() as session:
                for (row, _), text in zip(readable, texts, strict=True):
                    assert row.id is not None
                    # A row deleted meanwhile is simply not updated.
                    await session.exec(
                        update(Image)
                        .where(col(Image.id) == row.id)
                        .values(caption=text, caption_model=captioner.model_name)
                    )
                    captions[row.id] = text
                await session.commit()
        if progress is not None:
            await progress(total - len(todo) + start + len(batch), total)
    return captions


async def caption_image(ctx: AppContext, image_id: int, *, refresh: bool = False) -> ImagePublic:
    """Caption one stored image (or keep its cached caption) and return its record; ImageNotFound before BLIP
    loads, InTrash for a trashed one, OriginalUnreadable when its original cannot be read."""
    async with ctx.sessions() as session:
        if (await load_image(session, image_id)).trashed_at is not None:
            raise InTrash(f"image {image_id} is in the trash: restore it first (POST /trash/{image_id}/restore)")
    if image_id not in await caption_stored(ctx, [image_id], refresh=refresh):
        async with ctx.sessions() as session:
            await load_image(session, image_id)  # deleted meanwhile: not found
        raise OriginalUnreadable(
            f"the original file of image {image_id} is missing or cannot be decoded, so it cannot be captioned"
        )
    async with ctx.sessions() as session:
        return (await publish(session, [await load_image(session, image_id)]))[0]


async def start_caption_job(ctx: AppContext, ids: list[int], *, refresh: bool = False) -> Job:
    """Caption images in the background (CAPTION_ON_UPLOAD, or a caller's request)."""

    async def run(handle: JobHandle) -> dict[str, object]:
        async def progress(done: int, total: int) -> None:
            await handle.progress(done, total, "captioning")

        await handle.progress(0, len(ids), "loading BLIP")
        captions = await caption_stored(ctx, ids, refresh=refresh, progress=progress)
        return {"captioned": len(captions), "requested": len(ids)}

    if not ids:
        raise NothingToDo("no images to caption")
    return await ctx.jobs.submit("caption", {"image_ids": ids[:1000], "count": len(ids), "refresh": refresh}, run)
