from typing import Annotated

from fastapi import APIRouter, Query

from backend.deps import ContextDep
from backend.models import VALIDATION_ERROR_RESPONSE, ErrorBody, MapPublic
from backend.services.projection import collection_map

router = APIRouter(tags=["clusters"], responses=VALIDATION_ERROR_RESPONSE)

MAX_POINTS = 100_000


@router.get(
    "/map",
    response_model=MapPublic,
    summary="The collection as points on a plane, coloured by cluster",
    responses={404: {"model": ErrorBody, "description": "No clustering run with this id"}},
)
async def collection_map_route(
    ctx: ContextDep,
    run_id: Annotated[
        int | None,
        Query(ge=1, le=2**63 - 1, description="Label points by this run's clusters; default the newest run."),
    ] = None,
    max_points: Annotated[
        int, Query(ge=1, le=MAX_POINTS, description="Past this many images a seeded sample is drawn.")
    ] = 20_000,
) -> MapPublic:
    """Every searchable image's CLIP vector projected by PCA onto two axes, with its cluster."""
    return await collection_map(ctx, run_id=run_id, max_points=max_points)
