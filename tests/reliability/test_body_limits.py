"""Request bodies that are too big or hold too much: refused early, with nothing read past the point of
refusal and nothing left in storage.

- MAX_REQUEST_BYTES: a Content-Length over it is a 413 before a single body byte is read; a chunked body
  is cut off as soon as the bytes received pass it. Proven twice: in-process, with a request body that
  counts what the app pulled from it, and against the real server (uvicorn) over a raw socket, where the
  413 arrives although the body was never sent (Content-Length) or never finished (chunked).
- MAX_FILES_PER_REQUEST and the text-field limit (16): a 400 as soon as the part over the limit begins,
  not after the rest of the body was received.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from backend.config import Settings
from backend.multipart import MAX_TEXT_FIELDS
from bench.server import serve
from tests.api.test_multipart import BOUNDARY, HEADERS, body, part
from tests.conftest import AppRunner
from tests.helpers import make_image_bytes, stored_files

CHUNK = 16_384


class CountingBody:
    """A streamed request body that records how many bytes the app has pulled from it."""

    def __init__(self, data: bytes, chunk: int = CHUNK) -> None:
        self.data = data
        self.chunk = chunk
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self.data), self.chunk):
            piece = self.data[start : start + self.chunk]
            self.pulled += len(piece)
            yield piece


def noise(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


async def assert_nothing_kept(client: httpx.AsyncClient, settings: Settings) -> None:
    assert (await client.get("/images")).json()["count"] == 0
    assert stored_files(settings.storage_root) == []  # originals, thumbnails and tmp
    health = await client.get("/health")
    assert (health.status_code, health.json()["status"]) == (200, "ok")


# ------------------------------------------------------------------------------------- MAX_REQUEST_BYTES


@pytest.mark.parametrize("declared", ["exact", "2**40"])
async def test_content_length_over_the_limit_is_refused_before_the_body_is_read(
    run_app: AppRunner, settings: Settings, declared: str
) -> None:
    data = body(part("file", make_image_bytes(1, fmt="PNG", size=(200, 200)), filename="big.png"))
    length = len(data) if declared == "exact" else 2**40
    upload = CountingBody(data)
    async with run_app(max_request_bytes=10_000) as client:
        response = await client.post("/images", content=upload, headers={**HEADERS, "content-length": str(length)})
        assert response.request.headers["content-length"] == str(length)
        assert "transfer-encoding" not in response.request.headers
        assert response.status_code == 413
        assert response.json()["code"] == "request_too_large"
        assert "10000" in response.json()["detail"]
        assert upload.pulled == 0
        await assert_nothing_kept(client, settings)


async def test_plain_upload_over_the_limit_gets_413(run_app: AppRunner, settings: Settings) -> None:
    """What a client library sends (httpx sets Content-Length for a multipart body)."""
    data = make_image_bytes(9, fmt="PNG", size=(200, 200))
    async with run_app(max_request_bytes=10_000) as client:
        response = await client.post("/images", files={"file": ("big.png", data, "image/png")})
        assert int(response.request.headers["content-length"]) > 10_000
        assert (response.status_code, response.json()["code"]) == (413, "request_too_large")
        await assert_nothing_kept(client, settings)


@pytest.mark.parametrize("path", ["/images", "/search/image", "/cluster-images"])
async def test_chunked_body_is_cut_off_once_it_passes_the_limit(
    run_app: AppRunner, settings: Settings, path: str
) -> None:
    limit = 100_000
    data = body(part("file", noise(2_000_000), filename="big.png"))
    upload = CountingBody(data)
    async with run_app(max_request_bytes=limit) as client:
        response = await client.post(path, content=upload, headers=HEADERS)
        assert "content-length" not in response.request.headers
        assert response.status_code == 413, response.text
        assert response.json()["code"] == "request_too_large"
        # The app stopped pulling at the chunk that crossed the limit: 2 MB were never read.
        assert limit < upload.pulled <= limit + CHUNK
        await assert_nothing_kept(client, settings)


def http_answer(sock: socket.socket, deadline: float) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response with a Content-Length from a socket."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        piece = sock.recv(65536)
        assert piece, f"the server closed the connection without an answer: {buffer!r}"
        buffer += piece
    head, _, rest = buffer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    while len(rest) < int(headers["content-length"]):
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        piece = sock.recv(65536)
        assert piece, "the server closed the connection in the middle of its answer"
        rest += piece
    return int(status_line.split()[1]), headers, rest


def raw_request(base: str, head: str, body_bytes: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send a request head and only `body_bytes` of its body, keep the connection open, read the answer.
    A server that waited for the rest of the body would time out here instead of answering."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode("latin-1") + body_bytes)
        return http_answer(sock, time.monotonic() + 10)


@pytest.mark.slow
def test_real_server_answers_413_without_waiting_for_the_body(
    tmp_path: Path, tiny_clip_dir: Path, tiny_blip_dir: Path
) -> None:
    storage = tmp_path / "storage"
    limit = 100_000
    with serve(
        storage,
        tiny_clip_dir,
        tiny_blip_dir,
        timeout=120,
        settings={"MAX_REQUEST_BYTES": str(limit), "EXECUTOR_WORKERS": "2"},
    ) as server:
        start = (
            f"POST /images HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        )
        # 1 TB declared, not one byte sent.
        status, headers, answer = raw_request(server.base, start + f"Content-Length: {2**40}\r\n\r\n", b"")
        assert status == 413
        assert json.loads(answer)["code"] == "request_too_large"
        assert headers["connection"] == "close"

        # What curl sends for a large upload: it waits for "100 Continue" before sending the body, and
        # gets the refusal instead.
        expect = start + f"Content-Length: {limit + 1}\r\nExpect: 100-continue\r\n\r\n"
        status, _, answer = raw_request(server.base, expect, b"")
        assert status == 413
        assert json.loads(answer)["code"] == "request_too_large"

        # Chunked: a bit more than the limit, and the terminating chunk is never sent.
        opening = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'.encode()
        payload = opening + noise(limit + 2 * CHUNK)
        chunks = b"".join(
            f"{len(payload[i : i + CHUNK]):x}\r\n".encode() + payload[i : i + CHUNK] + b"\r\n"
            for i in range(0, len(payload), CHUNK)
        )
        status, _, answer = raw_request(server.base, start + "Transfer-Encoding: chunked\r\n\r\n", chunks)
        assert status == 413
        assert json.loads(answer)["code"] == "request_too_large"

        assert httpx.get(server.base + "/health", timeout=10).json()["status"] == "ok"
        assert httpx.get(server.base + "/images", timeout=10).json()["count"] == 0
        assert stored_files(storage) == []


# ---------------------------------------------------------------------------- files and fields per request


@pytest.mark.parametrize("extra", [1, 4, 500])
async def test_too_many_files_are_refused_at_the_first_file_over_the_limit(
    run_app: AppRunner, settings: Settings, extra: int
) -> None:
    parts = [part("files", make_image_bytes(80 + i % 10), filename=f"{i}.jpg") for i in range(3 + extra)]
    upload = CountingBody(body(*parts))
    async with run_app(max_files_per_request=3) as client:
        response = await client.post("/images", content=upload, headers=HEADERS)
        assert response.status_code == 400
        assert response.json()["code"] == "too_many_files"
        assert "3" in response.json()["detail"]
        # Every count over the limit is refused the same way, as soon as the fourth part's headers are read.
        assert upload.pulled <= sum(map(len, parts[:4])) + CHUNK
        await assert_nothing_kept(client, settings)


async def test_too_many_text_fields_are_refused_at_the_first_field_over_the_limit(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    parts = [part(f"f{i}", b"v" * 100) for i in range(10_000)]
    parts.insert(8, part("file", make_image_bytes(6), filename="a.jpg"))  # staged, then removed
    upload = CountingBody(body(*parts))
    response = await client.post("/images", content=upload, headers=HEADERS)
    assert (response.status_code, response.json()["code"]) == (400, "too_many_fields")
    assert str(MAX_TEXT_FIELDS) in response.json()["detail"]
    assert upload.pulled < len(upload.data) // 10
    await assert_nothing_kept(client, settings)


async def test_text_fields_up_to_the_limit_are_ignored(client: httpx.AsyncClient) -> None:
    parts = [part(f"f{i}", b"v") for i in range(MAX_TEXT_FIELDS)]
    content = body(*parts, part("file", make_image_bytes(7), filename="a.jpg"))
    response = await client.post("/images", content=content, headers=HEADERS)
    assert response.status_code == 201, response.text


async def test_search_by_image_takes_one_file(client: httpx.AsyncClient, settings: Settings) -> None:
    content = body(*(part("file", make_image_bytes(90 + i), filename=f"{i}.jpg") for i in range(2)))
    response = await client.post("/search/image", content=content, headers=HEADERS)
    assert (response.status_code, response.json()["code"]) == (400, "too_many_files")
    await assert_nothing_kept(client, settings)


async def test_grouping_uploads_has_the_same_file_limit(run_app: AppRunner, settings: Settings) -> None:
    async with run_app(max_files_per_request=2) as client:
        content = body(*(part("files", make_image_bytes(95 + i), filename=f"{i}.jpg") for i in range(3)))
        response = await client.post("/cluster-images?captions=false", content=content, headers=HEADERS)
        assert (response.status_code, response.json()["code"]) == (400, "too_many_files")
        await assert_nothing_kept(client, settings)
