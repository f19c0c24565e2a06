"""Uploading: stored records, dedup, batches, and refusals that store nothing."""

from __future__ import annotations

import asyncio
import hashlib
import io
from typing import Any

import httpx
import pytest
from PIL import Image

from backend.config import Settings
from tests.conftest import AppRunner
from tests.helpers import make_image_bytes, stored_files


async def upload(client: httpx.AsyncClient, data: bytes, name: str = "photo.jpg", ctype: str = "image/jpeg"):
    return await client.post("/images", files={"file": (name, data, ctype)})


async def test_upload_single_image_returns_its_record(client: httpx.AsyncClient, settings: Settings) -> None:
    data = make_image_bytes(1, size=(120, 80))
    response = await upload(client, data, "holiday.jpg")
    assert response.status_code == 201, response.text
    record = response.json()
    assert record["duplicate"] is False
    assert record["filename"] == "holiday.jpg"
    assert record["content_type"] == "image/jpeg"
    assert (record["width"], record["height"]) == (120, 80)
    assert record["size_bytes"] == len(data)
    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    assert record["embedding_model"] == settings.clip_model_name
    assert record["created_at"].endswith("Z")

    original = await client.get(record["file_url"])
    assert original.status_code == 200
    assert original.headers["content-type"] == "image/jpeg"
    assert original.content == data

    thumb = await client.get(record["thumbnail_url"])
    assert thumb.status_code == 200
    assert thumb.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(thumb.content)) as im:
        assert im.format == "JPEG"
        assert max(im.size) <= settings.thumbnail_size

    fetched = (await client.get(f"/images/{record['id']}")).json()
    assert fetched["sha256"] == record["sha256"]


async def test_upload_same_bytes_twice_returns_existing_record(client: httpx.AsyncClient, settings: Settings) -> None:
    data = make_image_bytes(2)
    first = await upload(client, data, "a.jpg")
    again = await upload(client, data, "renamed.jpg")
    assert first.status_code == 201
    assert again.status_code == 200
    assert again.json()["duplicate"] is True
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["filename"] == "a.jpg"
    assert (await client.get("/images")).json()["count"] == 1
    assert len([p for p in stored_files(settings.storage_root) if "originals" in p.parts]) == 1


async def test_upload_batch_answers_per_file(client: httpx.AsyncClient) -> None:
    good_a, good_b = make_image_bytes(3), make_image_bytes(4, fmt="PNG")
    files = [
        ("files", ("a.jpg", good_a, "image/jpeg")),
        ("files", ("b.png", good_b, "image/png")),
        ("files", ("notes.jpg", b"this is not an image", "image/jpeg")),
        ("files", ("a-copy.jpg", good_a, "image/jpeg")),
    ]
    response = await client.post("/images", files=files)
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["created"], body["duplicates"], body["failed"]) == (2, 1, 1)
    statuses = [item["status"] for item in body["items"]]
    assert statuses == ["created", "created", "failed", "duplicate"]
    failed = body["items"][2]
    assert failed["filename"] == "notes.jpg"
    assert failed["error"]["code"] == "invalid_image"
    assert failed["error"]["status"] == 400
    assert body["items"][3]["image"]["id"] == body["items"][0]["image"]["id"]
    assert (await client.get("/images")).json()["count"] == 2


