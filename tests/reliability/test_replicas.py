"""Two real service processes on one PostgreSQL database and one storage folder behave as one service."""

from __future__ import annotations

import asyncio
import io
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from bench.postgres import PostgresServer
from bench.server import RunningServer, free_port
from tests.helpers import make_image_bytes
from tests.reliability.realserver import kill_9, real_server

pytestmark = [pytest.mark.slow, pytest.mark.postgres]
LEASE_SECONDS = 3.0
NGINX_CONF = Path(__file__).resolve().parents[2] / "docs" / "nginx.conf"


@dataclass
class Replicas:
    a: RunningServer
    b: RunningServer
    url: str
    storage: Path
    imports: Path


@pytest.fixture
def replicas(postgres: PostgresServer, tiny_clip_dir: Path, tmp_path: Path) -> Iterator[Replicas]:
    """Replicas `a` and `b`, started at the same moment on a fresh database (so both race to set up the
    schema), sharing one STORAGE_ROOT."""
    url = postgres.create_database()
    storage = tmp_path / "storage"
    imports = tmp_path / "imports"
    imports.mkdir()
    env = {
        "DATABASE_URL": url,
        "JOB_LEASE_SECONDS": str(LEASE_SECONDS),
        "IMPORT_ROOTS": str(imports),
        "EMBED_BATCH_SIZE": "4",
    }
    try:
        with ExitStack() as stack, ThreadPoolExecutor(2) as pool:
            started = list(
                pool.map(
                    lambda name: stack.enter_context(
                        real_server(storage, tiny_clip_dir, name=name, REPLICA_ID=name, **env)
                    ),
                    ["a", "b"],
                )
            )
            yield Replicas(a=started[0], b=started[1], url=url, storage=storage, imports=imports)
    finally:
        postgres.drop_database(url)


def upload(server: RunningServer, data: bytes, name: str = "p.jpg") -> httpx.Response:
    return httpx.post(f"{server.base}/images", files={"file": (name, data, "image/jpeg")}, timeout=60)


def search(server: RunningServer, query: str = "a photo") -> set[int]:
    answer = httpx.get(f"{server.base}/search", params={"q": query, "top_k": 100}, timeout=60)
    assert answer.status_code == 200, answer.text
    return {hit["image"]["id"] for hit in answer.json()["results"]}


def job(server: RunningServer, job_id: str) -> dict:
    answer = httpx.get(f"{server.base}/jobs/{job_id}", timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def wait_for(server: RunningServer, job_id: str, done, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        current = job(server, job_id)
        if done(current) or time.monotonic() > deadline:
            return current
        time.sleep(0.1)


def test_both_say_what_they_are_and_an_upload_through_one_is_found_through_the_other(replicas: Replicas) -> None:
    for name, server in (("a", replicas.a), ("b", replicas.b)):
        health = httpx.get(f"{server.base}/health", timeout=30).json()
        assert health["database"] == {"backend": "postgresql", "replica": name}
        assert health["index"]["type"] == "pgvector-hnsw"
    created = upload(replicas.a, make_image_bytes(1))
    assert created.status_code == 201, created.text
    image_id = created.json()["id"]
    # Committed on a is searchable on b at once: no index of its own to catch up.
    assert search(replicas.b) == {image_id}
    assert httpx.get(f"{replicas.b.base}/images/{image_id}/file", timeout=30).content == make_image_bytes(1)
    health = httpx.get(f"{replicas.b.base}/health", timeout=30).json()
    assert health["images"] == health["index"]["size"] == 1
    # Nothing of the library lives in SQLite files beside PostgreSQL.
    assert not list(replicas.storage.rglob("*.db"))


def test_twenty_identical_uploads_over_both_replicas_store_one_image(replicas: Replicas) -> None:
    data = make_image_bytes(7, size=(320, 240))

    async def all_at_once() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        f"{(replicas.a if n % 2 else replicas.b).base}/images",
                        files={"file": (f"same-{n}.jpg", data, "image/jpeg")},
                    )
                    for n in range(20)
                )
            )

    answers = asyncio.run(all_at_once())
    assert all(answer.status_code in (200, 201) for answer in answers), [a.text for a in answers]
    assert sorted(answer.status_code for answer in answers).count(201) == 1
    assert len({answer.json()["id"] for answer in answers}) == 1
    for server in (replicas.a, replicas.b):
        assert httpx.get(f"{server.base}/images", timeout=30).json()["count"] == 1
    assert len(list((replicas.storage / "originals").rglob("*.jpg"))) == 1


