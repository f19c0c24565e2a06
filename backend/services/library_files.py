"""Reading a library's folder without ever writing to it (synchronous, for the executor).

- `list_folder` lists the image files under a library's root: regular files only, hidden entries and
  symlinks left out (a link could lead anywhere; what is indexed is what lies in the folder itself), the
  service's own storage skipped.
- `open_in_library` opens one of them read-only, walking from the root one component at a time with
  O_NOFOLLOW: the path is judged by what it leads to when it is opened, so a folder or file swapped for a
  link after the listing is refused, not followed out of the library.
- `hash_open_file` reads an opened file once for its SHA-256, size and modification time.
Nothing here creates, changes, moves or deletes a file under a library.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from backend.errors import ChangedFile, FileTooLargeError, UnreadableFile
from backend.services.imaging import IMAGE_EXTENSIONS

READ_CHUNK = 1024 * 1024
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True)
class FileState:
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class HashedFile:
    sha256: str
    size: int
    mtime_ns: int


def folder_online(root: Path) -> bool:
    """Whether the library's folder is there to be read (an unmounted disk's mount point may be missing)."""
    try:
        return stat.S_ISDIR(os.stat(root).st_mode) and os.access(root, os.R_OK | os.X_OK)
    except OSError:
        return False


def list_folder(root: Path, storage_root: Path) -> dict[str, FileState] | None:
    """Every image file under `root` by its path relative to it (with `/`), or None when the folder
    cannot be read at all (offline)."""
    if not folder_online(root):
        return None
    found: dict[str, FileState] = {}
    failed: list[OSError] = []
    for current, dirs, files in os.walk(root, followlinks=False, onerror=failed.append):
        base = Path(current)
        dirs[:] = [d for d in dirs if not d.startswith(".") and not (base / d).is_symlink()]
        if base.resolve().is_relative_to(storage_root):
            dirs[:] = []
            continue
        for name in files:
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            try:
                status = os.stat(base / name, follow_symlinks=False)
            except OSError:
                continue  # gone since the listing
            if stat.S_ISREG(status.st_mode):
                found[(base / name).relative_to(root).as_posix()] = FileState(status.st_size, status.st_mtime_ns)
    if failed and not found and not folder_online(root):
        return None  # the folder went away during the walk
    return found


def open_in_library(root: Path, relative: str) -> int:
    """A read-only descriptor of the regular file at `relative` under `root`, opened without following any
    link on the way; ChangedFile when the path is no longer a plain file inside the library."""
    parts = PurePosixPath(relative).parts
    if not parts or any(part in ("", ".", "..") or "\x00" in part for part in parts) or relative.startswith("/"):
        raise ChangedFile(f"{relative!r} is not a path inside the library")
    fd = os.open(root, _DIRECTORY)
    try:
        for part in parts[:-1]:
            try:
                child = os.open(part, _DIRECTORY, dir_fd=fd)
            except OSError as exc:
                raise _refusal(exc, relative) from exc
            os.close(fd)
            fd = child
        try:
            opened = os.open(parts[-1], _FILE, dir_fd=fd)
        except OSError as exc:
            raise _refusal(exc, relative) from exc
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(opened).st_mode):
        os.close(opened)
        raise ChangedFile(f"{relative} is no longer a regular file: it is not read")
    return opened


def _refusal(exc: OSError, relative: str) -> Exception:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return ChangedFile(f"{relative} was replaced by a link: it is not followed")
    if exc.errno == errno.ENOENT:
        return UnreadableFile(f"{relative} is gone")
    return UnreadableFile(f"{relative} cannot be read: {exc.strerror}")


def hash_open_file(fd: int, max_bytes: int) -> HashedFile:
    """SHA-256, size and mtime of an opened file, read from its start; refused past `max_bytes`."""
    status = os.fstat(fd)
    if status.st_size > max_bytes:
        raise FileTooLargeError(f"the file is {status.st_size} bytes, more than the limit of {max_bytes}")
    digest = hashlib.sha256()
    read = 0
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, READ_CHUNK):
        read += len(chunk)
        if read > max_bytes:
            raise FileTooLargeError(f"the file grew past the limit of {max_bytes} bytes while it was read")
        digest.update(chunk)
    return HashedFile(digest.hexdigest(), read, status.st_mtime_ns)


def descriptor_path(fd: int) -> Path:
    """A path that opens the very file behind `fd` (Linux /proc), for readers that take a path."""
    return Path(f"/proc/self/fd/{fd}")