async def test_upload_batch_of_only_bad_files_is_refused(client: httpx.AsyncClient, settings: Settings) -> None:
    files = [("files", ("x.jpg", b"nope", "image/jpeg")), ("files", ("y.jpg", b"", "image/jpeg"))]
    response = await client.post("/images", files=files)
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "no_image_accepted"
    assert [item["error"]["code"] for item in body["items"]] == ["invalid_image", "empty_file"]
    assert stored_files(settings.storage_root) == []


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"hello, I am text", 400, "invalid_image"),
        (b"", 400, "empty_file"),
        (b"<html><script>alert(1)</script></html>", 400, "invalid_image"),
        (make_image_bytes(5)[:400], 400, "invalid_image"),  # truncated JPEG
        (make_image_bytes(6, fmt="TGA"), 415, "unsupported_format"),
        (make_image_bytes(7, fmt="PCX"), 415, "unsupported_format"),
    ],
    ids=["text", "empty", "html", "truncated-jpeg", "tga", "pcx"],
)
async def test_upload_bad_file_is_refused_and_nothing_is_stored(
    client: httpx.AsyncClient, settings: Settings, data: bytes, status: int, code: str
) -> None:
    response = await upload(client, data, "bad.jpg")
    assert response.status_code == status, response.text
    assert response.json()["code"] == code
    assert response.json()["detail"]
    assert (await client.get("/images")).json()["count"] == 0
    assert stored_files(settings.storage_root) == []
    assert (await client.get("/health")).json()["index"]["size"] == 0


async def test_upload_larger_than_max_upload_bytes_gets_413(run_app: AppRunner, settings: Settings) -> None:
    data = make_image_bytes(8, fmt="PNG", size=(200, 200))
    async with run_app(max_upload_bytes=len(data) - 1) as client:
        response = await upload(client, data, "big.png", "image/png")
        assert response.status_code == 413
        assert response.json()["code"] == "file_too_large"
        assert (await client.get("/images")).json()["count"] == 0
    assert stored_files(settings.storage_root) == []


async def test_image_with_too_many_pixels_is_refused(run_app: AppRunner, settings: Settings) -> None:
    async with run_app(max_image_pixels=50 * 50) as client:
        response = await upload(client, make_image_bytes(10, fmt="PNG", size=(60, 60)), "wide.png", "image/png")
        assert response.status_code == 422
        assert response.json()["code"] == "image_too_large"
    assert stored_files(settings.storage_root) == []


async def test_upload_without_a_file_is_a_422(client: httpx.AsyncClient) -> None:
    response = await client.post("/images", data={"other": "x"})
    assert response.status_code == 422
    assert response.json()["code"] == "no_file"


@pytest.mark.parametrize(
    ("fmt", "ctype", "save_args"),
    [
        ("PNG", "image/png", {}),
        ("WEBP", "image/webp", {}),
        ("GIF", "image/gif", {}),
        ("BMP", "image/bmp", {}),
        ("TIFF", "image/tiff", {}),
        ("AVIF", "image/avif", {}),
        ("HEIF", "image/heic", {}),
    ],
)
async def test_upload_accepts_every_allowed_format(
    client: httpx.AsyncClient, fmt: str, ctype: str, save_args: dict[str, Any]
) -> None:
    if fmt == "HEIF":
        from pillow_heif import register_heif_opener

        register_heif_opener()
    data = make_image_bytes(30, fmt=fmt, **save_args)
    response = await upload(client, data, f"picture.{fmt.lower()}", "application/octet-stream")
    assert response.status_code == 201, response.text
    assert response.json()["content_type"] == ctype
    served = await client.get(response.json()["file_url"])
    assert served.headers["content-type"] == ctype
    assert served.content == data


async def test_upload_converts_unusual_modes(client: httpx.AsyncClient) -> None:
    for seed, (mode, fmt) in enumerate([("CMYK", "JPEG"), ("LA", "PNG"), ("P", "PNG"), ("I;16", "PNG"), ("L", "JPEG")]):
        data = make_image_bytes(40 + seed, fmt=fmt, mode=mode)
        response = await upload(client, data, f"{mode}.{fmt.lower()}")
        assert response.status_code == 201, f"{mode}: {response.text}"
        thumb = await client.get(response.json()["thumbnail_url"])
        assert thumb.status_code == 200


