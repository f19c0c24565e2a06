"""Clustering runs: k-means over the stored CLIP vectors, BLIP captions per cluster, persisted results.

A run is computed by a job and written in one transaction when it is complete, so a cancelled or failed
run leaves nothing behind. Each cluster's caption is chosen among the BLIP captions of its
representatives: the one whose CLIP text vector lies closest to the cluster's centroid.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import torch
from sqlalchemy import delete, func
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from backend.context import AppContext
from backend.errors import AppError, ModelUnavailableError, NotFoundError
from backend.models import (
    ClusterImages,
    ClusterMember,
    ClusterMemberPublic,
    ClusterPublic,
    ClusterRow,
    ClusterRun,
    ClusterRunPublic,
    Image,
    Job,
    UploadCluster,
    UploadClusters,
)
from backend.services.captions import caption_input, caption_stored
from backend.services.catalog import get_images_by_ids, publish
from backend.services.export import ExportEntry, folder_name, unique_name
from backend.services.ingest import IncomingFile, embed_prepared, prepare_image
from backend.services.jobs import JobHandle
from ml.clustering import ClusteringResult, cluster_vectors
from ml.embedder import ClipEmbedder

log = logging.getLogger(__name__)


def resolve_k(requested: int | str | None, default: int | str) -> int | None:
    """A request's k (a number or "auto"; None = the KMEANS_CLUSTERS default) -> a number, or None for auto."""
    value = default if requested is None else requested
    return None if value == "auto" else int(value)


async def start_run(ctx: AppContext, *, k: int | None, captions: bool, seed: int) -> Job:
    params = {"k": "auto" if k is None else k, "captions": captions, "seed": seed}

    async def run(handle: JobHandle) -> dict[str, Any]:
        return await _run(ctx, handle, k=k, captions=captions, seed=seed)

    return await ctx.jobs.submit("cluster", params, run)


async def _run(ctx: AppContext, handle: JobHandle, *, k: int | None, captions: bool, seed: int) -> dict[str, Any]:
    settings = ctx.settings
    await handle.progress(0, 1, "clustering")
    ids, vectors = await ctx.executor.run(ctx.vectors.index.snapshot)
    try:
        result = await ctx.executor.run(
            cluster_vectors,
            vectors,
            ids,
            k=k,
            seed=seed,
            batch_size=settings.kmeans_batch_size,
            k_max=settings.cluster_k_max,
            n_representatives=settings.cluster_representatives,
        )
    except ValueError as exc:
        raise AppError(str(exc), code="invalid_clustering") from exc
    await handle.progress(1, 1, "clustered")

    cluster_captions: dict[int, str | None] = {c.label: None for c in result.clusters}
    caption_error: str | None = None
    caption_model: str | None = None
    if captions and result.clusters:
        representatives = [int(i) for c in result.clusters for i in c.representative_ids]

        async def progress(done: int, total: int) -> None:
            await handle.progress(done, total, "captioning representatives")

        await handle.progress(0, len(representatives), "captioning representatives")
        try:
            by_image = await caption_stored(ctx, representatives, progress=progress)
            caption_model = ctx.captioner.model_name
            cluster_captions = await _choose_captions(ctx, result, by_image)
        except ModelUnavailableError as exc:
            caption_error = exc.detail
            log.warning("clustering without captions: %s", exc.detail)
    handle.checkpoint()
    run = ClusterRun(
        job_id=handle.id,
        embedding_model=ctx.vectors.model_name,
        k=result.k,
        k_requested=result.k_requested,
        seed=seed,
        image_count=int(len(ids)),
        silhouette=result.silhouette,
        captions=captions,
        caption_model=caption_model,
        caption_error=caption_error,
    )
    run_id = await _save(ctx, run, result, cluster_captions)
    return {"run_id": run_id, "k": result.k, "image_count": int(len(ids)), "caption_error": caption_error}


async def _choose_captions(
    ctx: AppContext, result: ClusteringResult, by_image: dict[int, str]
) -> dict[int, str | None]:
    """Per cluster, the representative caption closest to the centroid in CLIP space."""
    chosen: dict[int, str | None] = {}
    options = {
        c.label: [by_image[int(i)] for i in c.representative_ids if by_image.get(int(i))] for c in result.clusters
    }
    texts = sorted({text for found in options.values() for text in found})
    if not texts:
        return {c.label: None for c in result.clusters}
    try:
        embedder: ClipEmbedder | None = await ctx.models.get()
    except ModelUnavailableError:
        embedder = None
    text_vectors = await ctx.executor.run(embedder.embed_texts, texts) if embedder else None
    position = {text: n for n, text in enumerate(texts)}
    for cluster in result.clusters:
        found = options[cluster.label]
        if not found:
            chosen[cluster.label] = None
        elif text_vectors is None or text_vectors.shape[1] != cluster.centroid.shape[0]:
            chosen[cluster.label] = found[0]  # the closest representative's caption
        else:
            scores = text_vectors[[position[text] for text in found]] @ cluster.centroid
            chosen[cluster.label] = found[int(np.argmax(scores))]
    return chosen


