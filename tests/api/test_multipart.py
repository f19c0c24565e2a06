"""Streaming reception of multipart bodies: limits per file, odd parts, broken and abandoned bodies."""

from __future__ import annotations

import asyncio

import httpx
from asgi_lifespan import LifespanManager

from backend.config import Settings
from backend.main import create_app
from tests.conftest import AppRunner
from tests.helpers import make_image_bytes, stored_files, temp_files

BOUNDARY = "xYzBoundary"


def part(name: str, data: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"


def body(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


HEADERS = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


async def test_oversize_file_in_a_batch_fails_alone(run_app: AppRunner, settings: Settings) -> None:
    small, big = make_image_bytes(1), make_image_bytes(2, fmt="PNG", size=(300, 300))
    async with run_app(max_upload_bytes=len(small) + 10) as client:
        files = [("files", ("big.png", big, "image/png")), ("files", ("small.jpg", small, "image/jpeg"))]
        response = await client.post("/images", files=files)
        assert response.status_code == 201
        items = response.json()["items"]
        assert [i["status"] for i in items] == ["failed", "created"]
        assert items[0]["error"]["code"] == "file_too_large"
        assert items[0]["error"]["status"] == 413
    assert not temp_files(settings.storage_root)


async def test_file_in_an_unknown_field_is_not_an_upload(client: httpx.AsyncClient, settings: Settings) -> None:
    response = await client.post("/images", files={"image": ("a.jpg", make_image_bytes(3), "image/jpeg")})
    assert response.status_code == 422
    assert response.json()["code"] == "no_file"
    assert "`file`" in response.json()["detail"]
    assert stored_files(settings.storage_root) == []


async def test_empty_file_input_from_a_browser_form_is_ignored(client: httpx.AsyncClient) -> None:
    content = body(part("files", b"", filename=""), part("file", make_image_bytes(4), filename="real.jpg"))
    response = await client.post("/images", content=content, headers=HEADERS)
    assert response.status_code == 201, response.text
    assert response.json()["filename"] == "real.jpg"


async def test_malformed_multipart_is_a_400(client: httpx.AsyncClient, settings: Settings) -> None:
    broken = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'.encode()
    broken += b"no blank line, then garbage" + make_image_bytes(5)[:500]
    response = await client.post("/images", content=broken, headers=HEADERS)
    assert response.status_code == 400
    assert response.json()["code"] == "malformed_multipart"
    no_name = body(f"--{BOUNDARY}\r\nContent-Disposition: form-data\r\n\r\nx\r\n".encode())
    response = await client.post("/images", content=no_name, headers=HEADERS)
    assert (response.status_code, response.json()["code"]) == (400, "malformed_multipart")
    missing_boundary = await client.post("/images", content=b"x", headers={"content-type": "multipart/form-data"})
    assert (missing_boundary.status_code, missing_boundary.json()["code"]) == (400, "malformed_multipart")
    assert stored_files(settings.storage_root) == []


async def test_abandoned_upload_leaves_no_temp_file(settings: Settings) -> None:
    """A client that disconnects half-way through its body leaves nothing behind."""
    app = create_app(settings)
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'.encode()
    messages: list[dict[str, object]] = [
        {"type": "http.request", "body": head + make_image_bytes(7)[:300], "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict] = []

    async def receive() -> dict[str, object]:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/images",
        "raw_path": b"/images",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", HEADERS["content-type"].encode()), (b"host", b"localhost")],
        "client": ("127.0.0.1", 1234),
        "server": ("test", 80),
    }
    async with LifespanManager(app, startup_timeout=60) as manager:
        await manager.app(scope, receive, send)  # type: ignore[arg-type]  # plain dicts as ASGI messages
        assert sent[0]["status"] == 400
        assert not temp_files(settings.storage_root)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://localhost"
        ) as client:
            assert (await client.get("/images")).json()["count"] == 0


async def test_overlong_boundary_is_a_400(client: httpx.AsyncClient) -> None:
    boundary = "b" * 300
    content = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\nx\r\n--{boundary}--\r\n'
    )
    for path in ("/images", "/search/image"):
        response = await client.post(
            path, content=content.encode(), headers={"content-type": f"multipart/form-data; boundary={boundary}"}
        )
        assert (response.status_code, response.json()["code"]) == (400, "malformed_multipart"), path
