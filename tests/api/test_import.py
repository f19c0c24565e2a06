"""Folder import: what it ingests, what it reports, and every path it must refuse."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from backend.models import Job
from backend.services import importer as importer_service
from backend.services.jobs import JobCancelled, JobHandle
from tests.conftest import AppRunner, app_context
from tests.helpers import make_image_bytes, temp_files, wait_job


@pytest.fixture
def roots(tmp_path: Path) -> dict[str, Path]:
    """An import root with photos in it, and a folder outside it."""
    root = tmp_path / "photos"
    (root / "trip" / "day2").mkdir(parents=True)
    (root / ".cache").mkdir()
    outside = tmp_path / "private"
    outside.mkdir()
    (root / "a.jpg").write_bytes(make_image_bytes(1))
    (root / "b.png").write_bytes(make_image_bytes(2, fmt="PNG"))
    (root / "trip" / "c.webp").write_bytes(make_image_bytes(3, fmt="WEBP"))
    (root / "trip" / "day2" / "d.JPG").write_bytes(make_image_bytes(4))
    (root / "trip" / "broken.jpg").write_bytes(make_image_bytes(5)[:200])
    (root / "trip" / "notes.txt").write_text("not an image")
    (root / ".cache" / "hidden.jpg").write_bytes(make_image_bytes(6))
    (outside / "secret.jpg").write_bytes(make_image_bytes(7))
    return {"root": root, "outside": outside}


@pytest.fixture
async def importer(run_app: AppRunner, roots: dict[str, Path]) -> AsyncIterator[httpx.AsyncClient]:
    async with run_app(import_roots=[roots["root"]]) as client:
        yield client


async def start(client: httpx.AsyncClient, path: object, **extra: object) -> httpx.Response:
    return await client.post("/images/import", json={"path": str(path), **extra})


async def test_import_walks_the_folder_and_reports(importer: httpx.AsyncClient, roots: dict[str, Path]) -> None:
    response = await start(importer, roots["root"])
    assert response.status_code == 202, response.text
    job = await wait_job(importer, response.json()["id"])
    assert job["kind"] == "import" and job["status"] == "succeeded", job
    result = job["result"]
    assert (result["created"], result["duplicates"], result["failed"], result["skipped"]) == (4, 0, 1, 1)
    assert result["failures"][0]["path"].endswith("broken.jpg")
    assert result["failures"][0]["code"] == "invalid_image"
    assert job["progress"]["done"] == job["progress"]["total"] == 5
    listed = (await importer.get("/images")).json()
    assert sorted(image["filename"] for image in listed["data"]) == ["a.jpg", "b.png", "c.webp", "d.JPG"]
    # The imported images are searchable like uploads.
    assert (await importer.get("/search", params={"q": "a trip", "top_k": 10})).json()["count"] == 4

    again = await wait_job(importer, (await start(importer, roots["root"])).json()["id"])
    assert (again["result"]["created"], again["result"]["duplicates"]) == (0, 4)


async def test_non_recursive_import_reads_only_the_top_folder(
    importer: httpx.AsyncClient, roots: dict[str, Path]
) -> None:
    job = await wait_job(importer, (await start(importer, roots["root"], recursive=False)).json()["id"])
    assert job["result"]["created"] == 2


async def test_a_linked_file_pointing_out_is_refused(importer: httpx.AsyncClient, roots: dict[str, Path]) -> None:
    os.symlink(roots["outside"] / "secret.jpg", roots["root"] / "link.jpg")
    job = await wait_job(importer, (await start(importer, roots["root"], recursive=False)).json()["id"])
    assert job["result"]["created"] == 2
    refused = [f for f in job["result"]["failures"] if f["path"].endswith("link.jpg")]
    assert refused and refused[0]["code"] == "path_outside_roots"
    assert "secret.jpg" not in {i["filename"] for i in (await importer.get("/images")).json()["data"]}


async def test_a_linked_folder_pointing_out_is_not_followed(
    importer: httpx.AsyncClient, roots: dict[str, Path]
) -> None:
    os.symlink(roots["outside"], roots["root"] / "elsewhere")
    job = await wait_job(importer, (await start(importer, roots["root"])).json()["id"])
    assert job["result"]["created"] == 4
    refused = await start(importer, roots["root"] / "elsewhere")
    assert refused.status_code == 403 and refused.json()["code"] == "path_outside_roots"
    assert str(roots["outside"]) not in refused.json()["detail"]  # where the link leads stays private


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("{outside}", 403, "path_outside_roots"),
        ("{root}/../private", 400, "path_traversal"),
        ("{root}/trip/..", 400, "path_traversal"),
        ("photos/trip", 400, "invalid_path"),
        ("{root}/missing", 404, "path_not_found"),
        ("{root}/a.jpg", 400, "not_a_directory"),
        ("/", 403, "path_outside_roots"),
        ("{root}/trip\x00", 400, "invalid_path"),
        ("~no-such-user-here/photos", 400, "invalid_path"),
        # Outside the roots, missing and existing paths get the same answer: nothing there is probed.
        ("{outside}/missing", 403, "path_outside_roots"),
        ("{outside}/secret.jpg", 403, "path_outside_roots"),
    ],
    ids=[
        "outside",
        "dotdot-out",
        "dotdot-in",
        "relative",
        "missing",
        "a-file",
        "filesystem-root",
        "nul",
        "unknown-user",
        "outside-missing",
        "outside-file",
    ],
)
async def test_refused_paths(
    importer: httpx.AsyncClient, roots: dict[str, Path], path: str, status: int, code: str
) -> None:
    response = await start(importer, path.format(root=roots["root"], outside=roots["outside"]))
    assert response.status_code == status, response.text
    assert response.json()["code"] == code
    assert response.json()["detail"]
    assert (await importer.get("/jobs")).json()["count"] == 0


async def test_the_storage_root_is_refused(run_app: AppRunner, settings) -> None:
    # A root that holds the service's storage: the storage itself cannot be imported.
    async with run_app(import_roots=[settings.storage_root.parent]) as client:
        for target in (settings.storage_root, settings.storage_root / "originals"):
            response = await start(client, target)
            assert response.status_code == 403 and response.json()["code"] == "path_is_storage", target


async def test_import_is_disabled_without_roots(client: httpx.AsyncClient, roots: dict[str, Path]) -> None:
    response = await start(client, roots["root"])
    assert response.status_code == 403 and response.json()["code"] == "import_disabled"
    assert "IMPORT_ROOTS" in response.json()["detail"]


@pytest.mark.parametrize("body", [{}, {"path": ""}, {"path": 3}, {"path": "/x", "recursive": "sometimes"}])
async def test_bad_import_bodies_are_422(importer: httpx.AsyncClient, body: dict) -> None:
    response = await importer.post("/images/import", json=body)
    assert response.status_code == 422


@pytest.fixture
def hanging_read(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[threading.Event, list[Path]]]:
    """The second file an import opens hangs in its first read (as on a dead network share) until the test
    releases it; the paths opened, in order."""
    reached, release = threading.Event(), threading.Event()
    opened: list[Path] = []
    real_open, real_copy = importer_service.FileCopy.open, importer_service.FileCopy.copy_chunk

    def open_(copy: importer_service.FileCopy) -> None:
        opened.append(copy._listed.path)
        real_open(copy)

    def copy_chunk(copy: importer_service.FileCopy) -> bool:
        if len(opened) == 2 and not release.is_set():
            reached.set()
            release.wait(60)
        return real_copy(copy)

    monkeypatch.setattr(importer_service.FileCopy, "open", open_)
    monkeypatch.setattr(importer_service.FileCopy, "copy_chunk", copy_chunk)
    try:
        yield reached, opened
    finally:
        release.set()


async def test_a_cancel_stops_an_import_at_once_even_while_a_read_hangs(
    run_app: AppRunner, roots: dict[str, Path], hanging_read: tuple[threading.Event, list[Path]]
) -> None:
    reached, opened = hanging_read
    async with run_app(import_roots=[roots["root"]], embed_batch_size=1) as client:
        job = (await start(client, roots["root"])).json()
        assert await asyncio.to_thread(reached.wait, 30)
        response = await client.delete(f"/jobs/{job['id']}")
        # 200 when it stopped before the answer was written, 202 when it is stopping: at once, either way.
        assert response.status_code in (200, 202) and response.json()["cancel_requested"]
        finished = await wait_job(client, job["id"], timeout=10)  # the read is still hanging
        assert finished["status"] == "cancelled"
        assert len(opened) == 2  # nothing after the hung file was opened
        # What was stored before is whole and searchable; the result tells what the import did.
        assert (finished["result"]["created"], finished["result"]["files_done"]) == (1, 1)
        assert (await client.get("/images")).json()["count"] == 1
        assert (await client.get("/search", params={"q": "x", "top_k": 10})).json()["count"] == 1
        # The collection's queue moves on: the next job runs.
        following = (await client.post("/reindex", params={"all": "true"})).json()
        assert (await wait_job(client, following["id"], timeout=30))["status"] == "succeeded"


async def test_shutdown_is_bounded_while_a_read_hangs(
    run_app: AppRunner,
    roots: dict[str, Path],
    hanging_read: tuple[threading.Event, list[Path]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import backend.executor

    monkeypatch.setattr(backend.executor, "SHUTDOWN_GRACE_SECONDS", 1.0)
    reached, _ = hanging_read
    app = run_app(import_roots=[roots["root"]], embed_batch_size=1)
    client = await app.__aenter__()
    job = (await start(client, roots["root"])).json()
    assert await asyncio.to_thread(reached.wait, 30)
    # Leaving the app runs the whole shutdown; with the read still hanging it must end anyway.
    await asyncio.wait_for(app.__aexit__(None, None, None), timeout=30)
    async with run_app(import_roots=[roots["root"]]) as again:
        assert (await again.get(f"/jobs/{job['id']}")).json()["status"] == "failed"  # recorded, not running


async def test_a_listed_file_replaced_by_a_link_or_a_fifo_is_not_read(
    run_app: AppRunner, roots: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The path is checked by what it leads to when it is opened: a file swapped for a link to a file outside
    the roots, or for a FIFO, after the folder was listed, is refused alone and the import goes on."""
    root = roots["root"]
    real_find = importer_service.find_files

    def find_then_swap(*args, **kwargs):
        listed = real_find(*args, **kwargs)
        (root / "a.jpg").unlink()
        (root / "a.jpg").symlink_to(roots["outside"] / "secret.jpg")
        (root / "b.png").unlink()
        os.mkfifo(root / "b.png")
        return listed

    monkeypatch.setattr(importer_service, "find_files", find_then_swap)
    async with run_app(import_roots=[root]) as client:
        job = await wait_job(client, (await start(client, root)).json()["id"], timeout=60)
        assert job["status"] == "succeeded", job
        refused = {Path(f["path"]).name: f["code"] for f in job["result"]["failures"]}
        assert refused["a.jpg"] == refused["b.png"] == "file_changed"
        assert job["result"]["created"] == 2  # c.webp and d.JPG
        names = {image["filename"] for image in (await client.get("/images")).json()["data"]}
        assert names == {"c.webp", "d.JPG"}


