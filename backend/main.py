"""App factory: settings, lifespan (the runtime: storage lock, executor, models, collections), middleware,
error handlers, routers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi_offline import FastAPIOffline

from backend.apikeys import DEFAULT_COLLECTION, KeyEntry
from backend.collections import open_runtime
from backend.config import Settings, get_settings
from backend.deps import get_context
from backend.errors import install_error_handlers
from backend.middleware import (
    JsonCORSMiddleware,
    RequestBodyMiddleware,
    SecurityHeadersMiddleware,
    SiteGuardMiddleware,
)
from backend.models import ErrorBody, Responses
from backend.routers import (
    clusters,
    duplicates,
    health,
    images,
    jobs,
    libraries,
    maps,
    page,
    reindex,
    search,
    tags,
    timeline,
    trash,
)

log = logging.getLogger("backend")


def log_access(settings: Settings, entries: list[KeyEntry]) -> None:
    """Say at startup whether keys are needed, and which collections on disk no key reaches."""
    on_disk = sorted(p.name for p in (settings.storage_root / "collections").glob("*") if p.is_dir())
    reachable = {entry.collection for entry in entries}
    if reachable:
        log.info("API keys: on, %d keys for collections %s", len(entries), ", ".join(sorted(reachable)))
    else:
        log.warning("API keys: off (API_KEYS is empty): anyone who can reach the service uses the default collection")
    unreachable = [name for name in on_disk if name not in reachable]
    if unreachable:
        log.warning("collections on disk that no key opens (their data stays untouched): %s", ", ".join(unreachable))


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    # A no-op when the host (a test runner, say) has configured logging already.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_runtime(settings) as collections:
            app.state.collections = collections
            # The default collection opens at startup (a single-user install's whole library); others on first use.
            app.state.ctx = await collections.get(DEFAULT_COLLECTION)
            log_access(settings, app.state.key_entries)
            yield

    # Swagger UI and ReDoc served from the package's own copies, so /docs works without internet.
    app = FastAPIOffline(
        title=settings.app_name,
        summary="Upload images and find them again by a sentence or by a look-alike picture.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.add_middleware(
        RequestBodyMiddleware,
        max_bytes=settings.max_request_bytes,
        idle_timeout=settings.request_body_timeout,
        min_rate=settings.request_min_rate,
    )
    app.add_middleware(SiteGuardMiddleware, allowed_hosts=settings.allowed_hosts, allowed_origins=settings.cors_origins)
    app.state.key_entries = settings.key_entries  # parsed once: get_context reads them on every request
    app.add_middleware(SecurityHeadersMiddleware, vary_on_key=bool(app.state.key_entries))
    if settings.cors_origins:
        # Added last so it is the outermost layer: preflights and error answers carry the CORS headers too.
        app.add_middleware(
            JsonCORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PATCH", "DELETE"],  # every method a route answers
            allow_headers=["*"],
            # The export's filename and a job's URL are readable by the calling page too.
            expose_headers=["Content-Disposition", "Location"],
            max_age=600,
        )
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(page.router)
    # Everything else answers only to a valid X-API-Key when API_KEYS is set (get_context checks it).
    protected = [Depends(get_context)]
    unauthorized: Responses = {
        401: {"model": ErrorBody, "description": "API keys are required and no valid X-API-Key was sent"}
    }
    for router in (images, search, timeline, libraries, clusters, jobs, reindex, tags, maps, duplicates, trash):
        app.include_router(router.router, dependencies=protected, responses=unauthorized)
    return app
