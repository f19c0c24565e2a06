from typing import Annotated

from fastapi import APIRouter, Query

from backend.deps import ContextDep
from backend.models import VALIDATION_ERROR_RESPONSE, ErrorBody, TrashedImage, TrashEmptied, TrashPublic
from backend.routers.images import MAX_ID, ImageId
from backend.services import trash

router = APIRouter(prefix="/trash", tags=["duplicates"], responses=VALIDATION_ERROR_RESPONSE)


@router.get("", response_model=TrashPublic, summary="What is in the trash, most recently trashed first")
async def list_trash(
    ctx: ContextDep,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> TrashPublic:
    """Trashed images are out of every listing, search, cluster, map and export; their files and vectors
    stay until `purge_at` (TRASH_DAYS after they were trashed), or until the trash is emptied."""
    return await trash.list_trash(ctx, offset=offset, limit=limit)


@router.post(
    "/{image_id}/restore",
    response_model=TrashedImage,
    summary="Take an image out of the trash",
    responses={
        404: {"model": ErrorBody, "description": "No image with this id"},
        409: {"model": ErrorBody, "description": "The image is not in the trash"},
    },
)
async def restore(ctx: ContextDep, image_id: ImageId) -> TrashedImage:
    """Back in listings, searches, clusters, maps and exports, with its tags and caption."""
    return await trash.restore_image(ctx, image_id)


@router.delete("", response_model=TrashEmptied, summary="Empty the trash now")
async def empty_trash(ctx: ContextDep) -> TrashEmptied:
    """Deletes every trashed image for good: its record, vector and stored files. A library's original
    file is never deleted; its record goes, and scans of that library leave the file out from then on."""
    return TrashEmptied(purged=await trash.empty_trash(ctx))
