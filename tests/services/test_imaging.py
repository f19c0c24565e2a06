"""Decoding rules and file staging, without the app."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.errors import EmptyFileError, FileTooLargeError, ImageTooLargeError, InvalidImageError
from backend.services.imaging import DECODE_MIN_SIDE, decode_image, make_thumbnail, to_rgb
from backend.services.storage import FileStore
from backend.services.uploads import clean_filename
from tests.helpers import make_image_bytes


def write(tmp_path: Path, data: bytes, name: str = "f") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_png_pixel_bomb_is_refused_from_its_header(tmp_path: Path) -> None:
    # A 20000x20000 PNG compresses to a few hundred KB; it must be refused before decoding.
    buffer = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buffer, format="PNG")
    with pytest.raises(ImageTooLargeError):
        decode_image(write(tmp_path, buffer.getvalue()), max_pixels=100_000_000)


def test_image_just_over_the_pixel_limit_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, make_image_bytes(1, fmt="PNG", size=(101, 100)))
    with pytest.raises(ImageTooLargeError):
        decode_image(path, max_pixels=100 * 100)
    assert decode_image(path, max_pixels=101 * 100).info.width == 101


@pytest.mark.parametrize("mode", ["CMYK", "I;16", "I", "F", "LA", "RGBA", "P", "PA", "1", "L"])
def test_every_mode_becomes_8bit_rgb(mode: str) -> None:
    image = Image.new("RGB", (8, 6), (200, 100, 50)).convert(mode)
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    assert rgb.size == (8, 6)


def test_16bit_grey_keeps_its_contrast() -> None:
    image = Image.new("I;16", (4, 1))
    image.putdata([0, 20000, 40000, 65535])
    values = np.asarray(to_rgb(image))[0, :, 0].tolist()
    assert values[0] == 0 and values[-1] == 255
    assert values == sorted(values)


def test_transparent_pixels_are_flattened_onto_white() -> None:
    rgba = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)


def test_thumbnail_keeps_aspect_ratio() -> None:
    data = make_thumbnail(Image.new("RGB", (1000, 500)), 256)
    with Image.open(io.BytesIO(data)) as thumb:
        assert thumb.size == (256, 128)


def test_truncated_png_is_invalid(tmp_path: Path) -> None:
    data = make_image_bytes(2, fmt="PNG", size=(64, 64))
    with pytest.raises(InvalidImageError):
        decode_image(write(tmp_path, data[: len(data) // 2]), max_pixels=10**8)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("photo.jpg", "photo.jpg"),
        ("../../x.jpg", "x.jpg"),
        ("a\x00b\x07.jpg", "ab.jpg"),
        ("", "upload"),
        (None, "upload"),
        ("...", "upload"),
        (".hidden.png", "hidden.png"),
    ],
)
def test_clean_filename(raw: str | None, clean: str) -> None:
    assert clean_filename(raw) == clean


def test_clean_filename_bounds_length_and_keeps_extension() -> None:
    name = clean_filename("n" * 10_000 + ".jpeg")
    assert len(name) == 255
    assert name.endswith(".jpeg")


def test_staging_writer_hashes_and_counts_across_chunks(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    store.ensure_dirs()
    data = bytes(range(256)) * 12_000
    writer = store.open_staging(max_bytes=len(data))
    for start in range(0, len(data), 65_536):
        writer.write(data[start : start + 65_536])
    staged = writer.finish()
    assert staged.sha256 == hashlib.sha256(data).hexdigest()
    assert staged.size == len(data)
    assert staged.path.read_bytes() == data
    assert staged.path.parent == store.tmp_dir


@pytest.mark.parametrize(("data", "error"), [(b"x" * 101, FileTooLargeError), (b"", EmptyFileError)])
def test_staging_refusal_leaves_no_temp_file(tmp_path: Path, data: bytes, error: type[Exception]) -> None:
    store = FileStore(tmp_path)
    store.ensure_dirs()
    writer = store.open_staging(max_bytes=100)
    with pytest.raises(error):
        writer.write(data[:60])
        writer.write(data[60:])
        writer.finish()
    assert list(store.tmp_dir.iterdir()) == []


def test_storage_keys_cannot_leave_the_root(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    with pytest.raises(ValueError):
        store.path("../outside.jpg")


def _large_jpeg(path: Path, size: tuple[int, int], orientation: int = 1) -> bytes:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (size[1] // 50, size[0] // 50, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, format="JPEG", quality=90, exif=exif)
    return path.read_bytes()


def test_large_jpeg_is_decoded_reduced_but_reports_its_own_size(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    _large_jpeg(path, (2400, 1800), orientation=6)  # stored landscape, shown portrait
    decoded = decode_image(path, max_pixels=10**9)
    assert (decoded.info.width, decoded.info.height) == (1800, 2400)
    assert decoded.rgb.height > decoded.rgb.width  # turned upright like the original
    assert min(decoded.rgb.size) >= DECODE_MIN_SIDE and decoded.rgb.width < 1800
    full = decode_image(path, max_pixels=10**9, min_side=None)
    assert full.rgb.size == (1800, 2400)


def test_truncated_large_jpeg_is_refused_even_when_decoded_reduced(tmp_path: Path) -> None:
    path = tmp_path / "cut.jpg"
    data = _large_jpeg(path, (2400, 1800))
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidImageError):
        decode_image(path, max_pixels=10**9)
