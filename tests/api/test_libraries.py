"""Libraries: folders indexed in place, kept in step by scans and by watching, never written to."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import AppRunner
from tests.helpers import exif_photo, make_image_bytes, wait_job


def snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under a folder: size, mtime and hash. What the service must never change."""
    return {
        str(path.relative_to(folder)): (
            path.stat().st_size,
            path.stat().st_mtime_ns,
            hashlib.sha256(path.read_bytes()).hexdigest(),
        )
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.is_symlink()
    }


def backdate(path: Path, seconds: float = 60) -> None:
    """A file written a while ago (scans leave files written in the last LIBRARY_SETTLE_SECONDS for later)."""
    moment = time.time() - seconds
    os.utime(path, (moment, moment))


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "nas" / "photos"
    (root / "2021" / "summer").mkdir(parents=True)
    (root / "phone").mkdir()
    (root / "2021" / "summer" / "beach.jpg").write_bytes(exif_photo(1, taken="2021:07:14 09:30:05"))
    (root / "2021" / "summer" / "dunes.png").write_bytes(make_image_bytes(2, fmt="PNG"))
    (root / "phone" / "IMG_0001.jpg").write_bytes(make_image_bytes(3))
    (root / "phone" / "notes.txt").write_text("not an image")
    for path in root.rglob("*"):
        backdate(path)
    return root


