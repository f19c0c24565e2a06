"""Reading and deleting stored images, and the records the API answers with.

The service functions (`list_images`, `list_tags`, `get_image`, `stored_file`) take the
collection and open their own sessions. The helpers that take a `session` run inside the caller's
transaction; other services build on them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
from sqlalchemy import func
from sqlmodel import col, or_, select
from sqlmodel.ext.asyncio.session import AsyncSession

from backend.context import AppContext
from backend.errors import DamagedVector, DomainError, ImageNotFound, LibraryOffline, StoredFileMissing
from backend.models import (
    Image,
    ImageEmbedding,
    ImagePublic,
    ImagesPublic,
    ImageUploaded,
    TagScore,
    TagsPublic,
)
from backend.services.filters import ImageFilter, ImageSort, image_order, in_collection
from backend.services.index import stored_vector
from backend.services.library_files import descriptor_path, open_in_library
from backend.services.originals import library_roots
from backend.services.tagging import load_tags, tag_counts
from ml.inference import key_precision


@dataclass(frozen=True)
class StoredFile:
    """A file of an image on disk, with what a download of it needs."""

    path: Path
    media_type: str
    etag: str
    filename: str | None  # the name to save it as; None for a thumbnail
    opened: BinaryIO | None = None  # a library original, opened already: `path` reads this very file


def image_public(image: Image, tags: list[TagScore] | None = None) -> ImagePublic:
    """An image row as the API shows it: metadata, URLs, tags."""
    return ImagePublic.model_validate(image, update={**_urls(image), "tags": tags or []})


def image_uploaded(image: Image, *, duplicate: bool, tags: list[TagScore] | None = None) -> ImageUploaded:
    """An image row as an upload answers it: the public record and whether the bytes were stored already."""
    return ImageUploaded.model_validate(image, update={**_urls(image), "tags": tags or [], "duplicate": duplicate})


def _urls(image: Image) -> dict[str, str]:
    return {"file_url": f"/images/{image.id}/file", "thumbnail_url": f"/images/{image.id}/thumbnail"}


async def publish(session: AsyncSession, images: list[Image]) -> list[ImagePublic]:
    """Public records with their tags, loaded in one query."""
    tags = await load_tags(session, [image.id for image in images if image.id is not None])
    return [image_public(image, tags.get(image.id or 0)) for image in images]


async def load_image(session: AsyncSession, image_id: int) -> Image:
    image = await session.get(Image, image_id)
    if image is None:
        raise ImageNotFound(f"image {image_id} not found")
    return image


async def get_images_by_ids(session: AsyncSession, ids: list[int], *, trashed: bool = False) -> dict[int, Image]:
    """The rows of these ids that exist (and are outside the trash, unless `trashed`)."""
    if not ids:
        return {}
    query = select(Image).where(col(Image.id).in_(ids))
    rows = (await session.exec(query if trashed else query.where(in_collection()))).all()
    return {row.id: row for row in rows if row.id is not None}


async def count_images(session: AsyncSession, *, model_name: str, indexed: int) -> tuple[int, int]:
    """(all images, images whose vector another model made). The current model's images are exactly the
    index's `indexed` entries (kept in step with SQLite), so only the others are counted: two range
    searches of the model index, whose cost grows with the stale images, not with the collection."""
    other_model = or_(col(Image.embedding_model) < model_name, col(Image.embedding_model) > model_name)
    stale = (await session.exec(select(func.count()).select_from(Image).where(other_model, in_collection()))).one()
    return indexed + stale, stale


async def list_images(
    ctx: AppContext,
    *,
    offset: int,
    limit: int,
    image_filter: ImageFilter | None = None,
    sort: ImageSort = "-created_at",
) -> ImagesPublic:
    """A page in `sort` order (newest upload first by default) with the count of the images the filter keeps."""
    image_filter = canonical_filter(ctx, image_filter or ImageFilter())
    async with ctx.sessions() as session:
        where = image_filter.where()
        query = select(Image).where(where)
        if not image_filter.active:
            count, _ = await count_images(
                session, model_name=ctx.settings.embedding_model, indexed=await ctx.index.size()
            )
        else:
            count = (await session.exec(select(func.count()).select_from(Image).where(where))).one()
        rows = (await session.exec(query.order_by(*image_order(sort)).offset(offset).limit(limit))).all()
        return ImagesPublic(data=await publish(session, list(rows)), count=count, offset=offset, limit=limit)


def canonical_filter(ctx: AppContext, image_filter: ImageFilter) -> ImageFilter:
    """The filter with its tag in the vocabulary's spelling."""
    if image_filter.tag is None:
        return image_filter
    return replace(image_filter, tag=ctx.tags.canonical(image_filter.tag))


