"""kill -9 of the real server: during 100 concurrent uploads, during an index save, during a running job.

What the user is promised (docs/architecture.md, "How the three stay consistent"): an upload that was
answered 2xx survives the crash whole (row, original with its bytes, thumbnail, vector in the index); a crash
leaves at worst files no row references, which the startup sweep removes; the index file is always a whole
index, old or new; no job is left "running". A missing or corrupt index file is rebuilt from SQLite at
startup: tests/api/test_persistence.py (test_index_is_rebuilt_when_its_file_is_deleted,
test_corrupt_index_file_is_rebuilt, test_stale_index_file_is_rebuilt) and the removal of a killed save's
temp file at startup, tests/api/test_consistency.py::test_temp_files_of_an_interrupted_index_save_are_removed.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from backend.services.jobs import RESTART_ERROR
from bench.server import RunningServer
from ml.index import VectorIndex
from tests.helpers import make_image_bytes
from tests.reliability.realserver import (
    assert_index_holds_exactly,
    assert_rows_have_their_files,
    integrity,
    kill_9,
    leftover_temp_files,
    media_files,
    real_server,
    rows,
    server_logs,
    sha256,
    wait_for_no_orphans,
)

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[2]

UPLOADS = 100
CLIENTS = 20
KILL_AFTER = 35  # acknowledged uploads before the kill
IMPORT_FILES = 150


def _requests(seeds: list[int]) -> list[list[int]]:
    """The seeds grouped into requests of 1, 2 or 3 files."""
    groups: list[list[int]] = []
    it = iter(seeds)
    while group := list(itertools.islice(it, len(groups) % 3 + 1)):
        groups.append(group)
    return groups


async def _upload(client: httpx.AsyncClient, images: dict[int, bytes], group: list[int]) -> dict[int, int]:
    """seed -> id of every image of the request, which must be answered 2xx (stored or a duplicate)."""
    if len(group) == 1:
        (seed,) = group
        answer = await client.post("/images", files={"file": (f"{seed}.jpg", images[seed], "image/jpeg")})
        assert answer.status_code in (200, 201), answer.text
        return {seed: answer.json()["id"]}
    answer = await client.post(
        "/images", files=[("files", (f"{seed}.jpg", images[seed], "image/jpeg")) for seed in group]
    )
    assert answer.status_code in (200, 201), answer.text
    items = answer.json()["items"]
    assert all(item["status"] in ("created", "duplicate") for item in items), items
    return {seed: item["image"]["id"] for seed, item in zip(group, items, strict=True)}


@dataclass
class Crash:
    """What the clients saw before the kill, and the restarted server over the same storage."""

    storage: Path
    folder: Path
    images: dict[int, bytes]  # uploaded, by seed
    acknowledged: dict[int, int]  # seed -> id, for every upload answered 2xx before the kill
    deleted: dict[int, int]  # seed -> id, for every delete answered 204 before the kill
    delete_cut_off: dict[int, int]  # seed -> id, deletes in flight at the kill: they may or may not have run
    in_flight_at_kill: int
    cut_off: int  # upload requests that got no answer
    job_id: str
    job_at_kill: dict
    temp_files_at_restart: list[str]  # what tmp/ and the index folder held when the server started again
    orphans_at_restart: set[str]  # files no row referenced then, as storage keys
    planted_orphans: set[str]  # of those, the pair this test put there itself (see `crash`)
    server: RunningServer


async def _upload_and_import_until_killed(server: RunningServer, images: dict[int, bytes], folder: Path) -> dict:
    acknowledged: dict[int, int] = {}
    deleted: dict[int, int] = {}
    delete_cut_off: dict[int, int] = {}
    pending = iter(_requests(list(images)))
    in_flight = cut_off = 0
    async with httpx.AsyncClient(base_url=server.base, timeout=60) as client:
        started = await client.post("/images/import", json={"path": str(folder)})
        assert started.status_code == 202, started.text
        job_id = started.json()["id"]
        deadline = time.monotonic() + 60
        while (job := (await client.get(f"/jobs/{job_id}")).json())["progress"]["done"] < 4:
            assert job["status"] in ("queued", "running") and time.monotonic() < deadline, job
            await asyncio.sleep(0.01)

        async def uploader() -> None:
            nonlocal in_flight, cut_off
            for group in pending:
                in_flight += 1
                try:
                    acknowledged.update(await _upload(client, images, group))
                except httpx.TransportError:  # killed: no answer, so nothing was promised
                    cut_off += 1
                finally:
                    in_flight -= 1

        async def deleter(share: int) -> None:
            """With the two others, deletes every fifth acknowledged upload while the uploads go on."""
            while True:
                todo = [s for s in acknowledged if s % 15 == 5 * share and s not in deleted and s not in delete_cut_off]
                if not todo:
                    await asyncio.sleep(0.01)
                    continue
                seed = todo[0]
                try:
                    answer = await client.delete(f"/images/{acknowledged[seed]}", params={"purge": "true"})
                except httpx.TransportError:
                    delete_cut_off[seed] = acknowledged[seed]
                    return
                assert answer.status_code == 204, answer.text
                deleted[seed] = acknowledged[seed]

        deleting = asyncio.ensure_future(asyncio.gather(*(deleter(share) for share in range(3))))
        uploads = asyncio.ensure_future(asyncio.gather(*(uploader() for _ in range(CLIENTS))))
        while (len(acknowledged) < KILL_AFTER or len(deleted) < 3) and not uploads.done():
            await asyncio.sleep(0.002)
        job = (await client.get(f"/jobs/{job_id}")).json()
        in_flight_at_kill = in_flight
        kill_9(server)
        await uploads
        await asyncio.wait_for(deleting, timeout=30)  # it ends at its first request after the kill
    return {
        "acknowledged": acknowledged,
        "deleted": deleted,
        "delete_cut_off": delete_cut_off,
        "in_flight_at_kill": in_flight_at_kill,
        "cut_off": cut_off,
        "job_id": job_id,
        "job_at_kill": job,
    }


@pytest.fixture(scope="module")
def crash(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path) -> Iterator[Crash]:
    """One kill -9 of the real server while 20 clients upload 100 images (1 to 3 per request), another client
    deletes some of those acknowledged, and a folder import job runs; then the server started again over the
    same storage. Index saves run every 0.3 s, so the kill may also land in one, or between a commit and the
    next save."""
    root = tmp_path_factory.mktemp("crash")
    storage, folder = root / "storage", root / "imports" / "photos"
    folder.mkdir(parents=True)
    for i in range(IMPORT_FILES):
        (folder / f"{i:03}.jpg").write_bytes(make_image_bytes(1000 + i, size=(640, 480)))
    images = {seed: make_image_bytes(seed, size=(160, 120)) for seed in range(UPLOADS)}
    env = {"IMPORT_ROOTS": str(root / "imports"), "EMBED_BATCH_SIZE": "4", "INDEX_SAVE_INTERVAL": "0.3"}
    with real_server(storage, tiny_clip_dir, **env) as server:
        seen = asyncio.run(_upload_and_import_until_killed(server, images, folder))
    # What there is to clean up. The kill leaves staged files in tmp/ (uploads and the import were in flight),
    # and it leaves files no row references when it lands between an original's rename and its row's commit:
    # that window is short, so one such pair (an original and its thumbnail, no row) is added here as well.
    orphan = make_image_bytes(5000, size=(160, 120))
    digest = sha256(orphan)
    planted = {f"originals/{digest[:2]}/{digest}.jpg", f"thumbnails/{digest[:2]}/{digest}.jpg"}
    for key in planted:
        (storage / key).parent.mkdir(parents=True, exist_ok=True)
        (storage / key).write_bytes(orphan)
    referenced = {key for row in rows(storage).values() for key in (row.storage_key, row.thumbnail_key)}
    temp_files, orphans = leftover_temp_files(storage), media_files(storage) - referenced
    with real_server(storage, tiny_clip_dir, **env) as server:
        yield Crash(
            storage=storage,
            folder=folder,
            images=images,
            server=server,
            temp_files_at_restart=temp_files,
            orphans_at_restart=orphans,
            planted_orphans=planted,
            **seen,
        )


def test_the_kill_landed_mid_work(crash: Crash) -> None:
    assert crash.in_flight_at_kill >= 5, "the kill should land while uploads are in flight"
    assert crash.cut_off > 0 and len(crash.acknowledged) < UPLOADS, "the kill should cut some uploads off"
    assert len(crash.deleted) >= 3, "some deletes should have been answered before the kill"
    assert crash.job_at_kill["status"] == "running", crash.job_at_kill
    assert crash.job_at_kill["progress"]["done"] < IMPORT_FILES


def test_startup_emptied_tmp_and_the_index_folder_of_leftovers(crash: Crash) -> None:
    # A killed upload leaves its staged file in tmp/, a killed save its temp file beside the index.
    assert crash.temp_files_at_restart, "the kill should leave staged files for the restart to remove"
    assert leftover_temp_files(crash.storage) == []


def test_the_database_passes_its_integrity_check(crash: Crash) -> None:
    assert integrity(crash.storage) == "ok"


def test_every_acknowledged_upload_is_whole_after_the_restart(crash: Crash) -> None:
    base, by_id = crash.server.base, rows(crash.storage)
    for seed, image_id in crash.acknowledged.items():
        if seed in crash.deleted or seed in crash.delete_cut_off:
            continue
        assert image_id in by_id, f"acknowledged upload {seed} (id {image_id}) is not in the database"
        row = by_id[image_id]
        assert row.sha256 == sha256(crash.images[seed])
        assert sha256((crash.storage / row.storage_key).read_bytes()) == row.sha256
        assert httpx.get(f"{base}/images/{image_id}", timeout=30).status_code == 200
        got = httpx.get(f"{base}/images/{image_id}/file", timeout=30)
        assert got.status_code == 200 and sha256(got.content) == row.sha256
    listing = httpx.get(f"{base}/images", params={"limit": 500}, timeout=30).json()
    assert {image["id"] for image in listing["data"]} == set(by_id) and listing["count"] == len(by_id)


def test_every_acknowledged_delete_holds_after_the_restart(crash: Crash) -> None:
    base, by_id = crash.server.base, rows(crash.storage)
    for image_id in crash.deleted.values():
        assert image_id not in by_id, f"deleted image {image_id} is back after the restart"
        assert httpx.get(f"{base}/images/{image_id}", timeout=30).status_code == 404
    # Its files go too: at once, or (killed before that) by the startup sweep.
    wait_for_no_orphans(crash.storage, by_id)
    for seed in crash.deleted:
        assert not list(crash.storage.glob(f"*/*/{sha256(crash.images[seed])}.*"))


def test_no_row_without_its_file_and_the_index_holds_every_row(crash: Crash) -> None:
    by_id = rows(crash.storage)
    assert_rows_have_their_files(crash.storage, by_id)
    assert_index_holds_exactly(crash.server.base, set(by_id))


def test_files_no_row_references_are_swept(crash: Crash) -> None:
    assert crash.planted_orphans <= crash.orphans_at_restart, "there should be files for the sweep to remove"
    wait_for_no_orphans(crash.storage, rows(crash.storage))
    assert not any((crash.storage / key).exists() for key in crash.orphans_at_restart)


def test_the_interrupted_import_job_is_failed_not_running(crash: Crash) -> None:
    """tests/api/test_jobs.py::test_a_restart_never_leaves_a_job_running simulates the rows a killed process
    leaves; here the process really was killed while its import job worked."""
    base = crash.server.base
    job = httpx.get(f"{base}/jobs/{crash.job_id}", timeout=30).json()
    assert job["status"] == "failed" and job["error"] == RESTART_ERROR, job
    assert job["finished_at"] is not None
    for status in ("running", "queued"):
        assert httpx.get(f"{base}/jobs", params={"status": status}, timeout=30).json()["count"] == 0


def test_sending_again_and_importing_again_complete_the_work_without_doubles(crash: Crash) -> None:
    """What a user does after the crash: send the uploads that got no answer, run the import again. Every
    image is then stored exactly once; those committed before the kill come back as duplicates."""
    base, storage = crash.server.base, crash.storage
    before = {row.sha256: row.id for row in rows(storage).values()}

    async def resend() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            missing = [seed for seed in crash.images if seed not in crash.acknowledged]  # deleted ones stay deleted
            for group in _requests(missing):
                for seed, image_id in (await _upload(client, crash.images, group)).items():
                    if sha256(crash.images[seed]) in before:  # committed before the kill, never answered
                        assert image_id == before[sha256(crash.images[seed])]

    asyncio.run(resend())
    again = httpx.post(f"{base}/images/import", json={"path": str(crash.folder)}, timeout=30)
    assert again.status_code == 202, again.text
    deadline = time.monotonic() + 90
    while (job := httpx.get(f"{base}/jobs/{again.json()['id']}", timeout=30).json())["status"] in (
        "queued",
        "running",
    ):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    assert job["status"] == "succeeded", job
    imported = {sha256(p.read_bytes()) for p in crash.folder.iterdir()}
    assert job["result"]["created"] + job["result"]["duplicates"] == IMPORT_FILES
    assert job["result"]["duplicates"] == len(imported & set(before))

    final = rows(storage)
    kept = {sha256(data) for seed, data in crash.images.items() if seed not in crash.deleted}
    maybe_deleted = {sha256(crash.images[seed]) for seed in crash.delete_cut_off}
    stored = sorted(row.sha256 for row in final.values())
    assert len(stored) == len(set(stored)), "some bytes are stored twice"
    assert imported | (kept - maybe_deleted) <= set(stored) <= imported | kept
    health = httpx.get(f"{base}/health", timeout=30).json()
    assert health["images"] == health["index"]["size"] == len(stored)
    assert_rows_have_their_files(storage, final)
    assert "Traceback" not in server_logs(storage)


# --- kill -9 during an index save --------------------------------------------------------------------

SAVER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import numpy as np
    from ml.index import VectorIndex

    target, n, dim = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    vectors = np.random.default_rng(0).standard_normal((n + 1, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    old, new = VectorIndex(), VectorIndex()
    old.add(np.arange(n), vectors[:n])       # the old content: ids 0..n-1
    new.add(np.arange(1, n + 1), vectors[1:])  # the new content: ids 1..n
    if not target.exists():
        old.save(target)
    print("saving", flush=True)
    while True:  # save the new content, then the old again, and so on, until killed
        new.save(target)
        print("saved new", flush=True)
        old.save(target)
        print("saved old", flush=True)
    """
)


