"""Grouping images that are not stored (`POST /cluster-images`): receive, embed, cluster, caption, forget."""

from __future__ import annotations

import numpy as np
import torch

from backend.context import AppContext
from backend.errors import DomainError, InvalidInput
from backend.models import UploadCluster, UploadClusters
from backend.services.clustering import RequestedK, choose_captions, cluster, resolve_k
from backend.services.pipeline import PreparedImage
from backend.services.storage import IncomingFile, Receive


def _check_names(files: list[IncomingFile]) -> None:
    """The answer lists images by filename, so every file needs one of its own; a refused file stops all."""
    seen: set[str] = set()
    for item in files:
        if item.error is not None:
            raise item.error.about(item.filename)
        if not item.filename:
            raise InvalidInput("every file needs a filename: the answer lists images by it", code="missing_filename")
        if item.filename in seen:
            raise InvalidInput(
                f"two files are named {item.filename!r}: the answer lists images by filename, so names must differ",
                code="duplicate_filename",
            )
        seen.add(item.filename)


async def cluster_uploads(
    ctx: AppContext, receive: Receive, *, k: RequestedK = None, captions: bool = True
) -> UploadClusters:
    """Group the request's images (k "auto" unless a number is given) and describe each group with BLIP.
    CLIP, and BLIP when captions are asked for, are checked before the body is read."""
    embedder = await ctx.clip.get()
    captioner = await ctx.blip.get() if captions else None
    async with receive() as files:
        _check_names(files)
        paths = [item.staged.path for item in files if item.staged is not None]
        prepared: list[PreparedImage] = []
        for item, outcome in zip(files, await ctx.pipeline.prepare(paths, embedder.preprocess), strict=True):
            if isinstance(outcome, DomainError):
                raise outcome.about(item.filename)
            prepared.append(outcome)
        vectors = await ctx.pipeline.embed(embedder, prepared)
        ids = np.arange(len(files), dtype=np.int64)
        result = await cluster(ctx, vectors, ids, k=resolve_k(k, "auto"), seed=ctx.settings.cluster_seed)
        descriptions: dict[int, str | None] = {}
        if captioner is not None and result.clusters:
            representatives = [int(i) for c in result.clusters for i in c.representative_ids]
            pixels = []
            for i, outcome in zip(
                representatives,
                await ctx.pipeline.prepare([paths[i] for i in representatives], captioner.preprocess),
                strict=True,
            ):
                if isinstance(outcome, DomainError):
                    raise outcome.about(files[i].filename)
                pixels.append(outcome.pixels)
            texts = await ctx.executor.run(captioner.caption_pixels, torch.stack(pixels))
            descriptions = await choose_captions(ctx, result, dict(zip(representatives, texts, strict=True)))
    return UploadClusters(
        clusters=[
            UploadCluster(
                name=c.label,
                image_ids=[files[int(i)].filename for i in c.member_ids],
                description=descriptions.get(c.label) or "",
            )
            for c in result.clusters
        ]
    )
