"""FAISS wrapper: cosine search over unit vectors keyed by int64 ids, exact or approximate by size.

Small collections use an exact scan (`IndexIDMap2(IndexFlatIP)`). From `IndexLayout.approximate_from`
vectors on, an inverted-file index takes over: `IndexIVFScalarQuantizer` with fp16 codes (half the memory
and memory traffic of float32, with no measurable loss of ranking) and a hash-table direct map, so delete,
replace and reconstruct by id keep working. A search probes a fixed fraction of its lists.

Changes take the write side of a readers-writer lock; searches share the read side and run concurrently.
Switching layouts (`relayout`) builds the new index beside the old one while both keep serving, then
replays the changes made meanwhile and swaps. Synchronous: callers run it in an executor.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

# Vectors the inverted lists' centroids are trained on, per list (faiss asks for at least 39).
TRAIN_PER_LIST = 64
ADD_CHUNK = 100_000


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


@dataclass(frozen=True)
class IndexLayout:
    """When exact search gives way to an approximate index, and how much of it a search reads.

    `approximate_from`: collections of at least this many vectors use the inverted-file index (0: always
    exact). Below half of it an approximate index goes back to exact, so a collection hovering around the
    threshold does not switch back and forth. `probe_fraction`: the share of inverted lists a search
    visits; it sets the trade between recall and speed, whatever the collection's size.
    """

    approximate_from: int = 50_000
    probe_fraction: float = 0.25

    def __post_init__(self) -> None:
        if self.approximate_from < 0:
            raise ValueError("approximate_from must be >= 0")
        if not 0.0 < self.probe_fraction <= 1.0:
            raise ValueError("probe_fraction must be in (0, 1]")

    def approximate(self, n: int, *, now_approximate: bool) -> bool:
        if self.approximate_from <= 0:
            return False
        return n >= (self.approximate_from // 2 if now_approximate else self.approximate_from)

    @staticmethod
    def lists_for(n: int) -> int:
        """About sqrt(n) inverted lists, a power of two up to 4096 (256 at 100k vectors, 1024 at 1M)."""
        return int(min(4096, 2 ** round(math.log2(max(1.0, math.sqrt(n))))))

    def probes_for(self, lists: int) -> int:
        return max(1, math.ceil(lists * self.probe_fraction))


class VectorIndex:
    """Cosine search keyed by int64 ids. The dimension is fixed by the first vectors added."""

    def __init__(self, dim: int | None = None, layout: IndexLayout | None = None) -> None:
        self.layout = layout or IndexLayout()
        self._lock = ReadWriteLock()
        # Held for a whole layout change or reset, so two never race to swap in their result.
        self._rebuilding = threading.Lock()
        # While a relayout builds its index: the changes made meanwhile, replayed on it before the swap.
        self._journal: list[tuple[np.ndarray, np.ndarray | None]] | None = None
        self._index: faiss.Index | None = None
        if dim is not None:
            self._index = _exact(dim)

    @property
    def dim(self) -> int | None:
        return None if self._index is None else int(self._index.d)

    @property
    def approximate(self) -> bool:
        return isinstance(self._index, faiss.IndexIVF)

    @property
    def kind(self) -> str:
        index = self._index
        if isinstance(index, faiss.IndexIVF):
            return f"IndexIVFScalarQuantizer(fp16, {index.nlist} lists, {index.nprobe} probed)"
        return "IndexIDMap2(IndexFlatIP)"

    @property
    def relayout_running(self) -> bool:
        return self._rebuilding.locked()

    def __len__(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    def ids(self) -> np.ndarray:
        with self._lock.read():
            return _ids(self._index)

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """Every (id, vector) pair at this moment, as (n,) int64 and (n, dim) float32 arrays."""
        with self._lock.read():
            return _snapshot(self._index)

    def sample(self, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """At most `size` (id, vector) pairs: all of them, or a seeded random sample in index order, reading
        only the sampled vectors (a map of a million images need not copy them all)."""
        with self._lock.read():
            index = self._index
            if index is not None and index.ntotal > size:
                positions = np.sort(np.random.default_rng(seed).choice(index.ntotal, size=size, replace=False))
                ids = _ids(index)[positions]
                if isinstance(index, faiss.IndexIVF):
                    vectors = np.vstack([index.reconstruct(int(i)) for i in ids])
                else:
                    vectors = np.vstack([index.index.reconstruct(int(p)) for p in positions])
                return ids, np.ascontiguousarray(vectors, dtype=np.float32)
            return _snapshot(index)

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
                self._index = _exact(vectors.shape[1])
            if vectors.shape[1] != self._index.d:
                raise ValueError(f"vector dimension {vectors.shape[1]} != index dimension {self._index.d}")
            _replace(self._index, ids, vectors)
            if self._journal is not None:
                self._journal.append((ids, vectors))

    def remove(self, ids: np.ndarray) -> int:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        with self._lock.write():
            if self._index is None or len(ids) == 0:
                return 0
            removed = int(self._index.remove_ids(ids))
            if self._journal is not None:
                self._journal.append((ids, None))
            return removed

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[list[tuple[int, float]]]:
        """For each query, up to k (id, score) pairs, best first; missing slots (-1) are dropped. With
        `allowed`, only those ids are candidates, chosen before the top k is taken (a filtered search)."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        with self._lock.read():
            if self._index is None or self._index.ntotal == 0 or k <= 0 or (allowed is not None and not len(allowed)):
                return [[] for _ in range(len(queries))]
            if queries.shape[1] != self._index.d:
                raise ValueError(f"query dimension {queries.shape[1]} != index dimension {self._index.d}")
            k = min(k, self._index.ntotal, len(allowed) if allowed is not None else k)
            selector = None if allowed is None else faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
            if isinstance(self._index, faiss.IndexIVF):
                probed = faiss.SearchParametersIVF(nprobe=self._index.nprobe, sel=selector)
                scores, ids = self._index.search(queries, k, params=probed)
                # The probed lists may hold fewer than k vectors (a small index, a query far from every
                # centroid, or a filter): those queries read every list instead, so a search never comes back
                # short while k candidates exist.
                short = np.flatnonzero((ids >= 0).sum(axis=1) < k)
                if len(short):
                    everything = faiss.SearchParametersIVF(nprobe=self._index.nlist, sel=selector)
                    scores[short], ids[short] = self._index.search(queries[short], k, params=everything)
            else:
                params = None if selector is None else faiss.SearchParameters(sel=selector)
                scores, ids = self._index.search(queries, k, params=params)
        return [
            [(int(i), float(min(1.0, max(-1.0, s)))) for i, s in zip(row_ids, row_scores, strict=True) if i != -1]
            for row_ids, row_scores in zip(ids, scores, strict=True)
        ]

    def range_search(self, queries: np.ndarray, threshold: float, cap: int) -> list[list[tuple[int, float]]]:
        """For each query, the (id, score) pairs scoring at least `threshold`, best first, at most `cap` of
        them: FAISS's range search, whose cost does not grow with the pairs below the threshold."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        with self._lock.read():
            if self._index is None or self._index.ntotal == 0:
                return [[] for _ in range(len(queries))]
            if queries.shape[1] != self._index.d:
                raise ValueError(f"query dimension {queries.shape[1]} != index dimension {self._index.d}")
            # The range is exclusive in FAISS (score > radius); a hair below keeps a pair at the threshold.
            lims, scores, ids = self._index.range_search(queries, float(threshold) - 1e-6)
        found: list[list[tuple[int, float]]] = []
        for q in range(len(queries)):
            row_scores, row_ids = scores[lims[q] : lims[q + 1]], ids[lims[q] : lims[q + 1]]
            best = np.argsort(-row_scores, kind="stable")[:cap]
            found.append([(int(row_ids[j]), float(min(1.0, max(-1.0, row_scores[j])))) for j in best])
        return found

    def reset(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Replace the whole content at once (used by rebuilds), in the layout its size calls for."""
        with self._rebuilding:
            fresh = self._build(np.ascontiguousarray(ids, dtype=np.int64), vectors) if len(ids) else None
            with self._lock.write():
                self._index = fresh

    def needs_relayout(self) -> bool:
        """Whether the size now calls for the other layout, or for an approximate index with far more or
        fewer lists (the collection grew or shrank sixteenfold since the lists were trained)."""
        index = self._index
        if index is None:
            return False
        n = int(index.ntotal)
        approximate = isinstance(index, faiss.IndexIVF)
        if self.layout.approximate(n, now_approximate=approximate) != approximate:
            return True
        if approximate:
            wanted = IndexLayout.lists_for(n)
            return bool(
                wanted >= 4 * index.nlist
                or wanted * 4 <= index.nlist
                or index.nprobe != self.layout.probes_for(index.nlist)
            )
        return False

    def relayout(self) -> bool:
        """Rebuild in the layout the current size calls for, while searches and changes go on; False when
        there was nothing to do. The old index serves until the new one, with the changes made meanwhile
        replayed on it, takes its place."""
        with self._rebuilding:
            if not self.needs_relayout():
                return False
            with self._lock.write():
                self._journal = []
            try:
                ids, vectors = self.snapshot()
                fresh = self._build(ids, vectors) if len(ids) else None
                del vectors
                with self._lock.write():
                    for changed, added in self._journal:
                        if fresh is None and added is not None:
                            fresh = _exact(added.shape[1])
                        if fresh is not None and added is not None:
                            _replace(fresh, changed, added)
                        elif fresh is not None:
                            fresh.remove_ids(changed)
                    self._index = fresh
            finally:
                self._journal = None
            return True

    def _build(self, ids: np.ndarray, vectors: np.ndarray) -> faiss.Index:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        n, dim = vectors.shape
        if not self.layout.approximate(n, now_approximate=False):
            index = _exact(dim)
            index.add_with_ids(vectors, ids)
            return index
        lists = IndexLayout.lists_for(n)
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFScalarQuantizer(
            quantizer, dim, lists, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
        )
        index.by_residual = False  # fp16 codes hold the vectors themselves (snapshot decodes them as such)
        # Seeded sample: the same vectors give the same lists.
        rng = np.random.default_rng(0)
        training = (
            vectors
            if n <= TRAIN_PER_LIST * lists
            else vectors[np.sort(rng.choice(n, TRAIN_PER_LIST * lists, replace=False))]
        )
        index.train(training)
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        for start in range(0, n, ADD_CHUNK):
            index.add_with_ids(vectors[start : start + ADD_CHUNK], ids[start : start + ADD_CHUNK])
        index.nprobe = self.layout.probes_for(lists)
        return index

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
            handle.write(memoryview(data))  # no copy: tobytes() held the GIL for ~30 ms per 100 MB
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
    def load(cls, path: Path, layout: IndexLayout | None = None) -> VectorIndex:
        """Read an index saved by `save`; raises on a missing or unreadable file. It keeps the layout it was
        saved in (`needs_relayout` says whether `layout` wants another one)."""
        # Read straight into the index: no second copy of the file in memory (2 GB at a million vectors).
        loaded = faiss.read_index(str(path))
        index = cls(layout=layout)
        if isinstance(loaded, faiss.IndexIVFScalarQuantizer) and loaded.sq.qtype == faiss.ScalarQuantizer.QT_fp16:
            if loaded.direct_map.type != faiss.DirectMap.Hashtable:
                loaded.set_direct_map_type(faiss.DirectMap.Hashtable)
            if loaded.by_residual:
                raise ValueError(f"{path} holds an IVF index with residual codes, which this version never writes")
            loaded.nprobe = index.layout.probes_for(loaded.nlist)
        elif not isinstance(loaded, faiss.IndexIDMap2):
            raise ValueError(f"{path} holds neither an ID-mapped flat index nor an fp16 IVF index")
        index._index = loaded
        return index