def test_kill_9_during_index_save_leaves_the_old_or_the_new_index(tmp_path: Path) -> None:
    n, dim = 60_000, 128  # 31 MB: a save takes about 0.07 s here
    target = tmp_path / "index" / "faiss-test.index"
    vectors = np.random.default_rng(0).standard_normal((n + 1, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)  # the same unit vectors as the saver's
    contents = {"old": np.arange(n), "new": np.arange(1, n + 1)}
    rng = random.Random(1)
    seen: dict[str, int] = {"old": 0, "new": 0}
    killed_mid_write = 0
    for attempt in range(8):
        saver = subprocess.Popen(
            [sys.executable, "-c", SAVER, str(target), str(n), str(dim)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
        )
        try:
            assert saver.stdout is not None and saver.stdout.readline() == b"saving\n"
            if attempt % 4 == 1:  # just after a save of the new content replaced the file
                while (line := saver.stdout.readline()) != b"saved new\n":
                    assert line, "the saver stopped"
            elif attempt % 2:  # at a random moment of the loop
                time.sleep(rng.uniform(0.0, 0.5))
            else:  # as soon as a temp file is being written
                deadline = time.monotonic() + 10
                while not list(target.parent.glob("*.tmp")) and time.monotonic() < deadline:
                    time.sleep(0.0005)
            os.kill(saver.pid, signal.SIGKILL)
        finally:
            saver.kill()
            saver.wait(timeout=30)
            if saver.stdout is not None:
                saver.stdout.close()
        assert saver.returncode == -signal.SIGKILL
        leftovers = VectorIndex.remove_leftovers(target)
        killed_mid_write += leftovers > 0
        assert list(target.parent.iterdir()) == [target]  # the temp file of the killed save is gone

        loaded = VectorIndex.load(target)
        ids = np.sort(loaded.ids())
        which = next((name for name, expected in contents.items() if np.array_equal(ids, expected)), None)
        assert which is not None, f"attempt {attempt}: the index holds {len(ids)} ids, neither old nor new"
        seen[which] += 1
        first = int(ids[0])
        found, score = loaded.search(vectors[first], 1)[0][0]
        assert found == first and score == pytest.approx(1.0, abs=1e-5)
    assert killed_mid_write >= 4, "the kills should land while a temp file is being written"
    # Both outcomes happened: some kills left the old index, and some came after a save of the new one had
    # replaced it, so the load was checked on each.
    assert seen["old"] >= 1 and seen["new"] >= 1, seen
