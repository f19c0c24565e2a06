from typing import Annotated

from fastapi import APIRouter, Body, Path, Query, Request, Response, status
from fastapi.responses import StreamingResponse

from backend.deps import ContextDep, SessionDep
from backend.errors import AppError
from backend.models import (
    MAX_CLUSTERS,
    VALIDATION_ERROR_RESPONSE,
    ClusterImages,
    ClusterRequest,
    ClusterRunPublic,
    ErrorBody,
    JobPublic,
    UploadClusters,
)
from backend.multipart import multipart_body, receive_uploads
from backend.services import clustering
from backend.services.export import stream_zip
from backend.services.jobs import to_public

router = APIRouter(tags=["clusters"], responses=VALIDATION_ERROR_RESPONSE)

MAX_ID = 2**63 - 1
RunId = Annotated[int, Path(ge=1, le=MAX_ID, description="The clustering run's id.")]
_RUN_NOT_FOUND = {404: {"model": ErrorBody, "description": "No run (or cluster) with this id"}}
_FAILED = {
    409: {"model": ErrorBody, "description": "The clustering job did not succeed"},
    503: {"model": ErrorBody, "description": "A model is not available"},
}


def _k(value: str | None, default: int | str) -> int | None:
    """A k from the query string: a number or "auto"; None = KMEANS_CLUSTERS."""
    if value is None or value == "auto":
        return clustering.resolve_k(value, default)
    if not (value.isascii() and value.isdigit() and len(value) <= 6) or not 1 <= int(value) <= MAX_CLUSTERS:
        raise AppError(
            f'k must be a number from 1 to {MAX_CLUSTERS}, or "auto"', code="validation_error", status_code=422
        )
    return int(value)


KQuery = Annotated[
    str | None,
    Query(description=f'Number of clusters (1-{MAX_CLUSTERS}) or "auto"; default KMEANS_CLUSTERS.', examples=["auto"]),
]


@router.get("/clusters", response_model=ClusterRunPublic, summary="The latest clustering", responses=_FAILED)
async def latest_clusters(
    ctx: ContextDep,
    session: SessionDep,
    refresh: Annotated[bool, Query(description="Compute a new run now, even when one exists.")] = False,
    k: KQuery = None,
    captions: Annotated[
        bool | None, Query(description="Caption the clusters with BLIP (default true when computing).")
    ] = None,
    seed: Annotated[int | None, Query(ge=0, le=2**31 - 1, description="Random seed; default CLUSTER_SEED.")] = None,
) -> ClusterRunPublic:
    """The latest run, at once. A new run is computed first (as a job, visible in /jobs), and this request
    waits for it, when there is none yet, with `refresh=true`, when `k`, `seed` or `captions` are given
    and the latest run was made otherwise, or when the latest run is empty or was made by another CLIP
    model while images embedded by the current one exist. Without parameters, a clustering job already
    queued or running is awaited instead of starting another."""
    chosen_k = _k(k, ctx.settings.kmeans_clusters)
    asked: dict[str, object] = {}  # the parameters the caller gave, as the run fields they must match
    if k is not None:
        asked["k_requested"] = chosen_k  # None for "auto"
    if seed is not None:
        asked["seed"] = seed
    if captions is not None:
        asked["captions"] = captions
    run_id = (
        None
        if refresh
        else await clustering.latest_run_id(
            session, usable_for=len(ctx.vectors.index), model=ctx.settings.clip_model_name, asked=asked
        )
    )
    await session.commit()  # no read transaction stays open while a run is computed
    if run_id is None:
        # Without refresh, a run already on its way is awaited rather than computed twice.
        job = None if refresh or asked else ctx.jobs.active("cluster")
        if job is None:
            job = await clustering.start_run(
                ctx,
                k=chosen_k,
                captions=captions is not False,
                seed=ctx.settings.cluster_seed if seed is None else seed,
            )
        job = await ctx.jobs.wait(job.id)
        if job.status != "succeeded" or job.result is None:
            raise AppError(
                f"clustering {job.status}: {job.error or 'no result'}", code="clustering_failed", status_code=409
            )
        run_id = int(job.result["run_id"])
    return await clustering.get_run(session, run_id)