def test_a_clustering_job_started_on_one_shows_on_the_other_and_runs_once(replicas: Replicas) -> None:
    for n in range(6):
        assert upload(replicas.a if n % 2 else replicas.b, make_image_bytes(10 + n)).status_code == 201
    started = httpx.post(f"{replicas.a.base}/clusters", json={"k": 2, "captions": False}, timeout=30)
    assert started.status_code == 202, started.text
    job_id = started.json()["id"]
    seen = job(replicas.b, job_id)
    assert seen["kind"] == "cluster" and seen["replica"] == "a"
    finished = wait_for(replicas.b, job_id, lambda j: j["status"] in ("succeeded", "failed"), 60)
    assert finished["status"] == "succeeded", finished
    # GET /clusters through b answers from that run rather than computing another.
    run = httpx.get(f"{replicas.b.base}/clusters", timeout=60).json()
    assert run["id"] == finished["result"]["run_id"] and run["job_id"] == job_id
    assert sum(c["size"] for c in run["clusters"]) == 6
    listed = httpx.get(f"{replicas.b.base}/jobs", params={"kind": "cluster"}, timeout=30).json()
    assert listed["count"] == 1


def _many_images(folder: Path, count: int) -> None:
    for n in range(count):
        (folder / f"{n:04d}.jpg").write_bytes(make_image_bytes(1000 + n, size=(640, 480)))


def test_a_job_of_one_replica_is_cancelled_through_the_other(replicas: Replicas) -> None:
    _many_images(replicas.imports, 300)
    started = httpx.post(f"{replicas.a.base}/images/import", json={"path": str(replicas.imports)}, timeout=30)
    assert started.status_code == 202, started.text
    job_id = started.json()["id"]
    wait_for(replicas.b, job_id, lambda j: j["progress"]["done"] > 0, 60)
    cancelled = httpx.delete(f"{replicas.b.base}/jobs/{job_id}", timeout=30)
    assert cancelled.status_code in (200, 202), cancelled.text
    assert cancelled.json()["cancel_requested"] is True
    ended = wait_for(replicas.b, job_id, lambda j: j["status"] not in ("queued", "running"), 30)
    assert ended["status"] == "cancelled", ended
    assert ended["result"]["files_done"] < 300


def test_kill_9_of_the_replica_running_a_job_and_the_other_fails_it_within_the_lease(replicas: Replicas) -> None:
    _many_images(replicas.imports, 300)
    started = httpx.post(f"{replicas.a.base}/images/import", json={"path": str(replicas.imports)}, timeout=30)
    job_id = started.json()["id"]
    running = wait_for(replicas.b, job_id, lambda j: j["progress"]["done"] > 0, 60)
    assert running["status"] == "running", running
    kill_9(replicas.a)
    killed_at = time.monotonic()
    ended = wait_for(replicas.b, job_id, lambda j: j["status"] != "running", 4 * LEASE_SECONDS)
    took = time.monotonic() - killed_at
    assert ended["status"] == "failed", ended
    assert "replica a stopped renewing" in ended["error"]
    # Within the lease and one check of the other replica (half a lease), with a margin for a busy machine.
    assert took < 2.5 * LEASE_SECONDS, took
    # What a committed before it died stays, and b serves it.
    images = httpx.get(f"{replicas.b.base}/images", params={"limit": 1}, timeout=30).json()["count"]
    assert images >= 1 and len(search(replicas.b)) == min(images, 100)


