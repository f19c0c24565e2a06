from typing import Annotated

from fastapi import APIRouter, Path, Query, Response, status

from backend.deps import ContextDep
from backend.models import VALIDATION_ERROR_RESPONSE, ErrorBody, JobKind, JobPublic, JobsPublic, JobStatus, Responses
from backend.services.jobs import job_public

router = APIRouter(prefix="/jobs", tags=["jobs"], responses=VALIDATION_ERROR_RESPONSE)

JobId = Annotated[str, Path(min_length=1, max_length=64, description="The job's id.")]
_NOT_FOUND: Responses = {404: {"model": ErrorBody, "description": "No job with this id"}}


@router.get("", response_model=JobsPublic, summary="Recent jobs, newest first")
async def list_jobs(
    ctx: ContextDep,
    kind: JobKind | None = None,
    status: JobStatus | None = None,
    offset: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> JobsPublic:
    """Clustering, import, re-embedding and captioning jobs, with their progress and the counts of their
    results; the lists a result holds (failures, ids of images made) are in `GET /jobs/{id}`. Finished
    jobs are kept for JOB_RETENTION_DAYS."""
    jobs, total = await ctx.jobs.list(offset=offset, limit=limit, kind=kind, status=status)
    return JobsPublic(data=[job_public(job, listed=True) for job in jobs], count=total, offset=offset, limit=limit)


@router.get(
    "/{job_id}", response_model=JobPublic, summary="One job: status, progress, result or error", responses=_NOT_FOUND
)
async def get_job(ctx: ContextDep, job_id: JobId) -> JobPublic:
    return job_public(await ctx.jobs.get(job_id))


@router.delete(
    "/{job_id}",
    response_model=JobPublic,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Cancel a job",
    responses={
        200: {"model": JobPublic, "description": "The job was queued and is now cancelled"},
        **_NOT_FOUND,
        409: {"model": ErrorBody, "description": "The job has finished already"},
    },
)
async def cancel_job(ctx: ContextDep, job_id: JobId, response: Response) -> JobPublic:
    """A queued job is cancelled at once (200); a running one stops at its next checkpoint (202,
    `cancel_requested: true`). Work a job finished before it stopped is kept (imported images stay)."""
    job = await ctx.jobs.cancel(job_id)
    if job.status == "cancelled":
        response.status_code = status.HTTP_200_OK
    return job_public(job)
