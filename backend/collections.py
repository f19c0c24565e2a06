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
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO

import torch

from backend.apikeys import DEFAULT_COLLECTION
from backend.config import Settings
from backend.context import AppContext
from backend.db import create_engine, init_schema, session_factory
from backend.executor import Executor
from backend.services.catalog import count_images
from backend.services.imaging import set_pixel_limit
from backend.services.index import IndexService
from backend.services.jobs import JobService
from backend.services.libraries import LibraryWatcher
from backend.services.maintenance import sweep_in_background
from backend.services.model_loader import ModelLoader
from backend.services.pgvector_index import PgVectorIndex
from backend.services.pipeline import ImagePipeline
from backend.services.storage import FileStore
from backend.services.tagging import TagService
from ml.captioner import BlipCaptioner
from ml.embedder import ClipEmbedder
from ml.index import IndexLayout

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no storage lock
    fcntl = None  # type: ignore[assignment]  # the lock is skipped where there is no flock

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

    async def close(self) -> None:
        await self.clip.close()
        await self.blip.close()
        self.executor.shutdown()


def build_shared(settings: Settings) -> Shared:
    """The executor, the pipeline, the model loaders and the tag vocabulary; CLIP starts loading at once
    (CLIP_PRELOAD), so it loads while the collections are opened."""
    set_pixel_limit(settings.max_image_pixels)
    settings.embedding_model  # noqa: B018 - an impossible runtime or precision stops the start here, saying why
    executor = Executor(settings.executor_workers, settings.bulk_niceness)
    # Torch's own intra-op pool sized to the cores; the executor only decides how many calls run at once.
    torch.set_num_threads(executor.workers)
    clip = ModelLoader(
        label="CLIP",
        model_name=settings.clip_model_name,
        loader=partial(
            ClipEmbedder.load,
            settings.clip_model_name,
            settings.clip_device,
            settings.embed_batch_size,
            runtime=settings.inference_runtime,
            precision=settings.inference_precision,
            cache_root=settings.onnx_cache,
            threads=executor.workers,
        ),
        executor=executor,
    )
    blip = ModelLoader(
        label="BLIP",
        model_name=settings.blip_model_name,
        loader=partial(
            BlipCaptioner.load,
            settings.blip_model_name,
            settings.blip_device,
            settings.caption_batch_size,
            settings.caption_max_tokens,
            # BLIP follows an explicit bf16 only: `auto` keeps the captions of full precision.
            "bf16" if settings.inference_precision == "bf16" else "fp32",
        ),
        executor=executor,
    )
    if settings.clip_preload:
        clip.start_loading()
    return Shared(
        settings=settings,
        executor=executor,
        pipeline=ImagePipeline(
            executor=executor,
            max_pixels=settings.max_image_pixels,
            thumbnail_size=settings.thumbnail_size,
            max_bytes=settings.max_decode_bytes,
        ),
        clip=clip,
        blip=blip,
        tags=TagService(
            names=settings.tag_vocabulary,
            per_image=settings.tags_per_image,
            min_score=settings.tag_min_score,
            executor=executor,
        ),
    )


class StorageBusy(Exception):
    """Another process (a running service, a command) works on this STORAGE_ROOT."""


