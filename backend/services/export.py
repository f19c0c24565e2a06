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
MAX_FOLDER_NAME = 80


@dataclass(frozen=True)
class ExportEntry:
    folder: str
    name: str
    path: Path
    modified: datetime


def export_entries(members: list[MemberFile]) -> list[ExportEntry]:
    """Where each member goes: its cluster's folder, under its uploaded name made unique in that folder."""
    taken: dict[int, set[str]] = {}
    return [
        ExportEntry(
            folder=folder_name(member.cluster_id + 1, member.caption),
            name=unique_name(member.filename, taken.setdefault(member.cluster_id, set())),
            path=member.path,
            modified=member.modified,
        )
        for member in members
    ]


async def zip_run(ctx: AppContext, run_id: int) -> AsyncIterator[bytes]:
    """The run's zip, as an iterator of pieces to send; RunNotFound before anything is written."""
    entries = export_entries(await member_files(ctx, run_id))
    return stream_zip(entries, ctx.executor)


def folder_name(position: int, caption: str | None) -> str:
    """'01 a dog on the grass': numbered so folders keep the clusters' order, safe on every filesystem."""
    text = unicodedata.normalize("NFC", caption or "")
    text = re.sub(r'[<>:"/\\|?*\x00-\x1f\x7f]', " ", text)
    text = re.sub(r"\s+", " ", text).strip(" .")[:MAX_FOLDER_NAME].rstrip(" .")
    return f"{position:02d} {text}" if text else f"{position:02d} cluster"


def unique_name(name: str, taken: set[str]) -> str:
    """`name`, or `stem (2).ext`, ... when the folder holds that name already (case-insensitively)."""
    candidate, n = name, 1
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    while candidate.lower() in taken:
        n += 1
        candidate = f"{stem} ({n}){dot}{ext}"
    taken.add(candidate.lower())
    return candidate


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
