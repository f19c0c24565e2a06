"""Libraries: folders inside IMPORT_ROOTS indexed in place, and the scans that keep the catalog in step.

The originals stay where they are, read-only: the service stores only thumbnails, vectors and metadata,
and never creates, changes, moves or deletes a file in a library's folder (`library_files` opens them).

A scan compares the folder with the library's `library_file` rows:
- a file whose size and mtime are unchanged is not read again;
- a new or changed file is hashed; bytes the collection knows already (a file moved or renamed, a copy,
  an upload with the same bytes) link the path to that image, so its id, clusters and tags survive; new
  bytes are ingested like an upload, without the copy;
- a file that is gone unlinks its path; an image left with no file is removed from the catalog (its
  thumbnail and vector with it), and an image whose recorded path went away but whose bytes lie at another
  path now names that one;
- files modified in the last LIBRARY_SETTLE_SECONDS are left for the next scan: they may still be written.
The same bytes in two places are one image with two paths (two `library_file` rows).

A folder that cannot be read, or that lists no file at all while the library had files (the empty mount
point of an unmounted disk), takes the library offline: nothing is removed, its images are marked
offline, and the next scan that finds the folder brings them back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import delete, func, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from backend.context import AppContext
from backend.errors import DomainError, LibraryExists, LibraryNotFound
from backend.models import (
    DismissedFile,
    Image,
    Job,
    LibrariesPublic,
    Library,
    LibraryCreate,
    LibraryFile,
    LibraryPublic,
    LibraryUpdate,
    utcnow,
)
from backend.services.catalog import forget_images
from backend.services.importer import check_import_path
from backend.services.jobs import Failures, JobHandle
from backend.services.library_files import (
    HashedFile,
    descriptor_path,
    hash_open_file,
    list_folder,
    open_in_library,
)
from backend.services.storage import IncomingFile, LibraryOrigin, StagedFile
from backend.services.uploads import ingest_files

log = logging.getLogger(__name__)


# -- the records --------------------------------------------------------------------------------------------


async def _load(session: AsyncSession, library_id: int) -> Library:
    library = await session.get(Library, library_id)
    if library is None:
        raise LibraryNotFound(f"library {library_id} not found")
    return library


async def _public(session: AsyncSession, libraries: list[Library]) -> list[LibraryPublic]:
    ids = [library.id for library in libraries]
    images = dict(
        (
            await session.exec(
                select(Image.library_id, func.count())
                .where(col(Image.library_id).in_(ids))
                .group_by(col(Image.library_id))
            )
        ).all()
    )
    files = dict(
        (
            await session.exec(
                select(LibraryFile.library_id, func.count())
                .where(col(LibraryFile.library_id).in_(ids))
                .group_by(col(LibraryFile.library_id))
            )
        ).all()
    )
    return [
        LibraryPublic(
            **library.model_dump(), images=images.get(library.id or 0, 0), files=files.get(library.id or 0, 0)
        )
        for library in libraries
    ]


async def create_library(ctx: AppContext, body: LibraryCreate, *, roots: list[Path] | None = None) -> LibraryPublic:
    """Register a folder inside IMPORT_ROOTS (the import's path rules; the command line, run by the operator,
    passes the folder itself as `roots`); no folder may be another library's, nor lie inside or around one.
    Its first scan is queued."""
    settings = ctx.settings
    allowed = settings.import_roots if roots is None else roots
    folder = await ctx.executor.run(check_import_path, body.path, roots=allowed, storage_root=settings.storage_root)
    name = (body.name or folder.name or str(folder)).strip()[:200] or str(folder)[:200]
    async with ctx.write_lock, ctx.sessions() as session:
        for other in (await session.exec(select(Library))).all():
            existing = Path(other.path)
            if folder == existing or folder.is_relative_to(existing) or existing.is_relative_to(folder):
                raise LibraryExists(f"{body.path} is, or overlaps, the folder of library {other.id} ({other.name!r})")
            if other.name == name:
                raise LibraryExists(f"a library is called {name!r} already", code="library_name_taken")
        library = Library(name=name, path=str(folder), watch=body.watch)
        session.add(library)
        try:
            await session.commit()
        except IntegrityError as exc:  # another replica registered it meanwhile
            raise LibraryExists(f"{body.path} or the name {name!r} was registered meanwhile") from exc
        await session.refresh(library)
        public = (await _public(session, [library]))[0]
    job = await start_scan(ctx, public.id)
    ctx.libraries_changed.set()
    return public.model_copy(update={"scan_job": job.id})


async def list_libraries(ctx: AppContext) -> LibrariesPublic:
    async with ctx.sessions() as session:
        libraries = list((await session.exec(select(Library).order_by(col(Library.id)))).all())
        return LibrariesPublic(data=await _public(session, libraries), count=len(libraries))


async def get_library(ctx: AppContext, library_id: int) -> LibraryPublic:
    async with ctx.sessions() as session:
        return (await _public(session, [await _load(session, library_id)]))[0]


async def update_library(ctx: AppContext, library_id: int, body: LibraryUpdate) -> LibraryPublic:
    async with ctx.write_lock, ctx.sessions() as session:
        library = await _load(session, library_id)
        if body.name is not None:
            name = body.name.strip()
            if not name:
                raise DomainError("name must contain something other than spaces", code="validation_error")
            taken = (await session.exec(select(Library).where(Library.name == name, Library.id != library_id))).first()
            if taken is not None:
                raise LibraryExists(f"a library is called {name!r} already", code="library_name_taken")
            library.name = name
        if body.watch is not None:
            library.watch = body.watch
        session.add(library)
        await session.commit()
        await session.refresh(library)
        public = (await _public(session, [library]))[0]
    ctx.libraries_changed.set()
    return public


async def delete_library(ctx: AppContext, library_id: int) -> int:
    """Forget a library: its images leave the catalog (those whose bytes also lie elsewhere, in another
    library or as an upload, stay and name that place). Its folder is not touched. The images removed."""
    async with ctx.write_lock, ctx.sessions() as session:
        library = await _load(session, library_id)
        await session.exec(delete(LibraryFile).where(col(LibraryFile.library_id) == library_id))
        await session.delete(library)
        removed = await _settle_images(ctx, session, library_id)
    ctx.libraries_changed.set()
    return removed


# -- scanning -------------------------------------------------------------------------------------------------


async def start_scan(ctx: AppContext, library_id: int) -> Job:
    """Queue a scan of the library (the one already queued or running, if there is one)."""
    async with ctx.sessions() as session:
        await _load(session, library_id)

    async def run(handle: JobHandle) -> dict[str, Any]:
        return await scan_library(ctx, library_id, handle)

    return await ctx.jobs.submit("scan", {"library_id": library_id}, run)


async def scan_library(ctx: AppContext, library_id: int, handle: JobHandle) -> dict[str, Any]:
    settings = ctx.settings
    async with ctx.sessions() as session:
        library = await _load(session, library_id)
        known = {
            row.path: row
            for row in (await session.exec(select(LibraryFile).where(LibraryFile.library_id == library_id))).all()
        }
    root = Path(library.path)
    await handle.progress(0, None, "listing files")
    listing = await ctx.executor.run(list_folder, root, settings.storage_root)
    if listing is None or (not listing and known):
        reason = "the folder cannot be read" if listing is None else "the folder is empty, as an unmounted disk's is"
        await _set_online(ctx, library_id, online=False, reason=reason)
        return {"online": False, "reason": reason, "files": len(known)}
    if not library.online:
        await _set_online(ctx, library_id, online=True, reason=None)

    settle_before = time.time_ns() - int(settings.library_settle_seconds * 1e9)
    pending = [path for path, state in listing.items() if state.mtime_ns > settle_before]
    todo = sorted(
        path
        for path, state in listing.items()
        if state.mtime_ns <= settle_before
        and (path not in known or (known[path].size, known[path].mtime_ns) != (state.size, state.mtime_ns))
    )
    gone = [path for path in known if path not in listing]
    failures = Failures()
    counts = {"added": 0, "linked": 0, "unchanged": len(listing) - len(todo) - len(pending)}
    await handle.progress(0, len(todo), "reading new and changed files")
    for start in range(0, len(todo), settings.embed_batch_size):
        batch = todo[start : start + settings.embed_batch_size]
        added, linked = await _read_batch(ctx, handle, library_id, root, batch, known, failures)
        counts["added"] += added
        counts["linked"] += linked
        await handle.progress(start + len(batch), len(todo), "reading new and changed files")
    async with ctx.write_lock, ctx.sessions() as session:
        if gone:
            for chunk in _chunks(gone, 500):
                await session.exec(
                    delete(LibraryFile).where(
                        col(LibraryFile.library_id) == library_id, col(LibraryFile.path).in_(chunk)
                    )
                )
        removed = await _settle_images(ctx, session, library_id)
        await session.exec(
            update(Library).where(col(Library.id) == library_id).values(scanned_at=utcnow(), last_error=None)
        )
        await session.commit()
    if pending:
        _scan_again(ctx, library_id, settings.library_settle_seconds + 0.5)
    return {
        "online": True,
        "files": len(listing),
        **counts,
        "removed": removed,
        "gone": len(gone),
        "pending": len(pending),
        "failed": failures.count,
        "failures": failures.listed,
    }


# Follow-up scans waiting for files that were still being written (kept so they are not garbage-collected).
_follow_ups: set[asyncio.Task[None]] = set()


def _scan_again(ctx: AppContext, library_id: int, delay: float) -> None:
    """Scan the library once more after `delay`: it had files too fresh to read (still being written)."""

    async def later() -> None:
        await asyncio.sleep(delay)
        with contextlib.suppress(DomainError):  # deleted meanwhile, or the service is stopping
            await start_scan(ctx, library_id)

    task = asyncio.create_task(later(), name=f"library-{library_id}-settle")
    _follow_ups.add(task)
    task.add_done_callback(_follow_ups.discard)


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


async def _read_batch(
    ctx: AppContext,
    handle: JobHandle,
    library_id: int,
    root: Path,
    batch: list[str],
    known: dict[str, LibraryFile],
    failures: Failures,
) -> tuple[int, int]:
    """Hash a batch of files, link the known bytes, ingest the new ones; (images added, paths linked)."""
    opened: dict[str, int] = {}
    hashed: dict[str, HashedFile] = {}
    try:
        for path in batch:
            handle.checkpoint()
            try:
                fd = await ctx.executor.run(open_in_library, root, path)
            except DomainError as exc:
                failures.add(path=path, code=exc.code, detail=exc.detail)
                continue
            except OSError as exc:
                failures.add(path=path, code="unreadable", detail=f"cannot be read: {exc.strerror}")
                continue
            opened[path] = fd
            try:
                hashed[path] = await handle.unless_cancelled(
                    ctx.executor.run(hash_open_file, fd, ctx.settings.max_upload_bytes)
                )
            except DomainError as exc:
                failures.add(path=path, code=exc.code, detail=exc.detail)
            except OSError as exc:
                failures.add(path=path, code="unreadable", detail=f"cannot be read: {exc.strerror}")
        async with ctx.sessions() as session:
            hashes = {item.sha256 for item in hashed.values()}
            existing = dict(
                (await session.exec(select(Image.sha256, Image.id).where(col(Image.sha256).in_(hashes)))).all()
            )
            # Bytes purged from the trash stay out of this library's catalog: the file is left where it is.
            dismissed = set(
                (
                    await session.exec(
                        select(DismissedFile.sha256).where(
                            DismissedFile.library_id == library_id, col(DismissedFile.sha256).in_(hashes)
                        )
                    )
                ).all()
            )
        hashed = {path: item for path, item in hashed.items() if item.sha256 not in dismissed}
        incoming = [
            IncomingFile(
                filename=PurePosixPath(path).name,
                staged=StagedFile(path=descriptor_path(opened[path]), sha256=item.sha256, size=item.size),
                origin=LibraryOrigin(library_id=library_id, path=path),
            )
            for path, item in hashed.items()
            if item.sha256 not in existing
        ]
        outcomes = await ingest_files(ctx, incoming) if incoming else []
    finally:
        for fd in opened.values():
            with contextlib.suppress(OSError):
                os.close(fd)
    images: dict[str, int] = {}
    for file, outcome in zip(incoming, outcomes, strict=True):
        assert file.origin is not None
        if outcome.error is not None:
            failures.add(path=file.origin.path, code=outcome.error.code, detail=outcome.error.detail)
        elif outcome.image is not None and outcome.image.id is not None:
            images[file.origin.path] = outcome.image.id
    added = sum(1 for outcome in outcomes if outcome.created)
    for path, item in hashed.items():
        known_id = existing.get(item.sha256)
        if known_id is not None:
            images[path] = known_id
    async with ctx.write_lock, ctx.sessions() as session:
        for path, image_id in images.items():
            await _link(session, library_id, path, hashed[path], image_id, known.get(path))
        await session.commit()
    return added, len(images) - added


async def _link(
    session: AsyncSession, library_id: int, path: str, item: HashedFile, image_id: int, row: LibraryFile | None
) -> None:
    values: dict[str, Any] = {"size": item.size, "mtime_ns": item.mtime_ns, "sha256": item.sha256, "image_id": image_id}
    current = row
    if current is None:
        current = (
            await session.exec(
                select(LibraryFile).where(LibraryFile.library_id == library_id, LibraryFile.path == path)
            )
        ).first()
    if current is None:
        session.add(
            LibraryFile(
                library_id=library_id,
                path=path,
                size=item.size,
                mtime_ns=item.mtime_ns,
                sha256=item.sha256,
                image_id=image_id,
            )
        )
        await session.flush()
    else:  # changed, or another scan got there first
        await session.exec(update(LibraryFile).where(col(LibraryFile.id) == current.id).values(**values))


async def _settle_images(ctx: AppContext, session: AsyncSession, library_id: int) -> int:
    """After files were unlinked: the library's images that lost their recorded path name another file of
    theirs, or, with none left and no stored original, leave the catalog. Commits. The images removed."""
    images = (await session.exec(select(Image).where(Image.library_id == library_id))).all()
    files: dict[int, list[LibraryFile]] = {}
    ids = [image.id for image in images]
    for start in range(0, len(ids), 500):
        rows = (
            await session.exec(select(LibraryFile).where(col(LibraryFile.image_id).in_(ids[start : start + 500])))
        ).all()
        for row in rows:
            files.setdefault(row.image_id, []).append(row)
    orphans: list[Image] = []
    for image in images:
        mine = files.get(image.id or 0, [])
        if any(row.library_id == library_id and row.path == image.path for row in mine):
            continue
        if mine:
            chosen = min(mine, key=lambda row: (row.library_id != library_id, row.library_id, row.path))
            image.library_id, image.path = chosen.library_id, chosen.path
            image.filename = PurePosixPath(chosen.path).name
            session.add(image)
        elif image.storage_key:
            image.library_id, image.path = None, None
            session.add(image)
        else:
            orphans.append(image)
    await session.flush()
    if orphans:
        await forget_images(ctx, session, orphans)
    else:
        await session.commit()
    return len(orphans)


async def _set_online(ctx: AppContext, library_id: int, *, online: bool, reason: str | None) -> None:
    async with ctx.write_lock, ctx.sessions() as session:
        await session.exec(
            update(Library).where(col(Library.id) == library_id).values(online=online, last_error=reason)
        )
        await session.exec(update(Image).where(col(Image.library_id) == library_id).values(offline=not online))
        await session.commit()
    if not online:
        log.warning("library %s is offline: %s", library_id, reason)


# -- following the folders ----------------------------------------------------------------------------------


class LibraryWatcher:
    """While the service runs: every library with `watch` is followed with `watchfiles` (inotify, or
    polling where the folder sends no events), a change queueing a scan of that library a moment later, and
    every library is scanned every LIBRARY_RESCAN_INTERVAL seconds and at startup, for what happened while
    the service was down or what no event told."""

    def __init__(self, ctx: AppContext) -> None:
        self._ctx = ctx
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._pending: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="library-watcher")

    async def close(self) -> None:
        self._stop.set()
        for task in list(self._pending):
            task.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _libraries(self) -> list[Library]:
        async with self._ctx.sessions() as session:
            return list((await session.exec(select(Library).order_by(col(Library.id)))).all())

    async def _scan(self, library_id: int) -> None:
        try:
            await start_scan(self._ctx, library_id)
        except DomainError as exc:  # deleted meanwhile, shutting down, too many jobs
            log.info("library %s not scanned: %s", library_id, exc.detail)

    def _later(self, library_id: int, delay: float) -> None:
        """Scan once more after `delay`: files still being written when the first scan ran."""

        async def scan() -> None:
            await asyncio.sleep(delay)
            await self._scan(library_id)

        task = asyncio.create_task(scan(), name=f"library-rescan-{library_id}")
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _run(self) -> None:
        interval = self._ctx.settings.library_rescan_interval
        last_full = 0.0
        while not self._stop.is_set():
            self._ctx.libraries_changed.clear()
            libraries = await self._libraries()
            if time.monotonic() - last_full >= interval:
                last_full = time.monotonic()
                for library in libraries:
                    await self._scan(library.id or 0)
            watched = {library.id or 0: Path(library.path) for library in libraries if library.watch}
            timeout = max(0.1, interval - (time.monotonic() - last_full))
            if watched:
                await self._watch(watched, timeout)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._ctx.libraries_changed.wait(), timeout)

    async def _watch(self, watched: dict[int, Path], timeout: float) -> None:
        """Follow the folders until the libraries change or the rescan is due; each batch of changes queues a
        scan of the libraries it touched, and one more after the settle time for files still being written."""
        from watchfiles import awatch  # imported here: only a process that watches needs it

        online = {library_id: root for library_id, root in watched.items() if root.is_dir()}
        stop = asyncio.Event()

        async def until_due() -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ctx.libraries_changed.wait(), timeout)
            stop.set()

        waiter = asyncio.create_task(until_due())
        settle = self._ctx.settings.library_settle_seconds
        try:
            if not online:  # every watched folder is offline: wait for the next rescan to look again
                await stop.wait()
                return
            async for changes in awatch(
                *online.values(),
                stop_event=stop,
                debounce=int(min(1600, max(50, settle * 500))),
                step=50,
                recursive=True,
                force_polling=self._ctx.settings.library_watch_polling,
                poll_delay_ms=500,
                ignore_permission_denied=True,
            ):
                touched = {
                    library_id
                    for library_id, root in online.items()
                    for _, changed in changes
                    if Path(changed).is_relative_to(root)
                }
                for library_id in touched:
                    await self._scan(library_id)
                    self._later(library_id, settle + 0.5)
        except (OSError, RuntimeError) as exc:  # a folder went away under the watcher
            log.info("watching the libraries stopped (%s); the next rescan looks again", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(timeout, 5))
        finally:
            waiter.cancel()
