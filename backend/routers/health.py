from typing import Annotated

from fastapi import APIRouter, Depends, Request

from backend.context import AppContext
from backend.deps import get_context_if_allowed
from backend.models import Health, IndexHealth, ModelHealth
from backend.services.catalog import count_images
from backend.services.embedding import ModelService
from ml.index import VectorIndex

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health, summary="Service, model and index status")
async def health(request: Request, ctx: Annotated[AppContext | None, Depends(get_context_if_allowed)]) -> Health:
    """Always 200 while the process serves, with or without an API key; `status` is `degraded` when CLIP
    could not be loaded (BLIP is optional: without it only captions are missing). The counts are of the
    caller's collection; with API keys required and none given, only the service's state."""
    models, captioner = request.app.state.ctx.models, request.app.state.ctx.captioner
    images = stale = index = None
    if ctx is not None:
        async with ctx.sessions() as session:
            images, stale = await count_images(
                session=session, model_name=ctx.settings.clip_model_name, indexed=len(ctx.vectors.index)
            )
        index = _index_health(ctx.vectors.index)
    return Health(
        status="degraded" if models.state == "failed" else "ok",
        app=request.app.state.ctx.settings.app_name,
        collection=None if ctx is None else ctx.collection,
        images=images,
        stale_embeddings=stale,
        index=index,
        model=_model_health(models),
        captioner=_model_health(captioner),
    )


def _index_health(index: VectorIndex) -> IndexHealth:
    return IndexHealth(
        type=index.kind,
        size=len(index),
        dimension=index.dim,
        approximate=index.approximate,
        reorganizing=index.relayout_running,
    )


def _model_health(service: ModelService) -> ModelHealth:  # type: ignore[type-arg]
    return ModelHealth(
        name=service.model_name,
        device=service.device,
        state=service.state,
        loaded=service.state == "loaded",
        error=service.error,
    )
