"""Requests from other sites, with no API key configured: a rebound DNS name, cross-site uploads and POSTs
a browser sends without a preflight, and cross-site reads that make the service work. Each is refused
before it runs; the service's own page, allowed origins and clients that are not browsers are not."""

from __future__ import annotations

import httpx
import pytest

from backend.config import Settings
from tests.conftest import AppRunner
from tests.helpers import make_image_bytes, stored_files, upload_many

EVIL = "https://attacker.example"


def photo(seed: int = 1) -> dict[str, tuple[str, bytes, str]]:
    return {"file": ("a.jpg", make_image_bytes(seed), "image/jpeg")}


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8000", "127.0.0.2", "localhost.evil"])
async def test_a_host_header_naming_another_site_is_refused(client: httpx.AsyncClient, host: str) -> None:
    """DNS rebinding: the attacker's name, now pointing at 127.0.0.1, arrives in the Host header."""
    for method, path in (("GET", "/images"), ("GET", "/health"), ("GET", "/"), ("POST", "/reindex")):
        answer = await client.request(method, path, headers={"Host": host})
        assert answer.status_code == 400, (method, path, answer.text)
        assert answer.json()["code"] == "host_not_allowed"
    assert (await client.get("/jobs")).json()["count"] == 0


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST"])
async def test_loopback_names_are_allowed_by_default(client: httpx.AsyncClient, host: str) -> None:
    assert (await client.get("/images", headers={"Host": host})).status_code == 200


async def test_allowed_hosts_are_configurable(run_app: AppRunner) -> None:
    async with run_app(allowed_hosts=["photos.example", "*.home.arpa"]) as client:
        assert (await client.get("/health", headers={"Host": "photos.example"})).status_code == 200
        assert (await client.get("/health", headers={"Host": "nas.home.arpa:8443"})).status_code == 200
        assert (await client.get("/health", headers={"Host": "localhost"})).status_code == 400
    async with run_app(allowed_hosts=["*"]) as client:
        assert (await client.get("/health", headers={"Host": "anything.example"})).status_code == 200


async def test_state_changing_requests_from_another_site_are_refused(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    """What a foreign page's form or no-cors fetch sends without a preflight: refused, nothing done."""
    stored = (await client.post("/images", files=photo(1))).json()
    cross = {"Origin": EVIL}
    refused = [
        await client.post("/images", files=photo(2), headers=cross),
        await client.post("/reindex", params={"all": "true"}, headers=cross),
        await client.post("/clusters", headers=cross),
        await client.delete(f"/images/{stored['id']}", headers=cross),
        await client.post("/images", files=photo(3), headers={"Origin": "null"}),
        await client.post("/search/image", files=photo(4), headers={"Origin": "http://localhost:3000"}),
    ]
    for answer in refused:
        assert answer.status_code == 403, answer.text
        assert answer.json()["code"] == "cross_site_refused"
    assert (await client.get("/images")).json()["count"] == 1
    assert (await client.get("/jobs")).json()["count"] == 0
    assert len(stored_files(settings.storage_root)) == 2  # the one original and its thumbnail


async def test_reads_from_another_site_that_would_make_the_service_work_are_refused(client: httpx.AsyncClient) -> None:
    images = await upload_many(client, 3)
    cross_site = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}
    for path in ("/clusters?refresh=true&k=2", f"/images/{images[0]['id']}/thumbnail", "/search?q=dog", "/map"):
        answer = await client.get(path, headers=cross_site)
        assert answer.status_code == 403 and answer.json()["code"] == "cross_site_refused", path
    assert (await client.get("/jobs")).json()["count"] == 0  # no clustering was started
    # Following a link to the page or the docs from another site still works; the API does not.
    navigation = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
    for path in ("/", "/docs"):
        assert (await client.get(path, headers=navigation)).status_code == 200, path
    assert (await client.get("/images", headers=navigation)).status_code == 403


async def test_the_services_own_page_allowed_origins_and_scripts_are_not_affected(run_app: AppRunner) -> None:
    allowed = "http://photos.lan:3000"
    async with run_app(cors_origins=[allowed]) as client:
        own = {"Origin": "http://localhost", "Sec-Fetch-Site": "same-origin"}
        assert (await client.post("/images", files=photo(1), headers=own)).status_code == 201
        listed = {"Origin": allowed, "Sec-Fetch-Site": "cross-site"}
        assert (await client.post("/images", files=photo(2), headers=listed)).status_code == 201
        assert (await client.get("/images", headers=listed)).status_code == 200
        assert (await client.post("/images", files=photo(3))).status_code == 201  # curl: no Origin at all
        assert (await client.post("/images", files=photo(4), headers={"Origin": EVIL})).status_code == 403


def test_origin_null_needs_api_keys() -> None:
    """`null` is the origin of a page opened from disk, but also of a sandboxed frame of any web site."""
    with pytest.raises(ValueError, match="CORS_ORIGINS=null .* API_KEYS"):
        Settings(_env_file=None, cors_origins="null")  # a string, as the environment gives it
