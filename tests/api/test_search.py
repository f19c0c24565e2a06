"""Text and image search, similar images, and how results change with deletes."""

from __future__ import annotations

import httpx
import pytest
from sqlmodel import col, update

from backend.config import Settings
from backend.models import Image
from tests.conftest import app_context
from tests.helpers import make_image_bytes, stored_files


async def seed_images(client: httpx.AsyncClient, count: int, first_seed: int = 100) -> list[dict]:
    files = [("files", (f"img{i}.jpg", make_image_bytes(first_seed + i), "image/jpeg")) for i in range(count)]
    response = await client.post("/images", files=files)
    assert response.status_code == 201, response.text
    return [item["image"] for item in response.json()["items"]]


async def test_text_search_returns_sorted_bounded_scores(client: httpx.AsyncClient) -> None:
    images = await seed_images(client, 6)
    response = await client.get("/search", params={"q": "a dog running on a beach", "top_k": 4})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["query"] == "a dog running on a beach"
    assert body["count"] == len(body["results"]) == 4
    scores = [hit["score"] for hit in body["results"]]
    assert scores == sorted(scores, reverse=True)
    assert all(-1.0 <= s <= 1.0 for s in scores)
    assert {hit["image"]["id"] for hit in body["results"]} <= {image["id"] for image in images}

    everything = (await client.get("/search", params={"q": "anything", "top_k": 50})).json()
    assert everything["count"] == 6


async def test_text_search_is_deterministic(client: httpx.AsyncClient) -> None:
    await seed_images(client, 4)
    first = (await client.get("/search", params={"q": "mountains at sunset"})).json()
    second = (await client.get("/search", params={"q": "mountains at sunset"})).json()
    assert [h["image"]["id"] for h in first["results"]] == [h["image"]["id"] for h in second["results"]]
    assert [h["score"] for h in first["results"]] == pytest.approx([h["score"] for h in second["results"]])


@pytest.mark.parametrize(
    "params",
    [{"q": ""}, {"q": "   "}, {}, {"q": "cat", "top_k": 0}, {"q": "cat", "top_k": 100_000}, {"q": "cat", "top_k": "x"}],
    ids=["empty", "blank", "missing", "top_k-0", "top_k-huge", "top_k-text"],
)
async def test_bad_search_parameters_get_422(client: httpx.AsyncClient, params: dict) -> None:
    response = await client.get("/search", params=params)
    assert response.status_code == 422
    assert response.json()["code"] == "validation_error"
    assert response.json()["detail"]


async def test_blank_query_says_why(client: httpx.AsyncClient) -> None:
    response = await client.get("/search", params={"q": "   "})
    assert response.json()["detail"] == "q must contain something other than spaces"


async def test_search_on_empty_collection_returns_nothing(client: httpx.AsyncClient) -> None:
    response = await client.get("/search", params={"q": "a cat"})
    assert response.status_code == 200
    assert response.json()["results"] == []


async def test_similar_excludes_the_image_itself(client: httpx.AsyncClient) -> None:
    images = await seed_images(client, 5)
    target = images[2]["id"]
    response = await client.get(f"/images/{target}/similar", params={"top_k": 10})
    assert response.status_code == 200
    body = response.json()
    ids = [hit["image"]["id"] for hit in body["results"]]
    assert target not in ids
    assert sorted(ids) == sorted(image["id"] for image in images if image["id"] != target)
    scores = [hit["score"] for hit in body["results"]]
    assert scores == sorted(scores, reverse=True)

    top_two = (await client.get(f"/images/{target}/similar", params={"top_k": 2})).json()
    assert [h["image"]["id"] for h in top_two["results"]] == ids[:2]


async def test_search_by_stored_image_bytes_ranks_that_image_first(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    await seed_images(client, 5)
    query = make_image_bytes(102)  # the bytes of img2.jpg
    files_before = stored_files(settings.storage_root)
    response = await client.post("/search/image", files={"file": ("q.jpg", query, "image/jpeg")}, params={"top_k": 3})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert results[0]["image"]["filename"] == "img2.jpg"
    assert results[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert len(results) == 3
    assert (await client.get("/images")).json()["count"] == 5
    assert stored_files(settings.storage_root) == files_before


async def test_search_by_image_refuses_a_non_image(client: httpx.AsyncClient, settings: Settings) -> None:
    response = await client.post("/search/image", files={"file": ("q.jpg", b"not an image", "image/jpeg")})
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_image"
    assert stored_files(settings.storage_root) == []


async def test_purge_removes_image_everywhere(client: httpx.AsyncClient, settings: Settings) -> None:
    images = await seed_images(client, 3)
    doomed = images[1]
    response = await client.delete(f"/images/{doomed['id']}", params={"purge": "true"})
    assert response.status_code == 204
    assert (await client.get(f"/images/{doomed['id']}")).status_code == 404
    assert (await client.get(doomed["file_url"])).status_code == 404
    assert (await client.get(f"/images/{doomed['id']}/similar")).status_code == 404

    results = (await client.get("/search", params={"q": "anything", "top_k": 10})).json()["results"]
    assert doomed["id"] not in [hit["image"]["id"] for hit in results]
    assert len(results) == 2
    similar = (await client.get(f"/images/{images[0]['id']}/similar")).json()["results"]
    assert [hit["image"]["id"] for hit in similar] == [images[2]["id"]]

    assert not any(doomed["sha256"] in p.name for p in stored_files(settings.storage_root))
    health = (await client.get("/health")).json()
    assert health["images"] == health["index"]["size"] == 2

    again = await client.delete(f"/images/{doomed['id']}", params={"purge": "true"})
    assert again.status_code == 404
    assert again.json()["code"] == "image_not_found"


async def test_purged_image_can_be_uploaded_again(client: httpx.AsyncClient) -> None:
    data = make_image_bytes(7)
    first = (await client.post("/images", files={"file": ("a.jpg", data, "image/jpeg")})).json()
    assert (await client.delete(f"/images/{first['id']}", params={"purge": "true"})).status_code == 204
    again = await client.post("/images", files={"file": ("a.jpg", data, "image/jpeg")})
    assert again.status_code == 201
    assert again.json()["duplicate"] is False
    assert again.json()["id"] != first["id"]  # ids are never reused
    assert (await client.get(again.json()["file_url"])).content == data


@pytest.mark.sqlite_only("pgvector's column cannot hold a damaged vector")
async def test_similar_to_an_image_whose_stored_vector_is_damaged_says_so(client: httpx.AsyncClient) -> None:
    images = await seed_images(client, 3)
    async with app_context(client).sessions() as session:
        await session.exec(update(Image).where(col(Image.id) == images[0]["id"]).values(embedding=b"\x00\x01\x02"))
        await session.commit()
    response = await client.get(f"/images/{images[0]['id']}/similar")
    assert response.status_code == 409, response.text
    assert response.json()["code"] == "damaged_vector" and "check --repair" in response.json()["detail"]
    assert (await client.get(f"/images/{images[1]['id']}/similar")).status_code == 200  # the others answer
    # Its stored vector is refused the same way, not sent as garbage.
    embedding = await client.get(f"/images/{images[0]['id']}/embedding")
    assert embedding.status_code == 409, embedding.text
    assert embedding.json()["code"] == "damaged_vector" and "check --repair" in embedding.json()["detail"]
