"""Decoding and checking uploaded images, reading EXIF, making thumbnails (synchronous, for the executor)."""

from __future__ import annotations

import io
import math
import mmap
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from backend.errors import ImageTooComplexError, ImageTooLargeError, InvalidImageError, UnsupportedFormatError
from backend.services.photo_metadata import PhotoMetadata, read_metadata

try:  # HEIC/HEIF through the maintained pillow-heif plugin; AVIF is built into Pillow.
    from pillow_heif import register_heif_opener

    register_heif_opener()
except ImportError:  # pragma: no cover - the plugin is in requirements.txt
    pass

# Pillow format name -> (MIME type, file extension) of what we accept.
ALLOWED_FORMATS: dict[str, tuple[str, str]] = {
    "JPEG": ("image/jpeg", "jpg"),
    "MPO": ("image/jpeg", "jpg"),  # multi-picture JPEG written by many phones
    "PNG": ("image/png", "png"),
    "WEBP": ("image/webp", "webp"),
    "GIF": ("image/gif", "gif"),
    "BMP": ("image/bmp", "bmp"),
    "TIFF": ("image/tiff", "tif"),
    "HEIF": ("image/heic", "heic"),
    "AVIF": ("image/avif", "avif"),
}


# Files with these extensions are read; others are counted as skipped (folder import, libraries).
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".dib", ".tif", ".tiff", ".heic", ".heif",
     ".avif", ".mpo"}
)  # fmt: skip


@dataclass(frozen=True)
class ImageInfo:
    format: str
    content_type: str
    extension: str
    width: int  # after the EXIF orientation
    height: int
    metadata: PhotoMetadata  # EXIF date, place and camera


@dataclass
class DecodedImage:
    info: ImageInfo
    rgb: Image.Image  # oriented per EXIF, 8-bit RGB


def set_pixel_limit(max_pixels: int) -> None:
    """Align Pillow's own bomb guard (it refuses at twice its limit) with ours; process-wide."""
    Image.MAX_IMAGE_PIXELS = max_pixels


# JPEGs are decoded at the smallest scale (1/2, 1/4 or 1/8) whose shorter side keeps at least this many
# pixels: CLIP's 224 input (ingest asks for the thumbnail size when that is larger). The DCT scaling is
# itself a clean downscale, so the model sees what it would see from the full decode (cosine 0.99999 on the
# bench photos), and the resizes after it get cheaper too.
DECODE_MIN_SIDE = 224

# The work a JPEG asks of the decoder grows with its scans: a progressive file is decoded once per scan, and a
# hostile one can repeat a 95-byte scan thousands of times (an 8000x8000 grey JPEG costs about 40 ms per scan
# on one core, however small the file). Scans are counted from the markers before anything is decoded:
# more than MAX_JPEG_SCANS, or more scans x pixels than MAX_JPEG_SCAN_PIXELS (about a second of decoding; a
# 100-megapixel photo with the 10 scans of a standard progressive encoding fits), is refused.
MAX_JPEG_SCANS = 100
MAX_JPEG_SCAN_PIXELS = 1_000_000_000
# Memory one decode may need: the decoded image and the decoder's own buffer of it (a PNG's rows are inflated
# into one), what its mode is widened to, and for a progressive JPEG the coefficient buffers the decoder keeps
# for the whole image (about 6 bytes a pixel at most). Everything after that works on an image reduced to a
# few hundred pixels a side. At the default MAX_IMAGE_PIXELS (100 million) every mode fits (0.8 GB at most,
# RGBA); an operator who raises the pixel limit meets this one (MAX_DECODE_BYTES).
MAX_DECODE_BYTES = 1_000_000_000
# A JPEG marker: 0xFF and a code that is neither a stuffed zero nor another 0xFF. Fill bytes before it (0xFF
# repeated) need no pattern of their own: the match starts at the last one. A pattern with a fixed first byte
# lets the regex engine skip to each 0xFF at memchr speed: `\xff+` instead cost 55 ms per 3.6 MB photo,
# more than decoding it, and this 3 ms.
_JPEG_MARKER = re.compile(rb"\xff([^\x00\xff])")
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and RSTn carry no length


