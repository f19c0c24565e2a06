"""Clustering of unit vectors: auto k on known structure, ordering contracts, determinism, tiny and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, silhouette_score

from ml.clustering import Cluster, ClusteringError, ClusteringResult, cluster_vectors

DIM = 32


def unit_rows(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def groups(n_groups: int, seed: int = 0, per_group: tuple[int, int] = (30, 90)) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated groups on the unit sphere (random centres, small noise), with their true labels."""
    rng = np.random.default_rng(seed)
    centres = unit_rows(rng.normal(size=(n_groups, DIM)))
    truth = np.repeat(np.arange(n_groups), rng.integers(*per_group, size=n_groups))
    return unit_rows(centres[truth] + rng.normal(scale=0.05, size=(len(truth), DIM))), truth


def labels_by_id(result: ClusteringResult, ids: np.ndarray) -> np.ndarray:
    """Cluster label of each id, in the order of `ids`."""
    position = {int(i): row for row, i in enumerate(ids)}
    labels = np.full(len(ids), -1)
    for cluster in result.clusters:
        labels[[position[int(i)] for i in cluster.member_ids]] = cluster.label
    return labels


def check_structure(result: ClusteringResult, vectors: np.ndarray, ids: np.ndarray, n_representatives: int = 4) -> None:
    """Every contract of the result that does not depend on what the groups are."""
    assert result.k == len(result.clusters)
    assert [c.label for c in result.clusters] == list(range(result.k))
    all_members = np.concatenate([c.member_ids for c in result.clusters]) if result.clusters else np.array([])
    assert sorted(all_members.tolist()) == sorted(ids.tolist())  # each id exactly once
    sizes = [(-len(c.member_ids), int(c.member_ids.min())) for c in result.clusters]
    assert sizes == sorted(sizes)  # decreasing size, ties by smallest id
    by_id = {int(i): vectors[row] / np.linalg.norm(vectors[row]) for row, i in enumerate(ids)}
    for cluster in result.clusters:
        assert isinstance(cluster, Cluster)
        assert cluster.member_ids.dtype == np.int64 and cluster.representative_ids.dtype == np.int64
        assert cluster.distances.dtype == np.float32 and cluster.centroid.dtype == np.float32
        assert cluster.distances.shape == cluster.member_ids.shape
        assert cluster.centroid.shape == (vectors.shape[1],)
        assert np.linalg.norm(cluster.centroid) == pytest.approx(1.0, abs=1e-5)
        members = np.stack([by_id[int(i)] for i in cluster.member_ids])
        np.testing.assert_allclose(cluster.distances, 1.0 - members @ cluster.centroid, atol=1e-5)
        assert (cluster.distances >= 0).all()
        # Non-decreasing distance, equal distances by increasing id.
        keys = list(zip(cluster.distances.tolist(), cluster.member_ids.tolist(), strict=True))
        assert keys == sorted(keys)
        expected_reps = min(n_representatives, len(cluster.member_ids))
        np.testing.assert_array_equal(cluster.representative_ids, cluster.member_ids[:expected_reps])
        # The representatives are the closest members: no other member is strictly closer than the farthest one.
        if expected_reps:
            others = cluster.distances[expected_reps:]
            assert (others >= cluster.distances[expected_reps - 1]).all()


def assert_same(a: ClusteringResult, b: ClusteringResult) -> None:
    assert (a.k, a.k_requested, a.silhouette, a.candidates) == (b.k, b.k_requested, b.silhouette, b.candidates)
    for x, y in zip(a.clusters, b.clusters, strict=True):
        assert x.label == y.label
        for field in ("member_ids", "distances", "representative_ids", "centroid"):
            np.testing.assert_array_equal(getattr(x, field), getattr(y, field))


@pytest.mark.parametrize("n_groups", [3, 5, 7])
def test_auto_k_finds_the_groups(n_groups: int) -> None:
    vectors, truth = groups(n_groups, seed=n_groups)
    ids = np.arange(len(vectors), dtype=np.int64) * 3 + 11
    result = cluster_vectors(vectors, ids, k=None)
    check_structure(result, vectors, ids)
    assert result.k == n_groups
    assert result.k_requested is None
    assert adjusted_rand_score(truth, labels_by_id(result, ids)) >= 0.99
    assert sorted(result.candidates) == list(range(2, 21))
    assert max(result.candidates, key=lambda k: result.candidates[k]) == n_groups
    assert result.silhouette is not None and result.silhouette > 0.8


def test_silhouette_is_sklearns_cosine_silhouette_of_the_result() -> None:
    vectors, _ = groups(4, seed=1)
    ids = np.arange(len(vectors))
    for k in (None, 2, 6):
        result = cluster_vectors(vectors, ids, k=k)
        expected = silhouette_score(vectors, labels_by_id(result, ids), metric="cosine")
        assert result.silhouette == pytest.approx(expected, abs=1e-5)
    noise = unit_rows(np.random.default_rng(0).normal(size=(60, DIM)))
    result = cluster_vectors(noise, np.arange(60), k=25)  # small clusters, likely some singletons
    expected = silhouette_score(noise, labels_by_id(result, np.arange(60)), metric="cosine")
    assert result.silhouette == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("k", [1, 2, 5, 9])
