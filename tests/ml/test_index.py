"""The FAISS wrapper: ids, ordering, removal, persistence, and searching while writing."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from ml.index import VectorIndex


def unit(rows: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_search_ranks_by_cosine_and_returns_ids() -> None:
    vectors = unit(20)
    ids = np.arange(100, 120)
    index = VectorIndex()
    index.add(ids, vectors)
    hits = index.search(vectors[7], 5)[0]
    assert hits[0][0] == 107
    assert hits[0][1] == pytest.approx(1.0, abs=1e-5)
    expected = ids[np.argsort(-(vectors @ vectors[7]))[:5]]
    assert [i for i, _ in hits] == list(expected)
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)


def test_fewer_vectors_than_k_drops_empty_slots() -> None:
    index = VectorIndex()
    index.add(np.array([1, 2]), unit(2))
    assert len(index.search(unit(1, seed=3), 10)[0]) == 2
    assert VectorIndex().search(unit(1), 10) == [[]]


def test_remove_and_re_add_replace_not_duplicate() -> None:
    index = VectorIndex()
    vectors = unit(5)
    index.add(np.arange(5), vectors)
    index.add(np.array([2]), vectors[2:3])
    assert len(index) == 5
    assert index.remove(np.array([2, 99])) == 1
    assert sorted(index.ids()) == [0, 1, 3, 4]
    assert 2 not in [i for i, _ in index.search(vectors[2], 5)[0]]


def test_dimension_mismatch_is_refused() -> None:
    index = VectorIndex()
    index.add(np.array([1]), unit(1, dim=8))
    with pytest.raises(ValueError, match="dimension"):
        index.add(np.array([2]), unit(1, dim=4))
    with pytest.raises(ValueError, match="dimension"):
        index.search(unit(1, dim=4), 3)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    index = VectorIndex()
    vectors = unit(30)
    index.add(np.arange(1, 31), vectors)
    path = tmp_path / "sub" / "vectors.index"
    index.save(path)
    loaded = VectorIndex.load(path)
    assert loaded.dim == 8
    assert sorted(loaded.ids()) == list(range(1, 31))
    assert loaded.search(vectors[:3], 4) == index.search(vectors[:3], 4)
    assert [p.name for p in path.parent.iterdir()] == ["vectors.index"]  # no temp file left


def test_load_of_garbage_raises(tmp_path: Path) -> None:
    path = tmp_path / "bad.index"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(Exception):  # noqa: B017 - faiss raises RuntimeError, numpy may raise ValueError
        VectorIndex.load(path)


def test_searches_run_safely_while_vectors_are_added_and_removed() -> None:
    index = VectorIndex()
    base = unit(500, dim=32)
    index.add(np.arange(500), base)
    errors: list[BaseException] = []
    stop = threading.Event()

    def searcher() -> None:
        try:
            while not stop.is_set():
                for hits in index.search(base[:4], 10):
                    assert len(hits) == 10
                    assert all(-1.0 <= s <= 1.0 for _, s in hits)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for thread in threads:
        thread.start()
    extra = unit(300, dim=32, seed=1)
    for start in range(0, 300, 10):
        index.add(np.arange(1000 + start, 1010 + start), extra[start : start + 10])
        index.remove(np.arange(1000 + start, 1005 + start))
    stop.set()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(index) == 500 + 150
