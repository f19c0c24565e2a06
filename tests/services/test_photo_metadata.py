"""EXIF time, place and camera: read as cameras write them, absurd or damaged values dropped one by one."""

from __future__ import annotations

import io
from datetime import datetime

from PIL import ExifTags, Image
from PIL.TiffImagePlugin import IFDRational

from backend.services.photo_metadata import MAX_TEXT, PhotoMetadata, read_metadata
from tests.helpers import exif_photo, make_image_bytes


def metadata_of(data: bytes) -> PhotoMetadata:
    with Image.open(io.BytesIO(data)) as image:
        return read_metadata(image)


def test_a_camera_photo_gives_its_date_offset_place_and_camera() -> None:
    photo = exif_photo(
        1, taken="2019:12:31 23:59:59", offset="-03:00", gps=(-22.9519, -43.2105, 700.0), make="NIKON", model="Z 6"
    )
    found = metadata_of(photo)
    assert found.taken_at == datetime(2019, 12, 31, 23, 59, 59) and found.taken_at_offset == "-03:00"
    assert (round(found.latitude or 0, 4), round(found.longitude or 0, 4), found.altitude) == (
        -22.9519,
        -43.2105,
        700.0,
    )
    assert (found.camera_make, found.camera_model) == ("NIKON", "Z 6")


def test_no_exif_is_no_metadata() -> None:
    assert metadata_of(make_image_bytes(3)) == PhotoMetadata()
    assert metadata_of(make_image_bytes(3, fmt="PNG")) == PhotoMetadata()


def _crafted(**tags: object) -> bytes:
    exif = Image.Exif()
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    details = exif.get_ifd(ExifTags.IFD.Exif)
    for name, value in tags.items():
        if name.startswith("GPS"):
            gps[getattr(ExifTags.GPS, name)] = value
        elif name == "Model":
            exif[0x0110] = value
        else:
            details[{"DateTimeOriginal": 0x9003, "OffsetTimeOriginal": 0x9011}[name]] = value
    return make_image_bytes(2, exif=exif.tobytes())


def test_absurd_values_are_dropped_one_by_one() -> None:
    found = metadata_of(
        _crafted(
            DateTimeOriginal="0000:00:00 00:00:00",
            OffsetTimeOriginal="+99:00",
            GPSLatitudeRef="N",
            GPSLatitude=(IFDRational(95), IFDRational(0), IFDRational(0)),
            GPSLongitudeRef="E",
            GPSLongitude=(IFDRational(10), IFDRational(0), IFDRational(0)),
            GPSAltitude=IFDRational(1, 0),
            Model="Cam\x00\x07era  " + "x" * 500,
        )
    )
    assert found.taken_at is None and found.taken_at_offset is None
    assert found.latitude is None and found.longitude is None  # half a position is no position
    assert found.altitude is None
    assert found.camera_model is not None and found.camera_model.startswith("Cam era x")
    assert len(found.camera_model) == MAX_TEXT


def test_a_position_without_its_reference_reads_as_north_and_east() -> None:
    found = metadata_of(
        _crafted(
            GPSLatitude=(IFDRational(10), IFDRational(30), IFDRational(0)),
            GPSLongitude=(IFDRational(20), IFDRational(15), IFDRational(0)),
        )
    )
    assert (found.latitude, found.longitude) == (10.5, 20.25)
