from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from backend.deps import ContextDep
from backend.models import VALIDATION_ERROR_RESPONSE, ErrorBody, JobPublic
from backend.services.jobs import job_public
from backend.services.reindex import start_reindex

router = APIRouter(tags=["jobs"], responses=VALIDATION_ERROR_RESPONSE)


@router.post(
    "/reindex",
    response_model=JobPublic,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Re-embed images with the current CLIP model (a job)",
    responses={503: {"model": ErrorBody, "description": "The CLIP model is not available"}},
)
async def reindex(
    ctx: ContextDep,
    response: Response,
    all_images: Annotated[
        bool, Query(alias="all", description="Re-embed every image, not only those another model embedded.")
    ] = False,
) -> JobPublic:
    """Images whose vector another CLIP_MODEL_NAME made (`stale_embeddings` in /health) are read again
    from their originals and embedded and tagged by the current model. Search keeps answering meanwhile."""
    job = job_public(await start_reindex(ctx, all_images=all_images))
    response.headers["Location"] = job.url
    return job
