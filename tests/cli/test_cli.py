"""The `image-organizer` command, run as a real process against real storage: every subcommand, its output
and its exit status, and what the service sees of its work afterwards."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from backend import apikeys
from backend.config import Settings
from tests.conftest import AppRunner
from tests.helpers import make_image_bytes, sql, stored_files, upload_many, wait_job

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_cli(settings: Settings, *args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """`image-organizer ARGS` over the test's storage and tiny models, from a folder with no .env."""
    environment = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "STORAGE_ROOT": str(settings.storage_root),
        "CLIP_MODEL_NAME": settings.clip_model_name,
        "CLIP_DEVICE": "cpu",
        "MODEL_CACHE_DIR": str(settings.onnx_cache),
        "BLIP_MODEL_NAME": settings.blip_model_name,
        "BLIP_DEVICE": "cpu",
        "EXECUTOR_WORKERS": "2",
        "TAG_MIN_SCORE": "0",
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "backend.cli", "-q", *args],
        cwd=cwd or settings.storage_root.parent,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """A folder as a user has one: photos in sub-folders, a text file, a broken JPEG."""
    folder = tmp_path / "photos"
    (folder / "2024").mkdir(parents=True)
    for seed in range(4):
        (folder / f"p{seed}.jpg").write_bytes(make_image_bytes(seed))
    (folder / "2024" / "beach.png").write_bytes(make_image_bytes(10, fmt="PNG"))
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return folder


def test_help_lists_every_subcommand(settings: Settings) -> None:
    done = run_cli(settings, "--help")
    assert done.returncode == 0, done.stderr
    for command in ("serve", "import", "library", "reindex", "export", "check", "duplicates", "keys"):
        assert command in done.stdout
    assert run_cli(settings).returncode == 2  # no command: usage, status 2
    assert run_cli(settings, "export", "1").returncode == 2  # --to is required


async def test_import_stores_a_folder_once_and_reports_what_it_could_not_read(
    settings: Settings, photos: Path, run_app: AppRunner
) -> None:
    first = run_cli(settings, "import", str(photos))
    assert first.returncode == 0, first.stderr
    assert "imported 5 new images, 0 already stored, 1 failed, 1 other files skipped" in first.stdout
    assert "broken.jpg" in first.stdout
    again = run_cli(settings, "import", str(photos))
    assert again.returncode == 0, again.stderr
    assert "imported 0 new images, 5 already stored" in again.stdout
    flat = run_cli(settings, "import", "--no-recursive", str(photos / "2024"))
    assert "0 new images, 1 already stored" in flat.stdout

    async with run_app() as client:  # the service sees what the command stored, searchable
        listing = (await client.get("/images", params={"limit": 50})).json()
        assert sorted(image["filename"] for image in listing["data"]) == [
            "beach.png",
            "p0.jpg",
            "p1.jpg",
            "p2.jpg",
            "p3.jpg",
        ]
        assert (await client.get("/health")).json()["index"]["size"] == 5
        jobs = (await client.get("/jobs", params={"kind": "import"})).json()
        assert jobs["count"] == 3 and {job["status"] for job in jobs["data"]} == {"succeeded"}
    assert (photos / "p0.jpg").read_bytes() == make_image_bytes(0)  # the folder is left as it was


def test_import_refuses_bad_paths_with_a_reason(settings: Settings, photos: Path) -> None:
    missing = run_cli(settings, "import", str(photos / "nowhere"))
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    a_file = run_cli(settings, "import", str(photos / "p0.jpg"))
    assert a_file.returncode == 1 and "is not a folder" in a_file.stderr
    storage = run_cli(settings, "import", str(settings.storage_root))
    assert storage.returncode == 1 and "storage folder cannot be imported" in storage.stderr
    assert stored_files(settings.storage_root) == []


