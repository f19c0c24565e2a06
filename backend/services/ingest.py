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
from backend.services.imaging import DECODE_MIN_SIDE, ImageInfo, decode_image, make_thumbnail
from backend.services.storage import StagedFile
from backend.services.tagging import Tags, tag_rows
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

    @property
    def created(self) -> bool:
        return self.image is not None and not self.duplicate


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
    decoded = decode_image(path, max_pixels, min_side=max(DECODE_MIN_SIDE, thumbnail_size or 0))
    thumbnail = make_thumbnail(decoded.rgb, thumbnail_size) if thumbnail_size else b""
    return PreparedImage(info=decoded.info, thumbnail=thumbnail, pixels=embedder.preprocess([decoded.rgb])[0])


async def ingest_files(*, ctx: AppContext, session: AsyncSession, files: list[IncomingFile]) -> list[IngestOutcome]:
    """Ingest a batch of staged files; each succeeds, is a duplicate, or fails on its own.

    The caller owns the staged files: whatever is not moved into place stays in tmp/ for it to remove.
    """
    embedder = await ctx.models.get()
    outcomes = [IngestOutcome(filename=clean_filename(f.filename), error=f.error) for f in files]
    staged = {i: f.staged for i, f in enumerate(files) if f.staged is not None and f.error is None}
    if not staged:
        return outcomes

    # Bytes already stored, or repeated inside this batch, skip decoding and embedding.
    known = await _find_by_sha(session, {item.sha256 for item in staged.values()})
    await session.commit()  # end the read: no connection is held while images decode and embed
    first_of: dict[str, int] = {}
    repeats: dict[int, int] = {}
    for i, item in staged.items():
        if item.sha256 in first_of:
            repeats[i] = first_of[item.sha256]
        else:
            first_of[item.sha256] = i
    to_prepare = {i: staged[i] for i in first_of.values() if staged[i].sha256 not in known}
    prepared = await _prepare_all(ctx, embedder, to_prepare, outcomes)
    order = sorted(prepared)
    async with ctx.bulk_forward:
        vectors = await ctx.executor.run(embed_prepared, embedder, [prepared[i].pixels for i in order])
    tags = await ctx.tags.tag(embedder, vectors)
    await _commit(ctx, session, embedder, list(first_of.values()), staged, prepared, order, vectors, tags, outcomes)

    for i, first in repeats.items():
        outcomes[i].image = outcomes[first].image
        outcomes[i].duplicate = outcomes[first].image is not None
        outcomes[i].error = outcomes[first].error
    return outcomes


def embed_prepared(embedder: ClipEmbedder, pixels: list[torch.Tensor]) -> np.ndarray:
    if not pixels:
        return np.empty((0, embedder.dim), dtype=np.float32)
    return embedder.embed_pixels(torch.stack(pixels))


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
    firsts: list[int],
    staged: dict[int, StagedFile],
    prepared: dict[int, PreparedImage],
    order: list[int],
    vectors: np.ndarray,
    tags: list[Tags],
    outcomes: list[IngestOutcome],
) -> None:
    """Under the write lock: settle duplicates against the current rows, then store the new images."""
    new_ids: list[int] = []
    new_vectors: list[np.ndarray] = []
    async with ctx.write_lock:
        try:
            # Checked again under the lock: a delete or another upload may have run meanwhile.
            current = await _find_by_sha(session, {staged[i].sha256 for i in firsts})
            for i in firsts:
                if i in prepared or outcomes[i].error is not None:
                    continue
                existing = current.get(staged[i].sha256)
                if existing is None:
                    outcomes[i].error = AppError(
                        "an image with these bytes was deleted while this upload ran; send it again",
                        code="deleted_meanwhile",
                        status_code=409,
                    )
                else:
                    outcomes[i].image, outcomes[i].duplicate = existing, True
            for row, i in enumerate(order):
                item = staged[i]
                if item.sha256 in current:
                    outcomes[i].image, outcomes[i].duplicate = current[item.sha256], True
                    continue
                try:
                    image = await _store_one(
                        ctx, session, embedder, item, prepared[i], vectors[row], tags[row], outcomes[i].filename
                    )
                except IntegrityError:
                    # Another process stored the same bytes: the file at the key is identical, keep it.
                    outcomes[i].image = (await _find_by_sha(session, {item.sha256}))[item.sha256]
                    outcomes[i].duplicate = True
                    continue
                except Exception as exc:  # disk full, I/O error: this image fails, the batch goes on
                    log.exception("could not store %s", outcomes[i].filename)
                    outcomes[i].error = AppError(
                        f"the image could not be stored: {type(exc).__name__}", code="storage_error", status_code=500
                    )
                    continue
                outcomes[i].image = image
                assert image.id is not None
                new_ids.append(image.id)
                new_vectors.append(vectors[row])
            await session.commit()
        finally:
            # Rows that were committed are searchable even when a later image in the batch failed.
            if new_ids:
                await ctx.vectors.add(np.array(new_ids, dtype=np.int64), np.stack(new_vectors))


async def _store_one(
    ctx: AppContext,
    session: AsyncSession,
    embedder: ClipEmbedder,
    item: StagedFile,
    prep: PreparedImage,
    vector: np.ndarray,
    tags: Tags,
    filename: str,
) -> Image:
    """File, thumbnail, then row and tags. Called under the write lock with no row holding these bytes."""
    storage_key = ctx.store.original_key(item.sha256, prep.info.extension)
    thumbnail_key = ctx.store.thumbnail_key(item.sha256)
    image = Image(
        filename=filename,
        content_type=prep.info.content_type,
        format=prep.info.format,
        width=prep.info.width,
        height=prep.info.height,
        taken_at=prep.info.taken_at,
        size_bytes=item.size,
        sha256=item.sha256,
        embedding_model=embedder.model_name,
        embedding_dim=int(vector.shape[0]),
        embedding=vector_to_blob(vector),
        storage_key=storage_key,
        thumbnail_key=thumbnail_key,
    )
    try:
        await ctx.executor.run(ctx.store.commit, item, storage_key)
        await ctx.executor.run(ctx.store.write_atomic, thumbnail_key, prep.thumbnail)
        session.add(image)
        await session.flush()
        assert image.id is not None
        session.add_all(tag_rows(image.id, tags))
        await session.commit()
    except IntegrityError:
        await session.rollback()
        raise
    except Exception:
        await session.rollback()
        await ctx.executor.run(ctx.store.delete, storage_key, thumbnail_key)
        raise
    # A cancellation (shutdown, a client gone) may land after the commit went through, so the files stay:
    # a row must never lose its file. If no row was committed, the startup sweep removes them.
    return image


async def embed_query_image(*, ctx: AppContext, staged: StagedFile) -> np.ndarray:
    """Embed a received query image without storing anything; returns one unit vector."""
    embedder = await ctx.models.get()
    prep = await ctx.executor.run_query(
        prepare_image,
        staged.path,
        max_pixels=ctx.settings.max_image_pixels,
        thumbnail_size=None,
        embedder=embedder,
    )
    return (await ctx.executor.run_query(embed_prepared, embedder, [prep.pixels]))[0]
