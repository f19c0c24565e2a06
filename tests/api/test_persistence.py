"""Restarts, a lost or stale index file, and a model that cannot be loaded."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from backend.config import Settings
from backend.services import model_loader
from tests.conftest import AppRunner
from tests.helpers import make_image_bytes, stored_files


async def upload_some(client: httpx.AsyncClient, count: int, first_seed: int = 200) -> list[int]:
    files = [("files", (f"{i}.jpg", make_image_bytes(first_seed + i), "image/jpeg")) for i in range(count)]
    body = (await client.post("/images", files=files)).json()
    return [item["image"]["id"] for item in body["items"]]


async def snapshot(client: httpx.AsyncClient) -> tuple[list[dict], list[tuple[int, float]]]:
    listing = (await client.get("/images", params={"limit": 100})).json()["data"]
    hits = (await client.get("/search", params={"q": "a red car", "top_k": 20})).json()["results"]
    return listing, [(h["image"]["id"], round(h["score"], 5)) for h in hits]


def index_files(settings: Settings) -> list:
    return list((settings.storage_root / "index").glob("*.index"))


async def test_restart_keeps_everything(run_app: AppRunner) -> None:
    async with run_app() as client:
        ids = await upload_some(client, 4)
        await client.delete(f"/images/{ids[0]}")
        before = await snapshot(client)
    async with run_app() as client:
        after = await snapshot(client)
        health = (await client.get("/health")).json()
        file_ok = await client.get(f"/images/{ids[1]}/file")
    assert after == before
    assert len(after[1]) == 3
    assert health["images"] == health["index"]["size"] == 3
    assert file_ok.status_code == 200


@pytest.mark.sqlite_only("the FAISS index file; PostgreSQL keeps its index in the database")
async def test_index_is_rebuilt_when_its_file_is_deleted(run_app: AppRunner, settings: Settings) -> None:
    async with run_app() as client:
        await upload_some(client, 3)
        before = await snapshot(client)
    files = index_files(settings)
    assert len(files) == 1
    files[0].unlink()
    async with run_app() as client:
        assert (await client.get("/health")).json()["index"]["size"] == 3
        assert await snapshot(client) == before
    assert len(index_files(settings)) == 1  # saved again after the rebuild


@pytest.mark.sqlite_only("the FAISS index file; PostgreSQL keeps its index in the database")
async def test_corrupt_index_file_is_rebuilt(run_app: AppRunner, settings: Settings) -> None:
    async with run_app() as client:
        await upload_some(client, 3)
        before = await snapshot(client)
    index_files(settings)[0].write_bytes(b"garbage, not a faiss index")
    async with run_app() as client:
        assert (await client.get("/health")).json()["index"]["size"] == 3
        assert await snapshot(client) == before


@pytest.mark.sqlite_only("the FAISS index file; PostgreSQL keeps its index in the database")
async def test_stale_index_file_is_rebuilt(run_app: AppRunner, settings: Settings) -> None:
    """An index saved before later uploads (say, a crash before the next save) is detected and replaced."""
    async with run_app() as client:
        await upload_some(client, 2)
    old_index = index_files(settings)[0].read_bytes()
    async with run_app() as client:
        await upload_some(client, 2, first_seed=300)
        before = await snapshot(client)
    index_files(settings)[0].write_bytes(old_index)
    async with run_app() as client:
        assert (await client.get("/health")).json()["index"]["size"] == 4
        assert await snapshot(client) == before


@pytest.mark.sqlite_only("the FAISS index file; PostgreSQL keeps its index in the database")
async def test_index_is_saved_in_the_background(run_app: AppRunner, settings: Settings) -> None:
    async with run_app(index_save_interval=0.05) as client:
        await upload_some(client, 2)
        import asyncio

        for _ in range(100):
            if index_files(settings):
                break
            await asyncio.sleep(0.05)
        assert len(index_files(settings)) == 1


@pytest.mark.parametrize("preload", [True, False])
async def test_unloadable_model_is_reported_and_answers_503(
    run_app: AppRunner, settings: Settings, tmp_path, preload: bool
) -> None:
    missing = tmp_path / "no-such-model"
    missing.mkdir()
    async with run_app(clip_model_name=str(missing), clip_preload=preload) as client:
        upload = await client.post("/images", files={"file": ("a.jpg", make_image_bytes(1), "image/jpeg")})
        assert upload.status_code == 503
        assert upload.json()["code"] == "model_unavailable"
        assert str(missing) in upload.json()["detail"]
        search = await client.get("/search", params={"q": "cat"})
        assert search.status_code == 503
        health = (await client.get("/health")).json()
        assert health["status"] == "degraded"
        assert health["model"]["state"] == "failed"
        assert health["model"]["loaded"] is False
        assert health["model"]["error"]
        listing = await client.get("/images")
        assert listing.status_code == 200
        assert listing.json()["count"] == 0
    assert stored_files(settings.storage_root) == []


async def test_a_failed_model_load_is_tried_again_after_30_seconds(
    run_app: AppRunner, tiny_clip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model folder that is broken at startup and mended afterwards: the next request that needs the model
    loads it once 30 s have passed since the failure, not before. The loader's clock is the test's."""
    clock = SimpleNamespace(now=1000.0)
    fake_time = SimpleNamespace(monotonic=lambda: clock.now, perf_counter=time.perf_counter)
    monkeypatch.setattr(model_loader, "time", fake_time)
    model = shutil.copytree(tiny_clip_dir, tmp_path / "clip")
    (model / "model.safetensors").rename(tmp_path / "weights-away")
    async with run_app(clip_model_name=str(model)) as client:
        search = await client.get("/search", params={"q": "cat"})  # waits for the startup load, which fails
        assert search.status_code == 503 and search.json()["code"] == "model_unavailable"
        health = (await client.get("/health")).json()
        assert health["status"] == "degraded" and health["model"]["state"] == "failed"
        (tmp_path / "weights-away").rename(model / "model.safetensors")  # mended
        clock.now = 1029.9
        search = await client.get("/search", params={"q": "cat"})
        assert search.status_code == 503, "tried again before 30 s had passed"
        assert (await client.get("/health")).json()["model"]["state"] == "failed"
        clock.now = 1030.0  # 30 s after the failure
        search = await client.get("/search", params={"q": "cat"})
        assert search.status_code == 200, search.text
        health = (await client.get("/health")).json()
        assert health["status"] == "ok" and health["model"]["state"] == "loaded" and health["model"]["error"] is None
        upload = await client.post("/images", files={"file": ("a.jpg", make_image_bytes(1), "image/jpeg")})
        assert upload.status_code == 201, upload.text


async def test_images_of_another_model_stay_listed_but_leave_the_index(
    run_app: AppRunner, settings: Settings, tmp_path
) -> None:
    from tests.tiny_models import build_tiny_clip

    other = build_tiny_clip(tmp_path / "other-clip", seed=1)
    async with run_app() as client:
        ids = await upload_some(client, 2)
    async with run_app(clip_model_name=str(other)) as client:
        health = (await client.get("/health")).json()
        assert health["images"] == 2
        assert health["stale_embeddings"] == 2
        assert health["index"]["size"] == 0
        similar = await client.get(f"/images/{ids[0]}/similar")
        assert similar.status_code == 409
        assert similar.json()["code"] == "stale_embedding"