def jpeg_scans(path: Path) -> int:
    """How many scans (SOS markers) the first image of a JPEG file holds, read from its markers without
    decoding: segment lengths are followed, entropy-coded data is searched for the next marker in C."""
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        scans, position, size = 0, 2, len(data)
        while position < size:
            found = _JPEG_MARKER.search(data, position)
            if found is None:
                break
            code, after = found.group(1)[0], found.end()
            if code == 0xD9:  # EOI: the end of the first image (an MPO's others are never decoded)
                break
            if code in _STANDALONE:
                position = after
                continue
            if code == 0xDA:
                scans += 1
            # The segment's length (big-endian, counting itself); for SOS, its entropy-coded data follows and
            # the search for the next marker skips over it.
            position = after + int.from_bytes(data[after : after + 2], "big")
        return scans


def decode_image(
    path: Path, max_pixels: int, min_side: int | None = DECODE_MIN_SIDE, max_bytes: int = MAX_DECODE_BYTES
) -> DecodedImage:
    """Open, check and decode an image file; raise a 4xx-mapped error for anything unfit. Every byte of the
    image data is decoded (corrupt data is found), but the result may come out scaled down, keeping at least
    `min_side` (a JPEG, through the decoder) or twice that (other formats, by a whole factor) on its shorter
    side; None keeps the full size. The reported width and height are the original's (upright)."""
    with warnings.catch_warnings():
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; we refuse at our own limit.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except UnidentifiedImageError as exc:
            raise InvalidImageError("file is not a recognised image") from exc
        except Image.DecompressionBombError as exc:
            raise ImageTooLargeError(f"image has more than {max_pixels} pixels") from exc
        except Exception as exc:  # Pillow's plugins signal malformed data with many exception types
            raise InvalidImageError(f"image could not be read: {_short(exc)}") from exc
        with image:
            fmt = image.format or ""
            if fmt not in ALLOWED_FORMATS:
                allowed = ", ".join(sorted({f for f in ALLOWED_FORMATS if f != "MPO"}))
                raise UnsupportedFormatError(f"format {fmt or 'unknown'} is not accepted; allowed: {allowed}")
            width, height = image.size
            if width <= 0 or height <= 0:
                raise InvalidImageError("image has no pixels")
            if width * height > max_pixels:
                raise ImageTooLargeError(
                    f"image is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}"
                )
            if fmt in ("JPEG", "MPO"):
                _check_jpeg_work(path, width * height)
            _check_memory(image, fmt, max_bytes)
            try:
                image.seek(0)  # first frame of animations
                if min_side is not None and fmt in ("JPEG", "MPO") and min(width, height) > 2 * min_side:
                    scale = min_side / min(width, height)
                    image.draft(image.mode, (math.ceil(width * scale), math.ceil(height * scale)))
                image.load()
                metadata = read_metadata(image)
                orientation = _orientation(image)
                extrema = _grey_extrema(image) if image.mode in ("I", "F") else None
                rgb = to_rgb(_shrunk(image, min_side), extrema=extrema)
                if orientation is not None:
                    rgb = rgb.transpose(orientation)
                if orientation in _SWAPS_SIDES:
                    width, height = height, width
            except Image.DecompressionBombError as exc:
                raise ImageTooLargeError(f"image has more than {max_pixels} pixels") from exc
            except Exception as exc:
                raise InvalidImageError(f"image data is truncated or corrupt: {_short(exc)}") from exc
    content_type, extension = ALLOWED_FORMATS[fmt]
    info = ImageInfo(fmt, content_type, extension, width, height, metadata)
    return DecodedImage(info=info, rgb=rgb)


def _check_jpeg_work(path: Path, pixels: int) -> None:
    scans = jpeg_scans(path)
    if scans > MAX_JPEG_SCANS or scans * pixels > MAX_JPEG_SCAN_PIXELS:
        raise ImageTooComplexError(
            f"the JPEG holds {scans} scans over {pixels} pixels: decoding it would take too long (at most "
            f"{MAX_JPEG_SCANS} scans and {MAX_JPEG_SCAN_PIXELS} scans x pixels are accepted)"
        )


# EXIF orientation -> the transpose that makes the image upright (what ImageOps.exif_transpose applies).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_SIDES = {
    Image.Transpose.TRANSPOSE,
    Image.Transpose.ROTATE_270,
    Image.Transpose.TRANSVERSE,
    Image.Transpose.ROTATE_90,
}
# Bytes per pixel Pillow holds for a decoded image of each mode (bands are stored 1 or 4 bytes to a pixel).
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
# Modes widened to one Pillow can shrink before anything else happens, and what that adds per pixel.
_WIDENED_BYTES = {"1": 1, "P": 4, "PA": 4, "I;16": 1, "I;16B": 1, "I;16L": 1, "I;16N": 1}


