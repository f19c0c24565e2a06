from fastapi import APIRouter

from backend.deps import ContextDep, SessionDep
from backend.models import Health, IndexHealth, ModelHealth
from backend.services.catalog import count_images
from backend.services.embedding import ModelService
from ml.index import VectorIndex

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health, summary="Service, model and index status")
async def health(ctx: ContextDep, session: SessionDep) -> Health:
    """Always 200 while the process serves; `status` is `degraded` when CLIP could not be loaded (BLIP is
    optional: without it only captions are missing)."""
    images, stale = await count_images(
        session=session, model_name=ctx.settings.clip_model_name, indexed=len(ctx.vectors.index)
    )
    models = ctx.models
    return Health(
        status="degraded" if models.state == "failed" else "ok",
        app=ctx.settings.app_name,
        images=images,
        stale_embeddings=stale,
        index=_index_health(ctx.vectors.index),
        model=_model_health(models),
        captioner=_model_health(ctx.captioner),
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
