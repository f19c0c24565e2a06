"""Computing clustering runs: k-means over the stored CLIP vectors, BLIP captions per cluster, saved at the end.

A run is computed by a job and written in one transaction when it is complete, so a cancelled or failed
run leaves nothing behind. Each cluster's caption is chosen among the BLIP captions of its
representatives: the one whose CLIP text vector lies closest to the cluster's centroid. Reading runs is
`services/runs.py`; clustering uploaded files without storing them is `services/cluster_uploads.py`.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
from sqlalchemy import delete, insert
from sqlmodel import col, select

from backend.context import AppContext
from backend.errors import InvalidClustering, ModelUnavailableError
from backend.models import ClusterMember, ClusterRow, ClusterRun, Job
from backend.services.captions import caption_stored
from backend.services.jobs import JobHandle
from ml.clustering import ClusteringResult, cluster_vectors
from ml.embedder import ClipEmbedder

log = logging.getLogger(__name__)
# A requested k: a number, "auto" (chosen by silhouette), or None for the KMEANS_CLUSTERS default.
RequestedK = int | Literal["auto"] | None


def resolve_k(requested: RequestedK, default: int | Literal["auto"]) -> int | None:
    """A request's k -> a number, or None for auto."""
    value = default if requested is None else requested
    return None if value == "auto" else int(value)


async def cluster(
    ctx: AppContext, vectors: np.ndarray, ids: np.ndarray, *, k: int | None, seed: int
) -> ClusteringResult:
    """k-means (or the best k by silhouette) over unit vectors, in the executor, with the collection's settings."""
    settings = ctx.settings
    try:
        return await ctx.executor.run(
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
        raise InvalidClustering(str(exc)) from exc


async def start_run(ctx: AppContext, *, k: RequestedK = None, captions: bool = True, seed: int | None = None) -> Job:
    """Queue a clustering job over the collection (defaults from KMEANS_CLUSTERS and CLUSTER_SEED)."""
    chosen_k = resolve_k(k, ctx.settings.kmeans_clusters)
    chosen_seed = ctx.settings.cluster_seed if seed is None else seed
    params = {"k": "auto" if chosen_k is None else chosen_k, "captions": captions, "seed": chosen_seed}

    async def run(handle: JobHandle) -> dict[str, Any]:
        return await _run(ctx, handle, k=chosen_k, captions=captions, seed=chosen_seed)

    return await ctx.jobs.submit("cluster", params, run)


async def _run(ctx: AppContext, handle: JobHandle, *, k: int | None, captions: bool, seed: int) -> dict[str, Any]:
    await handle.progress(0, 1, "clustering")
    ids, vectors = await ctx.index.snapshot()
    result = await cluster(ctx, vectors, ids, k=k, seed=seed)
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
            caption_model = ctx.blip.model_name
            cluster_captions = await choose_captions(ctx, result, by_image)
        except ModelUnavailableError as exc:
            caption_error = exc.detail
            log.warning("clustering without captions: %s", exc.detail)
    handle.checkpoint()
    run = ClusterRun(
        job_id=handle.id,
        embedding_model=ctx.index.model_name,
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


async def choose_captions(ctx: AppContext, result: ClusteringResult, by_image: dict[int, str]) -> dict[int, str | None]:
    """Per cluster, the representative caption closest to the centroid in CLIP space."""
    chosen: dict[int, str | None] = {}
    options = {
        c.label: [by_image[int(i)] for i in c.representative_ids if by_image.get(int(i))] for c in result.clusters
    }
    texts = sorted({text for found in options.values() for text in found})
    if not texts:
        return {c.label: None for c in result.clusters}
    try:
        embedder: ClipEmbedder | None = await ctx.clip.get()
    except ModelUnavailableError:
        embedder = None
    text_vectors = await ctx.executor.run(embedder.embed_texts, texts) if embedder else None
    position = {text: n for n, text in enumerate(texts)}
    for found_cluster in result.clusters:
        found = options[found_cluster.label]
        if not found:
            chosen[found_cluster.label] = None
        elif text_vectors is None or text_vectors.shape[1] != found_cluster.centroid.shape[0]:
            chosen[found_cluster.label] = found[0]  # the closest representative's caption
        else:
            scores = text_vectors[[position[text] for text in found]] @ found_cluster.centroid
            chosen[found_cluster.label] = found[int(np.argmax(scores))]
    return chosen


# Member rows per INSERT: the event loop serves other requests between chunks of a large run.
MEMBER_CHUNK = 5000
MemberRow = tuple[int, int, int, int, float]  # run, image, cluster, rank, distance


def _kept_members(
    run_id: int, result: ClusteringResult, current: np.ndarray
) -> list[tuple[int, list[MemberRow], list[int]]]:
    """Per cluster: its label, its member rows and representatives, leaving out images deleted since the
    snapshot. Synchronous: 100k members take a while."""
    kept = []
    for found in result.clusters:
        alive = np.isin(found.member_ids, current)
        ids, distances = found.member_ids[alive].tolist(), found.distances[alive].tolist()
        rows = [(run_id, i, found.label, rank, d) for rank, (i, d) in enumerate(zip(ids, distances, strict=True))]
        alive_ids = set(ids)
        kept.append((found.label, rows, [int(i) for i in found.representative_ids if int(i) in alive_ids]))
    return kept


async def _save(ctx: AppContext, run: ClusterRun, result: ClusteringResult, captions: dict[int, str | None]) -> int:
    """Write the run, its clusters and members in one transaction; prune old runs."""
    async with ctx.write_lock, ctx.sessions() as session:
        # Images deleted since the snapshot are left out: deletes leave the index under this same lock.
        current = await ctx.index.ids()
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
        fields = ("run_id", "image_id", "cluster_id", "rank", "distance")
        members = [dict(zip(fields, row, strict=True)) for _, rows, _ in kept for row in rows]
        table = ClusterMember.__table__  # type: ignore[attr-defined]
        for start in range(0, len(members), MEMBER_CHUNK):  # Core executemany: portable and fast on both engines
            await connection.execute(insert(table), members[start : start + MEMBER_CHUNK])
        keep = select(ClusterRun.id).order_by(col(ClusterRun.id).desc()).limit(ctx.settings.cluster_runs_kept)
        await session.exec(delete(ClusterRun).where(col(ClusterRun.id).not_in(keep)))
        await session.commit()
        return run.id
