"""A changed CLIP model: stale vectors are detected, and POST /reindex re-embeds them in a job."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from ml.embedder import ClipEmbedder
from tests.conftest import AppRunner
from tests.helpers import make_image_bytes, sql, upload_many, wait_job
from tests.tiny_models import build_tiny_clip


@pytest.fixture(scope="module")
def other_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("other-clip"), seed=1)


async def test_reindex_after_a_model_change(
    run_app: AppRunner, other_clip_dir: Path, tmp_path: Path, another_database: Callable[[], str]
) -> None:
    async with run_app() as client:
        images = await upload_many(client, 4)
    # What the new model makes of the same pictures: a collection of its own, uploaded with that model.
    async with run_app(
        clip_model_name=str(other_clip_dir), storage_root=tmp_path / "reference", database_url=another_database()
    ) as client:
        reference = await upload_many(client, 4)
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
        for n, (image, expected) in enumerate(zip(images, reference, strict=True)):
            record = (await client.get(f"/images/{image['id']}")).json()
            assert record["embedding_model"] == str(other_clip_dir)
            # Tags made again by the new model: those it gives the same picture at upload.
            assert [t["tag"] for t in record["tags"]] == [t["tag"] for t in expected["tags"]]
            assert [t["score"] for t in record["tags"]] == pytest.approx([t["score"] for t in expected["tags"]])
            # The vector was computed again from the original, not just relabelled: the picture itself, sent as
            # a query (embedded by the new model), finds this image first at cosine 1.
            query = {"file": (f"q{n}.jpg", make_image_bytes(100 + n), "image/jpeg")}
            hits = (await client.post("/search/image", files=query, params={"top_k": 1})).json()["results"]
            assert hits[0]["image"]["id"] == image["id"]
            assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert fresh.json()["embedding_model"] == str(other_clip_dir)

        nothing = await wait_job(client, (await client.post("/reindex")).json()["id"])
        assert nothing["result"]["reembedded"] == 0
        everything = await wait_job(client, (await client.post("/reindex", params={"all": "true"})).json()["id"])
        assert everything["result"]["reembedded"] == 5


async def test_search_answers_throughout_a_reindex(
    run_app: AppRunner, other_clip_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    count = 24
    async with run_app() as client:
        await upload_many(client, count)
    # Each batch the job embeds takes 0.1 s longer (the model's real work, then a pause), so that searches
    # land while the job runs whatever the machine's speed.
    original = ClipEmbedder.embed_pixels

    def slower(self: ClipEmbedder, pixels: torch.Tensor) -> np.ndarray:
        time.sleep(0.1)
        return original(self, pixels)

    monkeypatch.setattr(ClipEmbedder, "embed_pixels", slower)
    async with run_app(clip_model_name=str(other_clip_dir), embed_batch_size=2) as client:

        async def search_while_it_runs(job_id: str) -> list[int]:
            """The result counts of the searches that answered while the job was running."""
            counts: list[int] = []
            while True:
                answer = await client.get("/search", params={"q": "a photo", "top_k": 50})
                assert answer.status_code == 200, answer.text
                hits = answer.json()["results"]
                assert all(hit["image"]["embedding_model"] == str(other_clip_dir) for hit in hits)
                status = (await client.get(f"/jobs/{job_id}")).json()["status"]
                if status not in ("queued", "running"):
                    return counts
                if status == "running":  # the search answered while the job was re-embedding
                    counts.append(len(hits))

        job = (await client.post("/reindex")).json()
        counts = await search_while_it_runs(job["id"])
        assert (await wait_job(client, job["id"]))["status"] == "succeeded"
        # Search answered throughout and found more images as the job went, never fewer.
        assert len(counts) >= 3 and counts == sorted(counts), counts
        assert any(0 < n < count for n in counts), counts
        # Every image again: each keeps its vector in the index until its new one replaces it.
        job = (await client.post("/reindex", params={"all": "true"})).json()
        counts = await search_while_it_runs(job["id"])
        assert (await wait_job(client, job["id"]))["status"] == "succeeded"
        assert len(counts) >= 3 and set(counts) == {count}, counts


async def test_reindex_reports_missing_originals(run_app: AppRunner, other_clip_dir: Path, settings) -> None:
    async with run_app() as client:
        images = await upload_many(client, 2)
    [(key,)] = await sql(settings, "SELECT storage_key FROM image WHERE id = :id", id=images[0]["id"])
    (settings.storage_root / key).unlink()
    async with run_app(clip_model_name=str(other_clip_dir)) as client:
        job = await wait_job(client, (await client.post("/reindex")).json()["id"])
        assert job["status"] == "succeeded"
        assert job["result"]["reembedded"] == 1 and job["result"]["failed"] == 1
        assert job["result"]["failures"][0]["image_id"] == images[0]["id"]
        assert (await client.get("/health")).json()["stale_embeddings"] == 1