def decode_memory(image: Image.Image, fmt: str) -> int:
    """Bytes a full decode of `image` (opened, not loaded) needs at most, by its size, mode and format."""
    pixels = image.width * image.height
    if fmt in ("JPEG", "MPO"):  # decoded through the scaled-down draft: only the coefficients are full-size
        return pixels * (6 if image.info.get("progressive") or image.info.get("progression") else 1)
    return pixels * (2 * _STORED_BYTES.get(image.mode, 4) + _WIDENED_BYTES.get(image.mode, 0))


def _check_memory(image: Image.Image, fmt: str, max_bytes: int) -> None:
    needed = decode_memory(image, fmt)
    if needed > max_bytes:
        raise ImageTooLargeError(
            f"decoding this {image.width}x{image.height} {fmt} image ({image.mode}) needs about {needed} bytes of "
            f"memory, more than the limit of {max_bytes}"
        )


def _orientation(image: Image.Image) -> Image.Transpose | None:
    try:
        return _TRANSPOSE.get(int(image.getexif().get(ExifTags.Base.Orientation, 1)))
    except Exception:  # a damaged EXIF block: taken as upright
        return None


def _shrunk(image: Image.Image, min_side: int | None) -> Image.Image:
    """The decoded image reduced by a whole factor (a box filter) while its shorter side keeps at least twice
    `min_side`, so every later step (conversion, rotation, thumbnail, model input) works on a small image;
    modes Pillow cannot reduce are widened first."""
    if image.mode == "1":
        image = image.convert("L")
    elif image.mode in ("P", "PA"):
        image = image.convert("RGBA" if image.mode == "PA" or "transparency" in image.info else "RGB")
    elif image.mode.startswith("I;16"):
        image = _sixteen_to_l(image)
    if min_side is None:
        return image
    factor = min(image.size) // (2 * min_side)
    return image.reduce(factor) if factor >= 2 else image


def _grey_extrema(image: Image.Image) -> tuple[float, float]:
    """Lowest and highest value of a one-band image (Pillow computes them without a copy)."""
    low, high = image.getextrema()
    assert isinstance(low, int | float) and isinstance(high, int | float), image.mode
    return float(low), float(high)


def _sixteen_to_l(image: Image.Image) -> Image.Image:
    """16-bit grey -> 8-bit (value / 257), a strip at a time, so no full-size wider copy is made."""
    out = np.empty((image.height, image.width), dtype=np.uint8)
    for top in range(0, image.height, 256):
        strip = np.asarray(image.crop((0, top, image.width, min(image.height, top + 256))), dtype=np.uint32)
        out[top : top + strip.shape[0]] = strip // 257
    return Image.fromarray(out, mode="L")


def to_rgb(image: Image.Image, extrema: tuple[float, float] | None = None) -> Image.Image:
    """Any mode -> 8-bit RGB; transparency is flattened onto white, high bit depths are scaled (16-bit grey by
    1/257; 32-bit grey and float from `extrema`, or the image's own lowest and highest values, to 0-255)."""
    if image.mode.startswith("I;16"):
        return _sixteen_to_l(image).convert("RGB")
    if image.mode in ("I", "F"):
        low, high = extrema or _grey_extrema(image)
        array = np.asarray(image, dtype=np.float32)
        array = (array - low) * (255.0 / (high - low)) if high > low else np.zeros_like(array)
        return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


def make_thumbnail(rgb: Image.Image, size: int) -> bytes:
    """A JPEG no larger than `size` on its longer side (the image itself is left as it is, with no copy)."""
    scale = min(1.0, size / max(rgb.size))
    target = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
    thumb = rgb.resize(target, Image.Resampling.LANCZOS, reducing_gap=2.0) if scale < 1.0 else rgb
    buffer = io.BytesIO()
    thumb.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def perceptual_hash(rgb: Image.Image) -> str:
    """pHash of the picture: 64 bits (16 hex digits) from the low frequencies of its 32x32 grey DCT, which
    re-encoding, resizing and format changes barely move (imagehash's reference implementation)."""
    return str(imagehash.phash(rgb))


def thumbnail_hash(thumbnail: Path | bytes) -> str:
    """The pHash of a thumbnail (a stored file, or the JPEG bytes ingest just made). Every image is hashed
    from its thumbnail, at ingest and when the duplicates scan fills in older images, so that the hashes of
    all images are made the same way, from a small picture that decodes fast."""
    with Image.open(io.BytesIO(thumbnail) if isinstance(thumbnail, bytes) else thumbnail) as thumb:
        return perceptual_hash(thumb.convert("RGB"))


def _short(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__)[:200]
