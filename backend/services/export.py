"""A clustering run exported: one folder per cluster, named from its caption, holding the originals.

As a zip (`zip_run`), the archive is written as it is sent (ZIP_STORED: photos are compressed already), one
piece of a file at a time through the executor, so memory stays flat whatever the collection's size. Into
a folder on disk (`export_to_folder`, the command line's `export`), the same layout as plain files.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import unicodedata
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO

from backend.context import AppContext
from backend.errors import InvalidInput
from backend.executor import Executor
from backend.services.runs import MemberFile, member_files

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class ExportEntry:
    folder: str
    name: str
    path: Path
    modified: datetime


def export_entries(members: list[MemberFile]) -> list[ExportEntry]:
    """Where each member goes: its cluster's folder, under its uploaded name made safe to extract anywhere
    and unique in that folder."""
    taken: dict[int, set[str]] = {}
    return [
        ExportEntry(
            folder=folder_name(member.cluster_id + 1, member.caption),
            name=unique_name(member.filename, member.extension, taken.setdefault(member.cluster_id, set())),
            path=member.path,
            modified=member.modified,
        )
        for member in members
    ]


async def zip_run(ctx: AppContext, run_id: int) -> AsyncIterator[bytes]:
    """The run's zip, as an iterator of pieces to send; RunNotFound before anything is written."""
    entries = export_entries(await member_files(ctx, run_id))
    return stream_zip(entries, ctx.executor)


# Extensions an uploader may have used for each stored format; any other is replaced by the format's own.
FORMAT_EXTENSIONS = {
    "jpg": ("jpg", "jpeg", "jpe", "jfif"),
    "png": ("png",),
    "webp": ("webp",),
    "gif": ("gif",),
    "bmp": ("bmp", "dib"),
    "tif": ("tif", "tiff"),
    "heic": ("heic", "heif"),
    "avif": ("avif",),
}
# Device names Windows reserves whatever extension follows them ("CON.png" cannot be created there).
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"{port}{n}" for port in ("COM", "LPT") for n in "0123456789¹²³")}
# What Windows refuses in a name (and "/" everywhere), control characters included.
_UNSAFE = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f]')
# Bytes of UTF-8 per file name and per folder name: under every filesystem's 255, and together (241 with the
# slash) short enough to extract into a folder of some depth on Windows.
MAX_NAME_BYTES = 150
MAX_FOLDER_BYTES = 90


def _fit(text: str, limit: int) -> str:
    """At most `limit` bytes of UTF-8, cut on a character boundary."""
    data = text.encode("utf-8")
    return text if len(data) <= limit else data[:limit].decode("utf-8", errors="ignore")


def safe_component(text: str, fallback: str) -> str:
    """`text` as a name Linux, macOS and Windows can all create: NFC (as macOS stores it), no character
    Windows refuses, no leading or trailing dots or spaces, not a reserved device name; `fallback` when
    nothing is left."""
    text = _UNSAFE.sub("_", unicodedata.normalize("NFC", text))
    text = re.sub(r"\s+", " ", text).strip(" .")
    if not text:
        return fallback
    if text.split(".", 1)[0].rstrip(" ").upper() in _RESERVED:
        text = "_" + text
    return text


def folder_name(position: int, caption: str | None) -> str:
    """'01 a dog on the grass': numbered so folders keep the clusters' order, safe on every filesystem."""
    text = safe_component(caption or "", "cluster")
    return _fit(f"{position:02d} {text}", MAX_FOLDER_BYTES).rstrip(" .")


def unique_name(uploaded: str, extension: str, taken: set[str]) -> str:
    """The uploaded name made safe (`safe_component`), with the extension of the stored format (the
    uploader's own when it is one of that format's, so `photo.JPEG` stays), at most MAX_NAME_BYTES, and
    unique in its folder ignoring case (`stem (2).jpg`, ...; the number is added before the cut, so it
    survives). `taken` holds the folder's names so far, casefolded."""
    stem, dot, given = uploaded.rpartition(".")
    if not dot or not stem.strip(" ."):
        stem, given = uploaded, ""
    own = FORMAT_EXTENSIONS.get(extension, (extension,))
    suffix = f".{given}" if given.lower() in own else f".{extension}" if extension else ""
    stem = safe_component(stem, "image")
    n = 1
    while True:
        number = "" if n == 1 else f" ({n})"
        cut = _fit(stem, MAX_NAME_BYTES - len(number.encode()) - len(suffix.encode())).rstrip(" .") or "image"
        candidate = f"{cut}{number}{suffix}"
        if candidate.casefold() not in taken:
            taken.add(candidate.casefold())
            return candidate
        n += 1


