"""Clustering runs end to end: the job, the persisted run, its clusters and captions, the zip export."""

from __future__ import annotations

import asyncio
import hashlib
import io
import shutil
import subprocess
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch
from sqlmodel import select, update

from backend.models import ClusterRun
from backend.services.export import folder_name
from ml.captioner import BlipCaptioner
from tests.conftest import AppRunner, app_context
from tests.helpers import make_image_bytes, upload_many, wait_job


async def run_clustering(client: httpx.AsyncClient, **body: object) -> dict:
    response = await client.post("/clusters", json=body)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["kind"] == "cluster" and job["status"] in ("queued", "running")
    finished = await wait_job(client, job["id"])
    assert finished["status"] == "succeeded", finished
    run = (await client.get(f"/clusters/{finished['result']['run_id']}")).json()
    assert run["job_id"] == job["id"]
    return run


async def test_a_run_groups_every_image_once_with_captions(client: httpx.AsyncClient) -> None:
    images = await upload_many(client, 9)
    run = await run_clustering(client, k=3)

    assert run["k"] == 3 and run["k_requested"] == 3 and not run["auto_k"]
    assert run["image_count"] == 9
    assert len(run["clusters"]) == 3
    sizes = [c["size"] for c in run["clusters"]]
    assert sum(sizes) == 9 and sizes == sorted(sizes, reverse=True)
    members: list[int] = []
    for cluster in run["clusters"]:
        assert isinstance(cluster["caption"], str)
        assert 1 <= len(cluster["representatives"]) <= min(4, cluster["size"])
        page = (await client.get(cluster["images_url"], params={"limit": 500})).json()
        assert page["size"] == cluster["size"] == len(page["data"])
        distances = [m["distance"] for m in page["data"]]
        assert distances == sorted(distances)
        assert [m["rank"] for m in page["data"]] == list(range(cluster["size"]))
        # The representatives are the members closest to the centroid.
        ids = [m["image"]["id"] for m in page["data"]]
        assert [r["id"] for r in cluster["representatives"]] == ids[: len(cluster["representatives"])]
        members += ids
    assert sorted(members) == sorted(image["id"] for image in images)


async def test_cluster_pages_are_bounded(client: httpx.AsyncClient) -> None:
    await upload_many(client, 6)
    run = await run_clustering(client, k=1)
    url = run["clusters"][0]["images_url"]
    first = (await client.get(url, params={"limit": 4})).json()
    second = (await client.get(url, params={"limit": 4, "offset": 4})).json()
    assert (len(first["data"]), len(second["data"])) == (4, 2)
    assert first["size"] == second["size"] == 6
    assert {m["image"]["id"] for m in first["data"]}.isdisjoint({m["image"]["id"] for m in second["data"]})


async def test_get_clusters_computes_once_then_answers_from_the_stored_run(client: httpx.AsyncClient) -> None:
    await upload_many(client, 5)
    first = await client.get("/clusters", params={"k": "2"})
    assert first.status_code == 200, first.text
    again = (await client.get("/clusters")).json()
    assert again["id"] == first.json()["id"]
    refreshed = (await client.get("/clusters", params={"refresh": "true", "k": "auto"})).json()
    assert refreshed["id"] > again["id"] and refreshed["auto_k"]
    assert (await client.get("/clusters")).json()["id"] == refreshed["id"]
    jobs = (await client.get("/jobs", params={"kind": "cluster"})).json()
    assert jobs["count"] == 2 and all(job["status"] == "succeeded" for job in jobs["data"])


async def test_get_clusters_computes_again_when_asked_for_another_run(client: httpx.AsyncClient) -> None:
    await upload_many(client, 6)
    two = (await client.get("/clusters", params={"k": "2", "captions": "false"})).json()
    assert two["k_requested"] == 2 and not two["captions"]
    assert (await client.get("/clusters", params={"k": "2"})).json()["id"] == two["id"]
    three = (await client.get("/clusters", params={"k": "3", "captions": "false"})).json()
    assert three["id"] > two["id"] and three["k_requested"] == 3
    seeded = (await client.get("/clusters", params={"seed": "7", "captions": "false"})).json()
    assert seeded["id"] > three["id"] and seeded["seed"] == 7
    captioned = (await client.get("/clusters", params={"captions": "true"})).json()
    assert captioned["id"] > seeded["id"] and captioned["captions"]
    assert (await client.get("/clusters")).json()["id"] == captioned["id"]  # no parameters: the latest as it is