def test_a_delete_through_one_never_shows_in_the_others_search(replicas: Replicas) -> None:
    ids = [upload(replicas.a, make_image_bytes(50 + n)).json()["id"] for n in range(4)]
    assert search(replicas.b) == set(ids)
    assert httpx.delete(f"{replicas.a.base}/images/{ids[0]}", timeout=30).status_code == 204
    assert search(replicas.b) == set(ids[1:])
    similar = httpx.get(f"{replicas.b.base}/images/{ids[1]}/similar", params={"top_k": 10}, timeout=30).json()
    assert ids[0] not in {hit["image"]["id"] for hit in similar["results"]}
    # A delete moves to the trash: b shows the record as trashed, and a purge through a removes it from b too.
    assert httpx.get(f"{replicas.b.base}/images/{ids[0]}", timeout=30).json()["trashed_at"] is not None
    assert {item["id"] for item in httpx.get(f"{replicas.b.base}/trash", timeout=30).json()["data"]} == {ids[0]}
    purged = httpx.delete(f"{replicas.a.base}/images/{ids[1]}", params={"purge": "true"}, timeout=30)
    assert purged.status_code == 204
    assert search(replicas.b) == set(ids[2:])
    assert httpx.get(f"{replicas.b.base}/images/{ids[1]}", timeout=30).status_code == 404


@pytest.fixture
def proxy(replicas: Replicas, tmp_path: Path) -> Iterator[str]:
    """A real nginx running docs/nginx.conf as documented, with the two replicas' ports put in; its URL."""
    nginx = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
    if nginx is None:
        pytest.skip("no nginx (scripts/setup-system.sh installs Debian's nginx)")
    port = free_port()
    ports = iter(server.base.rsplit(":", 1)[1] for server in (replicas.a, replicas.b))
    site, changes = re.subn(
        r"server 127\.0\.0\.1:800[12]", lambda _: f"server 127.0.0.1:{next(ports)}", NGINX_CONF.read_text()
    )
    assert changes == 2, "docs/nginx.conf no longer lists the two example replicas"
    site, changes = re.subn(r"listen 80;", f"listen 127.0.0.1:{port};", site)
    assert changes == 1
    here = tmp_path / "nginx"
    here.mkdir()
    (here / "site.conf").write_text(site)
    (here / "nginx.conf").write_text(
        f"""{"user root;" if os.geteuid() == 0 else ""}
pid {here}/nginx.pid;
error_log {here}/error.log;
events {{}}
http {{
    access_log {here}/access.log;
    client_body_temp_path {here}/body;
    proxy_temp_path {here}/proxy;
    fastcgi_temp_path {here}/fastcgi;
    uwsgi_temp_path {here}/uwsgi;
    scgi_temp_path {here}/scgi;
    include {here}/site.conf;
}}
"""
    )
    process = subprocess.Popen([nginx, "-p", str(here), "-c", str(here / "nginx.conf"), "-g", "daemon off;"])
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                httpx.get(f"{base}/health", timeout=5)
                break
            except httpx.TransportError:
                assert process.poll() is None, (here / "error.log").read_text()
                time.sleep(0.05)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


def _photo(seed: int, side: int = 1400) -> bytes:
    """A noisy JPEG of a few MB: larger than nginx's default body limit of 1 MB."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=95)
    return out.getvalue()


def test_behind_nginx_with_the_documented_config_large_uploads_and_job_polls_work(
    replicas: Replicas, proxy: str
) -> None:
    photos = [_photo(n) for n in range(3)]
    assert sum(map(len, photos)) > 6 * 1024 * 1024
    files = [("files", (f"big-{n}.jpg", data, "image/jpeg")) for n, data in enumerate(photos)]
    answer = httpx.post(f"{proxy}/images", files=files, timeout=300)
    assert answer.status_code == 201, answer.text
    assert [item["status"] for item in answer.json()["items"]] == ["created"] * 3
    ids = {item["image"]["id"] for item in answer.json()["items"]}
    # Both replicas answer through the proxy, and each sees the upload.
    answered = {httpx.get(f"{proxy}/health", timeout=30).json()["database"]["replica"] for _ in range(8)}
    assert answered == {"a", "b"}
    assert search(replicas.a) == search(replicas.b) == ids
    assert httpx.get(f"{proxy}/images/{min(ids)}/file", timeout=60).content in photos
    # A job started through the proxy is polled through it to the end, whichever replica answers a poll.
    started = httpx.post(f"{proxy}/clusters", json={"k": 2, "captions": False}, timeout=30)
    assert started.status_code == 202, started.text
    deadline = time.monotonic() + 60
    while (polled := httpx.get(f"{proxy}/jobs/{started.json()['id']}", timeout=30).json())["status"] in (
        "queued",
        "running",
    ):
        assert time.monotonic() < deadline, polled
        time.sleep(0.1)
    assert polled["status"] == "succeeded", polled
