"""Past INDEX_APPROXIMATE_FROM vectors the service searches an approximate index: same answers, same
deletes, and it comes back after a restart."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import AppRunner, app_context
from tests.helpers import make_image_bytes

pytestmark = pytest.mark.sqlite_only("FAISS's layouts; PostgreSQL searches pgvector's HNSW index")

# Tiny thresholds so a handful of uploads crosses them; probing every list keeps the ranking exact.
APPROXIMATE = {"index_approximate_from": 6, "index_probe_fraction": 1.0}


async def upload(client: httpx.AsyncClient, seeds: range) -> list[int]:
    files = [("files", (f"{s}.jpg", make_image_bytes(s), "image/jpeg")) for s in seeds]
    response = await client.post("/images", files=files)
    assert response.status_code == 201, response.text
    return [item["image"]["id"] for item in response.json()["items"]]


async def ranking(client: httpx.AsyncClient, image_id: int) -> list[int]:
    similar = await client.get(f"/images/{image_id}/similar", params={"top_k": 20})
    text = await client.get("/search", params={"q": "a boat on a lake", "top_k": 20})
    assert similar.status_code == text.status_code == 200
    return [h["image"]["id"] for h in similar.json()["results"]] + [h["image"]["id"] for h in text.json()["results"]]


async def test_crossing_the_threshold_switches_to_an_approximate_index_with_the_same_answers(
    run_app: AppRunner,
) -> None:
    async with run_app(index_approximate_from=0) as exact:
        ids = await upload(exact, range(400, 412))
        expected = await ranking(exact, ids[3])
        assert (await exact.get("/health")).json()["index"]["approximate"] is False
    async with run_app(**APPROXIMATE) as client:
        # The stored exact index is over the threshold: it is rebuilt in the background at startup.
        await app_context(client).index.wait_for_relayout()
        index = (await client.get("/health")).json()["index"]
        assert index["approximate"] is True and index["size"] == 12 and "IVF" in index["type"]
        assert await ranking(client, ids[3]) == expected
        assert (await client.delete(f"/images/{ids[5]}")).status_code == 204
        assert ids[5] not in await ranking(client, ids[3])
        after_delete = await ranking(client, ids[3])
    async with run_app(**APPROXIMATE) as client:
        index = (await client.get("/health")).json()["index"]
        assert index["approximate"] is True and index["size"] == 11
        assert await ranking(client, ids[3]) == after_delete


async def test_uploads_past_the_threshold_switch_the_layout_while_the_service_runs(run_app: AppRunner) -> None:
    async with run_app(**APPROXIMATE) as client:
        first = await upload(client, range(500, 505))
        assert (await client.get("/health")).json()["index"]["approximate"] is False
        second = await upload(client, range(505, 510))
        await app_context(client).index.wait_for_relayout()
        health = (await client.get("/health")).json()
        assert health["index"]["approximate"] is True
        assert health["images"] == health["index"]["size"] == 10
        found = await client.get(f"/images/{second[2]}/similar", params={"top_k": 10})
        assert {h["image"]["id"] for h in found.json()["results"]} == set(first + second) - {second[2]}
        # Deleting down below half the threshold goes back to exact search.
        for image_id in first + second[:3]:
            assert (await client.delete(f"/images/{image_id}")).status_code == 204
        await app_context(client).index.wait_for_relayout()
        index = (await client.get("/health")).json()["index"]
        assert index["approximate"] is False and index["size"] == 2
