"""The service's state for /health: the models, and the caller's collection's counts and index."""

from __future__ import annotations

from typing import Any

from backend.context import AppContext
from backend.models import DatabaseHealth, Health, ModelHealth, TowerHealth
from backend.services.catalog import count_images
from backend.services.model_loader import ModelLoader
from ml.captioner import BlipCaptioner
from ml.embedder import ClipEmbedder


async def service_health(default: AppContext, caller: AppContext | None) -> Health:
    """`degraded` when CLIP could not be loaded (BLIP is optional: without it only captions are missing).
    Counts and the index are the caller's collection's; without one (API keys required, none valid), only
    the service's state."""
    images = stale = index = None
    if caller is not None:
        async with caller.sessions() as session:
            images, stale = await count_images(
                session, model_name=caller.settings.embedding_model, indexed=await caller.index.size()
            )
        index = await caller.index.status()
    return Health(
        status="degraded" if default.clip.state == "failed" else "ok",
        app=default.settings.app_name,
        collection=None if caller is None else caller.collection,
        images=images,
        stale_embeddings=stale,
        index=index,
        database=DatabaseHealth(backend=default.settings.database_backend, replica=default.settings.replica),
        model=_model_health(default.clip, detailed=caller is not None),
        captioner=_model_health(default.blip, detailed=caller is not None),
    )


def _model_health(loader: ModelLoader[Any], *, detailed: bool) -> ModelHealth:
    """The model's state and what serves it; its name (a path, maybe), load error and fallback reason only for a
    caller with access."""
    model = loader.loaded
    towers = embedding_model = graphs = fallback = None
    if isinstance(model, ClipEmbedder):
        tower = TowerHealth(runtime=model.runtime, precision=model.precision)
        towers = {"image": tower, "text": tower}
        embedding_model = model.embedding_model if detailed else None
        graphs, fallback = model.graphs, model.fallback if detailed else None
    elif isinstance(model, BlipCaptioner):
        towers = {"captioner": TowerHealth(runtime="torch", precision=model.precision)}
    return ModelHealth(
        name=loader.model_name if detailed else None,
        device=loader.device,
        state=loader.state,
        loaded=loader.state == "loaded",
        error=loader.error if detailed else None,
        towers=towers,
        embedding_model=embedding_model,
        graphs=graphs,
        fallback=fallback,
    )
