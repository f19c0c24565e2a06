"""Reading and deleting stored images."""

from __future__ import annotations

import numpy as np
from sqlalchemy import func
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from backend.context import AppContext
from backend.errors import NotFoundError
from backend.models import Image, ImagePublic, ImagesPublic, ImageUploaded


def to_public(image: Image) -> ImagePublic:
    return ImagePublic.model_validate(image, update=_urls(image))


def to_uploaded(image: Image, *, duplicate: bool) -> ImageUploaded:
    return ImageUploaded.model_validate(image, update={**_urls(image), "duplicate": duplicate})


def _urls(image: Image) -> dict[str, str]:
    return {"file_url": f"/images/{image.id}/file", "thumbnail_url": f"/images/{image.id}/thumbnail"}


async def list_images(*, session: AsyncSession, offset: int, limit: int) -> ImagesPublic:
    count = (await session.exec(select(func.count()).select_from(Image))).one()
    rows = (
        await session.exec(
            select(Image).order_by(col(Image.created_at).desc(), col(Image.id).desc()).offset(offset).limit(limit)
        )
    ).all()
    return ImagesPublic(data=[to_public(row) for row in rows], count=count, offset=offset, limit=limit)


async def get_image(*, session: AsyncSession, image_id: int) -> Image:
    image = await session.get(Image, image_id)
    if image is None:
        raise NotFoundError(f"image {image_id} not found", code="image_not_found")
    return image


async def get_images_by_ids(*, session: AsyncSession, ids: list[int]) -> dict[int, Image]:
    if not ids:
        return {}
    rows = (await session.exec(select(Image).where(col(Image.id).in_(ids)))).all()
    return {row.id: row for row in rows if row.id is not None}


async def count_images(*, session: AsyncSession, model_name: str) -> tuple[int, int]:
    """(all images, images whose vector another model made)."""
    total = (await session.exec(select(func.count()).select_from(Image))).one()
    stale = (
        await session.exec(select(func.count()).select_from(Image).where(Image.embedding_model != model_name))
    ).one()
    return total, stale


async def delete_image(*, ctx: AppContext, session: AsyncSession, image_id: int) -> None:
    """Remove the row, then the vector, then the files: a crash in between leaves only unreferenced files."""
    async with ctx.write_lock:
        image = await get_image(session=session, image_id=image_id)
        keys = (image.storage_key, image.thumbnail_key)
        await session.delete(image)
        await session.commit()
        await ctx.vectors.remove(np.array([image_id], dtype=np.int64))
        await ctx.executor.run(ctx.store.delete, *keys)
