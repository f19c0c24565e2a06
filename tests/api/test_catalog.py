"""Listing, fetching, errors, health and the generated docs."""

from __future__ import annotations

import httpx
import pytest

from tests.helpers import make_image_bytes


async def test_list_is_paginated_newest_first(client: httpx.AsyncClient) -> None:
    ids = []
    for seed in range(5):
        response = await client.post("/images", files={"file": (f"{seed}.jpg", make_image_bytes(seed), "image/jpeg")})
        ids.append(response.json()["id"])
    newest_first = list(reversed(ids))

    page1 = (await client.get("/images", params={"limit": 2})).json()
    page2 = (await client.get("/images", params={"limit": 2, "offset": 2})).json()
    page3 = (await client.get("/images", params={"limit": 2, "offset": 4})).json()
    beyond = (await client.get("/images", params={"limit": 2, "offset": 10})).json()
    assert [p["count"] for p in (page1, page2, page3, beyond)] == [5, 5, 5, 5]
    assert [i["id"] for i in page1["data"] + page2["data"] + page3["data"]] == newest_first
    assert beyond["data"] == []
    assert (page2["offset"], page2["limit"]) == (2, 2)


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 10_000}, {"offset": -1}, {"offset": 2**64}])
async def test_list_rejects_bad_paging(client: httpx.AsyncClient, params: dict) -> None:
    response = await client.get("/images", params=params)
    assert response.status_code == 422
    assert response.json()["code"] == "validation_error"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/images/999"),
        ("GET", "/images/999/file"),
        ("GET", "/images/999/thumbnail"),
        ("GET", "/images/999/similar"),
        ("DELETE", "/images/999"),
    ],
)
async def test_missing_image_is_a_json_404(client: httpx.AsyncClient, method: str, path: str) -> None:
    response = await client.request(method, path)
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"detail": "image 999 not found", "code": "image_not_found"}


async def test_other_errors_are_json_with_a_code(client: httpx.AsyncClient) -> None:
    unknown = await client.get("/nowhere")
    assert (unknown.status_code, unknown.json()["code"]) == (404, "not_found")
    wrong_method = await client.put("/images")
    assert (wrong_method.status_code, wrong_method.json()["code"]) == (405, "method_not_allowed")
    bad_id = await client.get("/images/abc")
    assert (bad_id.status_code, bad_id.json()["code"]) == (422, "validation_error")
    assert "image_id" in bad_id.json()["detail"]
    for path in ("/images/9223372036854775808", "/images/9223372036854775808/similar", "/images/0"):
        huge = await client.get(path)
        assert (huge.status_code, huge.json()["code"]) == (422, "validation_error"), path


async def test_health_reports_model_and_index(client: httpx.AsyncClient, settings) -> None:
    await client.post("/images", files={"file": ("a.jpg", make_image_bytes(1), "image/jpeg")})
    health = (await client.get("/health")).json()
    assert health["status"] == "ok"
    assert health["images"] == 1
    postgres = settings.uses_postgres
    assert health["database"]["backend"] == ("postgresql" if postgres else "sqlite")
    assert health["index"] == {
        # pgvector's HNSW graph is approximate from the first vector; FAISS is exact below its threshold.
        "type": "pgvector-hnsw" if postgres else "IndexIDMap2(IndexFlatIP)",
        "size": 1,
        "dimension": 16,
        "approximate": postgres,
        "reorganizing": False,
    }
    assert health["model"]["name"] == settings.clip_model_name
    assert health["model"]["state"] == "loaded"
    assert health["model"]["loaded"] is True
    assert health["model"]["device"] == "cpu"


async def test_docs_work_without_internet(client: httpx.AsyncClient) -> None:
    for page, asset in (("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")):
        html = (await client.get(page)).text
        assert "cdn." not in html
        url = next(part.split('"')[0] for part in html.split('src="')[1:] if asset in part)
        response = await client.get(url)
        assert response.status_code == 200, url
        assert len(response.content) > 100_000


async def test_docs_and_schema_describe_every_route(client: httpx.AsyncClient) -> None:
    assert (await client.get("/docs")).status_code == 200
    assert (await client.get("/redoc")).status_code == 200
    schema = (await client.get("/openapi.json")).json()
    expected = {
        ("/images", "post"),
        ("/images", "get"),
        ("/images/{image_id}", "get"),
        ("/images/{image_id}", "delete"),
        ("/images/{image_id}/file", "get"),
        ("/images/{image_id}/thumbnail", "get"),
        ("/images/{image_id}/similar", "get"),
        ("/search", "get"),
        ("/search/image", "post"),
        ("/health", "get"),
    }
    found = {(path, method) for path, ops in schema["paths"].items() for method in ops}
    assert expected <= found
    for path, method in expected:
        operation = schema["paths"][path][method]
        assert operation.get("summary"), f"{method} {path} has no summary"
        if "422" in operation["responses"]:
            ref = operation["responses"]["422"]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith("/ErrorBody"), f"{method} {path} documents 422 as {ref}"
