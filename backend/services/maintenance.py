"""Housekeeping: the startup sweep of unreferenced files, and `check` (database, files and index compared).

Unreferenced originals and thumbnails are left when the process dies between placing a file and committing
its row. The sweep runs in the background after startup; each deletion is decided under the app's write
lock, the same lock under which uploads place files and commit rows, so a file being stored right now is
never taken.

`check_collection` reads everything and changes nothing unless asked to repair; a repair only ever does
what loses no data: it removes temp files and unreferenced files (what the startup sweep removes too),
makes missing thumbnails again from the originals, re-embeds images whose stored vector is damaged, and
rebuilds the index from the database. A record whose original is gone is reported, never deleted.
"""

from __future__ import annotations

import logging
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlmodel import col, select

from backend.context import AppContext
from backend.errors import DomainError
from backend.models import Image
from backend.services.imaging import decode_image, make_thumbnail
from backend.services.index import stored_vector
from backend.services.reindex import reembed_images
from backend.services.storage import FileStore
from backend.services.trash import purge_in_background

log = logging.getLogger(__name__)
_SHA_NAME = re.compile(r"^([0-9a-f]{64})(?:\.[A-Za-z0-9]+)?$")
CHUNK = 500


# Beside other replicas, a file placed this recently may belong to an upload that is about to commit its row.
SHARED_SWEEP_MIN_AGE = 3600.0


def _files_by_sha(root: Path, min_age: float = 0.0) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = defaultdict(list)
    cutoff = time.time() - min_age
    for folder in ("originals", "thumbnails"):
        for path in (root / folder).glob("*/*"):
            match = _SHA_NAME.match(path.name)
            if match and path.is_file() and (min_age <= 0 or path.stat().st_mtime < cutoff):
                found[match.group(1)].append(path)
    return found


