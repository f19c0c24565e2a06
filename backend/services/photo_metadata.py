"""What a photo's EXIF says about when, where and with what it was taken (synchronous, for the executor).

Every value is checked before it is kept: EXIF is written by thousands of cameras and apps, and by anyone
who crafts a file, so a damaged or absurd tag loses that one value, never the image. Strings are stripped of
NULs and control characters and cut to `MAX_TEXT`; coordinates outside the globe are dropped.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from PIL import ExifTags, Image

MAX_TEXT = 100
_DATETIME_ORIGINAL = 0x9003
_OFFSET_TIME_ORIGINAL = 0x9011
_MAKE = 0x010F
_MODEL = 0x0110
_LENS_MAKE = 0xA433
_LENS_MODEL = 0xA434
_OFFSET = re.compile(r"^([+-])(\d{2}):?(\d{2})$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class PhotoMetadata:
    taken_at: datetime | None = None  # camera local time, as EXIF stores it
    taken_at_offset: str | None = None  # its UTC offset, "+02:00", when the file names one
    latitude: float | None = None
    longitude: float | None = None
    altitude: float | None = None  # metres above sea level
    camera_make: str | None = None
    camera_model: str | None = None
    lens: str | None = None

    def columns(self) -> dict[str, Any]:
        """The values as the image table's columns of the same names."""
        return asdict(self)


def read_metadata(image: Image.Image) -> PhotoMetadata:
    """The metadata of an opened image; empty when it has no EXIF or an unreadable one."""
    try:
        exif = image.getexif()
        base = dict(exif)
        details = dict(exif.get_ifd(ExifTags.IFD.Exif))
        gps = dict(exif.get_ifd(ExifTags.IFD.GPSInfo))
    except Exception:  # a damaged EXIF block only loses the metadata
        return PhotoMetadata()
    latitude = _coordinate(gps.get(ExifTags.GPS.GPSLatitude), gps.get(ExifTags.GPS.GPSLatitudeRef), "S", 90)
    longitude = _coordinate(gps.get(ExifTags.GPS.GPSLongitude), gps.get(ExifTags.GPS.GPSLongitudeRef), "W", 180)
    if latitude is None or longitude is None:  # half a position is no position
        latitude = longitude = None
    lens = _text(details.get(_LENS_MODEL))
    lens_make = _text(details.get(_LENS_MAKE))
    if lens is not None and lens_make is not None and not lens.lower().startswith(lens_make.lower()):
        lens = f"{lens_make} {lens}"[:MAX_TEXT]
    return PhotoMetadata(
        taken_at=_datetime(details.get(_DATETIME_ORIGINAL) or base.get(_DATETIME_ORIGINAL)),
        taken_at_offset=_offset(details.get(_OFFSET_TIME_ORIGINAL)),
        latitude=latitude,
        longitude=longitude,
        altitude=_altitude(gps.get(ExifTags.GPS.GPSAltitude), gps.get(ExifTags.GPS.GPSAltitudeRef)),
        camera_make=_text(base.get(_MAKE)),
        camera_model=_text(base.get(_MODEL)),
        lens=lens,
    )


def read_file_metadata(path: str) -> PhotoMetadata:
    """The metadata of an image file, read without decoding its pixels."""
    with Image.open(path) as image:
        return read_metadata(image)


def _text(raw: object) -> str | None:
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    if not isinstance(raw, str):
        return None
    cleaned = " ".join(_CONTROL.sub(" ", raw).split())
    return cleaned[:MAX_TEXT] or None


def _datetime(raw: object) -> datetime | None:
    text = _text(raw)
    if text is None:
        return None
    try:
        moment = datetime.strptime(text[:19], "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return None
    return moment if moment.year >= 1800 else None


def _offset(raw: object) -> str | None:
    text = _text(raw)
    match = _OFFSET.match(text or "")
    if match is None:
        return None
    sign, hours, minutes = match.groups()
    if int(hours) > 14 or int(minutes) >= 60:
        return None
    return f"{sign}{hours}:{minutes}"


def _number(raw: object) -> float | None:
    try:
        value = float(raw)  # type: ignore[arg-type]  # IFDRational, int, float; anything else fails
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return value if math.isfinite(value) else None


def _coordinate(raw: object, ref: object, negative: str, limit: float) -> float | None:
    if not isinstance(raw, tuple) or not 1 <= len(raw) <= 3:
        return None
    parts = [_number(part) for part in raw]
    if any(part is None or part < 0 for part in parts):
        return None
    degrees = sum(part / 60**i for i, part in enumerate(parts) if part is not None)
    if isinstance(ref, bytes):
        ref = ref.decode("ascii", errors="replace")
    if isinstance(ref, str) and ref.strip("\x00 ").upper() == negative:
        degrees = -degrees
    return round(degrees, 7) if abs(degrees) <= limit else None


def _altitude(raw: object, ref: object) -> float | None:
    value = _number(raw)
    if value is None or abs(value) > 100_000:
        return None
    below = ref in (1, b"\x01") or (isinstance(ref, bytes) and ref[:1] == b"\x01")
    return round(-value if below else value, 2)
