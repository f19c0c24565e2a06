"""Test data: images made on the fly, and a look at what storage holds."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import ExifTags, Image
from PIL.TiffImagePlugin import IFDRational

from backend.config import Settings


def make_image_bytes(
    seed: int = 0,
    *,
    fmt: str = "JPEG",
    size: tuple[int, int] = (96, 64),
    mode: str = "RGB",
    **save_args: object,
) -> bytes:
    """A distinct, textured image per seed, encoded in `fmt`."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=3)
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
    pixels = (
        base + np.stack([xx * (seed + 1), yy * 3, xx + yy], axis=-1) + rng.integers(0, 40, (size[1], size[0], 3))
    ) % 256
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def exif_photo(
    seed: int,
    *,
    taken: str | None = None,
    offset: str | None = None,
    gps: tuple[float, float, float] | None = None,
    make: str | None = None,
    model: str | None = None,
    lens: str | None = None,
) -> bytes:
    """A JPEG whose EXIF says when (`taken` as 2021:07:14 09:30:05), where (latitude, longitude, altitude in
    decimal degrees and metres) and with what it was taken, as a camera writes it."""
    exif = Image.Exif()
    details = exif.get_ifd(ExifTags.IFD.Exif)
    if make is not None:
        exif[0x010F] = make
    if model is not None:
        exif[0x0110] = model
    if taken is not None:
        details[0x9003] = taken
    if offset is not None:
        details[0x9011] = offset
    if lens is not None:
        details[0xA434] = lens
    if gps is not None:
        latitude, longitude, altitude = gps
        info = exif.get_ifd(ExifTags.IFD.GPSInfo)
        info[ExifTags.GPS.GPSLatitudeRef] = "N" if latitude >= 0 else "S"
        info[ExifTags.GPS.GPSLatitude] = _dms(abs(latitude))
        info[ExifTags.GPS.GPSLongitudeRef] = "E" if longitude >= 0 else "W"
        info[ExifTags.GPS.GPSLongitude] = _dms(abs(longitude))
        info[ExifTags.GPS.GPSAltitudeRef] = b"\x00" if altitude >= 0 else b"\x01"
        info[ExifTags.GPS.GPSAltitude] = IFDRational(round(abs(altitude) * 100), 100)
    return make_image_bytes(seed, exif=exif.tobytes())


def _dms(degrees: float) -> tuple[IFDRational, IFDRational, IFDRational]:
    whole = int(degrees)
    minutes = int((degrees - whole) * 60)
    seconds = (degrees - whole - minutes / 60) * 3600
    return IFDRational(whole, 1), IFDRational(minutes, 1), IFDRational(round(seconds * 10000), 10000)


def stored_files(root: Path) -> list[Path]:
    """Every file under originals/, thumbnails/ and tmp/ of a storage root."""
    return sorted(p for sub in ("originals", "thumbnails", "tmp") for p in (root / sub).rglob("*") if p.is_file())


def temp_files(root: Path) -> list[Path]:
    """Every file under a storage root's tmp/ (on PostgreSQL each replica writes in a folder of its own there)."""
    return sorted(p for p in (root / "tmp").rglob("*") if p.is_file())


async def wait_job(client: httpx.AsyncClient, job_id: str, timeout: float = 120.0) -> dict:
    """Poll a job until it has finished; its final record. The timeout only guards against a hang."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        response = await client.get(f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        job = response.json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        assert asyncio.get_running_loop().time() < deadline, f"job {job_id} did not finish: {job}"
        await asyncio.sleep(0.05)


async def upload_many(client: httpx.AsyncClient, count: int, first_seed: int = 100, **image_args: Any) -> list[dict]:
    """Upload `count` distinct JPEGs in one request; their records in order."""
    files = [
        ("files", (f"img{i}.jpg", make_image_bytes(first_seed + i, **image_args), "image/jpeg")) for i in range(count)
    ]
    response = await client.post("/images", files=files)
    assert response.status_code == 201, response.text
    return [item["image"] for item in response.json()["items"]]


async def sql(settings: Settings, statement: str, **params: object) -> list[tuple[Any, ...]]:
    """Run one statement on the test's database, whichever engine it is (SQLite or PostgreSQL), outside the
    app: what another tool, or a crash, does to the rows. Its rows, if it returns any."""
    from sqlalchemy import text

    from backend.db import create_engine

    engine = create_engine(settings.effective_database_url)
    try:
        async with engine.begin() as connection:
            result = await connection.execute(text(statement), params)
            return [tuple(row) for row in result] if result.returns_rows else []
    finally:
        await engine.dispose()