class StorageLock:
    """An exclusive lock on STORAGE_ROOT for as long as a process holds it open. In the embedded mode the
    vector index lives in one process's memory: a second process writing the same storage (a second
    server, or a command-line import while the server runs) would keep a diverging index. The kernel drops
    the lock when the process ends, however it ends, so a crash never leaves it behind."""

    NAME = ".organizer.lock"

    def __init__(self, root: Path, *, shared: bool = False) -> None:
        self.path = root / self.NAME
        self.shared = shared
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        if fcntl is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held open until release()
        try:
            fcntl.flock(handle, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise StorageBusy(
                f"{self.path.parent} is in use by {holder}: stop it first, or do this through its API"
            ) from None
        if not self.shared:
            handle.seek(0)
            handle.truncate()
            handle.write(f"process {os.getpid()}")
            handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor releases the flock
            self._file = None


@asynccontextmanager
async def open_runtime(settings: Settings) -> AsyncIterator[Collections]:
    """Everything one process of the service runs on: the storage lock, the shared parts, the collections.
    The server's lifespan and the command line both use it; on exit every collection is closed and saved."""
    # Beside PostgreSQL, replicas share STORAGE_ROOT: they hold the lock together (an embedded-mode process,
    # whose index is in its own memory, cannot take it while they run, nor they while it does).
    lock = StorageLock(settings.storage_root, shared=settings.uses_postgres)
    lock.acquire()
    try:
        shared = build_shared(settings)
        collections = Collections(shared)
        try:
            yield collections
        finally:
            await collections.close()
            await shared.close()
    finally:
        lock.release()


def collection_schema(name: str) -> str:
    """The PostgreSQL schema of a collection other than `default` (which lives in `public`)."""
    return f"collection_{name}"


def collection_root(settings: Settings, name: str) -> Path:
    return settings.storage_root if name == DEFAULT_COLLECTION else settings.storage_root / "collections" / name


async def open_collection(
    shared: Shared, name: str, *, maintain: bool = True
) -> tuple[AppContext, asyncio.Task[None] | None]:
    """Set up one collection's storage, database, jobs and index; returns it with its orphan-file sweep.

    `maintain` (what a server does): empty tmp/, mark jobs an earlier run left unfinished as failed, load
    the index or rebuild it from the database, save it in the background, sweep unreferenced files. Without
    it (`image-organizer check`) nothing is changed and the index is left unloaded, to be compared as it is.
    """
    settings = shared.settings
    postgres = settings.uses_postgres
    store = FileStore(collection_root(settings, name), replica=settings.replica if postgres else None)
    await shared.executor.run(store.ensure_dirs)
    if maintain:
        swept = await shared.executor.run(store.sweep_tmp)
        if swept:
            log.info("collection %s: removed %d temp files left by an earlier run", name, swept)
    if postgres:
        # One database, a schema per collection: the same tables, no query of one reaches another's rows.
        schema = None if name == DEFAULT_COLLECTION else collection_schema(name)
        engine = create_engine(settings.effective_database_url, schema=schema, pool_size=settings.database_pool_size)
    else:
        schema = None
        url = (
            settings.effective_database_url
            if name == DEFAULT_COLLECTION
            else f"sqlite+aiosqlite:///{store.root / 'organizer.db'}"
        )
        engine = create_engine(url)
    await init_schema(engine, schema=schema)
    sessions = session_factory(engine)
    jobs = JobService(
        sessions,
        concurrency=settings.job_concurrency,
        queue_limit=settings.job_queue_limit,
        retention_days=settings.job_retention_days,
        replica=settings.replica,
        lease_seconds=settings.job_lease_seconds,
        shared=postgres,
    )
    if maintain:
        interrupted = await jobs.recover()
        if interrupted:
            log.warning("collection %s: marked %d jobs an earlier run left unfinished as failed", name, interrupted)
        expired = await jobs.expire()
        if expired:
            log.info("collection %s: deleted %d jobs that finished over JOB_RETENTION_DAYS ago", name, expired)
    index: IndexService | PgVectorIndex
    if postgres:
        index = PgVectorIndex(
            engine=engine,
            sessions=sessions,
            model_name=settings.embedding_model,
            executor=shared.executor,
            m=settings.pgvector_hnsw_m,
            ef_construction=settings.pgvector_ef_construction,
            ef_search=settings.pgvector_ef_search,
        )
    else:
        index = IndexService(
            index_dir=store.index_dir,
            model_name=settings.embedding_model,
            executor=shared.executor,
            save_interval=settings.index_save_interval,
            layout=IndexLayout(settings.index_approximate_from, settings.index_probe_fraction),
        )
    if maintain:
        await index.load_or_rebuild(sessions)
        async with sessions() as session:
            _, stale = await count_images(session, model_name=settings.embedding_model, indexed=await index.size())
        if stale:
            log.warning(
                "collection %s: %d images were embedded by another CLIP model than %r: they are not searched until "
                "POST /reindex re-embeds them",
                name,
                stale,
                settings.embedding_model,
            )
        index.start_autosave()
        jobs.start_leases()
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
    sweep = asyncio.create_task(sweep_in_background(ctx), name=f"sweep-orphan-files-{name}") if maintain else None
    if maintain and settings.library_watch:
        ctx.watcher = LibraryWatcher(ctx)
        ctx.watcher.start()
    return ctx, sweep


class Collections:
    """The open collections; the others open on first use, once, however many requests ask at once."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self._open: dict[str, tuple[AppContext, asyncio.Task[None] | None]] = {}
        self._opening: dict[str, asyncio.Task[tuple[AppContext, asyncio.Task[None] | None]]] = {}

    async def get(self, name: str, *, maintain: bool = True) -> AppContext:
        """The collection, opened first if needed (see open_collection for `maintain`)."""
        if name in self._open:
            return self._open[name][0]
        if name not in self._opening:
            self._opening[name] = asyncio.create_task(
                open_collection(self.shared, name, maintain=maintain), name=f"open-{name}"
            )
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
            if sweep is not None:
                sweep.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sweep
            if ctx.watcher is not None:
                await ctx.watcher.close()
            await ctx.jobs.close()
            await ctx.index.close()
            await ctx.engine.dispose()
        self._open.clear()