# Member rows per INSERT: the event loop serves other requests between chunks of a large run.
MEMBER_CHUNK = 5000


def _kept_members(
    run_id: int, result: ClusteringResult, current: np.ndarray
) -> list[tuple[int, list[tuple[int, int, int, int, float]], list[int]]]:
    """Per cluster: its label, its member rows (run, image, cluster, rank, distance) and representatives,
    leaving out images deleted since the snapshot. Synchronous: 100k members take a while."""
    kept = []
    for cluster in result.clusters:
        alive = np.isin(cluster.member_ids, current)
        ids, distances = cluster.member_ids[alive].tolist(), cluster.distances[alive].tolist()
        rows = [(run_id, i, cluster.label, rank, d) for rank, (i, d) in enumerate(zip(ids, distances, strict=True))]
        alive_ids = set(ids)
        kept.append((cluster.label, rows, [int(i) for i in cluster.representative_ids if int(i) in alive_ids]))
    return kept


async def _save(ctx: AppContext, run: ClusterRun, result: ClusteringResult, captions: dict[int, str | None]) -> int:
    """Write the run, its clusters and members in one transaction; prune old runs."""
    async with ctx.write_lock, ctx.sessions() as session:
        # Images deleted since the snapshot are left out: deletes leave the index under this same lock.
        current = await ctx.executor.run(ctx.vectors.index.ids)
        session.add(run)
        await session.flush()
        assert run.id is not None
        kept = await ctx.executor.run(_kept_members, run.id, result, current)
        for label, rows, representatives in kept:
            session.add(
                ClusterRow(
                    run_id=run.id,
                    cluster_id=label,
                    size=len(rows),
                    caption=captions.get(label),
                    representative_ids=representatives,
                )
            )
        await session.flush()
        connection = await session.connection()
        members = [row for _, rows, _ in kept for row in rows]
        for start in range(0, len(members), MEMBER_CHUNK):
            await connection.exec_driver_sql(
                "INSERT INTO cluster_member (run_id, image_id, cluster_id, rank, distance) VALUES (?, ?, ?, ?, ?)",
                members[start : start + MEMBER_CHUNK],
            )
        keep = select(ClusterRun.id).order_by(col(ClusterRun.id).desc()).limit(ctx.settings.cluster_runs_kept)
        await session.exec(delete(ClusterRun).where(col(ClusterRun.id).not_in(keep)))  # type: ignore[call-overload]
        await session.commit()
        return run.id


async def latest_run_id(session: AsyncSession, *, usable_for: int, model: str, asked: dict[str, object]) -> int | None:
    """The newest run when it still answers the question; None when a new one should be computed: there
    is none, it is empty while `usable_for` images are searchable now, another CLIP model made it while
    this one's vectors exist, or one of the `asked` run fields (`k_requested`, `seed`, `captions`) differs."""
    run = (await session.exec(select(ClusterRun).order_by(col(ClusterRun.id).desc()).limit(1))).first()
    if run is None:
        return None
    stale = usable_for > 0 and (run.image_count == 0 or run.embedding_model != model)
    differs = any(getattr(run, name) != value for name, value in asked.items())
    return None if stale or differs else run.id


async def get_run(session: AsyncSession, run_id: int) -> ClusterRunPublic:
    run = await session.get(ClusterRun, run_id)
    if run is None:
        raise NotFoundError(f"clustering run {run_id} not found", code="run_not_found")
    rows = (
        await session.exec(select(ClusterRow).where(ClusterRow.run_id == run_id).order_by(col(ClusterRow.cluster_id)))
    ).all()
    sizes = dict(
        (
            await session.exec(
                select(ClusterMember.cluster_id, func.count())
                .where(ClusterMember.run_id == run_id)
                .group_by(col(ClusterMember.cluster_id))
            )
        ).all()
    )
    representative_ids = [i for row in rows for i in row.representative_ids]
    images = await get_images_by_ids(session=session, ids=representative_ids)
    public = {p.id: p for p in await publish(session, list(images.values()))}
    clusters = [
        ClusterPublic(
            cluster_id=row.cluster_id,
            size=sizes.get(row.cluster_id, 0),
            caption=row.caption,
            representatives=[public[i] for i in row.representative_ids if i in public],
            images_url=f"/clusters/{run_id}/{row.cluster_id}",
        )
        for row in rows
    ]
    return ClusterRunPublic(
        **run.model_dump(exclude={"id"}),
        id=run_id,
        auto_k=run.k_requested is None,
        export_url=f"/clusters/{run_id}/export",
        clusters=clusters,
    )