async def test_a_run_made_by_another_clip_model_is_computed_again(client: httpx.AsyncClient) -> None:
    await upload_many(client, 4)
    first = (await client.get("/clusters", params={"captions": "false"})).json()
    async with app_context(client).sessions() as session:
        await session.exec(update(ClusterRun).values(embedding_model="some/older-model"))
        await session.commit()
    latest = (await client.get("/clusters")).json()
    assert latest["id"] > first["id"] and latest["embedding_model"] == first["embedding_model"]
    assert latest["image_count"] == 4


async def test_auto_k_and_k_larger_than_the_collection(client: httpx.AsyncClient) -> None:
    await upload_many(client, 3)
    auto = await run_clustering(client, k="auto")
    # The candidates run from 2 to the distinct images minus one: with 3 images, 2 is the only one.
    assert auto["auto_k"] and auto["k_requested"] is None and auto["k"] == 2
    assert len(auto["clusters"]) == 2 and sorted(c["size"] for c in auto["clusters"]) == [1, 2]
    big = await run_clustering(client, k=50, captions=False)
    # A k larger than the distinct images is lowered to their number.
    assert big["k"] == 3 and big["k_requested"] == 50 and [c["size"] for c in big["clusters"]] == [1, 1, 1]
    assert all(c["caption"] is None for c in big["clusters"])


async def test_empty_collection_gives_an_empty_run_until_images_arrive(client: httpx.AsyncClient) -> None:
    response = await client.get("/clusters")
    assert response.status_code == 200, response.text
    assert response.json()["k"] == 0 and response.json()["clusters"] == []
    await upload_many(client, 3)
    latest = (await client.get("/clusters")).json()
    assert latest["image_count"] == 3 and latest["id"] > response.json()["id"]


async def test_a_started_run_points_at_its_job(client: httpx.AsyncClient) -> None:
    response = await client.post("/clusters", json={"captions": False})
    assert response.status_code == 202
    assert response.headers["location"] == f"/jobs/{response.json()['id']}"
    await wait_job(client, response.json()["id"])


