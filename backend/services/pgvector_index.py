"""The vector index of a collection on PostgreSQL: pgvector's HNSW index over the `image.embedding` column.

There is nothing beside the database to keep in step: a vector is searchable as soon as the transaction that
stores its row commits, on every replica at once, and gone as soon as the delete commits. The index is an
expression index per CLIP model, partial on `embedding_model`, so vectors of two models never meet in one
search, and a search of the current model reads only its vectors:

    CREATE INDEX ... ON image USING hnsw ((embedding::vector(512)) vector_cosine_ops)
        WITH (m = 16, ef_construction = 64) WHERE embedding_model = '<model>'

The `embedding` column itself is an untyped `vector`: the dimension lives in the index (and in
`embedding_dim`), so a model with other dimensions only needs another index. A search sets `hnsw.ef_search`
(at least k), which bounds how many candidates the graph walk keeps, so recall stays at the bench's figures.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
from sqlalchemy import and_, text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel import col, func, select
from sqlmodel.ext.asyncio.session import AsyncSession

from backend.executor import Executor
from backend.models import Image, IndexHealth
from backend.services.filters import in_collection
from backend.services.index import blob_to_vector

log = logging.getLogger(__name__)
# Key of the advisory lock under which an HNSW index is created (replicas starting together build it once).
INDEX_LOCK = 0x1A6E_0002


# A filtered search over at most this many candidates ranks them exactly instead of walking the graph.
EXACT_FILTERED = 20_000
# How far the iterative scan of a filtered search may walk the graph (pgvector's default is 20 000).
MAX_SCAN_TUPLES = 200_000


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class PgVectorIndex:
    """`IndexService`'s operations, answered by the database."""

    kind = "pgvector-hnsw"

    def __init__(
        self,
        *,
        engine: AsyncEngine,
        sessions: async_sessionmaker[AsyncSession],
        model_name: str,
        executor: Executor,
        m: int = 16,
        ef_construction: int = 64,
        ef_search: int = 200,
    ) -> None:
        self.model_name = model_name
        self._engine = engine
        self._sessions = sessions
        self._executor = executor
        self._m = m
        self._ef_construction = ef_construction
        self._ef_search = ef_search
        self._dim: int | None = None
        self._ready_dims: set[int] = set()
        # The model filter as a literal: a partial index is only used when the planner can see its predicate
        # (a bound parameter hides it from a generic plan).
        self._model = _literal(model_name)
        self.index_name = "ix_image_hnsw_" + hashlib.sha1(model_name.encode()).hexdigest()[:12]

    # -- setup ---------------------------------------------------------------------------------------------

    async def load_or_rebuild(self, sessions: async_sessionmaker[AsyncSession] | None = None) -> None:
        """Make sure the current model's HNSW index exists (built once, whichever replica gets there first)."""
        async with self._sessions() as session:
            dim = (
                await session.exec(select(Image.embedding_dim).where(Image.embedding_model == self.model_name).limit(1))
            ).first()
        if dim is not None:
            await self._ensure_index(int(dim))

    async def _ensure_index(self, dim: int) -> None:
        if dim in self._ready_dims:
            return
        name = f"{self.index_name}_{dim}"
        async with self._engine.connect() as connection:
            autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
            await autocommit.execute(text("SELECT pg_advisory_lock(:key)"), {"key": INDEX_LOCK})
            try:
                valid = (
                    await autocommit.execute(
                        text(
                            "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                            "WHERE c.relname = :name AND c.relnamespace = current_schema()::regnamespace"
                        ),
                        {"name": name},
                    )
                ).scalar_one_or_none()
                if valid is False:  # a build that was interrupted leaves an invalid index behind
                    await autocommit.execute(text(f'DROP INDEX CONCURRENTLY IF EXISTS "{name}"'))
                if valid is not True:
                    log.info("building the HNSW index %s (dimension %d) for %s", name, dim, self.model_name)
                    await autocommit.execute(
                        text(
                            f'CREATE INDEX CONCURRENTLY IF NOT EXISTS "{name}" ON image USING hnsw '
                            f"((embedding::vector({dim})) vector_cosine_ops) "
                            f"WITH (m = {self._m}, ef_construction = {self._ef_construction}) "
                            f"WHERE embedding_model = {self._model}"
                        )
                    )
            finally:
                await autocommit.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": INDEX_LOCK})
        self._ready_dims.add(dim)
        self._dim = dim

    # -- changes: the rows are the index -----------------------------------------------------------------------

    async def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            await self._ensure_index(int(vectors.shape[1]))

    async def remove(self, ids: np.ndarray) -> None:
        return None

    # -- reading -------------------------------------------------------------------------------------------

    async def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> list[list[tuple[int, float]]]:
        """Per query, up to k (id, cosine) pairs, best first. With `allowed`, only those ids are candidates:
        a few thousand are ranked exactly; more go through the HNSW index, whose iterative scan keeps going
        until k of them are found (pgvector 0.8), so a filtered search does not come back short."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if k <= 0 or (allowed is not None and not len(allowed)):
            return [[] for _ in range(len(queries))]
        dim = queries.shape[1]
        distance = f"embedding::vector({dim}) <=> CAST(:q AS vector({dim}))"
        condition, order = "", distance
        parameters: dict[str, object] = {"k": k}
        if allowed is not None:
            condition = "AND id = ANY(:allowed) "
            parameters["allowed"] = [int(i) for i in allowed]
            if len(allowed) <= EXACT_FILTERED:
                order = f"({distance}) + 0"  # not the index's expression: an exact ranking of the few
        statement = text(
            f"SELECT id, {distance} AS distance FROM image WHERE embedding_model = {self._model} "
            f"AND embedding_dim = {dim} AND trashed_at IS NULL {condition}ORDER BY {order} LIMIT :k"
        )
        results: list[list[tuple[int, float]]] = []
        async with self._engine.connect() as connection, connection.begin():
            await connection.execute(text(f"SET LOCAL hnsw.ef_search = {max(self._ef_search, min(k, 1000))}"))
            # Always: trashed images are filtered out after the index scan, which must then keep going.
            await connection.execute(text("SET LOCAL hnsw.iterative_scan = strict_order"))
            await connection.execute(text(f"SET LOCAL hnsw.max_scan_tuples = {MAX_SCAN_TUPLES}"))
            for query in queries:
                rows = (await connection.execute(statement, {**parameters, "q": query.astype("<f4").tobytes()})).all()
                results.append([(int(row[0]), float(1.0 - row[1])) for row in rows])
        return results

    async def range_search(self, queries: np.ndarray, threshold: float, cap: int) -> list[list[tuple[int, float]]]:
        """Per query, the (id, cosine) pairs at or above `threshold`, best first, at most `cap`: the HNSW
        index's nearest `cap`, cut at the threshold."""
        return [
            [(i, score) for i, score in row if score >= threshold - 1e-6] for row in await self.search(queries, cap)
        ]

    def _current(self) -> object:
        return and_(col(Image.embedding_model) == self.model_name, in_collection())

    async def size(self) -> int:
        """Vectors of the current model: its images."""
        async with self._sessions() as session:
            return int(
                (await session.exec(select(func.count()).select_from(Image).where(self._current()))).one()  # type: ignore[arg-type]  # a SQL expression
            )

    async def database_ids(self, sessions: async_sessionmaker[AsyncSession] | None = None) -> np.ndarray:
        async with self._sessions() as session:
            rows = (await session.exec(select(Image.id).where(self._current()).order_by(col(Image.id)))).all()  # type: ignore[arg-type]
        return np.array([int(i or 0) for i in rows], dtype=np.int64)

    async def ids(self) -> np.ndarray:
        return await self.database_ids()

    async def _vectors(self, ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        query = select(Image.id, Image.embedding).where(self._current()).order_by(col(Image.id))  # type: ignore[arg-type]
        if ids is not None:
            query = query.where(col(Image.id).in_([int(i) for i in ids]))
        async with self._sessions() as session:
            rows = (await session.exec(query)).all()
        if not rows:
            return np.empty(0, dtype=np.int64), np.empty((0, self._dim or 0), dtype=np.float32)
        found = np.array([int(row[0] or 0) for row in rows], dtype=np.int64)
        vectors = await self._executor.run(lambda: np.stack([blob_to_vector(row[1]) for row in rows]))
        return found, vectors

    async def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """Every (id, vector) pair of the current model, in id order."""
        return await self._vectors(None)

    async def sample(self, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """At most `size` (id, vector) pairs: all of them, or a seeded sample in id order."""
        ids = await self.ids()
        if len(ids) <= size:
            return await self._vectors(None)
        chosen = np.sort(np.random.default_rng(seed).choice(ids, size=size, replace=False))
        return await self._vectors(chosen)

    async def status(self) -> IndexHealth:
        size = await self.size()
        return IndexHealth(
            type=self.kind,
            size=size,
            dimension=self._dim,
            approximate=bool(self._ready_dims),
            reorganizing=False,
        )

    # -- what a file-backed index needs and this one does not ----------------------------------------------

    async def saved_ids(self) -> np.ndarray:
        return await self.database_ids()

    async def save(self) -> None:
        return None

    def start_autosave(self) -> None:
        return None

    async def wait_for_relayout(self) -> None:
        return None

    async def close(self) -> None:
        return None