@router.post(
    "/clusters",
    response_model=JobPublic,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Start a clustering run (a job)",
    responses={400: {"model": ErrorBody, "description": "The body cannot be read as JSON (not UTF-8, say)"}},
)
async def start_clustering(
    ctx: ContextDep, response: Response, request: Annotated[ClusterRequest | None, Body()] = None
) -> JobPublic:
    """Clusters the stored images with MiniBatchKMeans (`k` a number, or "auto" to choose it by
    silhouette) and, with `captions`, writes a BLIP caption per cluster. Poll the returned job; its
    result holds the `run_id`."""
    request = request or ClusterRequest()
    k = clustering.resolve_k(request.k, ctx.settings.kmeans_clusters)
    seed = ctx.settings.cluster_seed if request.seed is None else request.seed
    job = to_public(await clustering.start_run(ctx, k=k, captions=request.captions, seed=seed))
    response.headers["Location"] = job.url
    return job


@router.get(
    "/clusters/{run_id}", response_model=ClusterRunPublic, summary="One clustering run", responses=_RUN_NOT_FOUND
)
async def get_run(session: SessionDep, run_id: RunId) -> ClusterRunPublic:
    return await clustering.get_run(session, run_id)


@router.get(
    "/clusters/{run_id}/export",
    response_class=StreamingResponse,
    summary="Download the run as a zip: a folder per cluster",
    responses={200: {"content": {"application/zip": {}}}, **_RUN_NOT_FOUND},
)
async def export_run(ctx: ContextDep, session: SessionDep, run_id: RunId) -> StreamingResponse:
    """One folder per cluster, named from its number and caption, holding the original files under
    their uploaded names, closest to the centroid first. Streamed as it is written."""
    entries = await clustering.export_run(ctx, session, run_id)
    return StreamingResponse(
        stream_zip(entries, ctx.executor),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="clusters-{run_id}.zip"'},
    )


@router.get(
    "/clusters/{run_id}/{cluster_id}",
    response_model=ClusterImages,
    summary="A cluster's images, closest to its centroid first",
    responses=_RUN_NOT_FOUND,
)
async def cluster_images(
    session: SessionDep,
    run_id: RunId,
    cluster_id: Annotated[int, Path(ge=0, le=MAX_CLUSTERS)],
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> ClusterImages:
    return await clustering.get_cluster_images(session, run_id, cluster_id, offset=offset, limit=limit)


@router.post(
    "/cluster-images",
    response_model=UploadClusters,
    summary="Cluster uploaded images without storing them",
    responses={
        400: {"model": ErrorBody, "description": "A file is not an image, or too many files"},
        413: {"model": ErrorBody, "description": "A file or the request is too large"},
        415: {"model": ErrorBody, "description": "A format outside the allow-list"},
        503: {"model": ErrorBody, "description": "CLIP or BLIP is not available"},
    },
    openapi_extra=multipart_body(files=(True, "The images to group.")),
)
async def cluster_images_stateless(
    request: Request,
    ctx: ContextDep,
    k: KQuery = None,
    captions: Annotated[bool, Query(description="Describe each cluster with BLIP.")] = True,
) -> UploadClusters:
    """Embeds the uploaded images, groups them (automatic k unless `k` is given) and describes each
    group with BLIP. Nothing is stored. `image_ids` are the uploaded filenames."""
    chosen_k = _k(k, "auto")
    await ctx.models.get()
    if captions:
        await ctx.captioner.get()
    async with receive_uploads(
        request, ctx, fields={"files", "file"}, missing="send images as multipart/form-data in the field `files`"
    ) as received:
        return await clustering.cluster_uploads(ctx, received, k=chosen_k, captions=captions)
