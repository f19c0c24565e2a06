"""Decoding and checking uploaded images, reading EXIF, making thumbnails (synchronous, for the executor)."""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from backend.errors import ImageTooLargeError, InvalidImageError, UnsupportedFormatError

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
_EXIF_DATETIME_ORIGINAL = 0x9003


@dataclass(frozen=True)
class ImageInfo:
    format: str
    content_type: str
    extension: str
    width: int  # after the EXIF orientation
    height: int
    taken_at: datetime | None


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


def decode_image(path: Path, max_pixels: int, min_side: int | None = DECODE_MIN_SIDE) -> DecodedImage:
    """Open, check and decode an image file; raise a 4xx-mapped error for anything unfit. Every byte of the
    image data is decoded (corrupt data is found), but a JPEG may come out scaled down to `min_side` on its
    shorter side (None: full size). The reported width and height are the original's."""
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
            try:
                image.seek(0)  # first frame of animations
                if min_side is not None and fmt in ("JPEG", "MPO") and min(width, height) > 2 * min_side:
                    scale = min_side / min(width, height)
                    image.draft(image.mode, (math.ceil(width * scale), math.ceil(height * scale)))
                image.load()
                taken_at = _taken_at(image)
                oriented = ImageOps.exif_transpose(image)
                rgb = to_rgb(oriented)
                # After EXIF rotation the original's sides are swapped exactly when the decoded image's are.
                swapped = (oriented.width > oriented.height) != (image.width > image.height)
                width, height = (height, width) if swapped else (width, height)
            except Image.DecompressionBombError as exc:
                raise ImageTooLargeError(f"image has more than {max_pixels} pixels") from exc
            except Exception as exc:
                raise InvalidImageError(f"image data is truncated or corrupt: {_short(exc)}") from exc
    content_type, extension = ALLOWED_FORMATS[fmt]
    info = ImageInfo(fmt, content_type, extension, width, height, taken_at)
    return DecodedImage(info=info, rgb=rgb)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode -> 8-bit RGB; transparency is flattened onto white, high bit depths are scaled."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            array = array / 257.0
        else:
            low, high = float(array.min()), float(array.max())
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
    thumb = rgb.copy()
    thumb.thumbnail((size, size), Image.Resampling.LANCZOS, reducing_gap=2.0)
    buffer = io.BytesIO()
    thumb.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def _taken_at(image: Image.Image) -> datetime | None:
    try:
        exif = image.getexif()
        raw = exif.get_ifd(ExifTags.IFD.Exif).get(_EXIF_DATETIME_ORIGINAL) or exif.get(_EXIF_DATETIME_ORIGINAL)
    except Exception:  # a damaged EXIF block only loses the date
        return None
    if not isinstance(raw, str):
        return None
    try:
        return datetime.strptime(raw.strip().rstrip("\x00"), "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return None


def _short(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__)[:200]
