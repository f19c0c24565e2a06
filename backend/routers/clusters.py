from functools import partial
from typing import Annotated, Literal

from fastapi import APIRouter, Body, Path, Query, Request, Response, status
from fastapi.responses import StreamingResponse

from backend.deps import ContextDep
from backend.errors import InvalidParameter
from backend.models import (
    MAX_CLUSTERS,
    VALIDATION_ERROR_RESPONSE,
    ClusterImages,
    ClusterRequest,
    ClusterRunPublic,
    ErrorBody,
    JobPublic,
    Responses,
    UploadClusters,
)
from backend.multipart import multipart_body, receive_uploads
from backend.services import clustering, runs
from backend.services.cluster_uploads import cluster_uploads
from backend.services.export import zip_run
from backend.services.jobs import job_public

router = APIRouter(tags=["clusters"], responses=VALIDATION_ERROR_RESPONSE)

MAX_ID = 2**63 - 1
RunId = Annotated[int, Path(ge=1, le=MAX_ID, description="The clustering run's id.")]
_RUN_NOT_FOUND: Responses = {404: {"model": ErrorBody, "description": "No run (or cluster) with this id"}}
_FAILED: Responses = {
    409: {"model": ErrorBody, "description": "The clustering job did not succeed"},
    503: {"model": ErrorBody, "description": "A model is not available"},
}


def _k(value: str | None) -> int | Literal["auto"] | None:
    """A k from the query string: a number or "auto"; None = KMEANS_CLUSTERS."""
    if value is None:
        return None
    if value == "auto":
        return "auto"
    if not (value.isascii() and value.isdigit() and len(value) <= 6) or not 1 <= int(value) <= MAX_CLUSTERS:
        raise InvalidParameter(f'k must be a number from 1 to {MAX_CLUSTERS}, or "auto"')
    return int(value)


KQuery = Annotated[
    str | None,
    Query(description=f'Number of clusters (1-{MAX_CLUSTERS}) or "auto"; default KMEANS_CLUSTERS.', examples=["auto"]),
]


@router.get("/clusters", response_model=ClusterRunPublic, summary="The latest clustering", responses=_FAILED)
async def latest_clusters(
    ctx: ContextDep,
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
    return await runs.latest_run(ctx, refresh=refresh, k=_k(k), captions=captions, seed=seed)


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
    job = job_public(await clustering.start_run(ctx, k=request.k, captions=request.captions, seed=request.seed))
    response.headers["Location"] = job.url
    return job


@router.get(
    "/clusters/{run_id}", response_model=ClusterRunPublic, summary="One clustering run", responses=_RUN_NOT_FOUND
)
async def get_run(ctx: ContextDep, run_id: RunId) -> ClusterRunPublic:
    return await runs.get_run(ctx, run_id)


@router.get(
    "/clusters/{run_id}/export",
    response_class=StreamingResponse,
    summary="Download the run as a zip: a folder per cluster",
    responses={200: {"content": {"application/zip": {}}}, **_RUN_NOT_FOUND},
)
async def export_run(ctx: ContextDep, run_id: RunId) -> StreamingResponse:
    """One folder per cluster, named from its number and caption, holding the original files under
    their uploaded names, closest to the centroid first. Streamed as it is written."""
    return StreamingResponse(
        await zip_run(ctx, run_id),
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
    ctx: ContextDep,
    run_id: RunId,
    cluster_id: Annotated[int, Path(ge=0, le=MAX_CLUSTERS)],
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> ClusterImages:
    return await runs.get_cluster_images(ctx, run_id, cluster_id, offset=offset, limit=limit)


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
    receive = partial(
        receive_uploads,
        request,
        ctx,
        fields={"files", "file"},
        missing="send images as multipart/form-data in the field `files`",
    )
    return await cluster_uploads(ctx, receive, k=_k(k), captions=captions)
