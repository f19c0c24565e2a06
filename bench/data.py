"""Generated test data: camera-like photos, small PNG and WebP files, and synthetic CLIP-like vector sets."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from bench.models import CACHE

PHOTO_SIZE = (4000, 3000)  # 12 megapixels


def photo_bytes(seed: int, size: tuple[int, int] = PHOTO_SIZE, quality: int = 92) -> bytes:
    """A JPEG like a phone photo: smooth shapes and colour gradients, fine texture and sensor noise
    (2-4 MB at 12 MP), with EXIF orientation and a capture date."""
    rng = np.random.default_rng(seed)
    width, height = size
    # Low-frequency content drawn small and scaled up: sky, ground, a few large shapes.
    small = np.zeros((height // 40, width // 40, 3), dtype=np.float32)
    yy, xx = np.mgrid[0 : small.shape[0], 0 : small.shape[1]].astype(np.float32)
    top, bottom = rng.uniform(40, 230, 3), rng.uniform(20, 200, 3)
    small[:] = top + (bottom - top) * (yy / small.shape[0])[..., None]
    for _ in range(rng.integers(3, 8)):
        cy, cx, r = rng.uniform(0, small.shape[0]), rng.uniform(0, small.shape[1]), rng.uniform(5, 30)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2) < r**2
        small[mask] = rng.uniform(0, 255, 3)
    base = np.asarray(Image.fromarray(small.clip(0, 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC))
    # Texture (leaves, fabric, gravel) and noise: what makes real photos 2-4 MB as JPEG.
    texture = rng.normal(0, 1, (height // 4, width // 4)).astype(np.float32)
    texture = np.asarray(Image.fromarray((texture * 40 + 128).clip(0, 255).astype(np.uint8)).resize(size))
    noise = rng.normal(0, 4, (height, width, 1)).astype(np.float32)
    pixels = base.astype(np.float32) + (texture.astype(np.float32)[..., None] - 128) * 0.35 + noise
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")
    exif = Image.Exif()
    exif[0x0112] = 1  # orientation
    exif[0x0132] = "2024:07:14 09:30:05"
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, exif=exif)
    return buffer.getvalue()


def scene_bytes(seed: int, size: tuple[int, int] = (1000, 750), fmt: str = "PNG") -> bytes:
    """A picture with clear structure (overlapping shapes on a background, softened, with sensor noise), in
    `fmt`: what the duplicates tiers are measured on. PNG by default, so it is the largest of its variants."""
    rng = np.random.default_rng(20_000 + seed)
    width, height = size
    image = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(width // 25, width // 2)), y0 + int(rng.integers(height // 15, height // 2))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
    softened = np.asarray(image.filter(ImageFilter.GaussianBlur(2)), dtype=np.int16)
    noisy = (softened + rng.integers(-12, 13, softened.shape)).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy, "RGB").save(buffer, format=fmt)
    return buffer.getvalue()


def variants(original: bytes) -> dict[str, bytes]:
    """What a collection makes of one photo: re-encodes at quality 50-95, resizes to 25-75 %, PNG and WebP
    conversions and 5 % crops (by name). The duplicates tiers are measured and tested on these."""
    with Image.open(io.BytesIO(original)) as opened:
        picture = opened.convert("RGB")
    width, height = picture.size

    def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **options)
        return buffer.getvalue()

    out = {f"jpeg q{q}": encoded(picture, "JPEG", quality=q) for q in (50, 75, 95)}
    for percent in (25, 50, 75):
        smaller = picture.resize((width * percent // 100, height * percent // 100), Image.Resampling.LANCZOS)
        out[f"resize {percent}%"] = encoded(smaller, "JPEG", quality=85)
    half = picture.resize((width // 2, height // 2), Image.Resampling.LANCZOS)
    out["png 50%"] = encoded(half, "PNG")
    out["webp"] = encoded(picture, "WEBP", quality=80)
    # 5 % of each dimension cut away: from one corner, and evenly around the picture.
    dx, dy = width // 20, height // 20
    out["crop 5% corner"] = encoded(picture.crop((dx, dy, width, height)), "JPEG", quality=90)
    out["crop 5% centred"] = encoded(picture.crop((dx // 2, dy // 2, width - dx // 2, height - dy // 2)), "JPEG")
    return out


def small_bytes(seed: int, fmt: str) -> bytes:
    """A small screenshot-like PNG or WebP (800x600)."""
    rng = np.random.default_rng(10_000 + seed)
    pixels = np.zeros((600, 800, 3), dtype=np.uint8)
    pixels[:] = rng.integers(0, 256, 3)
    for _ in range(12):
        y, x = rng.integers(0, 560), rng.integers(0, 760)
        pixels[y : y + rng.integers(20, 200), x : x + rng.integers(20, 300)] = rng.integers(0, 256, 3)
    pixels = (pixels.astype(np.int16) + rng.integers(-1, 2, pixels.shape)).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def dataset(photos: int, smalls: int, size: tuple[int, int] = PHOTO_SIZE) -> list[tuple[str, bytes]]:
    """(filename, bytes) of `photos` JPEG photos and `smalls` PNG/WebP files; cached on disk."""
    folder = CACHE / f"bench-data-{size[0]}x{size[1]}"
    folder.mkdir(parents=True, exist_ok=True)
    files: list[tuple[str, bytes]] = []
    for i in range(photos):
        path = folder / f"photo-{i:04d}.jpg"
        if not path.exists():
            path.write_bytes(photo_bytes(i, size))
        files.append((path.name, path.read_bytes()))
    for i in range(smalls):
        fmt = "PNG" if i % 2 == 0 else "WEBP"
        path = folder / f"small-{i:04d}.{fmt.lower()}"
        if not path.exists():
            path.write_bytes(small_bytes(i, fmt))
        files.append((path.name, path.read_bytes()))
    return files


def clustered_vectors(n: int, dim: int = 512, groups: int = 50, seed: int = 0) -> np.ndarray:
    """Unit vectors in `groups` loose clusters, like CLIP embeddings of a photo collection (float32)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((groups, dim)).astype(np.float32)
    labels = rng.integers(0, groups, n)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        block = centres[labels[start:stop]] + rng.standard_normal((stop - start, dim)).astype(np.float32) * 1.2
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out
