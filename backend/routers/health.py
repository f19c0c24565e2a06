from fastapi import APIRouter

from backend.deps import DefaultContextDep, OptionalContextDep
from backend.models import Health
from backend.services.health import service_health

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health, summary="Service, model and index status")
async def health(default: DefaultContextDep, ctx: OptionalContextDep) -> Health:
    """Always 200 while the process serves, with or without an API key; `status` is `degraded` when CLIP
    could not be loaded (BLIP is optional: without it only captions are missing). The counts are of the
    caller's collection; with API keys required and none given, only the service's state."""
    return await service_health(default, ctx)
