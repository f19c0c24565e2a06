"""Files under STORAGE_ROOT: content-addressed originals, thumbnails, and atomic writes.

Synchronous helpers: the services call them through the executor.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from backend.errors import EmptyFileError, FileTooLargeError
from ml.index import fsync_dir

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class StagedFile:
    """An upload copied into STORAGE_ROOT/tmp, hashed and synced, not yet in its final place."""

    path: Path
    sha256: str
    size: int


class FileStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp_dir = root / "tmp"
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

    def stage(self, source: BinaryIO, max_bytes: int) -> StagedFile:
        """Copy `source` to a temp file, hashing and counting; refuse it past `max_bytes`."""
        digest = hashlib.sha256()
        size = 0
        tmp = self.tmp_dir / f"upload-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as out:
                while chunk := source.read(CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise FileTooLargeError(f"file is larger than the limit of {max_bytes} bytes")
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if size == 0:
                raise EmptyFileError("file is empty")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return StagedFile(path=tmp, sha256=digest.hexdigest(), size=size)

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
        """Remove temp files left by a crash; run at startup, before any upload."""
        removed = 0
        for leftover in self.tmp_dir.glob("*"):
            if leftover.is_file():
                leftover.unlink(missing_ok=True)
                removed += 1
        return removed
