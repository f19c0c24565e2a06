"""The upload pipeline: stage and hash, deduplicate, decode and check, embed in batches, then commit.

Commit order for a new image: original file (atomic rename) -> thumbnail -> row -> index. A crash
between steps leaves at worst an unreferenced file, never a row without its file; the index is
re-derived from the rows at startup when it disagrees.
"""

from __future__ import annotations

import asyncio
import logging
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from backend.context import AppContext
from backend.errors import AppError
from backend.models import Image
from backend.services.imaging import ImageInfo, decode_image, make_thumbnail
from backend.services.storage import StagedFile
from backend.services.vectors import vector_to_blob
from ml.embedder import ClipEmbedder

log = logging.getLogger(__name__)
MAX_FILENAME_LENGTH = 255


@dataclass
class IncomingFile:
    """A received upload: staged in tmp/ already, or refused while it was received."""

    filename: str
    staged: StagedFile | None = None
    error: AppError | None = None


@dataclass
class IngestOutcome:
    filename: str
    image: Image | None = None
    duplicate: bool = False
    error: AppError | None = None


@dataclass
class PreparedImage:
    """What the pipeline keeps of a decoded upload: metadata, thumbnail bytes, model input."""

    info: ImageInfo
    thumbnail: bytes
    pixels: torch.Tensor


def clean_filename(raw: str | None) -> str:
    """Keep the last path component, drop control characters, bound the length."""
    name = re.split(r"[\\/]", raw or "")[-1]
    name = "".join(ch for ch in unicodedata.normalize("NFC", name) if unicodedata.category(ch)[0] != "C")
    name = name.strip().lstrip(".") or "upload"
    if len(name) > MAX_FILENAME_LENGTH:
        stem, dot, ext = name.rpartition(".")
        ext = ext[:16] if dot else ""
        name = (stem if dot else name)[: MAX_FILENAME_LENGTH - len(ext) - 1] + (f".{ext}" if ext else "")
    return name


def prepare_image(path: Path, *, max_pixels: int, thumbnail_size: int | None, embedder: ClipEmbedder) -> PreparedImage:
    """Decode, check, thumbnail (unless size is None) and preprocess one file; runs in the executor."""
    decoded = decode_image(path, max_pixels)
    thumbnail = make_thumbnail(decoded.rgb, thumbnail_size) if thumbnail_size else b""
    return PreparedImage(info=decoded.info, thumbnail=thumbnail, pixels=embedder.preprocess([decoded.rgb])[0])


async def ingest_files(*, ctx: AppContext, session: AsyncSession, files: list[IncomingFile]) -> list[IngestOutcome]:
    """Ingest a batch; each file succeeds, is a duplicate, or fails on its own."""
    embedder = await ctx.models.get()
    outcomes = [IngestOutcome(filename=clean_filename(f.filename), error=f.error) for f in files]
    staged = {i: f.staged for i, f in enumerate(files) if f.staged is not None and f.error is None}
    try:
        # Bytes already stored, or repeated inside this batch, are not decoded or embedded again.
        existing = await _find_by_sha(session, {s.sha256 for s in staged.values()})
        first_of: dict[str, int] = {}
        repeats: dict[int, int] = {}
        for i, item in staged.items():
            if item.sha256 in existing:
                outcomes[i].image, outcomes[i].duplicate = existing[item.sha256], True
            elif item.sha256 in first_of:
                repeats[i] = first_of[item.sha256]
            else:
                first_of[item.sha256] = i

        prepared = await _prepare_all(ctx, embedder, {i: staged[i] for i in first_of.values()}, outcomes)
        if prepared:
            order = sorted(prepared)
            vectors = await ctx.executor.run(embedder.embed_pixels, torch.stack([prepared[i].pixels for i in order]))
            await _commit(ctx, session, embedder, order, staged, prepared, vectors, outcomes)

        for i, first in repeats.items():
            outcomes[i].image = outcomes[first].image
            outcomes[i].duplicate = outcomes[first].image is not None
            outcomes[i].error = outcomes[first].error
    finally:
        for item in staged.values():
            await ctx.executor.run(ctx.store.discard, item)  # no-op for committed files (already moved)
    return outcomes


