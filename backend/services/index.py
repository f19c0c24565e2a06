"""The vector index of one collection, behind the operations its callers need.

`IndexService` keeps the FAISS index (`ml.index.VectorIndex`, private to it) in step with SQLite: load or
rebuild at startup, apply changes, save in the background, switch layouts as the collection grows. SQLite is
the source of truth; the index file is a cache of it that can always be rebuilt. Callers search, add,
remove, count, list ids, take snapshots and samples, and read its status; none of them touches FAISS.
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
from backend.models import Image, IndexHealth
from backend.services.filters import in_collection
from ml.index import IndexLayout, VectorIndex

log = logging.getLogger(__name__)
REBUILD_CHUNK = 10_000
# An autosave waits at least this many times as long as the previous save took.
SAVE_TIME_SHARE = 20


def vector_to_blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def blob_to_vector(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f4").astype(np.float32)


def stored_vector(blob: bytes, dim: int) -> np.ndarray | None:
    """The vector a row stores, or None when its blob is damaged (not `dim` finite float32 values)."""
    if len(blob) != 4 * dim or dim <= 0:
        return None
    vector = blob_to_vector(blob)
    return vector if bool(np.isfinite(vector).all()) else None


def index_file(index_dir: Path, model_name: str) -> Path:
    """One file per model, so vectors of two models never meet in one index."""
    tag = hashlib.sha1(model_name.encode()).hexdigest()[:12]
    return index_dir / f"faiss-{tag}.index"


class IndexService:
    """Search and changes run in the executor (searches in the query lane); changes are serialised by the
    index's own lock, searches run concurrently."""

    def __init__(
        self,
        *,
        index_dir: Path,
        model_name: str,
        executor: Executor,
        save_interval: float,
        layout: IndexLayout | None = None,
    ) -> None:
        self.path = index_file(index_dir, model_name)
        self.model_name = model_name
        self.layout = layout or IndexLayout()
        self._index = VectorIndex(layout=self.layout)
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
        db_ids = await self.database_ids(sessions)
        if reading is not None:
            try:
                loaded = await reading
                file_ids = np.sort(loaded.ids())
                if np.array_equal(file_ids, db_ids):
                    self._index = loaded
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

    async def database_ids(self, sessions: async_sessionmaker[AsyncSession]) -> np.ndarray:
        """The ids of the rows the current model embedded, sorted: what the index must hold."""
        async with sessions() as session:
            connection = await session.connection()
            result = await connection.execute(
                select(Image.id).where(Image.embedding_model == self.model_name, in_collection())
            )
            db_ids = np.fromiter((row[0] for row in result), dtype=np.int64)
        db_ids.sort()
        return db_ids

    async def saved_ids(self) -> np.ndarray:
        """The ids the saved index file holds, sorted, read as it is; raises when it is missing or unreadable."""
        loaded = await self._executor.run(VectorIndex.load, self.path, self.layout)
        return np.sort(loaded.ids())

    async def rebuild(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        """Build the index from the vectors stored in SQLite and save it. A stored vector that cannot be
        used (damaged: the wrong length, or not finite) is left out, with a warning, rather than stopping
        the service; `image-organizer check --repair` re-embeds such images."""
        ids: list[np.ndarray] = []
        vectors: list[np.ndarray] = []
        last_id = 0
        dim: int | None = None
        broken = 0
        async with sessions() as session:
            while True:
                rows = (
                    await session.exec(
                        select(Image.id, Image.embedding, Image.embedding_dim)
                        .where(
                            Image.embedding_model == self.model_name,
                            in_collection(),
                            col(Image.id) > last_id,
                        )
                        .order_by(col(Image.id))
                        .limit(REBUILD_CHUNK)
                    )
                ).all()
                if not rows:
                    break
                last_id = int(rows[-1][0] or 0)
                decoded = [(int(row[0] or 0), stored_vector(row[1], row[2])) for row in rows]
                if dim is None:
                    dim = next((len(v) for _, v in decoded if v is not None), None)
                usable = [(i, v) for i, v in decoded if v is not None and len(v) == dim]
                broken += len(decoded) - len(usable)
                if usable:
                    ids.append(np.array([i for i, _ in usable], dtype=np.int64))
                    vectors.append(np.stack([v for _, v in usable]))
        all_ids = np.concatenate(ids) if ids else np.empty(0, dtype=np.int64)
        all_vectors = np.concatenate(vectors) if vectors else np.empty((0, 0), dtype=np.float32)
        await self._executor.run(self._index.reset, all_ids, all_vectors)
        self._dirty = True
        await self.save()
        log.info("rebuilt index %s with %d vectors (%s)", self.path.name, len(all_ids), self._index.kind)
        if broken:
            log.warning(
                "%d images have a damaged stored vector and are not searchable: image-organizer check --repair "
                "re-embeds them",
                broken,
            )

    async def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        await self._executor.run(self._index.add, ids, vectors)
        await self._changed()

    async def remove(self, ids: np.ndarray) -> None:
        await self._executor.run(self._index.remove, ids)
        await self._changed()

    async def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> list[list[tuple[int, float]]]:
        """Per query, up to k (id, cosine) pairs, best first; only `allowed` ids when given."""
        return await self._executor.run_query(self._index.search, queries, k, allowed)

    async def range_search(self, queries: np.ndarray, threshold: float, cap: int) -> list[list[tuple[int, float]]]:
        """Per query, the (id, cosine) pairs at or above `threshold`, best first, at most `cap`."""
        return await self._executor.run(self._index.range_search, queries, threshold, cap)

    @property
    def count(self) -> int:
        """Vectors in the index: exactly the current model's images."""
        return len(self._index)

    async def size(self) -> int:
        """`count`, as every kind of index answers it (pgvector's asks the database)."""
        return len(self._index)

    async def ids(self) -> np.ndarray:
        return await self._executor.run(self._index.ids)

    async def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """Every (id, vector) pair at this moment, as (n,) int64 and (n, dim) float32 arrays."""
        return await self._executor.run(self._index.snapshot)

    async def sample(self, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """At most `size` (id, vector) pairs: all of them, or a seeded sample in index order."""
        return await self._executor.run(self._index.sample, size, seed)

    async def status(self) -> IndexHealth:
        return IndexHealth(
            type=self._index.kind,
            size=len(self._index),
            dimension=self._index.dim,
            approximate=self._index.approximate,
            reorganizing=self._index.relayout_running,
        )

    async def _changed(self) -> None:
        self._dirty = True
        if self._save_interval <= 0:
            await self.save()
        self._maybe_relayout()

    def _maybe_relayout(self) -> None:
        """Past the layout's thresholds, rebuild the index in the background (searches and changes go on)."""
        if self._index.needs_relayout() and (self._relayout is None or self._relayout.done()):
            self._relayout = asyncio.create_task(self._run_relayout(), name="index-relayout")

    async def _run_relayout(self) -> None:
        before = self._index.kind
        try:
            if await self._executor.run(self._index.relayout):
                log.info("index %s: %s -> %s (%d vectors)", self.path.name, before, self._index.kind, len(self._index))
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
                await self._executor.run(self._index.save, self.path)
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