class _Sink(io.RawIOBase):
    """An unseekable stream that keeps what the zip writer wrote until it is taken."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._position = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]  # zipfile only ever writes bytes here
        self._chunks.append(bytes(data))
        self._position += len(data)
        return len(data)

    def tell(self) -> int:
        return self._position

    def take(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data


class _ZipWriter:
    """Synchronous steps of writing the archive; each is one executor call."""

    def __init__(self) -> None:
        self.sink = _Sink()
        self.zip = zipfile.ZipFile(self.sink, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._source: IO[bytes] | None = None
        self._target: IO[bytes] | None = None

    def open(self, entry: ExportEntry) -> bool:
        try:
            self._source = open(entry.path, "rb")  # noqa: SIM115 - closed in close_entry
        except FileNotFoundError:  # deleted after the listing was taken: left out
            return False
        info = zipfile.ZipInfo(f"{entry.folder}/{entry.name}", date_time=_zip_time(entry.modified))
        info.compress_type = zipfile.ZIP_STORED
        info.file_size = entry.path.stat().st_size
        self._target = self.zip.open(info, "w")
        return True

    def copy(self) -> tuple[bytes, bool]:
        assert self._source is not None and self._target is not None
        data = self._source.read(CHUNK)
        if data:
            self._target.write(data)
            return self.sink.take(), False
        self._target.close()
        self._source.close()
        self._source = self._target = None
        return self.sink.take(), True

    def finish(self) -> bytes:
        self.zip.close()
        return self.sink.take()

    def abandon(self) -> None:
        """The client went away: close everything quietly (the rest only goes to the in-memory sink)."""
        for closing in (self._source, self._target, self.zip):
            if closing is not None:
                with contextlib.suppress(Exception):
                    closing.close()
        self._source = self._target = None
        self.sink.take()


def _zip_time(moment: datetime) -> tuple[int, int, int, int, int, int]:
    moment = max(moment, datetime(1980, 1, 1, tzinfo=moment.tzinfo))
    return (moment.year, moment.month, moment.day, moment.hour, moment.minute, moment.second)


async def stream_zip(entries: list[ExportEntry], executor: Executor) -> AsyncIterator[bytes]:
    writer = _ZipWriter()
    try:
        for entry in entries:
            if not await executor.run(writer.open, entry):
                continue
            done = False
            while not done:
                data, done = await executor.run(writer.copy)
                if data:
                    yield data
        yield await executor.run(writer.finish)
    finally:
        writer.abandon()


def _copy_into(target: Path, entries: list[ExportEntry]) -> tuple[int, int]:
    """Copy each entry to target/folder/name, keeping its time; (files written, files gone meanwhile)."""
    written = missing = 0
    for entry in entries:
        destination = target / entry.folder / entry.name
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(entry.path, destination)
        except FileNotFoundError:  # deleted after the listing was taken: left out, as in the zip
            missing += 1
            continue
        stamp = entry.modified.timestamp()
        os.utime(destination, (stamp, stamp))
        written += 1
    return written, missing


async def export_to_folder(ctx: AppContext, run_id: int, target: Path) -> tuple[int, int]:
    """Write the run's folders into `target` (which must be empty or not exist yet); (files written, files
    that were deleted meanwhile). Nothing of the collection is changed."""
    entries = export_entries(await member_files(ctx, run_id))

    def prepare() -> None:
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise InvalidInput(
                f"{target} is not an empty folder: export into a new or empty one", code="target_not_empty"
            )
        target.mkdir(parents=True, exist_ok=True)

    await ctx.executor.run(prepare)
    return await ctx.executor.run(_copy_into, target, entries)
