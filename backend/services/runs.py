"""Reading clustering runs: a run with its clusters, a cluster's members, the latest run (computed when it no
longer answers the question), and the listing an export writes. Computing a run is `services/clustering.py`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath

from sqlalchemy import func
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from backend.context import AppContext
from backend.errors import ClusteringFailed, ClusterNotFound, RunNotFound
from backend.models import (
    ClusterImages,
    ClusterMember,
    ClusterMemberPublic,
    ClusterPublic,
    ClusterRow,
    ClusterRun,
    ClusterRunPublic,
    Image,
)
from backend.services.catalog import get_images_by_ids, publish
from backend.services.clustering import RequestedK, resolve_k, start_run
from backend.services.filters import in_collection
from backend.services.originals import original_paths


@dataclass(frozen=True)
class MemberFile:
    """One member of a run as an export writes it: its cluster, the cluster's caption, and its original."""

    cluster_id: int
    caption: str | None
    filename: str  # as uploaded
    extension: str  # of the stored original: its decoded format's ("jpg", "png", ...)
    path: Path
    modified: datetime


async def load_run(session: AsyncSession, run_id: int) -> ClusterRun:
    run = await session.get(ClusterRun, run_id)
    if run is None:
        raise RunNotFound(f"clustering run {run_id} not found")
    return run


async def get_run(ctx: AppContext, run_id: int) -> ClusterRunPublic:
    """A run with its clusters (live sizes: deleted images drop out) and their representatives."""
    async with ctx.sessions() as session:
        run = await load_run(session, run_id)
        rows = (
            await session.exec(
                select(ClusterRow).where(ClusterRow.run_id == run_id).order_by(col(ClusterRow.cluster_id))
            )
        ).all()
        sizes = dict(
            (
                await session.exec(
                    select(ClusterMember.cluster_id, func.count())
                    .join(Image, col(Image.id) == ClusterMember.image_id)
                    .where(ClusterMember.run_id == run_id, in_collection())
                    .group_by(col(ClusterMember.cluster_id))
                )
            ).all()
        )
        representative_ids = [i for row in rows for i in row.representative_ids]
        images = await get_images_by_ids(session, representative_ids)
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


async def latest_run(
    ctx: AppContext,
    *,
    refresh: bool = False,
    k: RequestedK = None,
    captions: bool | None = None,
    seed: int | None = None,
) -> ClusterRunPublic:
    """The latest run when it still answers the question; otherwise a new one is computed (as a job) and
    awaited. A new run is needed when there is none, with `refresh`, when `k`, `seed` or `captions` are
    given and the latest run was made otherwise, or when the latest run is empty or another CLIP model
    made it while the current one's vectors exist. Without parameters, a clustering job already on its
    way is awaited rather than starting another. ClusteringFailed when the job does not succeed."""
    asked: dict[str, object] = {}  # the parameters the caller gave, as the run fields they must match
    if k is not None:
        asked["k_requested"] = resolve_k(k, ctx.settings.kmeans_clusters)  # None for "auto"
    if seed is not None:
        asked["seed"] = seed
    if captions is not None:
        asked["captions"] = captions
    run_id = None if refresh else await _answering_run(ctx, asked)
    if run_id is None:
        job = None if refresh or asked else await ctx.jobs.active_anywhere("cluster")
        if job is None:
            job = await start_run(ctx, k=k, captions=captions is not False, seed=seed)
        job = await ctx.jobs.wait(job.id)
        if job.status != "succeeded" or job.result is None:
            raise ClusteringFailed(f"clustering {job.status}: {job.error or 'no result'}")
        run_id = int(job.result["run_id"])
    return await get_run(ctx, run_id)


async def _answering_run(ctx: AppContext, asked: dict[str, object]) -> int | None:
    """The newest run's id, or None when it does not answer (see latest_run)."""
    async with ctx.sessions() as session:
        run = (await session.exec(select(ClusterRun).order_by(col(ClusterRun.id).desc()).limit(1))).first()
    if run is None:
        return None
    searchable = await ctx.index.size()
    stale = searchable > 0 and (run.image_count == 0 or run.embedding_model != ctx.settings.embedding_model)
    differs = any(getattr(run, name) != value for name, value in asked.items())
    return None if stale or differs else run.id


async def get_cluster_images(
    ctx: AppContext, run_id: int, cluster_id: int, *, offset: int, limit: int
) -> ClusterImages:
    """A page of a cluster's images, closest to its centroid first."""
    async with ctx.sessions() as session:
        row = await session.get(ClusterRow, (run_id, cluster_id))
        if row is None:
            await load_run(session, run_id)
            raise ClusterNotFound(f"run {run_id} has no cluster {cluster_id}")
        where = (ClusterMember.run_id == run_id, ClusterMember.cluster_id == cluster_id, in_collection())
        joined = select(ClusterMember).join(Image, col(Image.id) == ClusterMember.image_id).where(*where)
        size = (await session.exec(select(func.count()).select_from(joined.subquery()))).one()
        members = (await session.exec(joined.order_by(col(ClusterMember.rank)).offset(offset).limit(limit))).all()
        images = await get_images_by_ids(session, [m.image_id for m in members])
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


async def member_files(ctx: AppContext, run_id: int) -> list[MemberFile]:
    """Every member of a run, cluster by cluster, closest to the centroid first; RunNotFound first."""
    async with ctx.sessions() as session:
        await load_run(session, run_id)
        rows = (
            await session.exec(
                select(ClusterMember.cluster_id, ClusterRow.caption, Image)
                .join(Image, col(Image.id) == ClusterMember.image_id)
                .join(
                    ClusterRow,
                    (col(ClusterRow.run_id) == ClusterMember.run_id)
                    & (col(ClusterRow.cluster_id) == ClusterMember.cluster_id),
                )
                .where(ClusterMember.run_id == run_id, in_collection())
                .order_by(col(ClusterMember.cluster_id), col(ClusterMember.rank))
            )
        ).all()
        paths = await original_paths(ctx, session, [image for _, _, image in rows])
    found = []
    for (cluster_id, caption, image), path in zip(rows, paths, strict=True):
        found.append(
            MemberFile(
                cluster_id=cluster_id,
                caption=caption,
                filename=image.filename,
                extension=PurePosixPath(image.path or image.storage_key).suffix.removeprefix("."),
                path=path,
                modified=image.taken_at or image.created_at,
            )
        )
    return found