async def test_commands_refuse_a_storage_a_running_service_holds(
    settings: Settings, photos: Path, run_app: AppRunner
) -> None:
    async with run_app():
        busy = run_cli(settings, "import", str(photos))
        assert busy.returncode == 1
        assert "in use by process" in busy.stderr and "stop it first" in busy.stderr
        assert run_cli(settings, "check").returncode == 1
        serve = run_cli(settings, "serve", "--port", "1")
        assert serve.returncode == 1 and "in use" in serve.stderr
    assert stored_files(settings.storage_root) == []
    assert run_cli(settings, "import", str(photos)).returncode == 0  # once the service stopped


async def test_export_writes_a_run_as_folders_of_the_original_files(
    settings: Settings, run_app: AppRunner, tmp_path: Path
) -> None:
    async with run_app() as client:
        images = await upload_many(client, 6)
        job = (await client.post("/clusters", json={"k": 2})).json()
        run_id = (await wait_job(client, job["id"]))["result"]["run_id"]
        run = (await client.get(f"/clusters/{run_id}")).json()
    target = tmp_path / "sorted"
    done = run_cli(settings, "export", str(run_id), "--to", str(target))
    assert done.returncode == 0, done.stderr
    assert f"wrote 6 files into {target}" in done.stdout
    folders = sorted(p for p in target.iterdir())
    assert [f.name[:2] for f in folders] == ["01", "02"]
    assert [len(list(f.iterdir())) for f in folders] == [c["size"] for c in run["clusters"]]
    sent = {f"img{i}.jpg": hashlib.sha256(make_image_bytes(100 + i)).hexdigest() for i in range(6)}
    written = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for f in folders for p in f.iterdir()}
    assert written == sent and len(images) == 6

    again = run_cli(settings, "export", str(run_id), "--to", str(target))
    assert again.returncode == 1 and "not an empty folder" in again.stderr
    unknown = run_cli(settings, "export", "999", "--to", str(tmp_path / "other"))
    assert unknown.returncode == 1 and "clustering run 999 not found" in unknown.stderr
    assert not (tmp_path / "other").exists()


async def test_library_add_list_scan_remove_and_the_folder_is_left_as_it_was(
    settings: Settings, photos: Path, run_app: AppRunner
) -> None:
    before = {path: path.read_bytes() for path in photos.rglob("*") if path.is_file()}
    added = run_cli(settings, "library", "add", str(photos), "--name", "Holiday")
    assert added.returncode == 0, added.stderr
    assert f"library 1 (Holiday): {photos.resolve()}" in added.stdout
    assert "scanned 6 files: 5 new images" in added.stdout and "1 failed" in added.stdout
    listed = run_cli(settings, "library", "list")
    assert listed.returncode == 0 and "Holiday" in listed.stdout and "5 images" in listed.stdout
    (photos / "p0.jpg").unlink()
    before.pop(photos / "p0.jpg")
    rescanned = run_cli(settings, "library", "scan", "1")
    assert rescanned.returncode == 0, rescanned.stderr
    assert "1 images removed" in rescanned.stdout
    async with run_app() as client:  # the service sees the library and serves its files from the folder
        images = (await client.get("/images", params={"library": 1})).json()
        assert images["count"] == 4
        served = await client.get(images["data"][0]["file_url"])
        assert served.content == (photos / images["data"][0]["path"]).read_bytes()
    unknown = run_cli(settings, "library", "scan", "7")
    assert unknown.returncode == 1 and "library 7 not found" in unknown.stderr
    removed = run_cli(settings, "library", "remove", "1")
    assert removed.returncode == 0 and "4 images left the catalog" in removed.stdout
    assert {path: path.read_bytes() for path in photos.rglob("*") if path.is_file()} == before
    assert "no libraries" in run_cli(settings, "library", "list").stdout


async def test_reindex_re_embeds_every_image(settings: Settings, run_app: AppRunner) -> None:
    async with run_app() as client:
        await upload_many(client, 3)
    done = run_cli(settings, "reindex", "--all")
    assert done.returncode == 0, done.stderr
    assert f"re-embedded 3 images with {settings.clip_model_name}, 0 failed" in done.stdout
    nothing = run_cli(settings, "reindex")  # nothing was embedded by another model
    assert "re-embedded 0 images" in nothing.stdout