async def test_an_import_keeps_a_bounded_list_of_failures(run_app: AppRunner, tmp_path: Path) -> None:
    """A folder of 300 broken links with long paths: the result counts them all, lists the first 100 with
    each path cut, and a listing of jobs shows the counts without the lists."""
    root = tmp_path / "links"
    deep = root / ("d" * 200) / ("e" * 200)
    deep.mkdir(parents=True)
    for i in range(300):
        (deep / f"{i:03}-{'x' * 200}.jpg").symlink_to(tmp_path / "nowhere" / f"{i}.jpg")
    (deep / "good.jpg").write_bytes(make_image_bytes(8))
    async with run_app(import_roots=[root]) as client:
        jobs = [await wait_job(client, (await start(client, root)).json()["id"]) for _ in range(3)]
        result = jobs[0]["result"]
        assert (result["failed"], result["created"]) == (300, 1)
        assert len(result["failures"]) == 100
        assert all(f["code"] == "unreadable" and len(f["path"]) <= 500 for f in result["failures"])
        assert result["failures"][0]["path"].startswith(str(root))
        listing = await client.get("/jobs", params={"kind": "import"})
        assert listing.json()["count"] == 3
        for listed in listing.json()["data"]:
            assert listed["result"]["failed"] == 300 and "failures" not in listed["result"]
            assert "image_ids" not in listed["result"]
        assert len(listing.content) < 10_000  # three jobs of 300 failures each: it used to be ~250 KB
        whole = (await client.get(f"/jobs/{jobs[0]['id']}")).json()
        assert len(whole["result"]["failures"]) == 100 and whole["result"]["image_ids"]


async def test_a_cancel_between_two_reads_leaves_nothing_open(
    run_app: AppRunner, roots: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cancel lands after the file was opened and before its first read runs: the file is closed and
    its temp file removed at once, not left for the next start's sweep."""
    async with run_app(import_roots=[roots["root"]]) as client:
        ctx = app_context(client)
        loop = asyncio.get_running_loop()
        handle = JobHandle(ctx.jobs, Job(id="c" * 32, kind="import", status="running", params={}))
        real_open = importer_service.FileCopy.open

        def open_then_cancel(copy: importer_service.FileCopy) -> None:
            real_open(copy)
            cancelled = threading.Event()

            def cancel() -> None:
                handle.request_cancel()
                cancelled.set()

            loop.call_soon_threadsafe(cancel)
            cancelled.wait(10)

        monkeypatch.setattr(importer_service.FileCopy, "open", open_then_cancel)
        listed = importer_service.find_files(
            roots["root"], recursive=False, roots=[roots["root"]], storage_root=ctx.settings.storage_root
        )[0][0]
        with pytest.raises(JobCancelled):
            await importer_service._stage(ctx, handle, listed)
        assert temp_files(ctx.settings.storage_root) == []
        open_files = {os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")}
        assert str(listed.real) not in open_files
