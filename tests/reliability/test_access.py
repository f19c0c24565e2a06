"""Access control: optional API keys, collections that never see each other, CORS, import roots."""

from __future__ import annotations

import asyncio
import hmac
import re
import subprocess
import sys

import httpx
import pytest

from backend import apikeys
from backend.config import Settings
from tests.conftest import BACKENDS, AppRunner
from tests.helpers import make_image_bytes, sql

ALICE, BOB, DEFAULT = "alice-key-0123456789", "bob-key-0123456789", "default-key-0123456789"
KEYS = [
    f"alice:{apikeys.digest_of(ALICE)}",
    f"bob:{apikeys.digest_of(BOB)}",
    f"default:{apikeys.digest_of(DEFAULT)}",
]
PUBLIC = {"/health", "/", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}


def as_(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


async def upload(client: httpx.AsyncClient, key: str, seeds: list[int]) -> list[dict]:
    files = [("files", (f"{key[:3]}-{s}.jpg", make_image_bytes(s), "image/jpeg")) for s in seeds]
    response = await client.post("/images", files=files, headers=as_(key))
    assert response.status_code == 201, response.text
    return [item["image"] for item in response.json()["items"]]


async def wait_for(client: httpx.AsyncClient, key: str, job_id: str) -> dict:
    for _ in range(600):
        job = (await client.get(f"/jobs/{job_id}", headers=as_(key))).json()
        if job["status"] not in ("queued", "running"):
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


async def test_every_route_but_health_and_the_page_needs_a_valid_key(run_app: AppRunner) -> None:
    async with run_app(api_keys=KEYS) as client:
        schema = (await client.get("/openapi.json")).json()  # public: it holds no data
        routes = {path: methods for path, methods in schema["paths"].items() if path not in PUBLIC}
        assert len(routes) > 15
        for route, methods in routes.items():
            path = re.sub(r"\{[^}]+\}", "1", route)
            for method in methods:
                for headers in ({}, as_("wrong-key"), as_(ALICE.upper())):
                    answer = await client.request(method, path, headers=headers)
                    assert answer.status_code == 401, (method, path, answer.status_code, answer.text)
                    assert answer.json()["code"] == "unauthorized"
        assert all("401" in operation["responses"] for methods in routes.values() for operation in methods.values())
        two = await client.get("/images", headers=[("X-API-Key", ALICE), ("X-API-Key", BOB)])
        assert two.status_code == 401 and "one X-API-Key" in two.json()["detail"]
        for path in ("/health", "/", "/openapi.json", "/docs"):
            assert (await client.get(path)).status_code == 200
        # Ids restart in each collection: no cache may give one key's /images/1/file to another key.
        assert "X-API-Key" in (await client.get("/images/1/file", headers=as_(ALICE))).headers["vary"]
        anonymous = (await client.get("/health")).json()
        assert anonymous["collection"] is None and anonymous["images"] is None and anonymous["status"] == "ok"


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
async def test_collections_never_see_find_or_delete_each_others_images(run_app: AppRunner, settings: Settings) -> None:
    async with run_app(api_keys=KEYS) as client:
        alices = await upload(client, ALICE, [1, 2, 3])
        bobs = await upload(client, BOB, [1, 9])  # seed 1: the same bytes as one of Alice's
        assert all(not item.get("duplicate") for item in bobs)
        alice_shas = {image["sha256"] for image in alices}
        bob_shas = {image["sha256"] for image in bobs}

        async def listed(key: str) -> set[str]:
            return {i["sha256"] for i in (await client.get("/images", headers=as_(key))).json()["data"]}

        assert await listed(ALICE) == alice_shas
        assert await listed(BOB) == bob_shas
        assert await listed(DEFAULT) == set()
        for key, own in ((ALICE, alice_shas), (BOB, bob_shas)):
            health = (await client.get("/health", headers=as_(key))).json()
            assert health["images"] == len(own) and health["index"]["size"] == len(own)
            found = (await client.get("/search", params={"q": "a photo", "top_k": 50}, headers=as_(key))).json()
            assert {hit["image"]["sha256"] for hit in found["results"]} == own
            picture = {"file": ("q.jpg", make_image_bytes(2), "image/jpeg")}
            similar = (await client.post("/search/image", files=picture, headers=as_(key))).json()
            assert {hit["image"]["sha256"] for hit in similar["results"]} <= own
        # Bob works through every id he can name: only his own images change.
        for image_id in range(1, 10):
            got = await client.get(f"/images/{image_id}", headers=as_(BOB))
            assert got.status_code == 404 or got.json()["sha256"] in bob_shas
            await client.delete(f"/images/{image_id}", headers=as_(BOB))
        assert await listed(BOB) == set()
        assert await listed(ALICE) == alice_shas
        for image in alices:
            file = await client.get(f"/images/{image['id']}/file", headers=as_(ALICE))
            assert file.status_code == 200 and file.content == make_image_bytes(image_seed(image))

        # Jobs and clustering runs belong to their collection too.
        job = (await client.post("/clusters", json={"k": 2, "captions": False}, headers=as_(ALICE))).json()
        assert (await wait_for(client, ALICE, job["id"]))["status"] == "succeeded"
        run = (await client.get("/clusters", headers=as_(ALICE))).json()
        members = set()
        for cluster in run["clusters"]:
            page = (await client.get(cluster["images_url"], params={"limit": 100}, headers=as_(ALICE))).json()
            members |= {member["image"]["sha256"] for member in page["data"]}
        assert members == alice_shas
        assert (await client.get(f"/jobs/{job['id']}", headers=as_(BOB))).status_code == 404
        assert (await client.delete(f"/jobs/{job['id']}", headers=as_(BOB))).status_code == 404
        assert job["id"] not in {j["id"] for j in (await client.get("/jobs", headers=as_(BOB))).json()["data"]}
        assert (await client.get(f"/clusters/{run['id']}", headers=as_(BOB))).status_code == 404
    # Each collection keeps its own tables, files and index: Bob's files under STORAGE_ROOT/collections/bob,
    # his rows in his own SQLite file, or on PostgreSQL in a schema of his own.
    assert (settings.storage_root / "collections" / "bob" / "originals").is_dir()
    if settings.uses_postgres:
        schemas = await sql(settings, "SELECT schema_name FROM information_schema.schemata")
        assert {"collection_alice", "collection_bob"} <= {name for (name,) in schemas}
        assert not list(settings.storage_root.rglob("*.db"))
    else:
        assert (settings.storage_root / "collections" / "alice" / "organizer.db").exists()
        assert (settings.storage_root / "collections" / "bob" / "organizer.db").exists()


def image_seed(image: dict) -> int:
    return int(image["filename"].rsplit("-", 1)[1].split(".")[0])


async def test_without_keys_everything_is_open_and_in_the_default_collection(client: httpx.AsyncClient) -> None:
    await client.post("/images", files={"file": ("a.jpg", make_image_bytes(1), "image/jpeg")})
    health = (await client.get("/health", headers=as_("anything"))).json()
    assert health["collection"] == "default" and health["images"] == 1
    assert (await client.get("/images")).status_code == 200


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
async def test_the_default_collection_is_the_one_a_single_user_install_already_has(run_app: AppRunner) -> None:
    async with run_app() as client:
        stored = (await client.post("/images", files={"file": ("a.jpg", make_image_bytes(5), "image/jpeg")})).json()
    async with run_app(api_keys=KEYS) as client:
        listing = (await client.get("/images", headers=as_(DEFAULT))).json()["data"]
        assert [image["sha256"] for image in listing] == [stored["sha256"]]
        assert (await client.get("/images", headers=as_(ALICE))).json()["data"] == []


def test_keys_are_configured_as_digests_and_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="SHA-256"):
        Settings(api_keys=[f"alice:{ALICE}"])  # the key itself is refused: only its digest is configured
    with pytest.raises(ValueError, match="collection name"):
        Settings(api_keys=[f"../etc:{apikeys.digest_of(ALICE)}"])
    with pytest.raises(ValueError, match="both 'alice' and 'carol'"):
        Settings(api_keys=[*KEYS, f"carol:{apikeys.digest_of(ALICE)}"])  # one key cannot open two collections
    rotated = Settings(api_keys=[*KEYS, f"alice:{apikeys.digest_of('new-alice-key')}"]).key_entries
    assert apikeys.collection_for(rotated, "new-alice-key") == apikeys.collection_for(rotated, ALICE) == "alice"
    entries = Settings(api_keys=KEYS).key_entries
    assert all(ALICE.encode() not in entry.digest for entry in entries)
    calls: list[int] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    assert apikeys.collection_for(entries, ALICE) == "alice"  # the first entry matches ...
    assert len(calls) == len(entries)  # ... and every entry is still compared
    assert apikeys.collection_for(entries, "nope") is None
    assert apikeys.collection_for(entries, None) is None


