"""Duplicates in tiers with a suggested keeper, decisions that last, and the trash every delete goes to.

The tiny test CLIP has random weights, so its cosines mean nothing: the tests set the cosine thresholds so
that the perceptual hash (which is real) decides, except where the cosine gate itself is under test."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from backend.services.trash import purge_expired
from bench.data import scene_bytes, variants
from tests.api.test_libraries import add_library, backdate, scan, snapshot
from tests.conftest import AppRunner
from tests.helpers import exif_photo, stored_files, wait_job

# The cosine decides nothing here (see above); the similar tier is off.
HASH_DECIDES = {"duplicates_same_cosine": -1.0, "duplicates_similar_cosine": 1.01}


async def put(client: httpx.AsyncClient, name: str, data: bytes) -> dict:
    response = await client.post("/images", files={"file": (name, data, "application/octet-stream")})
    assert response.status_code == 201, response.text
    return response.json()


async def upload_photo_and_variants(client: httpx.AsyncClient, seed: int = 1) -> tuple[dict, dict[str, dict]]:
    original = scene_bytes(seed)
    stored = await put(client, "original.png", original)
    copies = {name: await put(client, f"{name}.img", data) for name, data in variants(original).items()}
    return stored, copies


async def groups(client: httpx.AsyncClient, **params: str | int) -> dict:
    response = await client.get("/duplicates", params=params)
    assert response.status_code == 200, response.text
    return response.json()


async def rescan(client: httpx.AsyncClient) -> dict:
    response = await client.post("/duplicates/scan")
    assert response.status_code == 202, response.text
    job = await wait_job(client, response.json()["id"])
    assert job["kind"] == "duplicates" and job["status"] == "succeeded", job
    return job["result"]


async def listed_ids(client: httpx.AsyncClient) -> set[int]:
    return {image["id"] for image in (await client.get("/images", params={"limit": 500})).json()["data"]}


async def searched_ids(client: httpx.AsyncClient) -> set[int]:
    found = (await client.get("/search", params={"q": "a photo", "top_k": 100})).json()["results"]
    return {hit["image"]["id"] for hit in found}


async def test_variants_of_one_photo_are_one_group_with_the_original_as_keeper(run_app: AppRunner) -> None:
    async with run_app(**HASH_DECIDES) as client:
        original, copies = await upload_photo_and_variants(client)
        strangers = [await put(client, f"other{seed}.png", scene_bytes(seed)) for seed in range(2, 6)]
        # Found as each image arrived, with no scan.
        found = await groups(client, tier="same_picture")
        assert found["count"] == 1, [g["id"] for g in found["data"]]
        group = found["data"][0]
        members = {m["image"]["id"] for m in group["members"]}
        assert members == {original["id"], *(c["id"] for c in copies.values())}
        assert not members & {s["id"] for s in strangers}
        assert group["tier"] == "same_picture" and group["size"] == len(members)
        assert group["keeper_id"] == original["id"] and group["members"][0]["keeper"] is True
        assert group["members"][0]["image"]["id"] == original["id"]
        assert "bytes" in group["keeper_reason"]  # as many pixels as the JPEG and WebP copies, more bytes
        assert all(p["hash_distance"] <= 16 and p["tier"] == "same_picture" for p in group["pairs"])
        assert group["id"] == f"same_picture-{min(members)}"
        # A full scan finds the same group again.
        result = await rescan(client)
        assert result["groups"]["same_picture"] == 1 and result["images"] == len(members) + len(strangers)
        assert (await groups(client))["data"][0]["id"] == group["id"]


async def test_neither_the_hash_nor_the_cosine_decides_alone(run_app: AppRunner) -> None:
    async with run_app(duplicates_same_cosine=1.0, duplicates_similar_cosine=1.01) as client:
        await upload_photo_and_variants(client)
        assert (await groups(client))["count"] == 0  # hashes close, cosines below 1: no group
    async with run_app(
        duplicates_same_cosine=-1.0, duplicates_hash_distance=0, duplicates_similar_cosine=1.01
    ) as client:
        await rescan(client)
        # Every cosine passes now, but only copies whose hashes match to the bit are grouped: not the crops.
        found = (await groups(client, tier="same_picture"))["data"]
        assert all(p["hash_distance"] == 0 for g in found for p in g["pairs"])
        assert sum(len(g["members"]) for g in found) < 1 + len(variants(scene_bytes(1)))
    async with run_app(duplicates_same_cosine=-1.0, duplicates_similar_cosine=-1.0) as client:
        await rescan(client)
        # With the similar tier wide open, the copies form a same_picture group and nothing more.
        found = await groups(client)
        assert [g["tier"] for g in found["data"]] == ["same_picture"]


async def test_resolving_trashes_the_rest_and_restore_brings_them_back(run_app: AppRunner, settings) -> None:
    async with run_app(**HASH_DECIDES) as client:
        original, copies = await upload_photo_and_variants(client)
        stranger = await put(client, "other.png", scene_bytes(7))
        group = (await groups(client))["data"][0]
        response = await client.post(f"/duplicates/{group['id']}/resolve", json={"keep": [original["id"]]})
        assert response.status_code == 200, response.text
        outcome = response.json()
        copy_ids = {c["id"] for c in copies.values()}
        assert set(outcome["trashed"]) == copy_ids and outcome["kept"] == [original["id"]]
        # Out of every listing and search, the group gone; the files are still there.
        assert await listed_ids(client) == {original["id"], stranger["id"]}
        assert await searched_ids(client) == {original["id"], stranger["id"]}
        assert (await client.get("/images")).json()["count"] == 2
        assert (await groups(client))["count"] == 0
        trash = (await client.get("/trash")).json()
        assert {i["id"] for i in trash["data"]} == copy_ids and trash["count"] == len(copy_ids)
        assert all(i["purge_at"] is not None for i in trash["data"])
        assert len(stored_files(settings.storage_root)) == 2 * (len(copy_ids) + 2)
        similar = (await client.get(f"/images/{original['id']}/similar", params={"top_k": 50})).json()
        assert {hit["image"]["id"] for hit in similar["results"]} == {stranger["id"]}

        back = copies["resize 50%"]["id"]
        restored = await client.post(f"/trash/{back}/restore")
        assert restored.status_code == 200 and restored.json()["id"] == back
        assert await listed_ids(client) == {original["id"], stranger["id"], back}
        assert await searched_ids(client) == {original["id"], stranger["id"], back}
        regrouped = (await groups(client))["data"]
        assert [{m["image"]["id"] for m in g["members"]} for g in regrouped] == [{original["id"], back}]
        again = await client.post(f"/trash/{back}/restore")
        assert again.status_code == 409 and again.json()["code"] == "not_in_trash"

        emptied = await client.delete("/trash")
        assert emptied.status_code == 200 and emptied.json()["purged"] == len(copy_ids) - 1
        assert (await client.get("/trash")).json()["count"] == 0
        assert len(stored_files(settings.storage_root)) == 2 * 3


async def test_keep_all_lasts_through_a_rescan_and_a_restart_until_a_new_image_joins(run_app: AppRunner) -> None:
    original = scene_bytes(3)
    made = variants(original)
    async with run_app(**HASH_DECIDES) as client:
        await put(client, "a.png", original)
        await put(client, "b.jpg", made["jpeg q75"])
        group = (await groups(client))["data"][0]
        response = await client.post(f"/duplicates/{group['id']}/resolve", json={"keep_all": True})
        assert response.status_code == 200 and response.json()["remembered"] is True
        assert response.json()["trashed"] == []
        assert (await groups(client))["count"] == 0
        await rescan(client)
        assert (await groups(client))["count"] == 0
    async with run_app(**HASH_DECIDES) as client:
        assert (await groups(client))["count"] == 0
        await rescan(client)
        assert (await groups(client))["count"] == 0
        assert len(await listed_ids(client)) == 2  # keep_all trashes nothing
        # A third copy is not covered by the decision: the group is back, with all three.
        third = await put(client, "c.webp", made["webp"])
        found = (await groups(client))["data"]
        assert len(found) == 1 and third["id"] in {m["image"]["id"] for m in found[0]["members"]}
        assert found[0]["size"] == 3


async def test_bulk_resolve_previews_then_applies_the_suggested_keepers(run_app: AppRunner) -> None:
    async with run_app(**HASH_DECIDES) as client:
        first, _ = await upload_photo_and_variants(client, seed=1)
        second = await put(client, "two.png", scene_bytes(2))
        await put(client, "two-small.jpg", variants(scene_bytes(2))["resize 25%"])
        before = await listed_ids(client)
        preview = await client.post("/duplicates/resolve", json={"dry_run": True})
        assert preview.status_code == 200, preview.text
        planned = preview.json()
        assert planned["dry_run"] is True and len(planned["groups"]) == 2
        assert {tuple(g["kept"]) for g in planned["groups"]} == {(first["id"],), (second["id"],)}
        assert all(g["reason"] for g in planned["groups"])
        assert await listed_ids(client) == before and (await groups(client))["count"] == 2
        applied = (await client.post("/duplicates/resolve", json={})).json()
        assert applied["trashed"] == planned["trashed"] == len(before) - 2
        assert await listed_ids(client) == {first["id"], second["id"]}
        assert (await groups(client))["count"] == 0


async def test_a_plan_sent_back_applies_exactly_what_the_preview_showed(run_app: AppRunner) -> None:
    async with run_app(**HASH_DECIDES) as client:
        small = variants(scene_bytes(1))
        one = await put(client, "one-75.jpg", small["resize 75%"])
        await put(client, "one-50.jpg", small["resize 50%"])
        two = await put(client, "two.png", scene_bytes(2))
        await put(client, "two-small.jpg", variants(scene_bytes(2))["resize 25%"])
        preview = (await client.post("/duplicates/resolve", json={"dry_run": True})).json()
        plan = [{k: g[k] for k in ("group_id", "kept", "trashed")} for g in preview["groups"]]
        assert {tuple(g["kept"]) for g in plan} == {(one["id"],), (two["id"],)}
        # The full-size original of the first picture arrives after the preview: it would be the keeper now.
        bigger = await put(client, "one.png", scene_bytes(1))
        applied = (await client.post("/duplicates/resolve", json={"plan": plan})).json()
        assert [g["group_id"] for g in applied["groups"]] == [g["group_id"] for g in plan if two["id"] in g["kept"]]
        assert [s["group_id"] for s in applied["skipped"]] == [g["group_id"] for g in plan if one["id"] in g["kept"]]
        assert "preview again" in applied["skipped"][0]["reason"]
        # The changed group is untouched: nothing the preview did not show was trashed.
        assert {one["id"], bigger["id"]} <= await listed_ids(client) and applied["trashed"] == 1
        refused = await client.post(
            "/duplicates/resolve", json={"plan": [{"group_id": "exact-1", "kept": [1], "trashed": [2]}]}
        )
        assert refused.status_code == 422 and refused.json()["code"] == "validation_error"


async def test_bad_decisions_are_refused_and_change_nothing(run_app: AppRunner) -> None:
    async with run_app(**HASH_DECIDES) as client:
        original, copies = await upload_photo_and_variants(client)
        group = (await groups(client))["data"][0]
        url = f"/duplicates/{group['id']}/resolve"
        cases = [
            (url, {"keep": [999_999]}, 400, "invalid_resolve"),
            (url, {"keep": [original["id"]], "keep_all": True}, 400, "invalid_resolve"),
            (url, {}, 400, "invalid_resolve"),
            (url, {"keep": []}, 422, "validation_error"),
            (url, {"keep": ["1"]}, 422, "validation_error"),
            ("/duplicates/same_picture-999999/resolve", {"keep_all": True}, 404, "group_not_found"),
            ("/duplicates/nonsense/resolve", {"keep_all": True}, 422, "validation_error"),
            ("/duplicates/resolve", {"tier": "exact"}, 422, "validation_error"),
        ]
        for path, body, status, code in cases:
            response = await client.post(path, json=body)
            assert response.status_code == status, (path, body, response.text)
            assert response.json()["code"] == code, response.text
        assert (await client.get("/duplicates", params={"tier": "twins"})).status_code == 422
        assert (await client.get("/duplicates", params={"limit": 0})).status_code == 422
        assert (await client.post("/trash/999999/restore")).status_code == 404
        assert (await client.post(f"/trash/{original['id']}/restore")).json()["code"] == "not_in_trash"
        assert len(await listed_ids(client)) == 1 + len(copies) and (await groups(client))["count"] == 1


async def test_two_resolves_sent_together_never_trash_the_whole_group(run_app: AppRunner) -> None:
    async with run_app(**HASH_DECIDES) as client:
        original, copies = await upload_photo_and_variants(client)
        group = (await groups(client))["data"][0]
        members = [m["image"]["id"] for m in group["members"]]
        url = f"/duplicates/{group['id']}/resolve"
        first, second = await asyncio.gather(
            client.post(url, json={"keep": [members[0]]}), client.post(url, json={"keep": [members[1]]})
        )
        answers = sorted([first, second], key=lambda r: r.status_code)
        assert answers[0].status_code == 200, answers[0].text
        # The later one finds the group gone (404) or its keeper trashed under the lock (409): nothing more moves.
        assert (answers[1].status_code, answers[1].json()["code"]) in {(404, "group_not_found"), (409, "group_changed")}
        kept = answers[0].json()["kept"]
        assert len(kept) == 1 and await listed_ids(client) == set(kept)
        assert (await client.get("/trash")).json()["count"] == len(members) - 1


@pytest.mark.parametrize("back_by", ["restore", "upload again"])
async def test_an_image_back_from_the_trash_is_paired_with_what_came_meanwhile(
    run_app: AppRunner, back_by: str
) -> None:
    original_bytes = scene_bytes(4)
    copy_name, copy_bytes = next(iter(variants(original_bytes).items()))
    async with run_app(**HASH_DECIDES) as client:
        original = await put(client, "original.png", original_bytes)
        assert (await client.delete(f"/images/{original['id']}")).status_code == 204
        copy = await put(client, f"{copy_name}.img", copy_bytes)
        assert (await groups(client))["count"] == 0
        if back_by == "restore":
            assert (await client.post(f"/trash/{original['id']}/restore")).status_code == 200
        else:
            again = await client.post("/images", files={"file": ("again.png", original_bytes, "image/png")})
            assert again.status_code == 200 and again.json()["id"] == original["id"], again.text
        found = (await groups(client))["data"]  # no scan: coming back looked for its duplicates
        assert [{m["image"]["id"] for m in g["members"]} for g in found] == [{original["id"], copy["id"]}]


async def test_a_trashed_image_is_not_captioned(run_app: AppRunner) -> None:
    async with run_app() as client:
        image = await put(client, "a.png", scene_bytes(2))
        assert (await client.delete(f"/images/{image['id']}")).status_code == 204
        response = await client.post(f"/images/{image['id']}/caption")
        assert response.status_code == 409 and response.json()["code"] == "in_trash", response.text
        assert "restore" in response.json()["detail"]


async def test_delete_moves_to_the_trash_and_purge_deletes_at_once(run_app: AppRunner, settings) -> None:
    async with run_app() as client:
        kept = await put(client, "kept.png", scene_bytes(1))
        doomed = await put(client, "doomed.png", scene_bytes(2))
        gone = await put(client, "gone.png", scene_bytes(3))
        assert (await client.delete(f"/images/{doomed['id']}")).status_code == 204
        # Its record still answers, saying when it went: the trash view shows it with its thumbnail.
        record = await client.get(f"/images/{doomed['id']}")
        assert record.status_code == 200 and record.json()["trashed_at"] is not None
        assert (await client.get(f"/images/{doomed['id']}/thumbnail")).status_code == 200
        assert await listed_ids(client) == {kept["id"], gone["id"]}
        assert (await client.get("/trash")).json()["data"][0]["id"] == doomed["id"]
        assert (await client.delete(f"/images/{gone['id']}", params={"purge": "true"})).status_code == 204
        assert (await client.get("/trash")).json()["count"] == 1
        assert len(stored_files(settings.storage_root)) == 2 * 2
        # Sending trashed bytes again takes the image out of the trash.
        again = await client.post("/images", files={"file": ("again.png", scene_bytes(2), "image/png")})
        assert again.json()["id"] == doomed["id"] and again.json()["duplicate"] is True
        assert (await client.get("/trash")).json()["count"] == 0
        assert await searched_ids(client) == {kept["id"], doomed["id"]}
    async with run_app(trash_days=0.5 / 86_400) as client:  # half a second
        assert (await client.delete(f"/images/{kept['id']}")).status_code == 204
        assert await purge_expired(client.ctx) == 0  # type: ignore[attr-defined]  # not yet
        await asyncio.sleep(1)
        assert await purge_expired(client.ctx) == 1  # type: ignore[attr-defined]
        assert (await client.get("/trash")).json()["count"] == 0
        assert len(stored_files(settings.storage_root)) == 2


async def test_a_library_image_in_the_trash_keeps_its_file_and_stays_out_after_purging(
    run_app: AppRunner, tmp_path: Path
) -> None:
    folder = tmp_path / "nas" / "photos"
    folder.mkdir(parents=True)
    original = scene_bytes(4)
    (folder / "big.png").write_bytes(original)
    (folder / "small.jpg").write_bytes(variants(original)["resize 50%"])
    (folder / "again.png").write_bytes(original)  # the same bytes twice: exact
    for path in folder.iterdir():
        backdate(path)
    before = snapshot(folder)
    async with run_app(
        import_roots=[folder.parent], library_watch=False, library_settle_seconds=0, **HASH_DECIDES
    ) as client:
        library = await add_library(client, folder)
        exact = (await groups(client, tier="exact"))["data"]
        assert len(exact) == 1 and exact[0]["size"] == 2
        assert {c["path"] for c in exact[0]["members"][0]["copies"]} == {"big.png", "again.png"}
        refused = await client.post(f"/duplicates/{exact[0]['id']}/resolve", json={"keep": [exact[0]["keeper_id"]]})
        assert refused.status_code == 400 and "nothing to trash" in refused.json()["detail"]
        group = (await groups(client, tier="same_picture"))["data"][0]
        outcome = (await client.post(f"/duplicates/{group['id']}/resolve", json={"keep": [group["keeper_id"]]})).json()
        assert len(outcome["trashed"]) == 1
        assert snapshot(folder) == before
        assert (await client.delete("/trash")).json()["purged"] == 1
        assert snapshot(folder) == before
        await scan(client, library["id"])
        # The purged file is not indexed again; the file itself is untouched.
        assert len(await listed_ids(client)) == 1
        assert snapshot(folder) == before
        assert (await client.get("/trash")).json()["count"] == 0


@pytest.mark.parametrize("window", [0.0, 60.0])
async def test_similar_shots_by_cosine_and_time_window(run_app: AppRunner, window: float) -> None:
    async with run_app(
        duplicates_same_cosine=1.0, duplicates_similar_cosine=-1.0, duplicates_similar_window=window
    ) as client:
        a = await put(client, "a.jpg", exif_photo(1, taken="2021:07:14 09:30:05"))
        b = await put(client, "b.jpg", exif_photo(2, taken="2021:07:14 09:30:35"))
        c = await put(client, "c.jpg", exif_photo(3, taken="2021:07:14 11:00:00"))
        found = (await groups(client, tier="similar"))["data"]
        members = [{m["image"]["id"] for m in g["members"]} for g in found]
        if window:
            assert members == [{a["id"], b["id"]}]  # the shot 90 minutes later is not in the burst
        else:
            assert members == [{a["id"], b["id"], c["id"]}]
        assert all(p["tier"] == "similar" for p in found[0]["pairs"])
