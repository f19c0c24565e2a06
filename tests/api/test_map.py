"""The collection map (GET /map) and the page served at `/`."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.api.test_clusters import run_clustering
from tests.conftest import AppRunner
from tests.helpers import make_image_bytes, upload_many


async def test_map_of_an_empty_collection_has_no_points(client: httpx.AsyncClient) -> None:
    answer = await client.get("/map")
    assert answer.status_code == 200
    assert answer.json() == {
        "method": "pca",
        "total": 0,
        "count": 0,
        "sampled": False,
        "run_id": None,
        "clusters": [],
        "points": [],
    }


async def test_map_places_every_image_once_the_same_way_each_time(client: httpx.AsyncClient) -> None:
    images = await upload_many(client, 5)
    first = (await client.get("/map")).json()
    assert sorted(p["id"] for p in first["points"]) == sorted(i["id"] for i in images)
    assert first["count"] == first["total"] == 5 and not first["sampled"]
    assert all(math.hypot(p["x"], p["y"]) <= 1.0 + 1e-5 for p in first["points"])
    assert len({(p["x"], p["y"]) for p in first["points"]}) == 5
    assert max(math.hypot(p["x"], p["y"]) for p in first["points"]) > 0.99  # the farthest point is on the rim
    assert all(p["cluster"] is None for p in first["points"])  # nothing clustered yet
    assert (await client.get("/map")).json() == first


async def map_by_sha(client: httpx.AsyncClient) -> dict[str, tuple[float, float]]:
    """Each point of GET /map, keyed by its image's SHA-256 (ids differ between collections)."""
    answer = (await client.get("/map")).json()
    listing = (await client.get("/images", params={"limit": 500})).json()["data"]
    sha = {image["id"]: image["sha256"] for image in listing}
    return {sha[p["id"]]: (p["x"], p["y"]) for p in answer["points"]}


async def test_the_same_collection_draws_the_same_way_whatever_the_upload_order(
    run_app: AppRunner, tmp_path: Path, another_database: Callable[[], str]
) -> None:
    pictures = [("files", (f"p{i}.jpg", make_image_bytes(300 + i), "image/jpeg")) for i in range(12)]
    async with run_app() as client:
        assert (await client.post("/images", files=pictures)).status_code == 201
        drawn = await map_by_sha(client)
    assert len(drawn) == 12 and len(set(drawn.values())) == 12
    async with run_app() as client:  # after a restart: the index is loaded from its file
        assert await map_by_sha(client) == drawn
    # The same pictures, uploaded the other way round into a collection of their own: other ids, the same map.
    async with run_app(storage_root=tmp_path / "reversed", database_url=another_database()) as client:
        assert (await client.post("/images", files=pictures[::-1])).status_code == 201
        reversed_order = await map_by_sha(client)
    assert reversed_order.keys() == drawn.keys()
    for sha, point in drawn.items():
        assert reversed_order[sha] == pytest.approx(point, abs=1e-4), sha


async def test_map_colours_points_by_the_latest_run_or_the_one_asked_for(client: httpx.AsyncClient) -> None:
    await upload_many(client, 6)
    two = await run_clustering(client, k=2, captions=False)
    three = await run_clustering(client, k=3, captions=False)
    for run, asked in ((three, ""), (two, f"?run_id={two['id']}")):
        answer = (await client.get(f"/map{asked}")).json()
        assert answer["run_id"] == run["id"]
        assert [c["cluster_id"] for c in answer["clusters"]] == [c["cluster_id"] for c in run["clusters"]]
        for cluster in run["clusters"]:
            page = (await client.get(f"/clusters/{run['id']}/{cluster['cluster_id']}?limit=500")).json()
            members = {m["image"]["id"] for m in page["data"]}
            assert {p["id"] for p in answer["points"] if p["cluster"] == cluster["cluster_id"]} == members


async def test_map_of_a_large_collection_is_a_sample(client: httpx.AsyncClient) -> None:
    images = await upload_many(client, 6)
    answer = (await client.get("/map?max_points=4")).json()
    assert (answer["count"], answer["total"], answer["sampled"]) == (4, 6, True)
    ids = [p["id"] for p in answer["points"]]
    assert len(set(ids)) == 4 and set(ids) <= {i["id"] for i in images}
    assert (await client.get("/map?max_points=4")).json() == answer  # the same sample each time


async def test_map_refuses_bad_parameters_with_reasons(client: httpx.AsyncClient) -> None:
    missing = await client.get("/map?run_id=42")
    assert missing.status_code == 404 and missing.json()["code"] == "run_not_found"
    for query in ("max_points=0", "max_points=100001", "run_id=0", "run_id=abc"):
        answer = await client.get(f"/map?{query}")
        assert answer.status_code == 422, query
        assert answer.json()["code"] == "validation_error"


async def test_page_is_served_at_the_root(client: httpx.AsyncClient) -> None:
    answer = await client.get("/")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "text/html; charset=utf-8"
    assert "<title>AI Image Organizer</title>" in answer.text
    # Nothing is fetched from another host: the page works offline.
    assert "https://" not in answer.text.split("<script>")[1] and 'src="http' not in answer.text