@pytest.fixture
async def app(run_app: AppRunner, photos: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with run_app(import_roots=[photos.parent], library_watch=False, library_settle_seconds=0) as client:
        yield client


async def add_library(client: httpx.AsyncClient, folder: Path, **extra: object) -> dict:
    """Register the folder and wait for its first scan; the record, with that scan's result as `first_scan`."""
    response = await client.post("/libraries", json={"path": str(folder), **extra})
    assert response.status_code == 201, response.text
    library = response.json()
    job = await wait_job(client, library["scan_job"])
    assert job["kind"] == "scan" and job["status"] == "succeeded", job
    return {**library, "first_scan": job["result"]}


async def scan(client: httpx.AsyncClient, library_id: int) -> dict:
    response = await client.post(f"/libraries/{library_id}/scan")
    assert response.status_code == 202, response.text
    job = await wait_job(client, response.json()["id"])
    assert job["status"] == "succeeded", job
    return job["result"]


async def images_of(client: httpx.AsyncClient, library_id: int) -> dict[str, dict]:
    listed = (await client.get("/images", params={"library": library_id, "limit": 500})).json()
    return {image["path"]: image for image in listed["data"]}


async def test_a_library_is_indexed_without_copying_an_original(app: httpx.AsyncClient, photos: Path, settings) -> None:
    before = snapshot(photos)
    library = await add_library(app, photos, name="NAS")
    assert (library["name"], library["path"], library["watch"], library["online"]) == ("NAS", str(photos), True, True)
    result = library["first_scan"]
    assert (result["files"], result["added"], result["failed"]) == (3, 3, 0)
    images = await images_of(app, library["id"])
    assert set(images) == {"2021/summer/beach.jpg", "2021/summer/dunes.png", "phone/IMG_0001.jpg"}
    beach = images["2021/summer/beach.jpg"]
    assert beach["library_id"] == library["id"] and beach["filename"] == "beach.jpg"
    assert beach["taken_at"] == "2021-07-14T09:30:05"
    served = await app.get(beach["file_url"])
    assert served.status_code == 200 and served.content == (photos / "2021/summer/beach.jpg").read_bytes()
    assert served.headers["content-type"] == "image/jpeg"
    assert (await app.get(beach["thumbnail_url"])).status_code == 200
    # Nothing of the originals in storage: only thumbnails (and the database and index).
    originals = settings.storage_root / "originals"
    assert not originals.exists() or not any(path.is_file() for path in originals.rglob("*"))
    assert snapshot(photos) == before
    found = (await app.get("/search", params={"q": "a beach", "library": library["id"]})).json()
    assert found["count"] == 3
    listed = (await app.get(f"/libraries/{library['id']}")).json()
    assert (listed["images"], listed["files"]) == (3, 3) and listed["scanned_at"] is not None
    # A second scan reads nothing again.
    again = await scan(app, library["id"])
    assert (again["added"], again["unchanged"], again["removed"]) == (0, 3, 0)


async def test_scans_follow_additions_changes_renames_and_deletions(app: httpx.AsyncClient, photos: Path) -> None:
    library = await add_library(app, photos)
    await scan(app, library["id"])
    first = await images_of(app, library["id"])
    beach_id, dunes_id = first["2021/summer/beach.jpg"]["id"], first["2021/summer/dunes.png"]["id"]

    (photos / "phone" / "IMG_0002.jpg").write_bytes(make_image_bytes(4))  # added
    (photos / "phone" / "IMG_0001.jpg").write_bytes(make_image_bytes(5))  # changed
    (photos / "2021" / "summer" / "beach.jpg").rename(photos / "phone" / "beach-moved.jpg")  # moved
    (photos / "2021" / "summer" / "dunes.png").unlink()  # deleted
    for path in photos.rglob("*"):
        backdate(path, 30)
    result = await scan(app, library["id"])
    assert (result["added"], result["linked"], result["gone"], result["removed"]) == (2, 1, 2, 2), result
    now = await images_of(app, library["id"])
    assert set(now) == {"phone/IMG_0001.jpg", "phone/IMG_0002.jpg", "phone/beach-moved.jpg"}
    assert now["phone/beach-moved.jpg"]["id"] == beach_id  # the same record: its clusters and tags survive
    assert (await app.get(f"/images/{dunes_id}")).status_code == 404
    changed = await app.get(now["phone/IMG_0001.jpg"]["file_url"])
    assert changed.content == make_image_bytes(5)


async def test_what_changed_while_the_service_was_stopped_is_found_at_the_next_start(
    run_app: AppRunner, photos: Path
) -> None:
    settings = {"import_roots": [photos.parent], "library_settle_seconds": 0}
    async with run_app(**settings, library_watch=False) as client:
        library = await add_library(client, photos)
        before = await images_of(client, library["id"])
    (photos / "phone" / "IMG_0001.jpg").unlink()
    (photos / "phone" / "while-down.jpg").write_bytes(make_image_bytes(31))
    async with run_app(**settings) as client:  # watching on: every library is scanned at startup
        deadline = time.monotonic() + 20
        while set(images := await images_of(client, library["id"])) != {
            "2021/summer/beach.jpg",
            "2021/summer/dunes.png",
            "phone/while-down.jpg",
        }:
            assert time.monotonic() < deadline, f"the startup scan did not catch up: {sorted(images)}"
            await asyncio.sleep(0.2)
        assert images["2021/summer/beach.jpg"]["id"] == before["2021/summer/beach.jpg"]["id"]


async def test_a_file_still_being_written_is_read_once_it_settles(run_app: AppRunner, photos: Path) -> None:
    async with run_app(import_roots=[photos.parent], library_watch=False, library_settle_seconds=5) as client:
        library = await add_library(client, photos)
        (photos / "phone" / "fresh.jpg").write_bytes(make_image_bytes(21))  # just written: may still grow
        result = await scan(client, library["id"])
        assert (result["pending"], result["added"]) == (1, 0)
        assert "phone/fresh.jpg" not in await images_of(client, library["id"])
        deadline = time.monotonic() + 30  # no watcher here: the scan itself comes back for it
        while "phone/fresh.jpg" not in await images_of(client, library["id"]):
            assert time.monotonic() < deadline, "the settled file was never read"
            await asyncio.sleep(0.2)


async def test_the_same_bytes_in_two_places_are_one_image(app: httpx.AsyncClient, photos: Path) -> None:
    shutil.copy2(photos / "phone" / "IMG_0001.jpg", photos / "2021" / "copy.jpg")
    library = await add_library(app, photos)
    result = library["first_scan"]
    assert (result["files"], result["added"], result["linked"]) == (4, 3, 1)
    assert (await app.get(f"/libraries/{library['id']}")).json()["files"] == 4
    images = await images_of(app, library["id"])
    assert len(images) == 3
    kept = next(image for path, image in images.items() if path in ("phone/IMG_0001.jpg", "2021/copy.jpg"))
    # One copy goes: the image stays, found at the other.
    (photos / kept["path"]).unlink()
    await scan(app, library["id"])
    after = await images_of(app, library["id"])
    assert len(after) == 3
    moved = next(image for image in after.values() if image["id"] == kept["id"])
    assert moved["path"] != kept["path"]
    assert (await app.get(moved["file_url"])).status_code == 200


async def test_an_unreachable_folder_takes_the_library_offline_and_loses_nothing(
    app: httpx.AsyncClient, photos: Path
) -> None:
    library = await add_library(app, photos)
    await scan(app, library["id"])
    unmounted = photos.with_name("photos-away")
    photos.rename(unmounted)
    result = await scan(app, library["id"])
    assert result["online"] is False
    state = (await app.get(f"/libraries/{library['id']}")).json()
    assert state["online"] is False and state["images"] == 3 and state["last_error"]
    images = await images_of(app, library["id"])
    assert len(images) == 3 and all(image["offline"] for image in images.values())
    some = next(iter(images.values()))
    refused = await app.get(some["file_url"])
    assert refused.status_code == 409 and refused.json()["code"] == "library_offline"
    assert (await app.get(some["thumbnail_url"])).status_code == 200

    # An empty mount point is offline too, not a library whose files were all deleted.
    photos.mkdir()
    assert (await scan(app, library["id"]))["online"] is False
    photos.rmdir()
    unmounted.rename(photos)
    back = await scan(app, library["id"])
    assert back["online"] is True and back["removed"] == 0
    images = await images_of(app, library["id"])
    assert len(images) == 3 and not any(image["offline"] for image in images.values())
    assert (await app.get(some["file_url"])).status_code == 200


async def test_forgetting_a_library_leaves_its_folder_and_other_images(app: httpx.AsyncClient, photos: Path) -> None:
    uploaded = await app.post(
        "/images", files={"file": ("same.jpg", (photos / "phone" / "IMG_0001.jpg").read_bytes(), "image/jpeg")}
    )
    assert uploaded.status_code == 201
    before = snapshot(photos)
    library = await add_library(app, photos)
    await scan(app, library["id"])
    assert (await app.get("/images")).json()["count"] == 3  # the upload's bytes are one of the library's files
    response = await app.delete(f"/libraries/{library['id']}")
    assert response.status_code == 204
    assert (await app.get(f"/libraries/{library['id']}")).status_code == 404
    remaining = (await app.get("/images")).json()
    assert [image["id"] for image in remaining["data"]] == [uploaded.json()["id"]]
    assert (await app.get(uploaded.json()["file_url"])).status_code == 200
    assert snapshot(photos) == before
    assert (await app.get("/search", params={"q": "a photo"})).json()["count"] == 1


async def test_deleting_a_library_image_keeps_the_file(app: httpx.AsyncClient, photos: Path) -> None:
    before = snapshot(photos)
    library = await add_library(app, photos)
    await scan(app, library["id"])
    image = next(iter((await images_of(app, library["id"])).values()))
    assert (await app.delete(f"/images/{image['id']}")).status_code == 204
    assert snapshot(photos) == before


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        (lambda p: "relative/folder", 400, "invalid_path"),
        (lambda p: str(p / ".." / "photos"), 400, "path_traversal"),
        (lambda p: str(p.parent.parent), 403, "path_outside_roots"),
        (lambda p: str(p / "missing"), 404, "path_not_found"),
        (lambda p: str(p / "phone" / "IMG_0001.jpg"), 400, "not_a_directory"),
    ],
)
async def test_a_folder_that_cannot_be_a_library_is_refused(
    app: httpx.AsyncClient, photos: Path, path: Callable[[Path], str], status: int, code: str
) -> None:
    response = await app.post("/libraries", json={"path": path(photos)})
    assert response.status_code == status and response.json()["code"] == code, response.text
    assert (await app.get("/libraries")).json()["count"] == 0