def test_fixed_k_gives_k_clusters(k: int) -> None:
    vectors, _ = groups(5, seed=2)
    ids = np.arange(len(vectors), dtype=np.int64)
    result = cluster_vectors(vectors, ids, k=k, n_representatives=3)
    check_structure(result, vectors, ids, n_representatives=3)
    assert (result.k, result.k_requested, result.candidates) == (k, k, {})
    assert (result.silhouette is None) == (k == 1)


def test_fixed_k_equal_to_groups_recovers_them() -> None:
    vectors, truth = groups(5, seed=3)
    ids = np.arange(len(vectors))
    result = cluster_vectors(vectors, ids, k=5)
    assert adjusted_rand_score(truth, labels_by_id(result, ids)) >= 0.99


def test_deterministic_and_independent_of_row_order() -> None:
    vectors, _ = groups(5, seed=4)
    ids = np.random.default_rng(0).permutation(10 * len(vectors))[: len(vectors)].astype(np.int64)
    first = cluster_vectors(vectors, ids, k=None, seed=7)
    assert_same(first, cluster_vectors(vectors.copy(), ids.copy(), k=None, seed=7))
    shuffle = np.random.default_rng(1).permutation(len(vectors))
    assert_same(first, cluster_vectors(vectors[shuffle], ids[shuffle], k=None, seed=7))
    fixed = cluster_vectors(vectors, ids, k=3, seed=7)
    assert_same(fixed, cluster_vectors(vectors[shuffle], ids[shuffle], k=3, seed=7))


def test_sampled_auto_k_still_finds_the_groups() -> None:
    vectors, truth = groups(4, seed=5, per_group=(100, 160))
    ids = np.arange(len(vectors))
    result = cluster_vectors(vectors, ids, k=None, sample_size=150, batch_size=128)
    check_structure(result, vectors, ids)
    assert result.k == 4
    assert adjusted_rand_score(truth, labels_by_id(result, ids)) >= 0.99
    assert result.silhouette is not None
    shuffle = np.random.default_rng(2).permutation(len(vectors))
    assert_same(result, cluster_vectors(vectors[shuffle], ids[shuffle], k=None, sample_size=150, batch_size=128))


def test_wide_k_range_tries_a_bounded_subset_of_candidates() -> None:
    vectors = unit_rows(np.random.default_rng(6).normal(size=(150, DIM)))
    result = cluster_vectors(vectors, np.arange(150), k=None, k_min=2, k_max=100)
    tried = sorted(result.candidates)
    assert len(tried) <= 20
    assert tried[:10] == list(range(2, 12))
    assert tried[-1] == 100


def test_unnormalised_input_is_normalised_first() -> None:
    vectors, _ = groups(3, seed=8)
    ids = np.arange(len(vectors))
    scales = np.random.default_rng(0).uniform(0.5, 4.0, size=(len(vectors), 1)).astype(np.float32)
    result = cluster_vectors(vectors * scales, ids, k=None)
    assert result.k == 3
    check_structure(result, vectors, ids)


def test_representatives_are_capped_by_size_and_can_be_off() -> None:
    vectors, _ = groups(3, seed=9)
    ids = np.arange(len(vectors))
    many = cluster_vectors(vectors, ids, k=3, n_representatives=1000)
    for cluster in many.clusters:
        np.testing.assert_array_equal(cluster.representative_ids, cluster.member_ids)
    none = cluster_vectors(vectors, ids, k=3, n_representatives=0)
    assert all(len(c.representative_ids) == 0 for c in none.clusters)


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("k", [None, 1, 3])
def test_empty_input_gives_no_clusters(k: int | None) -> None:
    result = cluster_vectors(np.zeros((0, 16), dtype=np.float32), np.zeros(0, dtype=np.int64), k=k)
    assert (result.k, result.k_requested, result.clusters, result.silhouette, result.candidates) == (0, k, [], None, {})


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("k", [None, 1, 3])
def test_single_vector_is_one_cluster(k: int | None) -> None:
    vector = unit_rows(np.ones((1, 16)))
    result = cluster_vectors(vector, np.array([42]), k=k)
    assert result.k == 1 and result.silhouette is None
    cluster = result.clusters[0]
    assert cluster.member_ids.tolist() == [42] and cluster.representative_ids.tolist() == [42]
    assert cluster.distances.tolist() == pytest.approx([0.0], abs=1e-6)
    np.testing.assert_allclose(cluster.centroid, vector[0], atol=1e-6)


@pytest.mark.filterwarnings("error")
def test_two_vectors() -> None:
    two = unit_rows(np.random.default_rng(0).normal(size=(2, 16)))
    ids = np.array([5, 3])
    auto = cluster_vectors(two, ids, k=None)
    check_structure(auto, two, ids)
    assert auto.k == 2 and auto.silhouette is None and auto.candidates == {}
    one = cluster_vectors(two, ids, k=1)
    assert one.k == 1 and sorted(one.clusters[0].member_ids.tolist()) == [3, 5]
    same = cluster_vectors(np.repeat(two[:1], 2, axis=0), ids, k=None)
    assert same.k == 1 and same.clusters[0].member_ids.tolist() == [3, 5]  # equal distance: by id


