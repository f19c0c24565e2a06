"""Files under STORAGE_ROOT: content-addressed originals, thumbnails, and atomic writes.

Synchronous helpers: the services call them through the executor.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from backend.errors import DomainError, EmptyFileError, FileTooLargeError
from ml.index import fsync_dir


@dataclass(frozen=True)
class StagedFile:
    """An upload copied into STORAGE_ROOT/tmp, hashed and synced, not yet in its final place."""

    path: Path
    sha256: str
    size: int


@dataclass
class IncomingFile:
    """A file handed to the service (an upload part, a file of an imported folder): staged in tmp/ already,
    or refused while it was received."""

    filename: str
    staged: StagedFile | None = None
    error: DomainError | None = None
    # The multipart field an upload came in (empty for files of a folder).
    form_field: str = ""
    # A library file indexed in place: `staged` then reads the original itself (never moved or removed).
    origin: LibraryOrigin | None = None


@dataclass(frozen=True)
class LibraryOrigin:
    library_id: int
    path: str  # relative to the library's folder, with /


# Receives a request's files: staged on entering, whatever is still in tmp/ removed on leaving. Services that
# take one check their preconditions (a model, say) before they enter it, so nothing is read in vain.
Receive = Callable[[], AbstractAsyncContextManager[list[IncomingFile]]]


class StagingWriter:
    """Receives a file piece by piece: writes, hashes and counts; refuses it past `max_bytes`.

    Synchronous: call it through the executor. On any refusal the temp file is already gone.
    """

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.size = 0
        self._digest = hashlib.sha256()
        self._file: BinaryIO | None = open(path, "wb")  # noqa: SIM115 - closed in finish/abort

    def write(self, data: bytes) -> None:
        assert self._file is not None, "write after finish or abort"
        self.size += len(data)
        if self.size > self.max_bytes:
            self.abort()
            raise FileTooLargeError(f"file is larger than the limit of {self.max_bytes} bytes")
        self._digest.update(data)
        self._file.write(data)

    def finish(self) -> StagedFile:
        assert self._file is not None, "finish after finish or abort"
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            if self.size == 0:
                raise EmptyFileError("file is empty")
        except BaseException:
            self.abort()
            raise
        return StagedFile(path=self.path, sha256=self._digest.hexdigest(), size=self.size)

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.path.unlink(missing_ok=True)


# A file another replica left in tmp/ is its leftover (a replica that died) once it is this old.
FOREIGN_TMP_SECONDS = 24 * 3600.0


class FileStore:
    """The files of a collection under its root. With `replica` (replicas sharing one STORAGE_ROOT) each
    process stages in a folder of its own, tmp/<replica>, so one replica's startup never empties what
    another is writing."""

    def __init__(self, root: Path, replica: str | None = None) -> None:
        self.root = root
        self.tmp_root = root / "tmp"
        self.tmp_dir = self.tmp_root / re.sub(r"[^A-Za-z0-9._-]", "_", replica) if replica else self.tmp_root
        self.index_dir = root / "index"

    def ensure_dirs(self) -> None:
        for folder in (self.root, self.tmp_dir, self.index_dir, self.root / "originals", self.root / "thumbnails"):
            folder.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def original_key(sha256: str, extension: str) -> str:
        return f"originals/{sha256[:2]}/{sha256}.{extension}"

    @staticmethod
    def thumbnail_key(sha256: str) -> str:
        return f"thumbnails/{sha256[:2]}/{sha256}.jpg"

    def path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"storage key {key!r} leaves the storage root")
        return path

    def open_staging(self, max_bytes: int) -> StagingWriter:
        return StagingWriter(self.tmp_dir / f"upload-{uuid.uuid4().hex}", max_bytes)

    def commit(self, staged: StagedFile, key: str) -> None:
        """Move a staged file to its final key with an atomic rename."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged.path, target)
        fsync_dir(target.parent)

    def write_atomic(self, key: str, data: bytes) -> None:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_dir / f"write-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(target.parent)

    def discard(self, staged: StagedFile) -> None:
        staged.path.unlink(missing_ok=True)

    def delete(self, *keys: str) -> None:
        for key in keys:
            self.path(key).unlink(missing_ok=True)

    def sweep_tmp(self) -> int:
        """Remove temp files left by a crash; run at startup, before any upload. Beside replicas: this one's
        folder, and what the others left for over FOREIGN_TMP_SECONDS (the files of a replica that died)."""
        removed = 0
        for leftover in self.tmp_dir.glob("*"):
            if leftover.is_file():
                leftover.unlink(missing_ok=True)
                removed += 1
        if self.tmp_dir != self.tmp_root:
            cutoff = time.time() - FOREIGN_TMP_SECONDS
            for leftover in self.tmp_root.glob("*/*"):
                with contextlib.suppress(OSError):
                    if leftover.is_file() and leftover.stat().st_mtime < cutoff:
                        leftover.unlink()
                        removed += 1
        return removed