def test_key_maker_prints_a_key_and_the_entry_that_opens_its_collection() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "backend.apikeys", "new", "carol"], capture_output=True, text=True, check=True
    ).stdout
    key_line, entry_line = re.search(r"^key .*?:\s+(\S+)$", out, re.M), re.search(r"API_KEYS .*?:\s+(\S+)$", out, re.M)
    assert key_line is not None and entry_line is not None, out
    key, entry = key_line.group(1), entry_line.group(1)
    assert key not in entry
    assert apikeys.collection_for([apikeys.parse_entry(entry)], key) == "carol"
    bad = subprocess.run([sys.executable, "-m", "backend.apikeys", "new", "Bad Name"], capture_output=True)
    assert bad.returncode == 2


async def test_cors_is_same_origin_only_by_default(client: httpx.AsyncClient) -> None:
    preflight = await client.options(
        "/images", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}
    )
    assert "access-control-allow-origin" not in preflight.headers
    answer = await client.get("/images", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in answer.headers


async def test_stored_files_are_never_sniffed_as_another_type(client: httpx.AsyncClient) -> None:
    # A JPEG with HTML after it is stored (it is a whole image); browsers must still treat it as an image.
    polyglot = make_image_bytes(3) + b"<html><script>alert(1)</script></html>"
    stored = (await client.post("/images", files={"file": ("p.jpg", polyglot, "image/jpeg")})).json()
    for path in (f"/images/{stored['id']}/file", f"/images/{stored['id']}/thumbnail", "/health", "/nope"):
        answer = await client.get(path)
        assert answer.headers["x-content-type-options"] == "nosniff", path
    assert (await client.get(f"/images/{stored['id']}/file")).headers["content-type"] == "image/jpeg"


def test_a_bad_api_keys_setting_stops_startup_without_printing_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    raw_key = apikeys.new_key()
    for value in (raw_key, f"alice:{raw_key}", " , "):
        monkeypatch.setenv("API_KEYS", value)
        with pytest.raises(ValueError) as refused:
            Settings()
        assert raw_key not in str(refused.value) and raw_key[3:20] not in str(refused.value)
        assert "API_KEYS" in str(refused.value)


async def test_startup_says_whether_keys_are_on_and_which_collections_no_key_opens(
    run_app: AppRunner, caplog: pytest.LogCaptureFixture
) -> None:
    async with run_app(api_keys=KEYS) as client:
        await upload(client, BOB, [4])
    with caplog.at_level("INFO", logger="backend"):
        async with run_app(api_keys=KEYS[:1]) as client:
            assert (await client.get("/images", headers=as_(BOB))).status_code == 401
    assert "API keys: on, 1 keys for collections alice" in caplog.text
    assert "no key opens (their data stays untouched): bob" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="backend"):
        async with run_app() as client:
            pass
    assert "API keys: off" in caplog.text