async def _find_by_sha(session: AsyncSession, hashes: set[str]) -> dict[str, Image]:
    if not hashes:
        return {}
    rows = (await session.exec(select(Image).where(col(Image.sha256).in_(hashes)))).all()
    return {row.sha256: row for row in rows}


async def _prepare_all(
    ctx: AppContext, embedder: ClipEmbedder, todo: dict[int, StagedFile], outcomes: list[IngestOutcome]
) -> dict[int, PreparedImage]:
    async def one(i: int, item: StagedFile) -> tuple[int, PreparedImage | None]:
        try:
            return i, await ctx.executor.run(
                prepare_image,
                item.path,
                max_pixels=ctx.settings.max_image_pixels,
                thumbnail_size=ctx.settings.thumbnail_size,
                embedder=embedder,
            )
        except AppError as exc:
            outcomes[i].error = exc
            return i, None

    results = await asyncio.gather(*(one(i, item) for i, item in todo.items()))
    return {i: p for i, p in results if p is not None}


async def _commit(
    ctx: AppContext,
    session: AsyncSession,
    embedder: ClipEmbedder,
    order: list[int],
    staged: dict[int, StagedFile],
    prepared: dict[int, PreparedImage],
    vectors: np.ndarray,
    outcomes: list[IngestOutcome],
) -> None:
    new_ids: list[int] = []
    new_vectors: list[np.ndarray] = []
    async with ctx.write_lock:
        for row, i in enumerate(order):
            item, prep = staged[i], prepared[i]
            # Checked again under the lock: another request may have stored these bytes meanwhile.
            already = (await _find_by_sha(session, {item.sha256})).get(item.sha256)
            if already is not None:
                outcomes[i].image, outcomes[i].duplicate = already, True
                continue
            storage_key = ctx.store.original_key(item.sha256, prep.info.extension)
            thumbnail_key = ctx.store.thumbnail_key(item.sha256)
            await ctx.executor.run(ctx.store.commit, item, storage_key)
            await ctx.executor.run(ctx.store.write_atomic, thumbnail_key, prep.thumbnail)
            image = Image(
                filename=outcomes[i].filename,
                content_type=prep.info.content_type,
                format=prep.info.format,
                width=prep.info.width,
                height=prep.info.height,
                taken_at=prep.info.taken_at,
                size_bytes=item.size,
                sha256=item.sha256,
                embedding_model=embedder.model_name,
                embedding_dim=int(vectors.shape[1]),
                embedding=vector_to_blob(vectors[row]),
                storage_key=storage_key,
                thumbnail_key=thumbnail_key,
            )
            session.add(image)
            try:
                await session.commit()
            except IntegrityError:
                # Another process stored the same bytes: the file at the key is identical, keep it.
                await session.rollback()
                outcomes[i].image = (await _find_by_sha(session, {item.sha256}))[item.sha256]
                outcomes[i].duplicate = True
                continue
            except BaseException:
                await session.rollback()
                await ctx.executor.run(ctx.store.delete, storage_key, thumbnail_key)
                raise
            outcomes[i].image = image
            assert image.id is not None
            new_ids.append(image.id)
            new_vectors.append(vectors[row])
        if new_ids:
            await ctx.vectors.add(np.array(new_ids, dtype=np.int64), np.stack(new_vectors))


async def embed_query_image(*, ctx: AppContext, staged: StagedFile) -> np.ndarray:
    """Embed a received query image without storing anything; returns one unit vector."""
    embedder = await ctx.models.get()
    item = staged
    try:
        prep = await ctx.executor.run(
            prepare_image,
            item.path,
            max_pixels=ctx.settings.max_image_pixels,
            thumbnail_size=None,
            embedder=embedder,
        )
    finally:
        await ctx.executor.run(ctx.store.discard, item)
    vectors = await ctx.executor.run(embedder.embed_pixels, prep.pixels.unsqueeze(0))
    return vectors[0]
