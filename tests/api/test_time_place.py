"""EXIF time, place and camera on the records; listings, searches and the timeline narrowed and ordered by them."""

from __future__ import annotations

import httpx
import pytest

from backend.config import Settings
from tests.helpers import exif_photo, sql, wait_job

# (seed, taken, gps, make, model): Paris, Sydney, Fiji on both sides of the antimeridian, and two undated.
PHOTOS = [
    (1, "2021:07:14 09:30:05", (48.8582, 2.2945, 35.0), "Canon", "Canon EOS R6"),
    (2, "2021:07:20 18:00:00", (-33.8568, 151.2153, 4.0), "Apple", "iPhone 15"),
    (3, "2022:01:01 00:15:00", (-17.7134, 178.065, 0.0), "Apple", "iPhone 15"),
    (4, "2022:01:03 12:00:00", (-16.5, -179.9, 2.0), "FUJIFILM", "X-T4"),
    (5, "2023:05:17 08:00:00", None, "Canon", "Canon EOS R6"),
    (6, None, None, None, None),
    (7, None, None, None, None),
]


async def seed(client: httpx.AsyncClient) -> dict[int, dict]:
    """Upload PHOTOS; their records by seed."""
    files = [
        ("files", (f"photo{s}.jpg", exif_photo(s, taken=taken, gps=gps, make=make, model=model), "image/jpeg"))
        for s, taken, gps, make, model in PHOTOS
    ]
    response = await client.post("/images", files=files)
    assert response.status_code == 201, response.text
    return {seed: item["image"] for (seed, *_), item in zip(PHOTOS, response.json()["items"], strict=True)}


def ids(body: dict, key: str = "data") -> list[int]:
    return [item["image"]["id"] if "image" in item else item["id"] for item in body[key]]


async def test_a_photo_carries_its_exif_date_place_and_camera(client: httpx.AsyncClient) -> None:
    photo = exif_photo(
        9, taken="2024:03:02 17:45:10", offset="+01:00", gps=(52.52, 13.405, -3.5), make="Apple", model="iPhone 15"
    )
    response = await client.post("/images", files={"file": ("berlin.jpg", photo, "image/jpeg")})
    assert response.status_code == 201, response.text
    record = response.json()
    assert record["taken_at"] == "2024-03-02T17:45:10" and record["taken_at_offset"] == "+01:00"
    assert record["latitude"] == pytest.approx(52.52, abs=1e-6)
    assert record["longitude"] == pytest.approx(13.405, abs=1e-6)
    assert record["altitude"] == pytest.approx(-3.5)
    assert (record["camera_make"], record["camera_model"]) == ("Apple", "iPhone 15")
    assert (await client.get(f"/images/{record['id']}")).json()["latitude"] == record["latitude"]
    # Stored is stored as UTC with its offset (RFC 3339), the camera's own time without one.
    assert record["created_at"].endswith(("Z", "+00:00"))


async def test_listing_sorts_by_date_taken_with_undated_last(client: httpx.AsyncClient) -> None:
    records = await seed(client)
    by_seed = {record["id"]: s for s, record in records.items()}
    newest = (await client.get("/images", params={"sort": "-taken_at"})).json()
    assert [by_seed[i] for i in ids(newest)][:5] == [5, 4, 3, 2, 1]
    assert {by_seed[i] for i in ids(newest)[5:]} == {6, 7}
    oldest = (await client.get("/images", params={"sort": "taken_at"})).json()
    assert [by_seed[i] for i in ids(oldest)][:5] == [1, 2, 3, 4, 5]
    assert {by_seed[i] for i in ids(oldest)[5:]} == {6, 7}
    uploaded = (await client.get("/images", params={"sort": "created_at", "limit": 2, "offset": 1})).json()
    assert uploaded["count"] == 7 and len(uploaded["data"]) == 2


@pytest.mark.parametrize(
    ("params", "seeds"),
    [
        ({"taken_after": "2021-07-15", "taken_before": "2022-01-02"}, {2, 3}),
        ({"taken_after": "2022-01-03T12:00:00"}, {4, 5}),
        ({"taken_before": "2021-07-14T09:30:06+05:00"}, {1}),  # the bound's own wall clock
        ({"camera": "iphone"}, {2, 3}),
        ({"camera": "canon eos"}, {1, 5}),
        ({"camera": "50%"}, set()),
        ({"has_location": "true"}, {1, 2, 3, 4}),
        ({"has_location": "false"}, {5, 6, 7}),
        ({"bbox": "2.2,48.8,2.4,48.9"}, {1}),
        ({"bbox": "170,-20,-170,-10"}, {3, 4}),  # across the antimeridian
        ({"bbox": "-10,-90,10,90", "camera": "iphone"}, set()),
        ({"has_location": "true", "camera": "apple", "taken_after": "2022-01-01"}, {3}),
    ],
)
async def test_listing_filters_count_what_they_keep(client: httpx.AsyncClient, params: dict, seeds: set) -> None:
    records = await seed(client)
    body = (await client.get("/images", params=params)).json()
    assert {record["id"] for record in body["data"]} == {records[s]["id"] for s in seeds}
    assert body["count"] == len(seeds)


