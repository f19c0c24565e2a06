"""A changed CLIP model: stale vectors are detected, and POST /reindex re-embeds them in a job."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.conftest import AppRunner
from tests.helpers import make_image_bytes, upload_many, wait_job
from tests.tiny_models import build_tiny_clip


@pytest.fixture(scope="module")
def other_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("other-clip"), seed=1)


async def test_reindex_after_a_model_change(run_app: AppRunner, other_clip_dir: Path) -> None:
    async with run_app() as client:
        images = await upload_many(client, 4)
        old_tags = {image["id"]: image["tags"] for image in images}
    async with run_app(clip_model_name=str(other_clip_dir)) as client:
        health = (await client.get("/health")).json()
        assert health["stale_embeddings"] == 4 and health["index"]["size"] == 0
        assert (await client.get(f"/images/{images[0]['id']}/similar")).status_code == 409
        # An upload with the new model is searchable at once; the old ones are not yet.
        fresh = await client.post("/images", files={"file": ("new.jpg", make_image_bytes(900), "image/jpeg")})
        assert (await client.get("/search", params={"q": "x", "top_k": 50})).json()["count"] == 1

        response = await client.post("/reindex")
        assert response.status_code == 202
        job = await wait_job(client, response.json()["id"])
        assert job["status"] == "succeeded", job
        assert job["result"]["reembedded"] == 4 and job["result"]["failed"] == 0
        health = (await client.get("/health")).json()
        assert health["stale_embeddings"] == 0 and health["index"]["size"] == 5
        assert (await client.get("/search", params={"q": "x", "top_k": 50})).json()["count"] == 5
        similar = await client.get(f"/images/{images[0]['id']}/similar")
        assert similar.status_code == 200 and similar.json()["count"] == 4
        retagged = (await client.get(f"/images/{images[0]['id']}")).json()
        assert retagged["embedding_model"] == str(other_clip_dir)
        assert retagged["tags"] != old_tags[images[0]["id"]] or len(retagged["tags"]) == 3
        assert fresh.json()["id"] not in {f.get("image_id") for f in job["result"]["failures"]}

        nothing = await wait_job(client, (await client.post("/reindex")).json()["id"])
        assert nothing["result"]["reembedded"] == 0
        everything = await wait_job(client, (await client.post("/reindex", params={"all": "true"})).json()["id"])
        assert everything["result"]["reembedded"] == 5


async def test_reindex_reports_missing_originals(run_app: AppRunner, other_clip_dir: Path, settings) -> None:
    async with run_app() as client:
        images = await upload_many(client, 2)
    db = sqlite3.connect(settings.storage_root / "organizer.db")
    key = db.execute("SELECT storage_key FROM image WHERE id = ?", (images[0]["id"],)).fetchone()[0]
    db.close()
    (settings.storage_root / key).unlink()
    async with run_app(clip_model_name=str(other_clip_dir)) as client:
        job = await wait_job(client, (await client.post("/reindex")).json()["id"])
        assert job["status"] == "succeeded"
        assert job["result"]["reembedded"] == 1 and job["result"]["failed"] == 1
        assert job["result"]["failures"][0]["image_id"] == images[0]["id"]
        assert (await client.get("/health")).json()["stale_embeddings"] == 1
