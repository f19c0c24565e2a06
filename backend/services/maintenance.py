"""Startup housekeeping: remove originals and thumbnails that no row references.

Such files are left when the process dies between placing a file and committing its row. The sweep
runs in the background after startup; each deletion is decided under the app's write lock, the same
lock under which uploads place files and commit rows, so a file being stored right now is never taken.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from pathlib import Path

from sqlmodel import col, select

from backend.context import AppContext
from backend.models import Image

log = logging.getLogger(__name__)
_SHA_NAME = re.compile(r"^([0-9a-f]{64})(?:\.[A-Za-z0-9]+)?$")
CHUNK = 500


def _files_by_sha(root: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = defaultdict(list)
    for folder in ("originals", "thumbnails"):
        for path in (root / folder).glob("*/*"):
            match = _SHA_NAME.match(path.name)
            if match and path.is_file():
                found[match.group(1)].append(path)
    return found


def _delete(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


async def sweep_orphan_files(ctx: AppContext) -> int:
    """Delete files whose SHA-256 no row has; returns how many files went."""
    files = await ctx.executor.run(_files_by_sha, ctx.store.root)
    hashes = sorted(files)
    removed = 0
    async with ctx.sessions() as session:
        for start in range(0, len(hashes), CHUNK):
            chunk = hashes[start : start + CHUNK]
            async with ctx.write_lock:
                known = set((await session.exec(select(Image.sha256).where(col(Image.sha256).in_(chunk)))).all())
                await session.commit()
                orphans = [path for sha in chunk if sha not in known for path in files[sha]]
                if orphans:
                    await ctx.executor.run(_delete, orphans)
                    removed += len(orphans)
    if removed:
        log.info("removed %d files that no image record referenced", removed)
    return removed


async def sweep_in_background(ctx: AppContext) -> None:
    try:
        await sweep_orphan_files(ctx)
    except Exception:  # housekeeping must never take the service down
        log.exception("sweeping unreferenced files failed")
