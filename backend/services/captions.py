"""BLIP captions for stored images: cached per image in SQLite, made in batches when missing."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import torch
from sqlalchemy import update
from sqlmodel import col

from backend.context import AppContext
from backend.errors import AppError
from backend.models import Image, Job
from backend.services.catalog import get_images_by_ids
from backend.services.imaging import decode_image
from backend.services.jobs import JobHandle
from ml.captioner import BlipCaptioner

log = logging.getLogger(__name__)
Progress = Callable[[int, int], Awaitable[None]]


def caption_input(path: Path, max_pixels: int, captioner: BlipCaptioner) -> torch.Tensor:
    """Decode one stored original into BLIP's input; runs in the executor."""
    return captioner.preprocess([decode_image(path, max_pixels).rgb])[0]


async def caption_stored(
    ctx: AppContext, ids: list[int], *, refresh: bool = False, progress: Progress | None = None
) -> dict[int, str]:
    """Captions of stored images by id. Cached captions of the current BLIP model are reused unless
    `refresh`; the rest are made in batches and saved. Images that are gone or unreadable are left out."""
    captioner = await ctx.captioner.get()
    async with ctx.sessions() as session:
        rows = await get_images_by_ids(session=session, ids=ids)
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
        inputs = await asyncio.gather(
            *(
                ctx.executor.run(
                    caption_input, ctx.store.path(row.storage_key), ctx.settings.max_image_pixels, captioner
                )
                for row in batch
            ),
            return_exceptions=True,
        )
        readable = [
            (row, pixels) for row, pixels in zip(batch, inputs, strict=True) if isinstance(pixels, torch.Tensor)
        ]
        for row, pixels in zip(batch, inputs, strict=True):
            if not isinstance(pixels, torch.Tensor):
                log.warning("image %s could not be read for captioning: %s", row.id, pixels)
        if readable:
            texts = await ctx.executor.run(captioner.caption_pixels, torch.stack([pixels for _, pixels in readable]))
            async with ctx.sessions() as session:
                for (row, _), text in zip(readable, texts, strict=True):
                    assert row.id is not None
                    # A row deleted meanwhile is simply not updated.
                    await session.exec(
                        update(Image)  # type: ignore[call-overload]
                        .where(col(Image.id) == row.id)
                        .values(caption=text, caption_model=captioner.model_name)
                    )
                    captions[row.id] = text
                await session.commit()
        if progress is not None:
            await progress(total - len(todo) + start + len(batch), total)
    return captions


async def caption_one(ctx: AppContext, image_id: int, *, refresh: bool = False) -> None:
    """Caption one stored image (or keep its cached caption); 409 when its original cannot be read."""
    if image_id in await caption_stored(ctx, [image_id], refresh=refresh):
        return
    async with ctx.sessions() as session:
        if await session.get(Image, image_id) is None:
            return  # deleted meanwhile: the caller's lookup answers 404
    raise AppError(
        f"the original file of image {image_id} is missing or cannot be decoded, so it cannot be captioned",
        code="original_unreadable",
        status_code=409,
    )


async def start_caption_job(ctx: AppContext, ids: list[int], *, refresh: bool = False) -> Job:
    """Caption images in the background (CAPTION_ON_UPLOAD, or a caller's request)."""

    async def run(handle: JobHandle) -> dict[str, object]:
        async def progress(done: int, total: int) -> None:
            await handle.progress(done, total, "captioning")

        await handle.progress(0, len(ids), "loading BLIP")
        captions = await caption_stored(ctx, ids, refresh=refresh, progress=progress)
        return {"captioned": len(captions), "requested": len(ids)}

    if not ids:
        raise AppError("no images to caption", code="nothing_to_do", status_code=422)
    return await ctx.jobs.submit("caption", {"image_ids": ids[:1000], "count": len(ids), "refresh": refresh}, run)