async def list_tags(ctx: AppContext) -> TagsPublic:
    """The tag vocabulary with how many images carry each tag, most used first."""
    async with ctx.sessions() as session:
        return await tag_counts(session, ctx.tags.names)


async def get_image(ctx: AppContext, image_id: int) -> ImagePublic:
    """One image's record, with its tags and caption."""
    async with ctx.sessions() as session:
        return (await publish(session, [await load_image(session, image_id)]))[0]


def image_vector(image: Image) -> np.ndarray:
    """An image's stored vector; DamagedVector when its row's blob cannot be read."""
    vector = stored_vector(image.embedding, image.embedding_dim)
    if vector is None:
        raise DamagedVector(
            f"the stored vector of image {image.id} is damaged: `image-organizer check --repair` mends it"
        )
    return vector


async def image_embedding(ctx: AppContext, image_id: int) -> ImageEmbedding:
    """The stored vector of one image with the model that made it; DamagedVector when the row's blob is unreadable."""
    async with ctx.sessions() as session:
        image = await load_image(session, image_id)
    vector = image_vector(image)
    current = image.embedding_model == ctx.settings.embedding_model
    loaded = ctx.clip.loaded
    return ImageEmbedding(
        id=image_id,
        model=image.embedding_model,
        current=current,
        precision=key_precision(image.embedding_model),
        runtime=loaded.runtime if current and loaded is not None else None,
        dim=image.embedding_dim,
        vector=[float(value) for value in vector],
    )


async def stored_file(ctx: AppContext, image_id: int, which: Literal["original", "thumbnail"]) -> StoredFile:
    """The original (as uploaded, or in its library's folder), or its JPEG thumbnail; StoredFileMissing when
    it is not on disk, LibraryOffline while its library's folder cannot be reached. A library file is opened
    here, without following links, and served from that descriptor (`opened`, for the caller to close)."""
    async with ctx.sessions() as session:
        image = await load_image(session, image_id)
        roots = await library_roots(session, {image.library_id} if image.library_id is not None else set())
    if which == "thumbnail":
        found = StoredFile(ctx.store.path(image.thumbnail_key), "image/jpeg", f"{image.sha256}-thumb", None)
    elif image.library_id is not None and image.path is not None:
        if image.offline or image.library_id not in roots:
            raise LibraryOffline(f"the library that holds image {image_id} is offline: its folder cannot be reached")
        try:
            fd = await ctx.executor.run(open_in_library, roots[image.library_id], image.path)
        except DomainError as exc:
            raise StoredFileMissing(f"the original in the library cannot be read: {exc.detail}") from exc
        except OSError as exc:
            raise StoredFileMissing("the library's folder cannot be read") from exc
        handle = os.fdopen(fd, "rb")  # closes the descriptor when the answer is done (or is dropped)
        return StoredFile(descriptor_path(fd), image.content_type, image.sha256, image.filename, handle)
    else:
        found = StoredFile(ctx.store.path(image.storage_key), image.content_type, image.sha256, image.filename)
    if not found.path.is_file():
        raise StoredFileMissing("the stored file is missing")
    return found


async def forget_images(ctx: AppContext, session: AsyncSession, images: list[Image]) -> None:
    """Delete these rows and commit, then their vectors and the files the service stored for them. Called
    under the write lock."""
    keys: list[str] = []
    for image in images:
        keys += [image.storage_key, image.thumbnail_key]  # a library image has no storage key: its original stays
        await session.delete(image)
    await session.commit()
    ids = np.array([image.id for image in images if image.id is not None], dtype=np.int64)
    if len(ids):
        await ctx.index.remove(ids)
    await ctx.executor.run(ctx.store.delete, *[key for key in keys if key])
