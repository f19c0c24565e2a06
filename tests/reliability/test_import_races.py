"""Folder import against a real server while the folder changes under it: files swapped, after the listing,
for links out of the roots (into another collection's originals) and for FIFOs. Each is refused alone,
the job ends, the next job runs, and the server still stops on SIGTERM."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from backend import apikeys
from tests.helpers import make_image_bytes
from tests.reliability.realserver import real_server

FILES = 300
SWAPPED = (FILES - 1, FILES - 2, FILES - 3, FILES - 4)


@pytest.mark.slow
def test_files_swapped_for_links_or_fifos_after_listing_are_refused(tmp_path: Path, tiny_clip_dir: Path) -> None:
    root = tmp_path / "imports"
    folder = root / "photos"
    folder.mkdir(parents=True)
    for i in range(FILES):
        (folder / f"{i:03}.jpg").write_bytes(make_image_bytes(2000 + i, size=(640, 480)))
    keys = {name: apikeys.new_key() for name in ("default", "other")}
    env = {
        "IMPORT_ROOTS": str(root),
        "EMBED_BATCH_SIZE": "4",
        "API_KEYS": ",".join(f"{name}:{apikeys.digest_of(key)}" for name, key in keys.items()),
    }
    storage = tmp_path / "storage"
    secret = make_image_bytes(9999, size=(320, 240))
    with real_server(storage, tiny_clip_dir, **env) as server, httpx.Client(base_url=server.base, timeout=60) as http:
        mine, theirs = ({"X-API-Key": keys[name]} for name in ("default", "other"))
        stored = http.post("/images", files={"file": ("secret.jpg", secret, "image/jpeg")}, headers=theirs)
        assert stored.status_code == 201, stored.text
        (their_original,) = (storage / "collections" / "other" / "originals").rglob("*.jpg")

        job = http.post("/images/import", json={"path": str(folder)}, headers=mine).json()
        while (state := http.get(f"/jobs/{job['id']}", headers=mine).json())["progress"]["message"] != "importing":
            assert state["status"] in ("queued", "running"), state
            time.sleep(0.01)
        assert state["progress"]["done"] < FILES - 40, "precondition: the swap must land before those files are read"
        names = [folder / f"{i:03}.jpg" for i in SWAPPED]
        for path in names:
            path.unlink()
        names[0].symlink_to(their_original)  # another collection's original, outside the roots
        names[1].symlink_to("/etc/passwd")
        os.mkfifo(names[2])  # opening it to read would wait for a writer forever
        os.mkfifo(names[3])

        deadline = time.monotonic() + 300
        while (job := http.get(f"/jobs/{job['id']}", headers=mine).json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, job
            time.sleep(0.2)
        assert job["status"] == "succeeded", job
        refused = {Path(f["path"]).name: f["code"] for f in job["result"]["failures"]}
        assert {name.name: refused.get(name.name) for name in names} == dict.fromkeys(
            (name.name for name in names), "file_changed"
        )
        assert job["result"]["created"] == FILES - len(SWAPPED)
        # Not a byte of the other collection reached this one.
        secret_sha = hashlib.sha256(secret).hexdigest()
        listing = http.get("/images", params={"limit": 500}, headers=mine).json()
        assert listing["count"] == FILES - len(SWAPPED)
        assert secret_sha not in {image["sha256"] for image in listing["data"]}
        # The collection's queue moves on, and the server stops when asked.
        follow = http.post("/reindex", headers=mine).json()
        while (follow := http.get(f"/jobs/{follow['id']}", headers=mine).json())["status"] in ("queued", "running"):
            time.sleep(0.1)
        assert follow["status"] == "succeeded"
        server.process.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then ends by the signal it was given.
        assert server.process.wait(timeout=60) in (0, -signal.SIGTERM)
