"""The upload flow: stage and hash, deduplicate, prepare and embed through the pipeline, then commit.

Commit order for a new image: original file (atomic rename) -> thumbnail -> row -> index. A crash
between steps leaves at worst an unreferenced file, never a row without its file; the index is
re-derived from the rows at startup when it disagrees. Uploads and folder imports both end here.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from backend.context import AppContext
from backend.errors import DeletedMeanwhile, DomainError, StorageFailure
from backend.models import Image, TagScore
from backend.services.captions import start_caption_job
from backend.services.duplicates import link_new
from backend.services.index import vector_to_blob
from backend.services.pipeline import PreparedImage
from backend.services.storage import IncomingFile, LibraryOrigin, Receive, StagedFile
from backend.services.tagging import Tags, load_tags, tag_rows
from backend.services.trash import revive
from ml.embedder import ClipEmbedder

log = logging.getLogger(__name__)
MAX_FILENAME_LENGTH = 255


@dataclass
class UploadOutcome:
    """What became of one file: stored, a duplicate of a stored image, or refused with a reason."""

    filename: str
    form_field: str = ""
    image: Image | None = None
    duplicate: bool = False
    error: DomainError | None = None

    @property
    def created(self) -> bool:
        return self.image is not None and not self.duplicate


@dataclass
class UploadResult:
    """The outcome per file, in the order they were sent, with the tags of every image they name."""

    outcomes: list[UploadOutcome]
    tags: dict[int, list[TagScore]]


@dataclass
class _NewFile:
    """A staged file whose bytes no other file of the batch had, as it goes through the steps."""

    outcome: UploadOutcome
    staged: StagedFile
    origin: LibraryOrigin | None = None
    prepared: PreparedImage | None = None
    vector: np.ndarray | None = None
    tags: Tags = field(default_factory=list)


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


async def upload_images(ctx: AppContext, receive: Receive) -> UploadResult:
    """Receive, store and embed the request's images; each file succeeds, is a duplicate, or fails on its own.
    The CLIP model is checked before the body is read. With CAPTION_ON_UPLOAD the new images go to a
    caption job; the upload does not wait for it."""
    await ctx.clip.get()
    async with receive() as received:
        outcomes = await ingest_files(ctx, received)
    created = [o.image.id for o in outcomes if o.created and o.image is not None and o.image.id is not None]
    if ctx.settings.caption_on_upload and created:
        await start_caption_job(ctx, created)
    ids = [o.image.id for o in outcomes if o.image is not None and o.image.id is not None]
    async with ctx.sessions() as session:
        tags = await load_tags(session, ids)
    return UploadResult(outcomes=outcomes, tags=tags)


async def ingest_files(ctx: AppContext, files: list[IncomingFile]) -> list[UploadOutcome]:
    """Store a batch of staged files; the outcome of each, in order.

    The caller owns the staged files: whatever is not moved into place stays in tmp/ for it to remove.
    """
    embedder = await ctx.clip.get()
    outcomes = [
        UploadOutcome(filename=clean_filename(f.filename), form_field=f.form_field, error=f.error) for f in files
    ]
    first_of: dict[str, _NewFile] = {}  # by SHA-256: the batch's first file with those bytes
    repeats: list[tuple[UploadOutcome, _NewFile]] = []
    for outcome, incoming in zip(outcomes, files, strict=True):
        if incoming.staged is None or incoming.error is not None:
            continue
        first = first_of.get(incoming.staged.sha256)
        if first is None:
            first_of[incoming.staged.sha256] = _NewFile(outcome=outcome, staged=incoming.staged, origin=incoming.origin)
        else:
            repeats.append((outcome, first))
    if not first_of:
        return outcomes

    # Bytes already stored skip decoding and embedding. The read ends here: no connection is held while
    # images decode and embed.
    async with ctx.sessions() as session:
        known = await _find_by_sha(session, set(first_of))
    todo = [item for sha, item in first_of.items() if sha not in known]
    prepared = await ctx.pipeline.prepare([item.staged.path for item in todo], embedder.preprocess, thumbnails=True)
    for item, result in zip(todo, prepared, strict=True):
        if isinstance(result, DomainError):
            item.outcome.error = result
        else:
            item.prepared = result
    ready = [item for item in todo if item.prepared is not None]
    vectors = await ctx.pipeline.embed(embedder, [item.prepared for item in ready if item.prepared is not None])
    tags = await ctx.tags.tag(embedder, vectors)
    for item, vector, item_tags in zip(ready, vectors, tags, strict=True):
        item.vector, item.tags = vector, item_tags
    new_ids, new_vectors = await _commit(ctx, embedder, list(first_of.values()))
    if new_ids:
        await link_new(ctx, new_ids, np.stack(new_vectors))

    for outcome, first in repeats:
        outcome.image = first.outcome.image
        outcome.duplicate = first.outcome.image is not None
        outcome.error = first.outcome.error
    return outcomes


async def _find_by_sha(session: AsyncSession, hashes: set[str]) -> dict[str, Image]:
    if not hashes:
        return {}
    rows = (await session.exec(select(Image).where(col(Image.sha256).in_(hashes)))).all()
    return {row.sha256: row for row in rows}


async def _commit(ctx: AppContext, embedder: ClipEmbedder, items: list[_NewFile]) -> tuple[list[int], list[np.ndarray]]:
    """Under the write lock: settle duplicates against the current rows, then store the new images; the ids
    and vectors of the images stored and of those taken out of the trash (to pair with their duplicates)."""
    new_ids: list[int] = []
    new_vectors: list[np.ndarray] = []
    back: list[tuple[int, np.ndarray]] = []
    revived: list[Image] = []  # known bytes that lay in the trash: sending them again takes them out
    async with ctx.write_lock, ctx.sessions() as session:
        try:
            # Checked again under the lock: a delete or another upload may have run meanwhile.
            current = await _find_by_sha(session, {item.staged.sha256 for item in items})
            for item in items:
                outcome = item.outcome
                if outcome.error is not None:
                    continue
                existing = current.get(item.staged.sha256)
                if item.vector is None:  # known before this batch: a duplicate, if it still exists
                    if existing is None:
                        outcome.error = DeletedMeanwhile(
                            "an image with these bytes was deleted while this upload ran; send it again"
                        )
                    else:
                        outcome.image, outcome.duplicate = existing, True
                        revived.append(existing)
                    continue
                if existing is not None:  # another request stored the same bytes meanwhile
                    outcome.image, outcome.duplicate = existing, True
                    revived.append(existing)
                    continue
                try:
                    image = await _store_one(ctx, session, embedder, item)
                except IntegrityError:
                    # Another process stored the same bytes: the file at the key is identical, keep it.
                    outcome.image = (await _find_by_sha(session, {item.staged.sha256}))[item.staged.sha256]
                    outcome.duplicate = True
                    continue
                except Exception as exc:  # disk full, I/O error: this image fails, the batch goes on
                    log.exception("could not store %s", outcome.filename)
                    outcome.error = StorageFailure(f"the image could not be stored: {type(exc).__name__}")
                    continue
                outcome.image = image
                assert image.id is not None
                new_ids.append(image.id)
                new_vectors.append(item.vector)
            await session.commit()
            # Revived images are paired again too: new images may have come while they lay in the trash.
            back = await revive(ctx, session, revived)  # only those in the trash
        finally:
            # Rows that were committed are searchable even when a later image in the batch failed.
            if new_ids:
                await ctx.index.add(np.array(new_ids, dtype=np.int64), np.stack(new_vectors))
    return new_ids + [i for i, _ in back], new_vectors + [v for _, v in back]


async def _store_one(ctx: AppContext, session: AsyncSession, embedder: ClipEmbedder, item: _NewFile) -> Image:
    """File, thumbnail, then row and tags. Called under the write lock with no row holding these bytes."""
    assert item.prepared is not None and item.vector is not None
    info, staged, vector = item.prepared.info, item.staged, item.vector
    origin = item.origin
    # A library's original stays where it is: no storage key, the record says where it lies.
    storage_key = "" if origin is not None else ctx.store.original_key(staged.sha256, info.extension)
    thumbnail_key = ctx.store.thumbnail_key(staged.sha256)
    image = Image(
        filename=item.outcome.filename,
        content_type=info.content_type,
        format=info.format,
        width=info.width,
        height=info.height,
        **info.metadata.columns(),
        size_bytes=staged.size,
        sha256=staged.sha256,
        phash=item.prepared.phash,
        embedding_model=embedder.embedding_model,
        embedding_dim=int(vector.shape[0]),
        embedding=vector_to_blob(vector),
        storage_key=storage_key,
        thumbnail_key=thumbnail_key,
        library_id=origin.library_id if origin is not None else None,
        path=origin.path if origin is not None else None,
    )
    stored_keys = (thumbnail_key,) if origin is not None else (storage_key, thumbnail_key)
    try:
        if origin is None:
            await ctx.executor.run(ctx.store.commit, staged, storage_key)
        await ctx.executor.run(ctx.store.write_atomic, thumbnail_key, item.prepared.thumbnail)
        session.add(image)
        await session.flush()
        assert image.id is not None
        session.add_all(tag_rows(image.id, item.tags))
        await session.commit()
    except IntegrityError:
        await session.rollback()
        raise
    except Exception:
        await session.rollback()
        await ctx.executor.run(ctx.store.delete, *stored_keys)
        raise
    # A cancellation (shutdown, a client gone) may land after the commit went through, so the files stay:
    # a row must never lose its file. If no row was committed, the startup sweep removes them.
    return image
