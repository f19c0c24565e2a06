"""The collection map: every searchable image as a point of a 2-D projection of its CLIP vector,
labelled with its cluster in a clustering run."""

from __future__ import annotations

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from backend.context import AppContext
from backend.models import ClusterMember, ClusterRow, ClusterRun, MapCluster, MapPoint, MapPublic
from backend.services.runs import load_run
from ml.projection import project_2d


async def collection_map(ctx: AppContext, *, run_id: int | None, max_points: int) -> MapPublic:
    """Points for the images in the index (a seeded sample past `max_points`), coloured by `run_id`'s
    clusters, or by the newest run the current CLIP model made when no run is named."""
    async with ctx.sessions() as session:
        run = await _run(session, run_id, ctx.settings.embedding_model)
    total = await ctx.index.size()
    ids, vectors = await ctx.index.sample(max_points, ctx.settings.cluster_seed)
    total = max(total, len(ids))
    points = await ctx.executor.run(project_2d, vectors, seed=ctx.settings.cluster_seed)
    labels: dict[int, int] = {}
    clusters: list[MapCluster] = []
    if run is not None and run.id is not None:
        async with ctx.sessions() as session:
            labels = dict(
                (
                    await session.exec(
                        select(ClusterMember.image_id, ClusterMember.cluster_id).where(ClusterMember.run_id == run.id)
                    )
                ).all()
            )
            rows = (
                await session.exec(
                    select(ClusterRow).where(ClusterRow.run_id == run.id).order_by(col(ClusterRow.cluster_id))
                )
            ).all()
            clusters = [MapCluster(cluster_id=row.cluster_id, caption=row.caption) for row in rows]
    return MapPublic(
        method="pca",
        total=total,
        count=len(ids),
        sampled=len(ids) < total,
        run_id=None if run is None else run.id,
        clusters=clusters,
        points=[
            MapPoint(id=int(i), x=round(float(x), 5), y=round(float(y), 5), cluster=labels.get(int(i)))
            for i, (x, y) in zip(ids.tolist(), points.tolist(), strict=True)
        ],
    )


async def _run(session: AsyncSession, run_id: int | None, model: str) -> ClusterRun | None:
    if run_id is not None:
        return await load_run(session, run_id)
    query = select(ClusterRun).where(ClusterRun.embedding_model == model).order_by(col(ClusterRun.id).desc()).limit(1)
    return (await session.exec(query)).first()
