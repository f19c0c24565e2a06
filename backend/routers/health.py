from fastapi import APIRouter

from backend.deps import ContextDep, SessionDep
from backend.models import Health, IndexHealth, ModelHealth
from backend.services.catalog import count_images

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health, summary="Service, model and index status")
async def health(ctx: ContextDep, session: SessionDep) -> Health:
    """Always 200 while the process serves; `status` is `degraded` when the model could not be loaded."""
    images, stale = await count_images(session=session, model_name=ctx.settings.clip_model_name)
    models = ctx.models
    return Health(
        status="degraded" if models.state == "failed" else "ok",
        app=ctx.settings.app_name,
        images=images,
        stale_embeddings=stale,
        index=IndexHealth(type=ctx.vectors.index.kind, size=len(ctx.vectors.index), dimension=ctx.vectors.index.dim),
        model=ModelHealth(
            name=models.model_name,
            device=models.device,
            state=models.state,
            loaded=models.state == "loaded",
            error=models.error,
        ),
    )
