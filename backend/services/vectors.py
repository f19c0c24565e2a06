"""Keeps the FAISS index in step with SQLite: load or rebuild at startup, apply changes, save in the background.

SQLite is the source of truth; the index file is a cache of it that can always be rebuilt.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from pathlib import Path

import numpy as np
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from backend.executor import Executor
from backend.models import Image
from ml.index import IndexLayout, VectorIndex

log = logging.getLogger(__name__)
REBUILD_CHUNK = 10_000
# An autosave waits at least this many times as long as the previous save took.
SAVE_TIME_SHARE = 20


def vector_to_blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def blob_to_vector(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f4").astype(np.float32)


class IndexService:
    def __init__(
        self,
        *,
        index_dir: Path,
        model_name: str,
        executor: Executor,
        save_interval: float,
        layout: IndexLayout | None = None,
    ) -> None:
        # One file per model, so vectors of two models never meet in one index.
        tag = hashlib.sha1(model_name.encode()).hexdigest()[:12]
        self.path = index_dir / f"faiss-{tag}.index"
        self.model_name = model_name
        self.layout = layout or IndexLayout()
        self.index = VectorIndex(layout=self.layout)
        self._executor = executor
        self._save_interval = save_interval
        self._dirty = False
        self._save_lock = asyncio.Lock()
        self._autosave: asyncio.Task[None] | None = None
        self._relayout: asyncio.Task[None] | None = None
        self._last_save_seconds = 0.0

    async def load_or_rebuild(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        """Use the saved index when it holds exactly the database's ids; otherwise rebuild it from SQLite.
        The file is read (in the executor) while the database lists its ids."""
        if VectorIndex.remove_leftovers(self.path):
            log.info("removed temp files of an index save that did not finish")
        reading = (
            asyncio.ensure_future(self._executor.run(VectorIndex.load, self.path, self.layout))
            if self.path.exists()
            else None
        )
        async with sessions() as session:
            connection = await session.connection()
            result = await connection.exec_driver_sql(
                "SELECT id FROM image WHERE embedding_model = ?", (self.model_name,)
            )
            db_ids = np.fromiter((row[0] for row in result), dtype=np.int64)
        db_ids.sort()
        if reading is not None:
            try:
                loaded = await reading
                file_ids = np.sort(loaded.ids())
                if np.array_equal(file_ids, db_ids):
                    self.index = loaded
                    log.info("loaded index %s with %d vectors (%s)", self.path.name, len(loaded), loaded.kind)
                    self._maybe_relayout()
                    return
                log.warning(
                    "index %s disagrees with the database (%d vs %d ids): rebuilding",
                    self.path.name,
                    len(file_ids),
                    len(db_ids),
                )
            except Exception as exc:
                log.warning("index %s could not be read (%s): rebuilding", self.path.name, exc)
        else:
            log.info("no index file at %s: building it from the database", self.path)
        await self.rebuild(sessions)

    async def rebuild(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        ids: list[np.ndarray] = []
        vectors: list[np.ndarray] = []
        last_id = 0
        async with sessions() as session:
            while True:
                rows = (
                    await session.exec(
                        select(Image.id, Image.embedding)
                        .where(Image.embedding_model == self.model_name, col(Image.id) > last_id)
                        .order_by(col(Image.id))
                        .limit(REBUILD_CHUNK)
                    )
                ).all()
                if not rows:
                    break
                ids.append(np.array([row[0] for row in rows], dtype=np.int64))
                vectors.append(np.stack([blob_to_vector(row[1]) for row in rows]))
                last_id = int(rows[-1][0])
        all_ids = np.concatenate(ids) if ids else np.empty(0, dtype=np.int64)
        all_vectors = np.concatenate(vectors) if vectors else np.empty((0, 0), dtype=np.float32)
        await self._executor.run(self.index.reset, all_ids, all_vectors)
        self._dirty = True
        await self.save()
        log.info("rebuilt index %s with %d vectors (%s)", self.path.name, len(all_ids), self.index.kind)

    async def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        await self._executor.run(self.index.add, ids, vectors)
        await self._changed()

    async def remove(self, ids: np.ndarray) -> None:
        await self._executor.run(self.index.remove, ids)
        await self._changed()

    async def search(self, queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        return await self._executor.run_query(self.index.search, queries, k)

    async def _changed(self) -> None:
        self._dirty = True
        if self._save_interval <= 0:
            await self.save()
        self._maybe_relayout()

    def _maybe_relayout(self) -> None:
        """Past the layout's thresholds, rebuild the index in the background (searches and changes go on)."""
        if self.index.needs_relayout() and (self._relayout is None or self._relayout.done()):
            self._relayout = asyncio.create_task(self._run_relayout(), name="index-relayout")

    async def _run_relayout(self) -> None:
        before = self.index.kind
        try:
            if await self._executor.run(self.index.relayout):
                log.info("index %s: %s -> %s (%d vectors)", self.path.name, before, self.index.kind, len(self.index))
                await self._changed()
        except Exception:
            log.exception("rebuilding the index in a new layout failed; it keeps its current one")

    async def wait_for_relayout(self) -> None:
        """Until a layout change running in the background has finished (tests, shutdown)."""
        if self._relayout is not None:
            await asyncio.shield(self._relayout)

    async def save(self) -> None:
        async with self._save_lock:
            if not self._dirty:
                return
            self._dirty = False
            started = time.perf_counter()
            try:
                await self._executor.run(self.index.save, self.path)
            except Exception:
                self._dirty = True
                raise
            self._last_save_seconds = time.perf_counter() - started

    def start_autosave(self) -> None:
        if self._save_interval > 0 and self._autosave is None:
            self._autosave = asyncio.create_task(self._autosave_loop(), name="index-autosave")

    def autosave_delay(self) -> float:
        """INDEX_SAVE_INTERVAL, or longer for a large index: saving (about a second per GB) takes at most
        one twentieth of the time, so a long ingest into a million images is not spent rewriting the file.
        What a crash loses in between is rebuilt from SQLite at the next start."""
        return max(self._save_interval, SAVE_TIME_SHARE * self._last_save_seconds)

    async def _autosave_loop(self) -> None:
        while True:
            await asyncio.sleep(self.autosave_delay())
            try:
                await self.save()
            except Exception:
                log.exception("saving the index failed; it will be tried again")

    async def close(self) -> None:
        await self.wait_for_relayout()
        if self._autosave is not None:
            self._autosave.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._autosave
            self._autosave = None
        await self.save()