@pytest.mark.filterwarnings("error")
def test_k_larger_than_n_is_clamped() -> None:
    vectors = unit_rows(np.random.default_rng(1).normal(size=(4, 16)))
    ids = np.arange(4)
    result = cluster_vectors(vectors, ids, k=10)
    check_structure(result, vectors, ids)
    assert (result.k, result.k_requested) == (4, 10)
    assert result.silhouette is None  # every point alone: undefined


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("k", [None, 1, 5])
def test_identical_vectors_make_one_cluster(k: int | None) -> None:
    vectors = np.repeat(unit_rows(np.ones((1, 16))), 50, axis=0)
    ids = np.arange(50)
    result = cluster_vectors(vectors, ids, k=k)
    check_structure(result, vectors, ids)
    assert result.k == 1 and result.silhouette is None
    assert result.clusters[0].member_ids.tolist() == list(range(50))


@pytest.mark.filterwarnings("error")
def test_duplicated_points_clamp_k_to_distinct_vectors() -> None:
    distinct = unit_rows(np.random.default_rng(2).normal(size=(3, 16)))
    vectors = np.repeat(distinct, [10, 12, 8], axis=0)
    ids = np.arange(30)
    auto = cluster_vectors(vectors, ids, k=None)
    check_structure(auto, vectors, ids)
    assert auto.k == 3 and auto.silhouette == pytest.approx(1.0)
    assert [len(c.member_ids) for c in auto.clusters] == [12, 10, 8]
    fixed = cluster_vectors(vectors, ids, k=7)
    assert (fixed.k, fixed.k_requested) == (3, 7)


@pytest.mark.filterwarnings("error")
def test_rare_distinct_vectors_keep_their_own_clusters() -> None:
    # A small random seeding subset almost surely misses the rare vectors; k must still be honoured.
    rng = np.random.default_rng(3)
    vectors = np.repeat(unit_rows(rng.normal(size=(1, 16))), 2000, axis=0)
    vectors[[100, 700, 1300, 1900]] = unit_rows(rng.normal(size=(4, 16)))
    ids = np.arange(2000)
    result = cluster_vectors(vectors, ids, k=5, batch_size=32)
    check_structure(result, vectors, ids)
    assert [len(c.member_ids) for c in result.clusters] == [1996, 1, 1, 1, 1]
    assert [int(c.member_ids[0]) for c in result.clusters[1:]] == [100, 700, 1300, 1900]


@pytest.mark.filterwarnings("error")
def test_fixed_k_is_honoured_on_tiny_inputs() -> None:
    rng = np.random.default_rng(4)
    for n in range(2, 9):
        vectors = unit_rows(rng.normal(size=(n, 16)))
        ids = np.arange(n)
        for k in range(1, n + 2):
            result = cluster_vectors(vectors, ids, k=k, batch_size=2)
            check_structure(result, vectors, ids)
            assert result.k == min(k, n)


def bad(**changes: object) -> dict[str, object]:
    good: dict[str, object] = {"vectors": unit_rows(np.ones((3, 4))), "ids": np.arange(3), "k": None}
    return {**good, **changes}


@pytest.mark.parametrize(
    "arguments",
    [
        bad(ids=np.arange(4)),
        bad(vectors=np.ones(4, dtype=np.float32)),
        bad(vectors=np.ones((3, 4, 1), dtype=np.float32)),
        bad(vectors=np.array([[1.0, np.nan], [0.0, 1.0], [1.0, 0.0]])),
        bad(vectors=np.array([[1.0, np.inf], [0.0, 1.0], [1.0, 0.0]])),
        bad(vectors=np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0]])),
        bad(vectors=np.full((3, 4), 1e30, dtype=np.float32)),
        bad(vectors=np.array([["a", "b"], ["c", "d"], ["e", "f"]])),
        bad(vectors=np.ones((3, 0), dtype=np.float32)),
        bad(ids=np.array([1, 2, 2])),
        bad(ids=np.array([1.0, 2.0, 3.0])),
        bad(ids=np.arange(3).reshape(3, 1)),
        bad(k=0),
        bad(k=-2),
        bad(k=2.5),
        bad(k=True),
        bad(k_min=5, k_max=4),
        bad(k_min=1),
        bad(batch_size=0),
        bad(sample_size=2),
        bad(n_representatives=-1),
        bad(seed=-1),
    ],
)
def test_invalid_input_raises_clustering_error(arguments: dict[str, object]) -> None:
    with pytest.raises(ClusteringError) as caught:
        cluster_vectors(**arguments)  # type: ignore[arg-type]  # wrong types on purpose
    assert isinstance(caught.value, ValueError)
    message = str(caught.value)
    assert message[0].isalpha() and message.endswith(".")
