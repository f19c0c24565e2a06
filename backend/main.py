"""App factory: settings, lifespan (executor, database, index, model), error handlers, routers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import torch
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from backend.config import Settings, get_settings
from backend.context import AppContext
from backend.db import create_engine, init_schema, session_factory
from backend.errors import install_error_handlers
from backend.executor import Executor
from backend.limits import BodySizeLimitMiddleware, JsonCORSMiddleware
from backend.routers import clusters, health, images, jobs, maps, page, reindex, search, tags
from backend.services.catalog import count_images
from backend.services.embedding import ModelService
from backend.services.imaging import set_pixel_limit
from backend.services.jobs import JobService
from backend.services.maintenance import sweep_in_background
from backend.services.storage import FileStore
from backend.services.tagging import TagService
from backend.services.vectors import IndexService
from ml.captioner import BlipCaptioner
from ml.embedder import ClipEmbedder
from ml.index import IndexLayout

log = logging.getLogger("backend")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    # A no-op when the host (a test runner, say) has configured logging already.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        set_pixel_limit(settings.max_image_pixels)
        executor = Executor(settings.executor_workers, settings.bulk_niceness)
        # Torch's own intra-op pool sized to the cores; the executor only decides how many calls run at once.
        torch.set_num_threads(executor.workers)
        store = FileStore(settings.storage_root)
        store.ensure_dirs()
        swept = store.sweep_tmp()
        if swept:
            log.info("removed %d temp files left by an earlier run", swept)
        engine = create_engine(settings.effective_database_url)
        await init_schema(engine)
        sessions = session_factory(engine)
        models = ModelService(
            label="CLIP",
            model_name=settings.clip_model_name,
            loader=partial(
                ClipEmbedder.load, settings.clip_model_name, settings.clip_device, settings.embed_batch_size
            ),
            executor=executor,
        )
        captioner = ModelService(
            label="BLIP",
            model_name=settings.blip_model_name,
            loader=partial(
                BlipCaptioner.load,
                settings.blip_model_name,
                settings.blip_device,
                settings.caption_batch_size,
                settings.caption_max_tokens,
            ),
            executor=executor,
        )
        jobs = JobService(sessions, concurrency=settings.job_concurrency)
        interrupted = await jobs.recover()
        if interrupted:
            log.warning("marked %d jobs that an earlier run left unfinished as failed", interrupted)
        vectors = IndexService(
            index_dir=store.index_dir,
            model_name=settings.clip_model_name,
            executor=executor,
            save_interval=settings.index_save_interval,
            layout=IndexLayout(settings.index_approximate_from, settings.index_probe_fraction),
        )
        if settings.clip_preload:
            models.start_loading()  # the model loads while the index is read
        await vectors.load_or_rebuild(sessions)
        async with sessions() as session:
            _, stale = await count_images(
                session=session, model_name=settings.clip_model_name, indexed=len(vectors.index)
            )
        if stale:
            log.warning(
                "%d images were embedded by another CLIP model than %r: they are not searched until "
                "POST /reindex re-embeds them",
                stale,
                settings.clip_model_name,
            )
        vectors.start_autosave()
        app.state.ctx = ctx = AppContext(
            settings=settings,
            executor=executor,
            engine=engine,
            sessions=sessions,
            store=store,
            models=models,
            captioner=captioner,
            vectors=vectors,
            tags=TagService(
                names=settings.tag_vocabulary,
                per_image=settings.tags_per_image,
                min_score=settings.tag_min_score,
                executor=executor,
            ),
            jobs=jobs,
        )
        app.state.sweep = asyncio.create_task(sweep_in_background(ctx), name="sweep-orphan-files")
        try:
            yield
        finally:
            app.state.sweep.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await app.state.sweep
            await jobs.close()
            await models.close()
            await captioner.close()
            await vectors.close()
            await engine.dispose()
            executor.shutdown()

    # Swagger UI and ReDoc served from the package's own copies, so /docs works without internet.
    app = FastAPIOffline(
        title=settings.app_name,
        summary="Upload images and find them again by a sentence or by a look-alike picture.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)
    if settings.cors_origins:
        # Added last so it is the outermost layer: preflights and error answers carry the CORS headers too.
        app.add_middleware(
            JsonCORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["*"],
            # The export's filename and a job's URL are readable by the calling page too.
            expose_headers=["Content-Disposition", "Location"],
            max_age=600,
        )
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(images.router)
    app.include_router(search.router)
    app.include_router(clusters.router)
    app.include_router(jobs.router)
    app.include_router(reindex.router)
    app.include_router(tags.router)
    app.include_router(maps.router)
    app.include_router(page.router)
    return app
