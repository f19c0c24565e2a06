"""The FAISS wrapper: ids, ordering, removal, persistence, and searching while writing."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from ml.index import IndexLayout, VectorIndex


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


# The approximate layout, switched on for small sizes so the tests stay fast.
SMALL = IndexLayout(approximate_from=400, probe_fraction=1.0)


def exact_top(vectors: np.ndarray, ids: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    return list(ids[np.argsort(-(vectors @ query), kind="stable")[:k]])


def test_large_collections_get_an_approximate_index_that_finds_what_exact_search_finds() -> None:
    vectors, ids = unit(1000, dim=16), np.arange(1, 1001)
    index = VectorIndex(layout=SMALL)
    index.reset(ids, vectors)
    assert index.approximate
    assert "IVF" in index.kind
    # Probing every list reads every vector, so the ranking is exact up to fp16 rounding.
    for row in (3, 500, 999):
        hits = index.search(vectors[row], 5)[0]
        assert hits[0][0] == ids[row]
        assert hits[0][1] == pytest.approx(1.0, abs=1e-3)
        assert [i for i, _ in hits][:3] == exact_top(vectors, ids, vectors[row], 3)


def test_approximate_index_deletes_replaces_and_hands_out_vectors_by_id() -> None:
    vectors, ids = unit(1000, dim=16), np.arange(1, 1001)
    index = VectorIndex(layout=SMALL)
    index.reset(ids[::-1].copy(), vectors[::-1].copy())
    assert index.remove(np.array([5, 6, 123456])) == 2
    index.add(np.array([7]), vectors[:1])  # 7 now holds the vector of 1
    assert len(index) == 998
    assert 5 not in [i for i, _ in index.search(vectors[4], 10)[0]]
    got_ids, got_vectors = index.snapshot()
    assert list(got_ids) == [i for i in range(1, 1001) if i not in (5, 6)]
    expected = vectors[got_ids - 1].copy()
    expected[list(got_ids).index(7)] = vectors[0]
    np.testing.assert_allclose(got_vectors, expected, atol=1e-3)
    sample_ids, sample_vectors = index.sample(50, seed=1)
    assert len(sample_ids) == 50 and list(sample_ids) != list(got_ids[:50])
    np.testing.assert_allclose(sample_vectors, expected[np.searchsorted(got_ids, sample_ids)], atol=1e-3)


def test_approximate_index_survives_save_and_load(tmp_path: Path) -> None:
    vectors, ids = unit(1000, dim=16), np.arange(1, 1001)
    index = VectorIndex(layout=SMALL)
    index.reset(ids, vectors)
    index.save(tmp_path / "v.index")
    loaded = VectorIndex.load(tmp_path / "v.index", layout=SMALL)
    assert loaded.approximate and loaded.kind == index.kind
    assert loaded.search(vectors[:3], 5) == index.search(vectors[:3], 5)
    loaded.remove(np.array([1]))  # the id map came back with it
    assert 1 not in loaded.ids()


def test_growing_past_the_threshold_switches_layout_keeping_changes_made_during_the_switch() -> None:
    vectors = unit(1200, dim=16)
    index = VectorIndex(layout=SMALL)
    index.add(np.arange(1000), vectors[:1000])
    assert not index.approximate and index.needs_relayout()
    build = index._build

    def build_while_others_write(ids: np.ndarray, vecs: np.ndarray):
        index.add(np.arange(1000, 1200), vectors[1000:])  # an upload lands mid-build
        index.remove(np.arange(0, 10))  # and a delete
        assert not index.approximate  # the old index still serves meanwhile
        return build(ids, vecs)

    index._build = build_while_others_write  # type: ignore[method-assign,assignment]  # instrumenting one instance
    assert index.relayout()
    assert index.approximate and not index.needs_relayout()
    assert sorted(index.ids()) == list(range(10, 1200))
    assert index.search(vectors[1100], 1)[0][0][0] == 1100
    assert not index.relayout()  # nothing left to do


def test_shrinking_well_below_the_threshold_goes_back_to_exact_search() -> None:
    vectors = unit(1000, dim=16)
    index = VectorIndex(layout=SMALL)
    index.reset(np.arange(1000), vectors)
    index.remove(np.arange(700))  # 300 left: above half the threshold, stays approximate
    assert index.approximate and not index.needs_relayout()
    index.remove(np.arange(700, 850))  # 150 left
    assert index.needs_relayout() and index.relayout()
    assert not index.approximate
    assert sorted(index.ids()) == list(range(850, 1000))


def test_layout_sizes_lists_by_the_square_root_and_refuses_nonsense() -> None:
    assert IndexLayout.lists_for(100_000) == 256
    assert IndexLayout.lists_for(1_000_000) == 1024
    assert IndexLayout.lists_for(10) == 4
    assert IndexLayout(probe_fraction=0.25).probes_for(1024) == 256
    assert not IndexLayout(approximate_from=0).approximate(10**9, now_approximate=False)
    with pytest.raises(ValueError):
        IndexLayout(probe_fraction=0)


def test_approximate_search_never_comes_back_short_of_k() -> None:
    # Few vectors over many lists, one list probed: the probed list alone holds fewer than k.
    vectors = unit(300, dim=16, seed=4)
    index = VectorIndex(layout=IndexLayout(approximate_from=100, probe_fraction=0.01))
    index.reset(np.arange(300), vectors)
    assert index.approximate
    for hits in index.search(vectors[:20], 50):
        assert len(hits) == 50 and len({i for i, _ in hits}) == 50
        assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
    index.remove(np.arange(290))
    assert [len(hits) for hits in index.search(vectors[290:], 200)] == [10] * 10


@pytest.mark.parametrize("layout", [IndexLayout(), IndexLayout(approximate_from=100, probe_fraction=0.01)])
def test_a_filtered_search_ranks_only_the_allowed_ids_and_fills_k_from_them(layout: IndexLayout) -> None:
    vectors, ids = unit(400, dim=16, seed=5), np.arange(1, 401)
    index = VectorIndex(layout=layout)
    index.reset(ids, vectors)
    assert index.approximate == (layout.approximate_from == 100)
    allowed = ids[::37]  # 11 ids scattered over the lists, most of them far from any one query
    for row in (0, 200, 399):
        hits = index.search(vectors[row], 5, allowed)[0]
        kept = vectors[allowed - 1]
        assert [i for i, _ in hits] == exact_top(kept, allowed, vectors[row], 5)
        assert len(index.search(vectors[row], 50, allowed)[0]) == len(allowed)
    assert index.search(vectors[0], 5, np.array([], dtype=np.int64)) == [[]]
    assert index.search(vectors[0], 5, np.array([10_000], dtype=np.int64)) == [[]]