async def get_cluster_images(
    session: AsyncSession, run_id: int, cluster_id: int, *, offset: int, limit: int
) -> ClusterImages:
    row = await session.get(ClusterRow, (run_id, cluster_id))
    if row is None:
        if await session.get(ClusterRun, run_id) is None:
            raise NotFoundError(f"clustering run {run_id} not found", code="run_not_found")
        raise NotFoundError(f"run {run_id} has no cluster {cluster_id}", code="cluster_not_found")
    where = (ClusterMember.run_id == run_id, ClusterMember.cluster_id == cluster_id)
    size = (await session.exec(select(func.count()).select_from(ClusterMember).where(*where))).one()
    members = (
        await session.exec(
            select(ClusterMember).where(*where).order_by(col(ClusterMember.rank)).offset(offset).limit(limit)
        )
    ).all()
    images = await get_images_by_ids(session=session, ids=[m.image_id for m in members])
    public = {p.id: p for p in await publish(session, list(images.values()))}
    return ClusterImages(
        run_id=run_id,
        cluster_id=cluster_id,
        caption=row.caption,
        size=size,
        offset=offset,
        limit=limit,
        data=[
            ClusterMemberPublic(image=public[m.image_id], rank=m.rank, distance=m.distance)
            for m in members
            if m.image_id in public
        ],
    )


async def export_run(ctx: AppContext, session: AsyncSession, run_id: int) -> list[ExportEntry]:
    """The files of a run's export: a folder per cluster, the originals under their uploaded names."""
    entries: list[ExportEntry] = []
    taken: dict[int, set[str]] = {}
    for cluster_id, caption, image in await _export_rows(session, run_id):
        name = image.filename
        stored_extension = PurePosixPath(image.storage_key).suffix
        if not PurePosixPath(name).suffix and stored_extension:
            name += stored_extension
        entries.append(
            ExportEntry(
                folder=folder_name(cluster_id + 1, caption),
                name=unique_name(name, taken.setdefault(cluster_id, set())),
                path=ctx.store.path(image.storage_key),
                modified=image.taken_at or image.created_at,
            )
        )
    return entries


async def _export_rows(session: AsyncSession, run_id: int) -> list[tuple[int, str | None, Image]]:
    """(cluster id, caption, image) for every member of a run, cluster by cluster, closest first."""
    if await session.get(ClusterRun, run_id) is None:
        raise NotFoundError(f"clustering run {run_id} not found", code="run_not_found")
    rows = (
        await session.exec(
            select(ClusterMember.cluster_id, ClusterRow.caption, Image)
            .join(Image, col(Image.id) == ClusterMember.image_id)
            .join(
                ClusterRow,
                (col(ClusterRow.run_id) == ClusterMember.run_id)
                & (col(ClusterRow.cluster_id) == ClusterMember.cluster_id),
            )
            .where(ClusterMember.run_id == run_id)
            .order_by(col(ClusterMember.cluster_id), col(ClusterMember.rank))
        )
    ).all()
    return [(cluster_id, caption, image) for cluster_id, caption, image in rows]


async def cluster_uploads(
    ctx: AppContext, files: list[IncomingFile], *, k: int | None, captions: bool
) -> UploadClusters:
    """Cluster images that are not stored: embed, k-means, caption each cluster, forget them."""
    seen: set[str] = set()
    for item in files:
        if item.error is not None:
            raise AppError(
                f"{item.filename}: {item.error.detail}", code=item.error.code, status_code=item.error.status_code
            )
        if not item.filename:
            raise AppError("every file needs a filename: the answer lists images by it", code="missing_filename")
        if item.filename in seen:
            raise AppError(
                f"two files are named {item.filename!r}: the answer lists images by filename, so names must differ",
                code="duplicate_filename",
            )
        seen.add(item.filename)
    embedder = await ctx.models.get()
    captioner = await ctx.captioner.get() if captions else None  # 503 before the work when BLIP is missing
    paths = [item.staged.path for item in files if item.staged is not None]
    prepared = await asyncio.gather(
        *(
            ctx.executor.run(
                prepare_image, path, max_pixels=ctx.settings.max_image_pixels, thumbnail_size=None, embedder=embedder
            )
            for path in paths
        ),
        return_exceptions=True,
    )
    for item, outcome in zip(files, prepared, strict=True):
        if isinstance(outcome, AppError):
            raise AppError(f"{item.filename}: {outcome.detail}", code=outcome.code, status_code=outcome.status_code)
        if isinstance(outcome, BaseException):
            raise outcome
    vectors = await ctx.executor.run(embed_prepared, embedder, [p.pixels for p in prepared])  # type: ignore[union-attr]
    try:
        result = await ctx.executor.run(
            cluster_vectors,
            vectors,
            np.arange(len(files), dtype=np.int64),
            k=k,
            seed=ctx.settings.cluster_seed,
            batch_size=ctx.settings.kmeans_batch_size,
            k_max=ctx.settings.cluster_k_max,
            n_representatives=ctx.settings.cluster_representatives,
        )
    except ValueError as exc:
        raise AppError(str(exc), code="invalid_clustering") from exc
    descriptions: dict[int, str | None] = {}
    if captioner is not None and result.clusters:
        representatives = [int(i) for c in result.clusters for i in c.representative_ids]
        inputs = await asyncio.gather(
            *(
                ctx.executor.run(caption_input, paths[i], ctx.settings.max_image_pixels, captioner)
                for i in representatives
            )
        )
        texts = await ctx.executor.run(captioner.caption_pixels, torch.stack(inputs))
        descriptions = await _choose_captions(ctx, result, dict(zip(representatives, texts, strict=True)))
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
