"""Folder import: walk a folder inside IMPORT_ROOTS and ingest its images through the upload pipeline.

Path rules (checked before the job starts, and again for every file found): no `..` components,
symlinks resolved, the result inside one of the configured roots and outside STORAGE_ROOT.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from backend.context import AppContext
from backend.errors import (
    ChangedFile,
    DomainError,
    ImportPathNotFound,
    ImportPathRefused,
    InvalidImportPath,
    ModelUnavailableError,
    UnreadableFile,
)
from backend.models import Job
from backend.services.captions import caption_stored
from backend.services.imaging import IMAGE_EXTENSIONS
from backend.services.jobs import Failures, JobCancelled, JobHandle
from backend.services.storage import FileStore, IncomingFile, StagedFile, StagingWriter
from backend.services.uploads import ingest_files

# Failures listed in the job's result (all are counted).
# A job's result lists the ids of at most this many images it made (its failures: jobs.MAX_LISTED).
MAX_LISTED_IDS = 1000
READ_CHUNK = 1024 * 1024


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


def check_import_path(raw: str, *, roots: list[Path], storage_root: Path) -> Path:
    """The resolved folder to import, or an error that says why it is refused."""
    if not roots:
        raise ImportPathRefused(
            "folder import is disabled: set IMPORT_ROOTS to the folders it may read", code="import_disabled"
        )
    if "\x00" in raw:
        raise InvalidImportPath("the path contains a NUL character")
    if ".." in PurePath(raw).parts:
        raise InvalidImportPath("the path must not contain '..' components", code="path_traversal")
    try:
        given = Path(raw).expanduser()
    except RuntimeError as exc:  # `~name` for a user this machine does not know
        raise InvalidImportPath(f"{raw}: unknown user in `~`") from exc
    if not given.is_absolute():
        raise InvalidImportPath("the path must be absolute")
    outside = ImportPathRefused(f"{raw} is outside the import roots (IMPORT_ROOTS)", code="path_outside_roots")
    # Where the path leads is checked before whether it exists, so the answers say nothing about what
    # lies outside the roots (nor where a link there points).
    try:
        resolved = given.resolve(strict=False)
    except (OSError, RuntimeError) as exc:  # a symlink loop
        if not _inside(given, roots):
            raise outside from exc
        raise ImportPathNotFound(f"the folder {raw} cannot be read") from exc
    if not _inside(resolved, roots):
        raise outside
    if resolved.is_relative_to(storage_root):
        # A folder that merely contains STORAGE_ROOT is fine: the walk skips the storage subtree.
        raise ImportPathRefused("the service's own storage folder cannot be imported", code="path_is_storage")
    try:
        is_dir = stat.S_ISDIR(resolved.stat().st_mode)
    except OSError as exc:  # missing, or a parent folder that cannot be entered
        raise ImportPathNotFound(f"the folder {raw} does not exist or cannot be read") from exc
    if not is_dir:
        raise InvalidImportPath(f"{raw} is not a folder", code="not_a_directory")
    return resolved


@dataclass(frozen=True)
class ListedFile:
    """A file found in the folder: the path it was listed under, where it resolved, and which file that was
    (device and inode), so that what is opened later is checked to be the very file that was checked."""

    path: Path
    real: Path
    device: int
    inode: int


def find_files(
    folder: Path, *, recursive: bool, roots: list[Path], storage_root: Path, shown: Path | None = None
) -> tuple[list[ListedFile], Failures, int]:
    """(image files to read, refused entries, skipped non-image files); sorted, symlinks checked. Paths are
    reported under `shown` (the folder as the caller named it), never under where a link led. Synchronous."""
    found: list[ListedFile] = []
    refused = Failures()
    skipped = 0
    for current, dirs, files in os.walk(folder, followlinks=False):
        base = Path(current)
        # Hidden folders are left out; symlinked folders are not followed (os.walk lists them as dirs).
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (base / d).is_symlink()) if recursive else []
        if base.resolve().is_relative_to(storage_root):
            dirs[:] = []
            continue
        for name in sorted(files):
            path = base / name
            listed_as = str((shown or folder) / path.relative_to(folder))
            if name.startswith("."):
                continue
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                skipped += 1
                continue
            try:
                real = path.resolve(strict=True)
            except (OSError, RuntimeError):
                refused.add(path=listed_as, code="unreadable", detail="broken link or unreadable file")
                continue
            if not _inside(real, roots) or real.is_relative_to(storage_root):
                refused.add(
                    path=listed_as, code="path_outside_roots", detail="a link that leads outside the import roots"
                )
                continue
            try:
                status = os.stat(real, follow_symlinks=False)
            except OSError:
                refused.add(path=listed_as, code="unreadable", detail="the file cannot be read")
                continue
            if stat.S_ISREG(status.st_mode):
                found.append(ListedFile(path=Path(listed_as), real=real, device=status.st_dev, inode=status.st_ino))
    return found, refused, skipped


class FileCopy:
    """Copies one listed file into tmp/ while hashing it, like an upload, a chunk per call (synchronous: each
    call runs in the executor). The file is opened without following a link and without blocking (a FIFO
    would wait for a writer forever), and must be the regular file that was listed: the path is checked
    by what it leads to when it is opened, not only when the folder was listed."""

    def __init__(self, store: FileStore, listed: ListedFile, max_bytes: int) -> None:
        self._store, self._listed, self._max_bytes = store, listed, max_bytes
        self._fd: int | None = None
        self._writer: StagingWriter | None = None
        # A cancel abandons the copy from the event loop while a call may be running in a thread (a read
        # that hangs): whoever comes last, the abandoning or the call, closes the file and the temp file.
        self._lock = threading.Lock()
        self._running = False
        self._abandoned = False

    @contextlib.contextmanager
    def _step(self) -> Iterator[bool]:
        """One call's turn: False when the copy was abandoned already; closed at its end when it was
        abandoned meanwhile."""
        with self._lock:
            self._running = not self._abandoned
        try:
            yield self._running
        finally:
            with self._lock:
                self._running = False
                if self._abandoned:
                    self.close()

    def open(self) -> None:
        with self._step() as go:
            if not go:
                return
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
            try:
                self._fd = os.open(self._listed.real, flags)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise ChangedFile("the file was replaced by a link after the folder was listed") from exc
                raise
            status = os.fstat(self._fd)
            if not stat.S_ISREG(status.st_mode):
                raise ChangedFile("the file is no longer a regular file (a FIFO, a device...): it is not read")
            if (status.st_dev, status.st_ino) != (self._listed.device, self._listed.inode):
                raise ChangedFile("the file was replaced after the folder was listed")
            self._writer = self._store.open_staging(self._max_bytes)

    def copy_chunk(self) -> bool:
        """Copy the next piece; False at the end of the file. Past MAX_UPLOAD_BYTES it is refused."""
        with self._step() as go:
            if not go:
                return False
            assert self._fd is not None and self._writer is not None
            chunk = os.read(self._fd, READ_CHUNK)
            if not chunk:
                return False
            self._writer.write(chunk)
            return True

    def finish(self) -> StagedFile:
        assert self._writer is not None
        writer, self._writer = self._writer, None
        self.close()
        return writer.finish()

    def abandon(self) -> None:
        """The job stopped waiting for this copy: close it now, or, when a call is still running, as soon
        as that call returns. Called on the event loop: closing a local file and removing a temp file do
        not wait, and a worker thread may be the one that hangs."""
        with self._lock:
            self._abandoned = True
            if not self._running:
                self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


async def _stage(ctx: AppContext, handle: JobHandle, listed: ListedFile) -> IncomingFile:
    """One file into tmp/; a cancel stops it at once, even while a read hangs (the read is abandoned)."""
    copy = FileCopy(ctx.store, listed, ctx.settings.max_upload_bytes)
    try:
        await handle.unless_cancelled(ctx.executor.run(copy.open))
        while await handle.unless_cancelled(ctx.executor.run(copy.copy_chunk)):
            pass
        staged = await ctx.executor.run(copy.finish)
    except JobCancelled:
        copy.abandon()  # between two calls or during one: either way nothing stays open
        raise
    except DomainError as exc:
        await ctx.executor.run(copy.close)
        return IncomingFile(filename=listed.path.name, error=exc)
    except OSError as exc:
        await ctx.executor.run(copy.close)
        return IncomingFile(filename=listed.path.name, error=UnreadableFile(f"could not read: {exc.strerror}"))
    return IncomingFile(filename=listed.path.name, staged=staged)


async def start_import(
    ctx: AppContext, raw_path: str, *, recursive: bool = True, roots: list[Path] | None = None
) -> Job:
    """Check the folder, then queue its import. `roots` are the folders it may lie in: IMPORT_ROOTS by
    default (the API); the command line, run by the operator, passes the folder itself."""
    settings = ctx.settings
    allowed = settings.import_roots if roots is None else roots
    folder = await ctx.executor.run(check_import_path, raw_path, roots=allowed, storage_root=settings.storage_root)
    await ctx.clip.get()  # unavailable now rather than a failed job when CLIP cannot load

    async def run(handle: JobHandle) -> dict[str, Any]:
        return await _run(ctx, handle, folder, Path(raw_path).expanduser(), recursive, allowed)

    # The path as the caller gave it: where a link inside the roots leads is nobody's business but the job's.
    return await ctx.jobs.submit("import", {"path": raw_path, "recursive": recursive}, run)


async def _run(
    ctx: AppContext, handle: JobHandle, folder: Path, shown: Path, recursive: bool, roots: list[Path]
) -> dict[str, Any]:
    settings = ctx.settings
    await handle.progress(0, None, "listing files")
    paths, failures, skipped = await ctx.executor.run(
        find_files, folder, recursive=recursive, roots=roots, storage_root=settings.storage_root, shown=shown
    )
    counts = {"created": 0, "duplicates": 0}
    created_ids: list[int] = []

    def summary(done: int) -> dict[str, Any]:
        return {
            **counts,
            "failed": failures.count,
            "skipped": skipped,
            "files": len(paths),
            "files_done": done,
            "failures": failures.listed,
            "image_ids": created_ids[:MAX_LISTED_IDS],
        }

    await handle.progress(0, len(paths), "importing")
    for start in range(0, len(paths), settings.embed_batch_size):
        batch = paths[start : start + settings.embed_batch_size]
        incoming: list[IncomingFile] = []
        try:
            for listed in batch:
                handle.checkpoint()  # a cancel stops before the next copy; staged files are removed below
                incoming.append(await _stage(ctx, handle, listed))
            outcomes = await ingest_files(ctx, incoming)
        finally:
            for item in incoming:
                if item.staged is not None:
                    await ctx.executor.run(ctx.store.discard, item.staged)  # a no-op once ingest moved it
        for listed, outcome in zip(batch, outcomes, strict=True):
            if outcome.error is not None:
                failures.add(path=str(listed.path), code=outcome.error.code, detail=outcome.error.detail)
            elif outcome.duplicate:
                counts["duplicates"] += 1
            else:
                counts["created"] += 1
                assert outcome.image is not None and outcome.image.id is not None
                created_ids.append(outcome.image.id)
        handle.partial = summary(start + len(batch))
        await handle.progress(start + len(batch), len(paths), "importing")
    result = summary(len(paths))
    if settings.caption_on_upload and created_ids:

        async def progress(done: int, total: int) -> None:
            await handle.progress(done, total, "captioning")

        try:
            result["captioned"] = len(await caption_stored(ctx, created_ids, progress=progress))
        except ModelUnavailableError as exc:
            result["caption_error"] = exc.detail
    return result
