"""The image pipeline every caller shares: decode, orient, thumbnail, preprocess, embed.

Uploads, folder imports, re-embedding, clustering of uploaded files, search by image and captioning all go
through it. `prepare` decodes many files in parallel on the executor and returns, per file, what was made
of it or the error that file alone ran into; `embed` turns prepared images into unit vectors in one batched
forward pass. Bulk work runs in the bulk lane, one forward pass at a time across the service; a search's
query image runs in the query lane.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from backend.errors import DomainError
from backend.executor import Executor
from backend.services.imaging import (
    DECODE_MIN_SIDE,
    MAX_DECODE_BYTES,
    ImageInfo,
    decode_image,
    make_thumbnail,
    thumbnail_hash,
)
from ml.embedder import ClipEmbedder

# A model's preprocessing: RGB images -> (n, 3, H, W) pixel tensor (CLIP's or BLIP's `preprocess`).
Preprocess = Callable[[Sequence[Image.Image]], torch.Tensor]


@dataclass
class PreparedImage:
    """What is kept of a decoded file: its metadata, thumbnail bytes (empty unless asked for) and model input."""

    info: ImageInfo
    thumbnail: bytes
    pixels: torch.Tensor
    phash: str | None = None  # made with the thumbnail: what ingest stores


def prepare_image(
    path: Path,
    *,
    preprocess: Preprocess,
    max_pixels: int,
    max_bytes: int = MAX_DECODE_BYTES,
    min_side: int = DECODE_MIN_SIDE,
    thumbnail_size: int | None = None,
) -> PreparedImage:
    """Decode, check, thumbnail (when a size is given) and preprocess one file. Synchronous: runs in the executor."""
    decoded = decode_image(path, max_pixels, min_side=min_side, max_bytes=max_bytes)
    thumbnail = make_thumbnail(decoded.rgb, thumbnail_size) if thumbnail_size else b""
    phash = thumbnail_hash(thumbnail) if thumbnail else None
    return PreparedImage(info=decoded.info, thumbnail=thumbnail, pixels=preprocess([decoded.rgb])[0], phash=phash)


def embed_prepared(embedder: ClipEmbedder, pixels: list[torch.Tensor]) -> np.ndarray:
    """One batched forward pass over preprocessed images; (n, dim) unit vectors. Synchronous."""
    if not pixels:
        return np.empty((0, embedder.dim), dtype=np.float32)
    return embedder.embed_pixels(torch.stack(pixels))


class ImagePipeline:
    """Shared by every collection: it holds no data, only the executor, the limits and the forward-pass lock."""

    def __init__(
        self, *, executor: Executor, max_pixels: int, thumbnail_size: int, max_bytes: int = MAX_DECODE_BYTES
    ) -> None:
        self.executor = executor
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.thumbnail_size = thumbnail_size
        # One bulk forward pass at a time: two would split the cores between them and finish no sooner, while
        # the other executor worker can decode the next batch meanwhile.
        self.bulk_forward = asyncio.Lock()

    async def prepare(
        self, paths: Sequence[Path], preprocess: Preprocess, *, thumbnails: bool = False, query: bool = False
    ) -> list[PreparedImage | DomainError]:
        """Per path, in order: the prepared image, or the domain error that file ran into (not an image,
        too many pixels, corrupt...). With `thumbnails`, JPEGs are decoded no smaller than the thumbnail."""
        thumbnail_size = self.thumbnail_size if thumbnails else None
        run = self.executor.run_query if query else self.executor.run

        async def one(path: Path) -> PreparedImage | DomainError:
            try:
                return await run(
                    prepare_image,
                    path,
                    preprocess=preprocess,
                    max_pixels=self.max_pixels,
                    max_bytes=self.max_bytes,
                    min_side=max(DECODE_MIN_SIDE, thumbnail_size or 0),
                    thumbnail_size=thumbnail_size,
                )
            except DomainError as exc:
                return exc

        return list(await asyncio.gather(*(one(path) for path in paths)))

    async def embed(
        self, embedder: ClipEmbedder, prepared: Sequence[PreparedImage], *, query: bool = False
    ) -> np.ndarray:
        """CLIP vectors of prepared images, (n, dim), L2-normalised, in order."""
        pixels = [item.pixels for item in prepared]
        if query:
            return await self.executor.run_query(embed_prepared, embedder, pixels)
        async with self.bulk_forward:
            return await self.executor.run(embed_prepared, embedder, pixels)
