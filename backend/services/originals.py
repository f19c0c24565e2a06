"""Where an image's original lies: in STORAGE_ROOT for an upload, in its library's folder for a file
indexed in place. Readers that take a path (re-embedding, captions, EXIF, exports) ask here."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from backend.context import AppContext
from backend.models import Image, Library


async def library_roots(session: AsyncSession, ids: set[int]) -> dict[int, Path]:
    if not ids:
        return {}
    rows = (await session.exec(select(Library).where(col(Library.id).in_(ids)))).all()
    return {row.id: Path(row.path) for row in rows if row.id is not None}


def inside_library(root: Path, relative: str) -> Path:
    """The path of a library file; a file whose path now leads out of the library (a link swapped in)
    resolves to a path that is not there, so it reads as missing rather than as something else."""
    target = (root / relative).resolve()
    return target if target.is_relative_to(root) else root / ".outside-the-library"


async def original_paths(ctx: AppContext, session: AsyncSession, images: Sequence[Image]) -> list[Path]:
    """The original of each image, in order."""
    roots = await library_roots(session, {image.library_id for image in images if image.library_id is not None})
    paths: list[Path] = []
    for image in images:
        if image.library_id is None or image.path is None:
            paths.append(ctx.store.path(image.storage_key))
        else:
            root = roots.get(image.library_id)
            paths.append(inside_library(root, image.path) if root is not None else ctx.store.path(".missing"))
    return paths
