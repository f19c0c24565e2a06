"""The real service as a uvicorn subprocess (bench.server.serve), killed with SIGKILL, and a look at what a
killed process left on disk: the rows in SQLite, the files under STORAGE_ROOT and the index folder."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from bench.server import RunningServer, serve

STARTUP_SECONDS = 120


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextmanager
def real_server(storage: Path, clip: Path, name: str = "server", **settings: str) -> Iterator[RunningServer]:
    """The service over `storage` on a free loopback port; stopped (or found dead) when the block ends, even
    when the test fails. Its log is kept beside the storage, one file per start (and per `name`: replicas)."""
    # One ONNX export of the tiny model for the session's servers, beside the model (see tests/conftest.py).
    settings = {"EXECUTOR_WORKERS": "2", "MODEL_CACHE_DIR": str(clip.parent / "onnx-cache"), **settings}
    try:
        with ExitStack() as stack:
            try:
                server = stack.enter_context(
                    serve(storage, clip, timeout=STARTUP_SECONDS, settings=settings, name=name)
                )
            except RuntimeError as exc:  # it did not start; the message ends with its log
                pytest.fail(str(exc))
            yield server  # leaving the stack terminates it (a no-op when it was killed)
    finally:
        log = storage.parent / f"{storage.name}-{name}.log"
        if log.exists():
            starts = len(list(storage.parent.glob(f"{storage.name}-{name}-*.log")))
            log.rename(storage.parent / f"{storage.name}-{name}-{starts + 1}.log")


def kill_9(server: RunningServer) -> None:
    """SIGKILL: no shutdown handler, no final index save, open transactions and half-written files stay."""
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait(timeout=30)
    assert server.process.returncode == -signal.SIGKILL


def server_logs(storage: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(storage.parent.glob(f"{storage.name}-server*.log")))


@dataclass
class Row:
    id: int
    sha256: str
    storage_key: str
    thumbnail_key: str


def rows(storage: Path) -> dict[int, Row]:
    """Every image row, read straight from the database file (the server may be running: WAL allows it)."""
    with closing(sqlite3.connect(storage / "organizer.db", timeout=30)) as db:
        return {
            r[0]: Row(*r) for r in db.execute("SELECT id, sha256, storage_key, thumbnail_key FROM image ORDER BY id")
        }


def integrity(storage: Path) -> str:
    with closing(sqlite3.connect(storage / "organizer.db", timeout=30)) as db:
        return "; ".join(str(r[0]) for r in db.execute("PRAGMA integrity_check"))


def media_files(storage: Path) -> set[str]:
    """Every file under originals/ and thumbnails/, as storage keys."""
    return {
        str(p.relative_to(storage))
        for sub in ("originals", "thumbnails")
        for p in (storage / sub).rglob("*")
        if p.is_file()
    }


def assert_rows_have_their_files(storage: Path, by_id: dict[int, Row]) -> None:
    """No row points at a missing file, and every original holds the bytes its row's SHA-256 names."""
    for row in by_id.values():
        original = storage / row.storage_key
        assert original.is_file(), f"image {row.id} points at a missing original {row.storage_key}"
        assert sha256(original.read_bytes()) == row.sha256, f"image {row.id}: its original is not its bytes"
        assert (storage / row.thumbnail_key).is_file(), f"image {row.id} points at a missing thumbnail"


def wait_for_no_orphans(storage: Path, by_id: dict[int, Row], timeout: float = 30.0) -> None:
    """The background sweep after startup removes the files no row references; wait for it, bounded."""
    referenced = {key for row in by_id.values() for key in (row.storage_key, row.thumbnail_key)}
    deadline = time.monotonic() + timeout
    while (orphans := media_files(storage) - referenced) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not orphans, f"files no row references are still there after {timeout} s: {sorted(orphans)[:5]}"


def leftover_temp_files(storage: Path) -> list[str]:
    tmp = [p.name for p in (storage / "tmp").glob("*")]
    return tmp + [p.name for p in (storage / "index").glob("*.tmp")]


def assert_index_holds_exactly(base: str, ids: set[int]) -> None:
    """/health counts them and a search over everything (the exact index, at most 200 images) returns them."""
    health = httpx.get(f"{base}/health", timeout=30).json()
    assert health["images"] == health["index"]["size"] == len(ids), health
    assert len(ids) <= 200
    found = httpx.get(f"{base}/search", params={"q": "a photo", "top_k": 200}, timeout=30)
    assert found.status_code == 200, found.text
    assert {hit["image"]["id"] for hit in found.json()["results"]} == ids