def _exact(dim: int) -> faiss.IndexIDMap2:
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def _replace(index: faiss.Index, ids: np.ndarray, vectors: np.ndarray) -> None:
    index.remove_ids(ids)
    index.add_with_ids(vectors, ids)


def _ids(index: faiss.Index | None) -> np.ndarray:
    if index is None:
        return np.empty(0, dtype=np.int64)
    if isinstance(index, faiss.IndexIVF):
        lists = index.invlists
        parts = [
            faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)) for i in range(index.nlist) if lists.list_size(i)
        ]
        return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, dtype=np.int64)
    return np.asarray(faiss.vector_to_array(index.id_map), dtype=np.int64)


def _snapshot(index: faiss.Index | None) -> tuple[np.ndarray, np.ndarray]:
    if index is None or index.ntotal == 0:
        return np.empty(0, dtype=np.int64), np.empty((0, 0 if index is None else index.d), dtype=np.float32)
    if isinstance(index, faiss.IndexIVF):
        # Lists hold ids in no useful order: hand them out by id, decoding each list straight into place.
        ids = _ids(index)
        rank = np.empty(len(ids), dtype=np.int64)
        rank[np.argsort(ids, kind="stable")] = np.arange(len(ids))
        vectors = np.empty((len(ids), index.d), dtype=np.float32)
        lists, offset = index.invlists, 0
        for i in range(index.nlist):
            size = lists.list_size(i)
            if size:
                codes = faiss.rev_swig_ptr(lists.get_codes(i), size * index.code_size)
                vectors[rank[offset : offset + size]] = np.frombuffer(codes, dtype=np.float16).reshape(size, index.d)
                offset += size
        return np.sort(ids), vectors
    ids = faiss.vector_to_array(index.id_map).astype(np.int64)
    return ids, np.ascontiguousarray(index.index.reconstruct_n(0, index.ntotal), dtype=np.float32)


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
