"""Zero-shot tags at ingest, the tag filter, and per-image BLIP captions."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from backend.models import Image
from tests.conftest import AppRunner, app_context
from tests.helpers import make_image_bytes, upload_many, wait_job
from tests.tiny_models import build_tiny_blip


async def test_uploads_get_their_top_tags(client: httpx.AsyncClient) -> None:
    images = await upload_many(client, 3)
    for image in images:
        tags = image["tags"]
        assert len(tags) == 3
        scores = [t["score"] for t in tags]
        assert scores == sorted(scores, reverse=True) and all(0 < s <= 1 for s in scores)
        assert len({t["tag"] for t in tags}) == 3
        # The same tags come back from every read path.
        assert (await client.get(f"/images/{image['id']}")).json()["tags"] == tags


async def test_tag_filter_lists_only_tagged_images(client: httpx.AsyncClient) -> None:
    images = await upload_many(client, 6)
    tag = images[0]["tags"][0]["tag"]
    expected = {image["id"] for image in images if tag in {t["tag"] for t in image["tags"]}}
    listed = (await client.get("/images", params={"tag": tag})).json()
    assert listed["count"] == len(expected)
    assert {image["id"] for image in listed["data"]} == expected
    assert (await client.get("/images", params={"tag": "no such tag"})).json() == {
        "data": [],
        "count": 0,
        "offset": 0,
        "limit": 50,
    }


def most_used_first(carried: list[str], vocabulary: list[str]) -> list[dict]:
    """What GET /tags lists: every vocabulary tag with its count, most used first, equals in vocabulary order."""
    counted = [{"tag": tag, "count": carried.count(tag)} for tag in vocabulary]
    return sorted(counted, key=lambda item: (-item["count"], vocabulary.index(item["tag"])))


async def test_tags_lists_the_vocabulary_with_counts_and_the_filter_ignores_case(run_app: AppRunner) -> None:
    vocabulary = ["Beach", "Forest", "City"]
    async with run_app(tag_vocabulary=vocabulary, tags_per_image=1) as client:
        empty = (await client.get("/tags")).json()
        assert empty == {
            "data": [{"tag": "Beach", "count": 0}, {"tag": "Forest", "count": 0}, {"tag": "City", "count": 0}],
            "vocabulary_size": 3,
        }
        images = await upload_many(client, 5)
        carried = [image["tags"][0]["tag"] for image in images]
        listed = (await client.get("/tags")).json()
        assert listed == {"data": most_used_first(carried, vocabulary), "vocabulary_size": 3}
        counts = {item["tag"]: item["count"] for item in listed["data"]}
        top = images[0]["tags"][0]["tag"]
        for spelling in (top, top.upper(), f" {top.lower()} "):
            assert (await client.get("/images", params={"tag": spelling})).json()["count"] == counts[top]
    # The same stored tags under the vocabulary listed least used first: the answer still starts with the most
    # used (5 images over 3 tags cannot all count the same, so this order differs from the vocabulary's).
    least_first = sorted(vocabulary, key=lambda tag: (carried.count(tag), tag))
    async with run_app(tag_vocabulary=least_first, tags_per_image=1) as client:
        listed = (await client.get("/tags")).json()["data"]
        assert listed == most_used_first(carried, least_first)
        assert [item["tag"] for item in listed] != least_first


async def test_search_results_carry_tags(client: httpx.AsyncClient) -> None:
    images = await upload_many(client, 3)
    by_id = {image["id"]: image["tags"] for image in images}
    hits = (await client.get("/search", params={"q": "a beach"})).json()["results"]
    assert hits and all(hit["image"]["tags"] == by_id[hit["image"]["id"]] for hit in hits)


async def test_custom_vocabulary_and_threshold(run_app: AppRunner) -> None:
    async with run_app(tag_vocabulary=["alpha", "beta"], tags_per_image=5) as client:
        image = (await upload_many(client, 1))[0]
        assert {t["tag"] for t in image["tags"]} == {"alpha", "beta"}
        assert sum(t["score"] for t in image["tags"]) == pytest.approx(1.0, abs=1e-4)
    async with run_app(tag_min_score=0.99) as client:
        image = (await upload_many(client, 1, first_seed=7))[0]
        assert image["tags"] == []


async def test_tags_go_with_a_deleted_image(client: httpx.AsyncClient) -> None:
    image = (await upload_many(client, 1))[0]
    tag = image["tags"][0]["tag"]
    await client.delete(f"/images/{image['id']}")
    assert (await client.get("/images", params={"tag": tag})).json()["count"] == 0


async def test_caption_on_demand_is_stored_and_reused(client: httpx.AsyncClient, caption_calls: list[int]) -> None:
    image = (await upload_many(client, 1))[0]
    assert image["caption"] is None
    first = await client.post(f"/images/{image['id']}/caption")
    assert first.status_code == 200, first.text
    caption = first.json()["caption"]
    assert isinstance(caption, str) and caption_calls == [1]
    assert (await client.get(f"/images/{image['id']}")).json()["caption"] == caption
    assert (await client.post(f"/images/{image['id']}/caption")).json()["caption"] == caption
    assert caption_calls == [1]
    refreshed = await client.post(f"/images/{image['id']}/caption", params={"refresh": "true"})
    assert refreshed.json()["caption"] == caption  # greedy decoding: the same model says the same thing
    assert caption_calls == [1, 1]


async def stored_caption(client: httpx.AsyncClient, image_id: int) -> tuple[str | None, str | None]:
    """The caption on the record, and the BLIP model the record says wrote it."""
    async with app_context(client).sessions() as session:
        row = await session.get(Image, image_id)
    assert row is not None
    return row.caption, row.caption_model


async def test_a_caption_is_made_again_after_blip_model_name_changes(
    run_app: AppRunner, tiny_blip_dir: Path, tmp_path: Path, caption_calls: list[int]
) -> None:
    other_blip = str(build_tiny_blip(tmp_path / "other-blip", seed=1))
    async with run_app() as client:
        image = (await upload_many(client, 1))[0]
        first = (await client.post(f"/images/{image['id']}/caption")).json()["caption"]
        assert caption_calls == [1]
        assert await stored_caption(client, image["id"]) == (first, str(tiny_blip_dir))
    async with run_app(blip_model_name=other_blip) as client:
        # Without refresh: the cached caption is another model's, so BLIP runs again and the record says so.
        answer = await client.post(f"/images/{image['id']}/caption")
        assert answer.status_code == 200, answer.text
        second = answer.json()["caption"]
        assert caption_calls == [1, 1]
        assert await stored_caption(client, image["id"]) == (second, other_blip)
        assert (await client.get(f"/images/{image['id']}")).json()["caption"] == second
        # Now it is this model's own caption: reused.
        assert (await client.post(f"/images/{image['id']}/caption")).json()["caption"] == second
        assert caption_calls == [1, 1]
        # A clustering run reuses it too: its representative is not captioned again.
        run = (await client.get("/clusters", params={"k": "1"})).json()
        assert run["caption_model"] == other_blip and run["clusters"][0]["caption"] == second
        assert caption_calls == [1, 1]
    async with run_app() as client:
        # Back to the first model: made again, and greedy decoding gives that model's caption of before.
        assert (await client.post(f"/images/{image['id']}/caption")).json()["caption"] == first
        assert caption_calls == [1, 1, 1]
        assert await stored_caption(client, image["id"]) == (first, str(tiny_blip_dir))


async def test_caption_of_a_lost_original_is_409(client: httpx.AsyncClient) -> None:
    image = (await upload_many(client, 1))[0]
    ctx = app_context(client)
    async with ctx.sessions() as session:
        row = await session.get(Image, image["id"])
    assert row is not None
    ctx.store.path(row.storage_key).unlink()
    response = await client.post(f"/images/{image['id']}/caption", params={"refresh": "true"})
    assert response.status_code == 409 and response.json()["code"] == "original_unreadable"
    assert str(image["id"]) in response.json()["detail"]
    assert (await client.get(f"/images/{image['id']}")).json()["caption"] is None


async def test_caption_errors(run_app: AppRunner) -> None:
    async with run_app(blip_model_name="/nonexistent/blip") as client:
        assert (await client.post("/images/5/caption")).status_code == 404
        image = (await upload_many(client, 1))[0]
        response = await client.post(f"/images/{image['id']}/caption")
        assert response.status_code == 503 and response.json()["code"] == "model_unavailable"
        assert "BLIP" in response.json()["detail"]
        health = (await client.get("/health")).json()
        assert health["captioner"]["state"] == "failed"


async def test_caption_on_upload_runs_a_background_job(run_app: AppRunner) -> None:
    async with run_app(caption_on_upload=True) as client:
        images = await upload_many(client, 2)
        jobs = (await client.get("/jobs", params={"kind": "caption"})).json()["data"]
        assert len(jobs) == 1
        done = await wait_job(client, jobs[0]["id"])
        assert done["status"] == "succeeded" and done["result"]["captioned"] == 2
        for image in images:
            assert (await client.get(f"/images/{image['id']}")).json()["caption"] is not None
        # A duplicate upload creates nothing, so it starts no job.
        again = await client.post("/images", files={"file": ("again.jpg", make_image_bytes(100), "image/jpeg")})
        assert again.status_code == 200 and again.json()["duplicate"]
        assert len((await client.get("/jobs", params={"kind": "caption"})).json()["data"]) == 1