async def test_overlapping_folders_and_names_are_refused(app: httpx.AsyncClient, photos: Path) -> None:
    library = await add_library(app, photos / "phone", name="Phone")
    for body in (
        {"path": str(photos / "phone")},
        {"path": str(photos)},
        {"path": str(photos / "2021"), "name": "Phone"},
    ):
        response = await app.post("/libraries", json=body)
        assert response.status_code == 409, response.text
    renamed = await app.patch(f"/libraries/{library['id']}", json={"name": "Pixel", "watch": False})
    assert renamed.status_code == 200 and (renamed.json()["name"], renamed.json()["watch"]) == ("Pixel", False)
    assert (await app.patch("/libraries/999", json={"name": "x"})).status_code == 404
    assert (await app.post("/libraries", json={"path": str(photos), "extra": 1})).status_code == 422
    assert (await app.get("/libraries")).json()["count"] == 1


async def test_a_file_swapped_for_a_link_out_of_the_library_is_not_read(
    app: httpx.AsyncClient, photos: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(make_image_bytes(9))
    (photos / "phone" / "link.jpg").symlink_to(secret)
    library = await add_library(app, photos)
    assert library["first_scan"]["files"] == 3  # the link is not listed
    images = await images_of(app, library["id"])
    target = photos / "phone" / "IMG_0001.jpg"
    target.unlink()
    target.symlink_to(secret)  # swapped after the scan
    served = await app.get(images["phone/IMG_0001.jpg"]["file_url"])
    assert served.status_code == 404 and served.content != secret.read_bytes()


async def test_a_watched_library_follows_its_folder_within_seconds(run_app: AppRunner, photos: Path) -> None:
    async with run_app(import_roots=[photos.parent], library_settle_seconds=0.5) as client:
        library = await add_library(client, photos)

        async def until(check: Callable[[dict[str, dict]], bool], what: str) -> dict[str, dict]:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                images = await images_of(client, library["id"])
                if check(images):
                    return images
                await asyncio.sleep(0.2)
            raise AssertionError(f"the watcher did not pick up {what}: {sorted(images)}")

        first = await until(lambda images: len(images) == 3, "the first scan")
        beach_id = first["2021/summer/beach.jpg"]["id"]
        (photos / "phone" / "new.jpg").write_bytes(make_image_bytes(11))
        await until(lambda images: "phone/new.jpg" in images, "a new file")
        (photos / "2021" / "summer" / "beach.jpg").rename(photos / "2021" / "beach.jpg")
        moved = await until(lambda images: "2021/beach.jpg" in images and len(images) == 4, "a rename")
        assert moved["2021/beach.jpg"]["id"] == beach_id
        (photos / "phone" / "new.jpg").unlink()
        await until(lambda images: "phone/new.jpg" not in images and len(images) == 3, "a deletion")
