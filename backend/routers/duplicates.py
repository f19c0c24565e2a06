from typing import Annotated

from fastapi import APIRouter, Body, Path, Query, Response, status

from backend.deps import ContextDep
from backend.models import (
    VALIDATION_ERROR_RESPONSE,
    BulkResolveOutcome,
    BulkResolveRequest,
    DuplicatesPublic,
    DuplicateTier,
    ErrorBody,
    JobPublic,
    ResolveOutcome,
    ResolveRequest,
)
from backend.routers.images import MAX_ID
from backend.services import duplicates
from backend.services.jobs import job_public

router = APIRouter(prefix="/duplicates", tags=["duplicates"], responses=VALIDATION_ERROR_RESPONSE)

GroupId = Annotated[
    str,
    Path(
        pattern=r"^(exact|same_picture|similar)-[0-9]{1,19}$",
        max_length=40,
        description="A group's id from GET /duplicates, as same_picture-12.",
    ),
]


@router.get("", response_model=DuplicatesPublic, summary="Groups of duplicates, largest first")
async def list_duplicates(
    ctx: ContextDep,
    tier: Annotated[DuplicateTier | None, Query(description="Only this tier; all three when left out.")] = None,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
) -> DuplicatesPublic:
    """Each group has its tier (`exact`: the same bytes in several places; `same_picture`: re-encoded,
    resized, converted or cropped copies, by perceptual hash and CLIP together; `similar`: near-identical
    shots), the evidence, the suggested keeper with the reason in words, and the pairwise scores. Groups
    come from the last `POST /duplicates/scan` and from each image ingested since."""
    return await duplicates.list_groups(ctx, tier=tier, offset=offset, limit=limit)


@router.post(
    "/scan",
    response_model=JobPublic,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Look for duplicates in the whole collection (a job)",
)
async def scan(ctx: ContextDep, response: Response) -> JobPublic:
    """Hashes older images that have no perceptual hash yet, then asks the vector index for each image's
    close neighbours (a range search, never all pairs). New images are checked as they arrive anyway: a
    scan is for a collection stored before, or after the thresholds changed."""
    job = job_public(await duplicates.start_scan(ctx))
    response.headers["Location"] = job.url
    return job


@router.post(
    "/resolve",
    response_model=BulkResolveOutcome,
    summary="Keep each group's suggested keeper and trash the rest",
    responses={400: {"model": ErrorBody, "description": "The body cannot be read as JSON (not UTF-8, say)"}},
)
async def resolve_many(ctx: ContextDep, request: Annotated[BulkResolveRequest, Body()]) -> BulkResolveOutcome:
    """For up to `limit` groups of the tier, largest first. With `dry_run` nothing changes: the answer says
    what would be kept and trashed. With `plan` (a dry run's `groups` sent back), exactly those groups, each
    only if its members are unchanged; the others are listed in `skipped`. Trashed images can be restored
    (POST /trash/{id}/restore)."""
    return await duplicates.resolve_many(ctx, request)


@router.post(
    "/{group_id}/resolve",
    response_model=ResolveOutcome,
    summary="Keep some of a group and trash the rest, or keep them all",
    responses={
        400: {
            "model": ErrorBody,
            "description": "Neither or both of keep and keep_all, ids not in the group, or a body that is not JSON",
        },
        409: {"model": ErrorBody, "description": "A member to keep was trashed meanwhile (group_changed)"},
        404: {"model": ErrorBody, "description": "No such group now"},
    },
)
async def resolve(ctx: ContextDep, group_id: GroupId, request: Annotated[ResolveRequest, Body()]) -> ResolveOutcome:
    """`{"keep": [ids]}` moves the group's other members to the trash. `{"keep_all": true}` records that
    these are not duplicates: the group stays hidden through rescans and restarts until a new image joins."""
    return await duplicates.resolve(ctx, group_id, request)