async def test_duplicates_scan_list_and_resolve_with_a_dry_run_first(settings: Settings, run_app: AppRunner) -> None:
    from bench.data import scene_bytes, variants

    def duplicates(*args: str) -> subprocess.CompletedProcess[str]:
        """The command with the hash deciding alone: random weights give no meaningful cosine."""
        return run_cli(settings, "duplicates", *args, DUPLICATES_SAME_COSINE="-1", DUPLICATES_SIMILAR_COSINE="1.01")

    original = scene_bytes(5)
    async with run_app() as client:
        stored = [
            await client.post("/images", files={"file": (name, data)})
            for name, data in [("original.png", original), *variants(original).items()][:4]
        ]
        assert all(response.status_code == 201 for response in stored)
        keeper = stored[0].json()["id"]  # the PNG: as many pixels as the JPEG copies, more bytes
    # A collection stored before duplicates were looked for: no hashes, no pairs.
    await sql(settings, "UPDATE image SET phash = NULL")
    await sql(settings, "DELETE FROM duplicate_pair")
    empty = duplicates("list")
    assert empty.returncode == 0 and "0 groups" in empty.stdout
    scanned = duplicates("scan")
    assert scanned.returncode == 0, scanned.stderr
    assert "scanned 4 images (4 hashed now)" in scanned.stdout and "1 same_picture" in scanned.stdout
    listed = duplicates("list")
    assert f"same_picture-{keeper}\t4 images\tkeep {keeper}:" in listed.stdout and "1 groups" in listed.stdout
    preview = duplicates("resolve", "--dry-run")
    assert preview.returncode == 0 and "would move 3 images to the trash from 1 groups" in preview.stdout
    assert "1 groups" in duplicates("list").stdout
    done = duplicates("resolve")
    assert done.returncode == 0 and "moved 3 images to the trash" in done.stdout
    async with run_app(duplicates_same_cosine=-1.0, duplicates_similar_cosine=1.01) as client:
        assert [i["id"] for i in (await client.get("/images")).json()["data"]] == [keeper]
        assert (await client.get("/trash")).json()["count"] == 3
    assert run_cli(settings, "duplicates", "list", "--limit", "0").returncode == 2


