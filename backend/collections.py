"""Collections: separate image libraries in one service, one per API key's collection name.

Each collection is a whole stack of its own — SQLite database, files, FAISS index, jobs, clustering runs —
so one collection cannot see, find or delete another's images: no query of one can reach the other's
data. What they share is what holds no data of theirs: settings, the executor, the image pipeline, the
model loaders and the tag vocabulary. `default` lives in STORAGE_ROOT (where a single-user install keeps
everything); any other collection in STORAGE_ROOT/collections/<name>, opened on its first request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from backend.apikeys import DEFAULT_COLLECTION
from backend.config import Settings
from backend.context import AppContext
from backend.db import create_engine, init_schema, session_factory
from backend.executor import Executor
from backend.services.catalog import count_images
from backend.services.index import IndexService
from backend.services.jobs import JobService
from backend.services.maintenance import sweep_in_background
from backend.services.model_loader import ModelLoader
from backend.services.pipeline import ImagePipeline
from backend.services.storage import FileStore
from backend.services.tagging import TagService
from ml.captioner import BlipCaptioner
from ml.embedder import ClipEmbedder
from ml.index import IndexLayout

log = logging.getLogger(__name__)


@dataclass
class Shared:
    """What every collection uses and none owns."""

    settings: Settings
    executor: Executor
    # One bulk forward pass at a time across all collections (they share the cores): the pipeline's lock.
    pipeline: ImagePipeline
    clip: ModelLoader[ClipEmbedder]
    blip: ModelLoader[BlipCaptioner]
    tags: TagService


def collection_root(settings: Settings, name: str) -> Path:
    return settings.storage_root if name == DEFAULT_COLLECTION else settings.storage_root / "collections" / name


async def open_collection(shared: Shared, name: str) -> tuple[AppContext, asyncio.Task[None]]:
    """Set up one collection's storage, database, jobs and index; returns it with its orphan-file sweep."""
    settings = shared.settings
    store = FileStore(collection_root(settings, name))
    await shared.executor.run(store.ensure_dirs)
    swept = await shared.executor.run(store.sweep_tmp)
    if swept:
        log.info("collection %s: removed %d temp files left by an earlier run", name, swept)
    url = (
        settings.effective_database_url
        if name == DEFAULT_COLLECTION
        else f"sqlite+aiosqlite:///{store.root / 'organizer.db'}"
    )
    engine = create_engine(url)
    await init_schema(engine)
    sessions = session_factory(engine)
    jobs = JobService(sessions, concurrency=settings.job_concurrency)
    interrupted = await jobs.recover()
    if interrupted:
        log.warning("collection %s: marked %d jobs an earlier run left unfinished as failed", name, interrupted)
    index = IndexService(
        index_dir=store.index_dir,
        model_name=settings.clip_model_name,
        executor=shared.executor,
        save_interval=settings.index_save_interval,
        layout=IndexLayout(settings.index_approximate_from, settings.index_probe_fraction),
    )
    await index.load_or_rebuild(sessions)
    async with sessions() as session:
        _, stale = await count_images(session, model_name=settings.clip_model_name, indexed=index.count)
    if stale:
        log.warning(
            "collection %s: %d images were embedded by another CLIP model than %r: they are not searched until "
            "POST /reindex re-embeds them",
            name,
            stale,
            settings.clip_model_name,
        )
    index.start_autosave()
    ctx = AppContext(
        settings=settings,
        executor=shared.executor,
        pipeline=shared.pipeline,
        engine=engine,
        sessions=sessions,
        store=store,
        index=index,
        jobs=jobs,
        clip=shared.clip,
        blip=shared.blip,
        tags=shared.tags,
        collection=name,
    )
    sweep = asyncio.create_task(sweep_in_background(ctx), name=f"sweep-orphan-files-{name}")
    return ctx, sweep


class Collections:
    """The open collections; the others open on first use, once, however many requests ask at once."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self._open: dict[str, tuple[AppContext, asyncio.Task[None]]] = {}
        self._opening: dict[str, asyncio.Task[tuple[AppContext, asyncio.Task[None]]]] = {}

    async def get(self, name: str) -> AppContext:
        if name in self._open:
            return self._open[name][0]
        if name not in self._opening:
            self._opening[name] = asyncio.create_task(open_collection(self.shared, name), name=f"open-{name}")
        try:
            opened = await asyncio.shield(self._opening[name])
        except BaseException:
            if self._opening.get(name) is not None and self._opening[name].done():
                del self._opening[name]  # a failed open is tried again by the next request
            raise
        self._open.setdefault(name, opened)
        self._opening.pop(name, None)
        return self._open[name][0]

    async def close(self) -> None:
        for task in list(self._opening.values()):
            with contextlib.suppress(BaseException):
                opened = await task
                self._open.setdefault(opened[0].collection, opened)
        for ctx, sweep in self._open.values():
            sweep.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweep
            await ctx.jobs.close()
            await ctx.index.close()
            await ctx.engine.dispose()
        self._open.clear()
