"""FAISS wrapper: an ID-mapped inner-product index over unit vectors (so scores are cosines).

Changes take the write side of a readers-writer lock; searches share the read side and run
concurrently. Synchronous: callers run it in an executor.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np


class ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers so it is not starved."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class VectorIndex:
    """Exact cosine search keyed by int64 ids. The dimension is fixed by the first vectors added."""

    def __init__(self, dim: int | None = None) -> None:
        self._lock = ReadWriteLock()
        self._index: faiss.IndexIDMap2 | None = None
        if dim is not None:
            self._index = self._new(dim)

    @staticmethod
    def _new(dim: int) -> faiss.IndexIDMap2:
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    @property
    def dim(self) -> int | None:
        return None if self._index is None else int(self._index.d)

    @property
    def kind(self) -> str:
        return "IndexIDMap2(IndexFlatIP)"

    def __len__(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    def ids(self) -> np.ndarray:
        with self._lock.read():
            if self._index is None:
                return np.empty(0, dtype=np.int64)
            return faiss.vector_to_array(self._index.id_map).astype(np.int64)

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """Every (id, vector) pair at this moment, as (n,) int64 and (n, dim) float32 arrays."""
        with self._lock.read():
            if self._index is None or self._index.ntotal == 0:
                return np.empty(0, dtype=np.int64), np.empty((0, self.dim or 0), dtype=np.float32)
            ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
            vectors = self._index.index.reconstruct_n(0, self._index.ntotal)
        return ids, np.ascontiguousarray(vectors, dtype=np.float32)

    def sample(self, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """At most `size` (id, vector) pairs: all of them, or a seeded random sample in index order, reading
        only the sampled vectors (a map of a million images need not copy them all)."""
        with self._lock.read():
            if self._index is not None and self._index.ntotal > size:
                positions = np.sort(np.random.default_rng(seed).choice(self._index.ntotal, size=size, replace=False))
                ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)[positions]
                vectors = np.vstack([self._index.index.reconstruct(int(p)) for p in positions])
                return ids, np.ascontiguousarray(vectors, dtype=np.float32)
        return self.snapshot()

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors under ids; an id already present is replaced, never duplicated."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if len(ids) != len(vectors):
            raise ValueError("ids and vectors differ in length")
        if len(ids) == 0:
            return
        with self._lock.write():
            if self._index is None:
                self._index = self._new(vectors.shape[1])
            if vectors.shape[1] != self._index.d:
                raise ValueError(f"vector dimension {vectors.shape[1]} != index dimension {self._index.d}")
            self._index.remove_ids(ids)
            self._index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> int:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        with self._lock.write():
            if self._index is None or len(ids) == 0:
                return 0
            return int(self._index.remove_ids(ids))

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        """For each query, up to k (id, score) pairs, best first; missing slots (-1) are dropped."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        with self._lock.read():
            if self._index is None or self._index.ntotal == 0 or k <= 0:
                return [[] for _ in range(len(queries))]
            if queries.shape[1] != self._index.d:
                raise ValueError(f"query dimension {queries.shape[1]} != index dimension {self._index.d}")
            scores, ids = self._index.search(queries, min(k, self._index.ntotal))
        return [
            [(int(i), float(min(1.0, max(-1.0, s)))) for i, s in zip(row_ids, row_scores, strict=True) if i != -1]
            for row_ids, row_scores in zip(ids, scores, strict=True)
        ]

    def reset(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Replace the whole content at once (used by rebuilds)."""
        fresh = None
        if len(ids):
            fresh = self._new(vectors.shape[1])
            fresh.add_with_ids(
                np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64)
            )
        with self._lock.write():
            self._index = fresh

    def save(self, path: Path) -> None:
        """Write atomically: a temp file beside the target, fsync, rename, fsync the folder."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock.read():
            if self._index is None:
                path.unlink(missing_ok=True)
                return
            data = faiss.serialize_index(self._index)
        tmp = _temp_path(path)
        with open(tmp, "wb") as handle:
            handle.write(data.tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)

    @staticmethod
    def remove_leftovers(path: Path) -> int:
        """Delete temp files that a save killed half-way left beside `path`."""
        removed = 0
        for leftover in path.parent.glob(f".{path.name}.*.tmp"):
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed

    @classmethod
    def load(cls, path: Path) -> VectorIndex:
        """Read an index saved by `save`; raises on a missing or unreadable file."""
        # Read straight into the index: no second copy of the file in memory (2 GB at a million vectors).
        loaded = faiss.read_index(str(path))
        if not isinstance(loaded, faiss.IndexIDMap2):
            loaded = faiss.downcast_index(loaded)
        if not isinstance(loaded, faiss.IndexIDMap2):
            raise ValueError(f"{path} does not hold an ID-mapped index")
        index = cls()
        index._index = loaded
        return index


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