async def test_check_finds_damage_changes_nothing_and_repair_mends_what_loses_no_data(
    settings: Settings, run_app: AppRunner
) -> None:
    async with run_app() as client:
        images = await upload_many(client, 4)
    clean = run_cli(settings, "check")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "collection default: 4 images" in clean.stdout and "agree" in clean.stdout

    root = settings.storage_root
    database = root / "organizer.db"
    with sqlite3.connect(database) as db:
        rows = {row[0]: row[1:] for row in db.execute("SELECT id, storage_key, thumbnail_key FROM image")}
    first, second, third = (image["id"] for image in images[:3])
    (root / rows[first][1]).unlink()  # a lost thumbnail
    orphan = root / "originals" / "ab" / ("ab" + "0" * 62 + ".jpg")
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"left by a crash")
    (root / "tmp" / "upload-leftover").write_bytes(b"partial")
    with sqlite3.connect(database) as db:  # a damaged vector
        db.execute("UPDATE image SET embedding = ? WHERE id = ?", (b"\x00\x01\x02", second))
    index_file = next((root / "index").glob("faiss-*.index"))
    index_file.write_bytes(b"garbage")
    before = {p: p.read_bytes() for p in stored_files(root)}

    found = run_cli(settings, "check")
    assert found.returncode == 1
    for expected in (
        "1 temp files",
        "1 files that no image record references",
        f"thumbnail is missing: {first}",
        f"stored vector is damaged: {second}",
        "the saved index cannot be read",
        "run again with --repair",
    ):
        assert expected in found.stdout, found.stdout
    assert {p: p.read_bytes() for p in stored_files(root)} == before  # a check alone changes nothing
    assert index_file.read_bytes() == b"garbage"

    repaired = run_cli(settings, "check", "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    for expected in ("removed 1 temp files", "removed 1 unreferenced files", "made 1 thumbnails", "re-embedded 1"):
        assert expected in repaired.stdout, repaired.stdout
    assert not orphan.exists() and (root / rows[first][1]).is_file()
    assert run_cli(settings, "check").returncode == 0

    async with run_app() as client:
        thumbnail = await client.get(f"/images/{first}/thumbnail")
        assert thumbnail.status_code == 200 and thumbnail.content[:2] == b"\xff\xd8"
        similar = (await client.get(f"/images/{second}/similar", params={"top_k": 3})).json()
        assert similar["count"] == 3  # searchable again, with a vector of the right size
        assert (await client.get("/health")).json()["index"]["size"] == 4

    (root / rows[third][0]).unlink()  # a lost original: nothing can bring it back
    lost = run_cli(settings, "check", "--repair")
    assert lost.returncode == 1
    assert f"original is missing: {third}" in lost.stdout and "not repaired" in lost.stdout
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT count(*) FROM image WHERE id = ?", (third,)).fetchone() == (1,)  # kept


def test_keys_new_prints_a_key_and_the_entry_that_opens_its_collection(settings: Settings) -> None:
    done = run_cli(settings, "keys", "new", "family")
    assert done.returncode == 0, done.stderr
    key = done.stdout.split("):", 1)[1].split()[0]
    entry = done.stdout.rsplit(maxsplit=1)[1]
    assert apikeys.collection_for([apikeys.parse_entry(entry)], key) == "family"
    bad = run_cli(settings, "keys", "new", "Not A Name")
    assert bad.returncode == 2 and "must be 1-64" in bad.stderr


def test_bad_settings_are_named_and_stop_with_status_2(settings: Settings, photos: Path) -> None:
    done = run_cli(settings, "import", str(photos), EMBED_BATCH_SIZE="0")
    assert done.returncode == 2
    assert "EMBED_BATCH_SIZE" in done.stderr and "invalid settings" in done.stderr
    other = run_cli(settings, "check", "--collection", "Bad Name")
    assert other.returncode == 2 and "collection name" in other.stderr


async def test_commands_work_on_the_collection_they_are_given(
    settings: Settings, photos: Path, run_app: AppRunner
) -> None:
    done = run_cli(settings, "import", "--collection", "family", str(photos))
    assert done.returncode == 0, done.stderr
    assert (settings.storage_root / "collections" / "family" / "organizer.db").is_file()
    async with run_app() as client:  # the default collection is untouched
        assert (await client.get("/images")).json()["count"] == 0
    checked = run_cli(settings, "check", "--collection", "family")
    assert "collection family: 5 images" in checked.stdout


@pytest.mark.slow
def test_pip_install_gives_the_image_organizer_command(tmp_path: Path) -> None:
    """The package as a user installs it: a wheel built from the checkout, installed into a fresh venv (its
    dependencies borrowed from this one), run from a folder that holds no source."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(REPO_ROOT)],
        check=True,
        timeout=600,
    )
    (wheel,) = wheels.glob("ai_image_organizer-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = subprocess.run(
        [sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(site) / "borrowed-dependencies.pth").write_text(ours + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, timeout=300)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    helped = subprocess.run(
        [str(venv / "bin" / "image-organizer"), "--help"], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert helped.returncode == 0, helped.stderr
    for command in ("serve", "import", "library", "reindex", "export", "check", "duplicates", "keys"):
        assert command in helped.stdout
    where = subprocess.run(
        [str(python), "-c", "import backend, backend.routers.page as p; print(backend.__file__); print(p.PAGE)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert where[0].startswith(str(venv)), where  # the installed package, not the checkout
    page = Path(where[1])
    assert page.is_file() and page.read_bytes() == (REPO_ROOT / "test.html").read_bytes()