def _delete(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


async def sweep_orphan_files(ctx: AppContext) -> int:
    """Delete files whose SHA-256 no row has; returns how many files went. Beside other replicas (PostgreSQL)
    only files older than SHARED_SWEEP_MIN_AGE: the write lock is this process's, not theirs."""
    min_age = SHARED_SWEEP_MIN_AGE if ctx.settings.uses_postgres else 0.0
    files = await ctx.executor.run(_files_by_sha, ctx.store.root, min_age)
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
    """Sweep unreferenced files once, then purge the expired trash every hour (until cancelled)."""
    try:
        await sweep_orphan_files(ctx)
    except Exception:  # housekeeping must never take the service down
        log.exception("sweeping unreferenced files failed")
    await purge_in_background(ctx)


@dataclass
class CheckReport:
    """What `check` found, and what a repair did."""

    collection: str
    images: int = 0
    integrity: str = "ok"
    temp_files: int = 0
    orphan_files: int = 0
    missing_originals: list[int] = field(default_factory=list)
    missing_thumbnails: list[int] = field(default_factory=list)
    damaged_vectors: list[int] = field(default_factory=list)
    stale_vectors: int = 0
    index: str = "ok"
    repaired: list[str] = field(default_factory=list)
    unrepaired: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        found = []
        if self.integrity != "ok":
            found.append(f"database integrity check: {self.integrity}")
        if self.temp_files:
            found.append(f"{self.temp_files} temp files left in tmp/")
        if self.orphan_files:
            found.append(f"{self.orphan_files} files that no image record references")
        if self.missing_originals:
            found.append(
                f"{len(self.missing_originals)} images whose original is missing: {_ids(self.missing_originals)}"
            )
        if self.missing_thumbnails:
            found.append(
                f"{len(self.missing_thumbnails)} images whose thumbnail is missing: {_ids(self.missing_thumbnails)}"
            )
        if self.damaged_vectors:
            found.append(
                f"{len(self.damaged_vectors)} images whose stored vector is damaged: {_ids(self.damaged_vectors)}"
            )
        if self.index != "ok":
            found.append(f"index: {self.index}")
        return found

    @property
    def healthy(self) -> bool:
        """Nothing is wrong now: no problem was found, or every one was repaired."""
        return not self.problems or (bool(self.repaired) and not self.unrepaired)

    def lines(self) -> list[str]:
        out = [f"collection {self.collection}: {self.images} images"]
        problems = self.problems
        out += [f"problem: {line}" for line in problems] or ["database, files and index agree"]
        if self.stale_vectors:
            out.append(
                f"note: {self.stale_vectors} images were embedded by another CLIP model and are not searched: "
                "run `image-organizer reindex`"
            )
        out += [f"repaired: {line}" for line in self.repaired]
        out += [f"not repaired: {line}" for line in self.unrepaired]
        if problems and not self.repaired and not self.unrepaired:
            out.append("run again with --repair to fix what can be fixed without losing data")
        return out


def _ids(ids: list[int], shown: int = 20) -> str:
    listed = ", ".join(map(str, ids[:shown]))
    return listed + (f" and {len(ids) - shown} more" if len(ids) > shown else "")


def _remake_thumbnail(
    store: FileStore, storage_key: str, thumbnail_key: str, size: int, max_pixels: int, max_bytes: int
) -> None:
    decoded = decode_image(store.path(storage_key), max_pixels, min_side=size, max_bytes=max_bytes)
    store.write_atomic(thumbnail_key, make_thumbnail(decoded.rgb, size))


async def check_collection(ctx: AppContext, *, repair: bool = False) -> CheckReport:
    """Compare the database, the files on disk and the saved index of a collection opened without
    maintenance (`open_collection(maintain=False)`); with `repair`, fix what loses no data."""
    report = CheckReport(collection=ctx.collection)
    model = ctx.settings.embedding_model
    files = await ctx.executor.run(_files_by_sha, ctx.store.root)
    report.temp_files = await ctx.executor.run(lambda: sum(1 for p in ctx.store.tmp_dir.glob("*") if p.is_file()))
    known: set[str] = set()
    thumbnails_to_make: list[tuple[int, str, str]] = []
    async with ctx.sessions() as session:
        connection = await session.connection()
        if connection.dialect.name == "sqlite":
            rows = (await connection.exec_driver_sql("PRAGMA integrity_check")).all()
            report.integrity = "; ".join(str(row[0]) for row in rows)[:500] or "ok"
        last_id = 0
        while True:  # in chunks: a million vectors need not be in memory at once
            chunk = (
                await session.exec(
                    select(Image).where(col(Image.id) > last_id).order_by(col(Image.id)).limit(CHUNK * 20)
                )
            ).all()
            if not chunk:
                break
            last_id = chunk[-1].id or 0
            for image in chunk:
                assert image.id is not None
                image_id, sha, storage_key, thumbnail_key = (
                    image.id,
                    image.sha256,
                    image.storage_key,
                    image.thumbnail_key,
                )
                report.images += 1
                known.add(sha)
                original = ctx.store.path(storage_key)
                # A library's original lies in its folder, which its scans follow; only uploads are checked here.
                in_library = image.library_id is not None
                if not in_library and original not in files.get(sha, []):
                    report.missing_originals.append(image_id)
                if ctx.store.path(thumbnail_key) not in files.get(sha, []):
                    report.missing_thumbnails.append(image_id)
                    if not in_library and original in files.get(sha, []):
                        thumbnails_to_make.append((image_id, storage_key, thumbnail_key))
                if image.embedding_model != model:
                    report.stale_vectors += 1
                elif stored_vector(image.embedding, image.embedding_dim) is None:
                    report.damaged_vectors.append(image_id)
    report.orphan_files = sum(len(paths) for sha, paths in files.items() if sha not in known)
    try:
        saved = await ctx.index.saved_ids()
        expected = await ctx.index.database_ids(ctx.sessions)
        if not np.array_equal(saved, expected):
            report.index = f"the saved index holds {len(saved)} vectors, the database {len(expected)} of this model"
    except FileNotFoundError:
        report.index = "no saved index file" if report.images - report.stale_vectors else "ok"
    except Exception as exc:  # unreadable, or not an index this version writes
        report.index = f"the saved index cannot be read ({type(exc).__name__}: {exc})"
    if repair and report.problems:
        await _repair(ctx, report, thumbnails_to_make)
    return report


async def _repair(ctx: AppContext, report: CheckReport, thumbnails: list[tuple[int, str, str]]) -> None:
    if report.integrity != "ok":
        report.unrepaired.append("the database is damaged: restore organizer.db from a backup")
    if report.temp_files:
        removed = await ctx.executor.run(ctx.store.sweep_tmp)
        report.repaired.append(f"removed {removed} temp files")
    if report.orphan_files:
        removed = await sweep_orphan_files(ctx)
        report.repaired.append(f"removed {removed} unreferenced files")
    made = 0
    for image_id, storage_key, thumbnail_key in thumbnails:
        try:
            await ctx.executor.run(
                _remake_thumbnail,
                ctx.store,
                storage_key,
                thumbnail_key,
                ctx.settings.thumbnail_size,
                ctx.settings.max_image_pixels,
                ctx.settings.max_decode_bytes,
            )
            made += 1
        except DomainError as exc:
            report.unrepaired.append(f"thumbnail of image {image_id}: {exc.detail}")
    if made:
        report.repaired.append(f"made {made} thumbnails again from their originals")
    if report.missing_originals:
        report.unrepaired.append(
            f"{len(report.missing_originals)} images have lost their original: restore the files from a backup, or "
            "delete the records (DELETE /images/ID)"
        )
    if report.index != "ok" or report.damaged_vectors:
        # Load the saved index when it agrees with the database, else rebuild it (damaged vectors left out).
        await ctx.index.load_or_rebuild(ctx.sessions)
        if report.index != "ok":
            report.repaired.append(f"rebuilt the index from the database ({await ctx.index.size()} vectors)")
    damaged = [i for i in report.damaged_vectors if i not in set(report.missing_originals)]
    if damaged:
        try:
            done, failures = await reembed_images(ctx, damaged)
        except DomainError as exc:  # CLIP cannot load
            report.unrepaired.append(f"damaged vectors not re-embedded: {exc.detail}")
        else:
            if done:
                report.repaired.append(f"re-embedded {done} images whose stored vector was damaged")
            for failure in failures:
                report.unrepaired.append(f"image {failure['image_id']}: {failure['detail']}")
    if len(damaged) < len(report.damaged_vectors):
        report.unrepaired.append("images with a damaged vector and no original cannot be re-embedded")
    await ctx.index.save()