async def test_animated_gif_is_stored_whole(client: httpx.AsyncClient) -> None:
    frames = [Image.new("RGB", (40, 30), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    response = await upload(client, buffer.getvalue(), "anim.gif", "image/gif")
    assert response.status_code == 201
    assert (await client.get(response.json()["file_url"])).content == buffer.getvalue()


async def test_exif_orientation_and_date_are_applied(client: httpx.AsyncClient) -> None:
    image = Image.new("RGB", (80, 40), (10, 120, 200))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    exif.get_ifd(0x8769)[0x9003] = "2021:07:14 09:30:05"
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    response = await upload(client, buffer.getvalue(), "portrait.jpg")
    assert response.status_code == 201
    record = response.json()
    assert (record["width"], record["height"]) == (40, 80)
    assert record["taken_at"] == "2021-07-14T09:30:05"
    thumb = await client.get(record["thumbnail_url"])
    with Image.open(io.BytesIO(thumb.content)) as im:
        assert im.size[1] > im.size[0]


@pytest.mark.parametrize(
    ("sent", "kept"),
    [("../../etc/passwd.jpg", "passwd.jpg"), ("C:\\photos\\cat.jpg", "cat.jpg"), ("ünïcode ✓.jpg", "ünïcode ✓.jpg")],
)
async def test_filenames_are_reduced_to_a_safe_name(client: httpx.AsyncClient, sent: str, kept: str) -> None:
    response = await upload(client, make_image_bytes(sum(map(ord, sent)) % 1000 + 100), sent)
    assert response.status_code == 201
    assert response.json()["filename"] == kept


async def test_concurrent_uploads_of_the_same_bytes_store_one_image(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    data = make_image_bytes(50)
    responses = await asyncio.gather(*(upload(client, data, f"same-{i}.jpg") for i in range(6)))
    assert sorted(r.status_code for r in responses) == [200] * 5 + [201]
    assert len({r.json()["id"] for r in responses}) == 1
    assert (await client.get("/images")).json()["count"] == 1
    assert (await client.get("/health")).json()["index"]["size"] == 1
    assert len([p for p in stored_files(settings.storage_root) if "originals" in p.parts]) == 1


def corrupt_avif() -> bytes:
    """A valid AVIF container whose colour planes no longer decode (Pillow raises RuntimeError)."""
    buffer = io.BytesIO()
    Image.new("RGB", (120, 80), (10, 200, 90)).save(buffer, format="AVIF")
    data = bytearray(buffer.getvalue())
    data[-1] ^= 0xFF
    return bytes(data)


async def test_corrupt_avif_is_refused_without_sinking_the_batch(client: httpx.AsyncClient, settings: Settings) -> None:
    alone = await upload(client, corrupt_avif(), "bad.avif", "image/avif")
    assert alone.status_code == 400
    assert alone.json()["code"] == "invalid_image"
    files = [
        ("files", ("good.png", make_image_bytes(71, fmt="PNG"), "image/png")),
        ("files", ("bad.avif", corrupt_avif(), "image/avif")),
    ]
    batch = await client.post("/images", files=files)
    assert batch.status_code == 201
    assert [item["status"] for item in batch.json()["items"]] == ["created", "failed"]
    assert (await client.get("/images")).json()["count"] == 1


async def test_repeated_file_field_stores_every_file(client: httpx.AsyncClient) -> None:
    files = [
        ("file", ("a.jpg", make_image_bytes(90), "image/jpeg")),
        ("file", ("b.jpg", make_image_bytes(91), "image/jpeg")),
    ]
    response = await client.post("/images", files=files)
    assert response.status_code == 201
    assert response.json()["created"] == 2
    assert [item["filename"] for item in response.json()["items"]] == ["a.jpg", "b.jpg"]


async def test_empty_text_parts_from_swagger_ui_are_ignored(client: httpx.AsyncClient) -> None:
    # Swagger UI sends an empty text part for a file field left unused.
    response = await client.post(
        "/images", data={"files": ""}, files={"file": ("a.jpg", make_image_bytes(95), "image/jpeg")}
    )
    assert response.status_code == 201, response.text
    assert response.json()["filename"] == "a.jpg"


async def test_openapi_offers_file_pickers_for_uploads(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    body = schema["paths"]["/images"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["properties"]["file"] == {**body["properties"]["file"], "type": "string", "format": "binary"}
    assert body["properties"]["files"]["items"] == {"type": "string", "format": "binary"}