@pytest.mark.parametrize(
    "body",
    [
        {"k": 0},
        {"k": -3},
        {"k": "many"},
        {"k": 100_000},
        {"k": True},
        {"k": 3.0},
        {"seed": -1},
        {"captions": "yes"},
        {"captions": 1},
        {"captons": False},
        [2],
    ],
)
async def test_bad_cluster_requests_get_422(client: httpx.AsyncClient, body: object) -> None:
    response = await client.post("/clusters", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "validation_error"
    assert (await client.get("/jobs")).json()["count"] == 0


@pytest.mark.parametrize("k", ["0", "abc", "-1", "1.5", "\u00b2", "\uff13", "9" * 5000])
async def test_bad_k_in_the_query_gets_422(client: httpx.AsyncClient, k: str) -> None:
    response = await client.get("/clusters", params={"k": k})
    assert response.status_code == 422 and "k must be" in response.json()["detail"]


async def test_unknown_run_and_cluster_are_404(client: httpx.AsyncClient) -> None:
    await upload_many(client, 2)
    run = await run_clustering(client, k=1, captions=False)
    for url, code in [
        ("/clusters/999", "run_not_found"),
        ("/clusters/999/0", "run_not_found"),
        (f"/clusters/{run['id']}/7", "cluster_not_found"),
        ("/clusters/999/export", "run_not_found"),
    ]:
        response = await client.get(url)
        assert response.status_code == 404 and response.json()["code"] == code, url


async def test_captions_are_cached_per_image(client: httpx.AsyncClient, caption_calls: list[int]) -> None:
    await upload_many(client, 4)
    first = await run_clustering(client, k=2)
    assert sum(caption_calls) == sum(len(c["representatives"]) for c in first["clusters"])
    second = await run_clustering(client, k=2)
    assert sum(caption_calls) == sum(len(c["representatives"]) for c in first["clusters"])  # nothing captioned again
    assert [c["caption"] for c in second["clusters"]] == [c["caption"] for c in first["clusters"]]
    representative = first["clusters"][0]["representatives"][0]["id"]
    assert (await client.get(f"/images/{representative}")).json()["caption"] is not None


async def test_without_blip_clusters_have_no_caption_and_say_why(run_app: AppRunner) -> None:
    async with run_app(blip_model_name="/nonexistent/blip") as client:
        await upload_many(client, 3)
        run = await run_clustering(client, k=2)
        assert all(c["caption"] is None for c in run["clusters"])
        assert "BLIP model '/nonexistent/blip' is not available" in run["caption_error"]


async def test_deleted_images_leave_their_cluster(client: httpx.AsyncClient) -> None:
    images = await upload_many(client, 4)
    run = await run_clustering(client, k=1, captions=False)
    assert (await client.delete(f"/images/{images[0]['id']}")).status_code == 204
    after = (await client.get(f"/clusters/{run['id']}")).json()
    assert after["clusters"][0]["size"] == 3
    page = (await client.get(after["clusters"][0]["images_url"])).json()
    assert images[0]["id"] not in {m["image"]["id"] for m in page["data"]}


async def test_runs_survive_a_restart(run_app: AppRunner) -> None:
    async with run_app() as client:
        await upload_many(client, 4)
        run = await run_clustering(client, k=2)
    async with run_app() as client:
        latest = (await client.get("/clusters")).json()
        assert latest == run


async def test_old_runs_are_pruned(run_app: AppRunner) -> None:
    async with run_app(cluster_runs_kept=2) as client:
        await upload_many(client, 3)
        runs = [await run_clustering(client, k=1, captions=False) for _ in range(3)]
        assert (await client.get(f"/clusters/{runs[0]['id']}")).status_code == 404
        assert (await client.get(f"/clusters/{runs[1]['id']}")).status_code == 200


async def test_export_zip_has_a_folder_per_cluster_with_the_originals(client: httpx.AsyncClient) -> None:
    images = await upload_many(client, 9)
    run = await run_clustering(client, k=3)

    response = await client.get(f"/clusters/{run['id']}/export")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/zip"
    assert f"clusters-{run['id']}.zip" in response.headers["content-disposition"]
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    assert archive.testzip() is None
    names = archive.namelist()
    assert len({name.split("/")[0] for name in names}) == 3
    for cluster in run["clusters"]:
        # The folder is "01 <the cluster's caption>", made safe to extract (export.folder_name).
        assert isinstance(cluster["caption"], str) and cluster["caption"]
        folder = folder_name(cluster["cluster_id"] + 1, cluster["caption"])
        in_folder = [name for name in names if name.split("/")[0] == folder]
        page = (await client.get(cluster["images_url"], params={"limit": 500})).json()
        # It holds exactly its own cluster's originals, byte for byte.
        members = sorted(member["image"]["sha256"] for member in page["data"])
        assert sorted(hashlib.sha256(archive.read(name)).hexdigest() for name in in_folder) == members
        assert len(in_folder) == cluster["size"]
        assert len({name.casefold() for name in in_folder}) == len(in_folder)
    assert sorted(hashlib.sha256(archive.read(name)).hexdigest() for name in names) == sorted(
        image["sha256"] for image in images
    )


async def test_export_numbers_names_that_repeat_in_a_folder(client: httpx.AsyncClient) -> None:
    """One cluster, so the same-named uploads share its folder: each arrives, numbered, ignoring letter case."""
    uploaded = ["same.jpg", "same.jpg", "Same.JPG", "same.jpg"]
    files = [("files", (name, make_image_bytes(501 + i), "image/jpeg")) for i, name in enumerate(uploaded)]
    response = await client.post("/images", files=files)
    assert response.status_code == 201, response.text
    shas = sorted(item["image"]["sha256"] for item in response.json()["items"])
    run = await run_clustering(client, k=1, captions=False)
    archive = zipfile.ZipFile(io.BytesIO((await client.get(f"/clusters/{run['id']}/export")).content))
    names = archive.namelist()
    assert {name.split("/")[0] for name in names} == {"01 cluster"}  # no caption: the folder says "cluster"
    assert sorted(name.split("/")[1].casefold() for name in names) == [
        "same (2).jpg",
        "same (3).jpg",
        "same (4).jpg",
        "same.jpg",
    ]
    assert sorted(hashlib.sha256(archive.read(name)).hexdigest() for name in names) == shas


HOSTILE_NAMES = [
    "\u732b" * 200 + ".jpg",  # 600 bytes of UTF-8: longer than any filesystem's name
    "\u732b" * 200 + ".jpg",  # the same again: the number must survive the cut
    "a" * 250 + ".jpg",
    "CON.png",
    "a:b.png",
    'q"<>|*?.png',
    "trailing. . .",
    "x.html",
    "x.exe",
]


async def test_export_entries_extract_on_every_system(client: httpx.AsyncClient, tmp_path: Path) -> None:
    files = [("files", (name, make_image_bytes(600 + i), "image/jpeg")) for i, name in enumerate(HOSTILE_NAMES)]
    response = await client.post("/images", files=files)
    assert response.status_code == 201, response.text
    shas = {item["image"]["sha256"] for item in response.json()["items"]}
    run = await run_clustering(client, k=1, captions=False)
    archive_path = tmp_path / "export.zip"
    archive_path.write_bytes((await client.get(f"/clusters/{run['id']}/export")).content)
    names = zipfile.ZipFile(archive_path).namelist()
    assert len(names) == len(HOSTILE_NAMES)
    for name in names:
        for component in name.split("/"):
            assert len(component.encode()) <= 150, name
            assert not set(component) & set('<>:"\\|?*'), name
            assert not component.endswith((".", " ")) and component.split(".")[0].upper() != "CON", name
        assert name.endswith(".jpg"), name  # the decoded format's extension, not .html, .exe or .png
    assert any(name.endswith("/_CON.jpg") for name in names)
    # Both tools extract every entry, and each file holds an uploaded image's bytes.
    for tool, target in (("unzip", tmp_path / "by-unzip"), ("python", tmp_path / "by-python")):
        if tool == "unzip":
            if shutil.which("unzip") is None:
                continue
            done = subprocess.run(["unzip", "-q", str(archive_path), "-d", str(target)], capture_output=True)
            assert done.returncode == 0, done.stderr
        else:
            zipfile.ZipFile(archive_path).extractall(target)
        extracted = [p for p in target.rglob("*") if p.is_file()]
        assert len(extracted) == len(HOSTILE_NAMES)
        assert {hashlib.sha256(p.read_bytes()).hexdigest() for p in extracted} == shas


async def test_get_clusters_waits_for_a_run_on_its_way_instead_of_starting_another(client: httpx.AsyncClient) -> None:
    await upload_many(client, 4)
    started = (await client.post("/clusters", json={"k": 2})).json()
    latest = (await client.get("/clusters")).json()
    finished = await wait_job(client, started["id"])
    assert latest["id"] == finished["result"]["run_id"]
    assert (await client.get("/jobs", params={"kind": "cluster"})).json()["count"] == 1


@dataclass
class HeldCaptions:
    """BLIP's first caption batch waits in its thread until `release` is set, so a clustering job stays running,
    in its captioning, while the test acts on it; the batch itself is BLIP's real work. `calls`: batch sizes."""

    started: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    calls: list[int] = field(default_factory=list)

    async def wait_started(self) -> None:
        assert await asyncio.to_thread(self.started.wait, 60), "no caption batch began"


@pytest.fixture
def held_captions(monkeypatch: pytest.MonkeyPatch) -> Iterator[HeldCaptions]:
    held = HeldCaptions()
    original = BlipCaptioner.caption_pixels

    def holding(self: BlipCaptioner, pixel_values: torch.Tensor) -> list[str]:
        held.calls.append(len(pixel_values))
        if len(held.calls) == 1:
            held.started.set()
            held.release.wait(timeout=60)  # bounded: a failing test must not hang the executor for ever
        return original(self, pixel_values)

    monkeypatch.setattr(BlipCaptioner, "caption_pixels", holding)
    yield held
    held.release.set()


async def test_a_cancelled_clustering_job_stores_no_run(run_app: AppRunner, held_captions: HeldCaptions) -> None:
    async with run_app(caption_batch_size=1) as client:
        await upload_many(client, 6)
        before = await run_clustering(client, k=2, captions=False)
        running = (await client.post("/clusters", json={"k": 3})).json()
        await held_captions.wait_started()
        assert (await client.get(f"/jobs/{running['id']}")).json()["status"] == "running"
        # One clustering at a time: another run waits, and a queued job is cancelled at once.
        queued = (await client.post("/clusters", json={"k": 2, "seed": 5})).json()
        assert queued["status"] == "queued"
        cancelled = await client.delete(f"/jobs/{queued['id']}")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        # A running one stops at its next checkpoint: after the caption batch under way.
        asked = await client.delete(f"/jobs/{running['id']}")
        assert asked.status_code == 202 and asked.json()["cancel_requested"] is True
        held_captions.release.set()
        job = await wait_job(client, running["id"])
        assert job["status"] == "cancelled" and "run_id" not in (job["result"] or {}), job
        assert held_captions.calls == [1]  # the batch under way finished; none of the other five began
        assert (await wait_job(client, queued["id"]))["status"] == "cancelled"
        # Neither left a run: the latest is still the one before, and it is the only one stored.
        latest = await client.get("/clusters")
        assert latest.status_code == 200 and latest.json()["id"] == before["id"]
        async with app_context(client).sessions() as session:
            stored = (await session.exec(select(ClusterRun.id, ClusterRun.job_id))).all()
        assert [tuple(row) for row in stored] == [(before["id"], before["job_id"])]
        finished = await client.delete(f"/jobs/{running['id']}")
        assert finished.status_code == 409 and finished.json()["code"] == "job_finished"


async def test_get_clusters_answers_409_when_the_run_it_waits_for_is_cancelled(
    client: httpx.AsyncClient, held_captions: HeldCaptions
) -> None:
    await upload_many(client, 4)
    waiting = asyncio.ensure_future(client.get("/clusters"))  # no run yet: it computes one and waits for it
    await held_captions.wait_started()
    jobs = (await client.get("/jobs", params={"kind": "cluster", "status": "running"})).json()["data"]
    assert len(jobs) == 1
    assert (await client.delete(f"/jobs/{jobs[0]['id']}")).status_code == 202
    held_captions.release.set()
    answer = await waiting
    assert answer.status_code == 409, answer.text
    assert answer.json()["code"] == "clustering_failed" and "cancelled" in answer.json()["detail"]


async def test_get_clusters_answers_409_when_its_clustering_job_fails(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    await upload_many(client, 4)

    def out_of_memory(self: BlipCaptioner, pixel_values: torch.Tensor) -> list[str]:
        raise RuntimeError("CUDA out of memory")  # what a model can do mid-run; BLIP cannot be made to here

    with monkeypatch.context() as patch:
        patch.setattr(BlipCaptioner, "caption_pixels", out_of_memory)
        answer = await client.get("/clusters")
    assert answer.status_code == 409, answer.text
    assert answer.json()["code"] == "clustering_failed"
    assert "failed" in answer.json()["detail"] and "CUDA out of memory" in answer.json()["detail"]
    jobs = (await client.get("/jobs", params={"kind": "cluster"})).json()["data"]
    assert [job["status"] for job in jobs] == ["failed"]
    # The failed job stored nothing; the next request computes a run.
    again = await client.get("/clusters")
    assert again.status_code == 200 and again.json()["image_count"] == 4