async def test_nothing_is_told_to_whoever_has_no_key_or_no_business_knowing(
    run_app: AppRunner, settings: Settings, tmp_path
) -> None:
    """/health without a key shows no model paths or load errors; a refused import path does not list the
    roots; a job records the path it was given, not where a link inside the roots leads."""
    roots = tmp_path / "roots"
    (roots / "real").mkdir(parents=True)
    (roots / "real" / "a.jpg").write_bytes(make_image_bytes(1))
    (roots / "real" / "broken.jpg").write_bytes(b"not a picture")
    (roots / "shortcut").symlink_to(roots / "real")
    async with run_app(api_keys=KEYS, import_roots=[roots]) as client:
        anonymous = (await client.get("/health")).json()
        for model in (anonymous["model"], anonymous["captioner"]):
            assert model["name"] is None and model["error"] is None and model["state"]
        assert settings.clip_model_name not in str(anonymous)
        known = (await client.get("/health", headers=as_(ALICE))).json()
        assert known["model"]["name"] == settings.clip_model_name

        outside = await client.post("/images/import", json={"path": str(tmp_path / "elsewhere")}, headers=as_(ALICE))
        assert outside.status_code == 403 and str(roots) not in outside.json()["detail"]
        given = str(roots / "shortcut")
        job = (await client.post("/images/import", json={"path": given}, headers=as_(ALICE))).json()
        assert job["params"]["path"] == given
        finished = await wait_for(client, ALICE, job["id"])
        assert finished["status"] == "succeeded" and str(roots / "real") not in str(finished)
        assert [f["path"] for f in finished["result"]["failures"]] == [f"{given}/broken.jpg"]
