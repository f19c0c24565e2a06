"""POST /cluster-images: the stateless contract a browser front end on another origin relies on."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import AppRunner
from tests.helpers import make_image_bytes, stored_files

ORIGIN = "http://localhost:8082"


def upload(names: list[str]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (name, make_image_bytes(300 + n), "image/jpeg")) for n, name in enumerate(names)]


async def test_contract_exactly(client: httpx.AsyncClient, settings) -> None:
    names = [f"photo-{n}.jpg" for n in range(7)]
    response = await client.post("/cluster-images", files=upload(names))
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"clusters"}
    clusters = body["clusters"]
    assert clusters
    for position, cluster in enumerate(clusters):
        assert set(cluster) == {"name", "image_ids", "description"}
        assert cluster["name"] == position
        assert isinstance(cluster["description"], str)
        assert cluster["image_ids"]
    assert sorted(n for c in clusters for n in c["image_ids"]) == sorted(names)
    # Nothing is stored.
    assert (await client.get("/images")).json()["count"] == 0
    assert stored_files(settings.storage_root) == []


async def test_k_overrides_auto_and_the_answer_is_deterministic(client: httpx.AsyncClient) -> None:
    names = [f"{n}.jpg" for n in range(6)]
    first = (await client.post("/cluster-images", params={"k": 3}, files=upload(names))).json()
    again = (await client.post("/cluster-images", params={"k": "3"}, files=upload(names))).json()
    assert len(first["clusters"]) == 3
    assert first == again
    one = (await client.post("/cluster-images", params={"k": 1}, files=upload(names))).json()
    assert len(one["clusters"]) == 1 and sorted(one["clusters"][0]["image_ids"]) == sorted(names)


async def test_without_captions_descriptions_are_empty(client: httpx.AsyncClient) -> None:
    body = (await client.post("/cluster-images", params={"captions": "false"}, files=upload(["a.jpg", "b.jpg"]))).json()
    assert all(cluster["description"] == "" for cluster in body["clusters"])


async def test_a_single_image_is_one_cluster(client: httpx.AsyncClient) -> None:
    body = (await client.post("/cluster-images", files=upload(["only.jpg"]))).json()
    assert body["clusters"][0]["image_ids"] == ["only.jpg"] and len(body["clusters"]) == 1


async def test_a_bad_file_is_named_and_nothing_is_kept(client: httpx.AsyncClient, settings) -> None:
    files = upload(["good.jpg"]) + [("files", ("notes.jpg", b"these are not pixels", "image/jpeg"))]
    response = await client.post("/cluster-images", files=files)
    assert response.status_code == 400
    assert response.json()["detail"].startswith("notes.jpg: ")
    assert response.json()["code"] == "invalid_image"
    assert stored_files(settings.storage_root) == []


@pytest.mark.parametrize("k", ["0", "x", "1001"])
async def test_bad_k_is_422(client: httpx.AsyncClient, k: str) -> None:
    response = await client.post("/cluster-images", params={"k": k}, files=upload(["a.jpg"]))
    assert response.status_code == 422


async def test_no_files_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post("/cluster-images", data={"note": "x"}, files={"other": ("a.txt", b"x")})
    assert response.status_code == 422 and response.json()["code"] == "no_file"


async def test_too_many_files_is_400(run_app: AppRunner) -> None:
    async with run_app(max_files_per_request=2) as client:
        response = await client.post("/cluster-images", files=upload(["a.jpg", "b.jpg", "c.jpg"]))
        assert response.status_code == 400 and response.json()["code"] == "too_many_files"


async def test_cors_preflight_from_an_allowed_origin(run_app: AppRunner) -> None:
    async with run_app(cors_origins=[ORIGIN]) as client:
        preflight = await client.options(
            "/cluster-images",
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in preflight.headers["access-control-allow-methods"]
        response = await client.post("/cluster-images", files=upload(["a.jpg"]), headers={"Origin": ORIGIN})
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == ORIGIN

        other = await client.options(
            "/cluster-images",
            headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert other.status_code == 400
        assert other.json()["code"] == "cors_refused" and "origin" in other.json()["detail"].lower()
        assert "access-control-allow-origin" not in other.headers


async def test_an_allowed_origin_may_send_every_method_the_api_uses(run_app: AppRunner) -> None:
    """PATCH /libraries/{id} and DELETE /images/{id} from a page on an allowed origin pass the preflight."""
    async with run_app(cors_origins=[ORIGIN]) as client:
        for method, path in [("PATCH", "/libraries/1"), ("DELETE", "/images/1"), ("POST", "/duplicates/scan")]:
            preflight = await client.options(path, headers={"Origin": ORIGIN, "Access-Control-Request-Method": method})
            assert preflight.status_code == 200, (method, preflight.text)
            assert method in preflight.headers["access-control-allow-methods"]


async def test_no_cross_origin_access_by_default(client: httpx.AsyncClient) -> None:
    preflight = await client.options(
        "/cluster-images", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in preflight.headers
    response = await client.post("/cluster-images", files=upload(["a.jpg"]), headers={"Origin": ORIGIN})
    assert "access-control-allow-origin" not in response.headers


async def test_filenames_must_identify_the_images(client: httpx.AsyncClient) -> None:
    response = await client.post("/cluster-images", files=upload(["same.jpg", "b.jpg", "same.jpg"]))
    assert response.status_code == 400 and response.json()["code"] == "duplicate_filename"
    assert "same.jpg" in response.json()["detail"]
    # What `curl -F "files=@a.jpg;filename="` sends: a file part whose filename is empty.
    body = (
        b'--b\r\nContent-Disposition: form-data; name="files"; filename=""\r\nContent-Type: image/jpeg\r\n\r\n'
        + make_image_bytes(1)
        + b"\r\n--b--\r\n"
    )
    response = await client.post(
        "/cluster-images", content=body, headers={"Content-Type": "multipart/form-data; boundary=b"}
    )
    assert response.status_code == 400 and response.json()["code"] == "missing_filename"