@pytest.mark.parametrize(
    "params",
    [
        {"bbox": "1,2,3"},
        {"bbox": "a,b,c,d"},
        {"bbox": "0,50,10,40"},
        {"bbox": "0,0,200,10"},
        {"bbox": "nan,0,1,1"},
        {"taken_after": "2022-01-01", "taken_before": "2021-01-01"},
        {"taken_after": "yesterday"},
        {"sort": "size"},
        {"has_location": "maybe"},
    ],
)
async def test_bad_filters_are_refused_with_a_reason(client: httpx.AsyncClient, params: dict) -> None:
    for path, extra in (("/images", {}), ("/search", {"q": "a photo"}), ("/timeline", {})):
        if path == "/timeline" and "sort" in params:
            continue  # the timeline is always newest first
        response = await client.get(path, params={**params, **extra})
        assert response.status_code in (400, 422), (path, response.text)
        assert response.json()["detail"]


async def test_filtered_search_finds_top_k_among_the_kept(client: httpx.AsyncClient) -> None:
    records = await seed(client)
    located = {records[s]["id"] for s in (1, 2, 3, 4)}
    for top_k in (2, 4, 10):
        body = (await client.get("/search", params={"q": "a photo", "has_location": "true", "top_k": top_k})).json()
        assert set(ids(body, "results")) <= located
        assert body["count"] == min(top_k, 4)
    # The filtered ranking is the unfiltered one with the others left out.
    everything = ids((await client.get("/search", params={"q": "a photo", "top_k": 7})).json(), "results")
    kept = ids((await client.get("/search", params={"q": "a photo", "has_location": "true"})).json(), "results")
    assert kept == [i for i in everything if i in located]

    similar = (await client.get(f"/images/{records[1]['id']}/similar", params={"camera": "apple", "top_k": 5})).json()
    assert set(ids(similar, "results")) == {records[2]["id"], records[3]["id"]}
    itself = (await client.get(f"/images/{records[1]['id']}/similar", params={"camera": "canon"})).json()
    assert ids(itself, "results") == [records[5]["id"]]

    query = exif_photo(1)
    response = await client.post(
        "/search/image",
        params={"taken_after": "2022-01-01", "top_k": 3},
        files={"file": ("q.jpg", query, "image/jpeg")},
    )
    assert set(ids(response.json(), "results")) <= {records[s]["id"] for s in (3, 4, 5)}
    assert response.json()["count"] == 3


async def test_search_results_in_date_order_and_cut_by_score(client: httpx.AsyncClient) -> None:
    await seed(client)
    best = (await client.get("/search", params={"q": "a photo", "top_k": 4})).json()["results"]
    dated = (await client.get("/search", params={"q": "a photo", "top_k": 4, "sort": "-taken_at"})).json()["results"]
    # The same top 4, now by date taken, newest first, undated last.
    assert {hit["image"]["id"] for hit in dated} == {hit["image"]["id"] for hit in best}
    taken = [hit["image"]["taken_at"] for hit in dated]
    with_date = [t for t in taken if t is not None]
    assert with_date == sorted(with_date, reverse=True) and taken[: len(with_date)] == with_date

    scores = [
        hit["score"] for hit in (await client.get("/search", params={"q": "a photo", "top_k": 7})).json()["results"]
    ]
    cut = scores[3]
    strong = (await client.get("/search", params={"q": "a photo", "top_k": 7, "min_score": cut})).json()
    assert [hit["score"] for hit in strong["results"]] == [s for s in scores if s >= cut]


async def test_timeline_buckets_count_and_show_the_newest(client: httpx.AsyncClient) -> None:
    records = await seed(client)
    months = (await client.get("/timeline", params={"granularity": "month"})).json()
    assert [(b["key"], b["count"]) for b in months["buckets"]] == [
        ("2023-05", 1),
        ("2022-01", 2),
        ("2021-07", 2),
    ]
    assert months["count"] == 3 and months["undated"] == 2
    assert [image["id"] for image in months["buckets"][1]["images"]] == [records[4]["id"], records[3]["id"]]
    thumbnail = await client.get(months["buckets"][0]["images"][0]["thumbnail_url"])
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"

    years = (await client.get("/timeline", params={"granularity": "year", "per_bucket": 1})).json()
    assert [(b["key"], b["count"], len(b["images"])) for b in years["buckets"]] == [
        ("2023", 1, 1),
        ("2022", 2, 1),
        ("2021", 2, 1),
    ]
    days = (await client.get("/timeline", params={"granularity": "day", "offset": 1, "limit": 2})).json()
    assert [b["key"] for b in days["buckets"]] == ["2022-01-03", "2022-01-01"] and days["count"] == 5
    located = (await client.get("/timeline", params={"granularity": "year", "has_location": "true"})).json()
    assert [(b["key"], b["count"]) for b in located["buckets"]] == [("2022", 2), ("2021", 2)]
    assert located["undated"] == 0


async def test_the_metadata_job_fills_in_images_stored_before(client: httpx.AsyncClient, settings: Settings) -> None:
    records = await seed(client)
    # As a library stored before the service read place and camera: those columns are empty.
    await sql(settings, "UPDATE image SET taken_at = NULL, latitude = NULL, longitude = NULL, camera_model = NULL")
    assert (await client.get("/images", params={"has_location": "true"})).json()["count"] == 0
    response = await client.post("/images/metadata")
    assert response.status_code == 202, response.text
    job = await wait_job(client, response.json()["id"])
    assert job["status"] == "succeeded", job
    assert job["result"]["read"] == 7 and job["result"]["with_metadata"] == 5 and job["result"]["failed"] == 0
    restored = (await client.get(f"/images/{records[2]['id']}")).json()
    assert restored["taken_at"] == "2021-07-20T18:00:00" and restored["camera_model"] == "iPhone 15"
    assert restored["latitude"] == pytest.approx(-33.8568, abs=1e-6)
    assert (await client.get("/images", params={"has_location": "true"})).json()["count"] == 4
