"""Reading and deleting stored images."""

from __future__ import annotations

import numpy as np
from sqlalchemy import func
from sqlmodel import col, or_, select
from sqlmodel.ext.asyncio.session import AsyncSession

from backend.context import AppContext
from backend.errors import NotFoundError
from backend.models import Image, ImagePublic, ImagesPublic, ImageTag, ImageUploaded, TagScore
from backend.services.tagging import load_tags


def to_public(image: Image, tags: list[TagScore] | None = None) -> ImagePublic:
    return ImagePublic.model_validate(image, update={**_urls(image), "tags": tags or []})


def to_uploaded(image: Image, *, duplicate: bool, tags: list[TagScore] | None = None) -> ImageUploaded:
    return ImageUploaded.model_validate(image, update={**_urls(image), "tags": tags or [], "duplicate": duplicate})


def _urls(image: Image) -> dict[str, str]:
    return {"file_url": f"/images/{image.id}/file", "thumbnail_url": f"/images/{image.id}/thumbnail"}


async def publish(session: AsyncSession, images: list[Image]) -> list[ImagePublic]:
    """Public records with their tags, loaded in one query."""
    tags = await load_tags(session, [image.id for image in images if image.id is not None])
    return [to_public(image, tags.get(image.id or 0)) for image in images]


async def list_images(
    *, session: AsyncSession, offset: int, limit: int, total: int, tag: str | None = None
) -> ImagesPublic:
    """A page, newest first; `total` (from count_images) is the count when no tag narrows the list."""
    query = select(Image)
    count = total
    if tag is not None:
        tagged = select(ImageTag.image_id).where(ImageTag.tag == tag)
        query = query.where(col(Image.id).in_(tagged))
        count = (await session.exec(select(func.count()).select_from(Image).where(col(Image.id).in_(tagged)))).one()
    rows = (
        await session.exec(
            query.order_by(col(Image.created_at).desc(), col(Image.id).desc()).offset(offset).limit(limit)
        )
    ).all()
    return ImagesPublic(data=await publish(session, list(rows)), count=count, offset=offset, limit=limit)


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


async def count_images(*, session: AsyncSession, model_name: str, indexed: int) -> tuple[int, int]:
    """(all images, images whose vector another model made). The current model's images are exactly the
    index's `indexed` entries (kept in step with SQLite), so only the others are counted: two range
    searches of the model index, whose cost grows with the stale images, not with the collection."""
    other_model = or_(col(Image.embedding_model) < model_name, col(Image.embedding_model) > model_name)
    stale = (await session.exec(select(func.count()).select_from(Image).where(other_model))).one()
    return indexed + stale, stale


async def delete_image(*, ctx: AppContext, session: AsyncSession, image_id: int) -> None:
    """Remove the row, then the vector, then the files: a crash in between leaves only unreferenced files.

    Its tags and cluster memberships go with the row (ON DELETE CASCADE).
    """
    async with ctx.write_lock:
        image = await get_image(session=session, image_id=image_id)
        keys = (image.storage_key, image.thumbnail_key)
        await session.delete(image)
        await session.commit()
        await ctx.vectors.remove(np.array([image_id], dtype=np.int64))
        await ctx.executor.run(ctx.store.delete, *keys)
