"""Races and partial failures: the database, the files and the index stay in step."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import httpx
import pytest

import backend.services.pipeline as pipeline
from backend.config import Settings
from backend.services.storage import FileStore
from tests.conftest import AppRunner
from tests.helpers import make_image_bytes, stored_files, temp_files


async def test_upload_racing_a_delete_never_reports_a_deleted_image(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = make_image_bytes(1)
    first = (await client.post("/images", files={"file": ("old.jpg", old, "image/jpeg")})).json()
    entered, release = threading.Event(), threading.Event()
    real_prepare = pipeline.prepare_image

    def slow_prepare(path, **kwargs):
        entered.set()
        release.wait(10)
        return real_prepare(path, **kwargs)

    monkeypatch.setattr(pipeline, "prepare_image", slow_prepare)
    files = [("files", ("old.jpg", old, "image/jpeg")), ("files", ("new.jpg", make_image_bytes(2), "image/jpeg"))]
    upload = asyncio.create_task(client.post("/images", files=files))
    await asyncio.to_thread(entered.wait, 10)
    assert (await client.delete(f"/images/{first['id']}", params={"purge": "true"})).status_code == 204
    release.set()
    body = (await upload).json()

    old_item, new_item = body["items"]
    assert old_item["status"] == "failed"
    assert old_item["error"]["code"] == "deleted_meanwhile"
    assert old_item["error"]["status"] == 409
    assert new_item["status"] == "created"
    listing = (await client.get("/images")).json()
    assert [image["filename"] for image in listing["data"]] == ["new.jpg"]


async def test_storage_failure_mid_batch_keeps_the_rest_consistent(
    client: httpx.AsyncClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real_write = FileStore.write_atomic

    def flaky_write(self: FileStore, key: str, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        real_write(self, key, data)

    monkeypatch.setattr(FileStore, "write_atomic", flaky_write)
    files = [("files", (f"{i}.jpg", make_image_bytes(10 + i), "image/jpeg")) for i in range(3)]
    response = await client.post("/images", files=files)
    assert response.status_code == 201
    items = response.json()["items"]
    assert [item["status"] for item in items] == ["created", "failed", "created"]
    assert items[1]["error"] == {
        "status": 500,
        "code": "storage_error",
        "detail": "the image could not be stored: OSError",
    }
    health = (await client.get("/health")).json()
    assert health["images"] == health["index"]["size"] == 2
    search = (await client.get("/search", params={"q": "x", "top_k": 10})).json()
    assert sorted(hit["image"]["filename"] for hit in search["results"]) == ["0.jpg", "2.jpg"]
    originals = [p for p in stored_files(settings.storage_root) if "originals" in p.parts]
    assert len(originals) == 2
    assert not temp_files(settings.storage_root)


@pytest.mark.sqlite_only("the FAISS index file; PostgreSQL keeps its index in the database")
async def test_clean_restart_loads_the_saved_index_instead_of_rebuilding(
    run_app: AppRunner, settings: Settings
) -> None:
    async with run_app() as client:
        files = [("files", (f"{i}.jpg", make_image_bytes(20 + i), "image/jpeg")) for i in range(3)]
        await client.post("/images", files=files)
    (index_file,) = (settings.storage_root / "index").glob("*.index")
    before = index_file.stat().st_ino
    async with run_app() as client:
        assert (await client.get("/health")).json()["index"]["size"] == 3
    assert index_file.stat().st_ino == before  # a rebuild would have saved a new file


@pytest.mark.sqlite_only("the FAISS index file; PostgreSQL keeps its index in the database")
async def test_temp_files_of_an_interrupted_index_save_are_removed(run_app: AppRunner, settings: Settings) -> None:
    async with run_app() as client:
        await client.post("/images", files={"file": ("a.jpg", make_image_bytes(30), "image/jpeg")})
    (index_file,) = (settings.storage_root / "index").glob("*.index")
    leftover = index_file.with_name(f".{index_file.name}.999.123.tmp")
    leftover.write_bytes(b"half a save")
    async with run_app() as client:
        assert (await client.get("/health")).json()["index"]["size"] == 1
    assert not leftover.exists()


async def test_files_no_record_references_are_swept_at_startup(run_app: AppRunner, settings: Settings) -> None:
    async with run_app() as client:
        kept = (await client.post("/images", files={"file": ("a.jpg", make_image_bytes(40), "image/jpeg")})).json()
    # What a crash between placing the files and committing the row leaves behind:
    ghost = "ab" + "0" * 62
    orphan = settings.storage_root / "originals" / "ab" / f"{ghost}.jpg"
    orphan_thumb = settings.storage_root / "thumbnails" / "ab" / f"{ghost}.jpg"
    for path in (orphan, orphan_thumb):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(make_image_bytes(41))
        # Two hours old: with replicas sharing the storage (PostgreSQL), a younger file may be another
        # replica's upload that has not committed yet, and is left for a later sweep.
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    unrelated = settings.storage_root / "originals" / "notes.txt"
    unrelated.write_text("not ours to judge")

    async with run_app() as client:
        for _ in range(200):
            if not orphan.exists() and not orphan_thumb.exists():
                break
            await asyncio.sleep(0.05)
        assert not orphan.exists() and not orphan_thumb.exists()
        assert (await client.get(kept["file_url"])).status_code == 200
        assert (await client.get(kept["thumbnail_url"])).status_code == 200
    assert unrelated.exists()


async def test_cancelled_upload_never_leaves_a_record_without_its_file(
    run_app: AppRunner, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shutdown cancels a request or job at any await: even right after its row was committed."""
    from sqlmodel.ext.asyncio.session import AsyncSession

    from backend.models import Image

    real_commit = AsyncSession.commit

    async def commit_then_cancelled(self: AsyncSession) -> None:
        holds_image = any(isinstance(o, Image) for o in self.sync_session.identity_map.values())
        await real_commit(self)
        if holds_image:
            raise asyncio.CancelledError

    async with run_app() as client:
        monkeypatch.setattr(AsyncSession, "commit", commit_then_cancelled)
        with pytest.raises(asyncio.CancelledError):
            await client.post("/images", files={"file": ("cut.jpg", make_image_bytes(5), "image/jpeg")})
        monkeypatch.setattr(AsyncSession, "commit", real_commit)
    async with run_app() as client:  # restarted: the committed row is whole
        (image,) = (await client.get("/images")).json()["data"]
        assert image["filename"] == "cut.jpg"
        assert (await client.get(image["file_url"])).content == make_image_bytes(5)
        assert (await client.get(image["thumbnail_url"])).status_code == 200
