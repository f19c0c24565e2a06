from typing import Annotated

from fastapi import APIRouter, Query

from backend.deps import ContextDep
from backend.models import VALIDATION_ERROR_RESPONSE, TimelinePublic
from backend.routers.params import FilterDep
from backend.services.timeline import Granularity, timeline

router = APIRouter(tags=["images"], responses=VALIDATION_ERROR_RESPONSE)


@router.get("/timeline", response_model=TimelinePublic, summary="Images by year, month or day taken")
async def timeline_route(
    ctx: ContextDep,
    image_filter: FilterDep,
    granularity: Annotated[Granularity, Query(description="How wide a bucket is.")] = "month",
    offset: Annotated[int, Query(ge=0, le=2**63 - 1, description="Buckets to skip.")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000, description="Buckets to answer.")] = 60,
    per_bucket: Annotated[int, Query(ge=0, le=50, description="Newest images shown per bucket.")] = 4,
) -> TimelinePublic:
    """Buckets of the images with a date taken, newest first, each with its count and newest thumbnails;
    the same filters as GET /images."""
    return await timeline(
        ctx, granularity=granularity, image_filter=image_filter, offset=offset, limit=limit, per_bucket=per_bucket
    )
