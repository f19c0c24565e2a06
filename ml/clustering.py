"""Group CLIP vectors into clusters with mini-batch k-means, choosing k by cosine silhouette when asked to.

Synchronous, pure numpy / scikit-learn: callers run it in an executor. Knows nothing of HTTP or databases.

The vectors are unit vectors, so Euclidean k-means approximates spherical k-means; the final assignment and
all reported distances use re-normalised centroids and cosine distance (1 - cos).

Results are deterministic for a fixed seed and do not depend on the order of the rows: rows are sorted by id
before anything else happens.

Tiny and degenerate inputs never raise:

- no vectors -> k = 0 and no clusters;
- k is clamped to the number of distinct vectors (so one vector, or many identical ones, give one cluster);
- with automatic k and fewer than 3 points nothing can be scored, so k = min(k_min, number of distinct vectors):
  two different vectors give two clusters, two identical ones give one;
- a cluster k-means leaves empty is dropped, so `ClusteringResult.k` can be smaller than the k asked for.
"""

from __future__ import annotations

import operator
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from sklearn.cluster import MiniBatchKMeans, kmeans_plusplus
from sklearn.exceptions import ConvergenceWarning
from threadpoolctl import threadpool_limits

# k-means++ seedings to try, keeping the lowest inertia. On synthetic well-separated groups (2-15 groups, 30 seeds
# each) auto-k missed a group in 2 of 420 cases with 5 seedings and in none with 10; at k <= 20 each takes ~20 ms.
N_INIT = 10
# sklearn moves centres with few points onto random batch rows. Batches are drawn with replacement, so on small
# inputs that lands centres on rows that already have one and clusters vanish; k-means++ seeding leaves few dead
# centres to rescue in the first place.
REASSIGNMENT_RATIO = 0.0
# Automatic k: at most this many candidates get a fit, so the cost stays bounded however wide k_min..k_max is.
MAX_CANDIDATES = 20
# Every k in the first DENSE_CANDIDATES of the range is tried; beyond that the step grows geometrically.
DENSE_CANDIDATES = 10
# Silhouettes this close count as a tie, and the smaller k wins (fewer, broader groups are easier to browse).
SILHOUETTE_TIE = 1e-4
# Rows per block in matrix products, so memory stays bounded at 100k x 512 and with large k.
CHUNK_ROWS = 16384

# threadpoolctl limits are process-wide, so concurrent calls must not interleave their set/restore pairs.
_THREADPOOL_LOCK = threading.Lock()


class ClusteringError(ValueError):
    """The input cannot be clustered; the message says why in one sentence."""


@dataclass
class Cluster:
    label: int  # 0..k-1, by decreasing size (ties: by smallest member id)
    member_ids: np.ndarray  # int64, by increasing distance to the centroid (ties by id)
    distances: np.ndarray  # float32 cosine distance (1 - cos) of each member to the centroid, same order
    representative_ids: np.ndarray  # the first min(n_representatives, size) of member_ids
    centroid: np.ndarray  # float32 unit vector (d,)


@dataclass
class ClusteringResult:
    k: int  # clusters actually produced
    k_requested: int | None  # None when k was automatic
    clusters: list[Cluster]
    silhouette: float | None  # cosine silhouette of the result on the (sampled) data; None when undefined
    candidates: dict[int, float]  # automatic k: k -> silhouette for every candidate tried; {} for fixed k


def cluster_vectors(
    vectors: np.ndarray,
    ids: np.ndarray,
    *,
    k: int | None,
    seed: int = 0,
    batch_size: int = 1024,
    k_min: int = 2,
    k_max: int = 20,
    sample_size: int = 5000,
    n_representatives: int = 4,
) -> ClusteringResult:
    """Cluster (n, d) unit vectors with matching int64 ids into k groups, or into an automatically chosen number.

    Fixed k: k is clamped to the number of distinct vectors, then MiniBatchKMeans is fitted on all the data.

    Automatic k (`k=None`): candidates run from k_min to min(k_max, distinct vectors in the sample, sample size - 1),
    every value for the first 10 and then geometrically spaced, at most 20 in all. Each candidate is fitted on a
    seeded random sample of at most `sample_size` rows and scored by its cosine silhouette on that sample; the best
    wins, the smaller k on a near-tie. The winner is then refitted on all the data, starting from its sample
    centroids (when the sample is the whole collection the sample fit is kept as is).

    `silhouette` is the cosine silhouette of the returned clustering on the same sample (all rows when
    n <= sample_size). It is None when it is undefined: fewer than 2 clusters, or every sampled point alone.
    `candidates` holds the sample-fit silhouettes, so `candidates[k]` can differ slightly from `silhouette`.

    Rows are re-normalised, so vectors of any positive length are accepted. Invalid input raises ClusteringError.
    BLAS and OpenMP run single-threaded during the call: on 2 cores sklearn's OpenMP threads and OpenBLAS's
    threads spin against each other and made fits erratic and up to 10x slower. The limit is process-wide, so
    concurrent calls are serialised, and BLAS users in other threads run single-threaded meanwhile.
    """
    matrix, ids = _validate(
        vectors,
        ids,
        k=k,
        seed=seed,
        batch_size=batch_size,
        k_min=k_min,
        k_max=k_max,
        sample_size=sample_size,
        n_representatives=n_representatives,
    )
    k_requested = None if k is None else operator.index(k)
    n = len(ids)
    if n == 0:
        return ClusteringResult(k=0, k_requested=k_requested, clusters=[], silhouette=None, candidates={})

    sample = (
        np.arange(n) if n <= sample_size else np.sort(np.random.default_rng(seed).choice(n, sample_size, replace=False))
    )

    with _THREADPOOL_LOCK, threadpool_limits(limits=1), warnings.catch_warnings():
        # k is clamped to the distinct points, but near-duplicates can still collapse centres; empty clusters are
        # dropped afterwards, so the warning tells the caller nothing.
        warnings.filterwarnings("ignore", message="Number of distinct clusters", category=ConvergenceWarning)
        candidates: dict[int, float] = {}
        if k_requested is not None:
            centres = _fit(matrix, _distinct_count(matrix, k_requested), seed=seed, batch_size=batch_size)
        else:
            centres, candidates = _auto_centres(
                matrix,
                sample,
                k_min=k_min,
                k_max=k_max,
                seed=seed,
                batch_size=batch_size,
            )
        labels = _assign(matrix, centres)
        clusters, labels = _build_clusters(matrix, ids, labels, n_representatives)
        silhouette = _cosine_silhouette(matrix[sample], labels[sample])

    return ClusteringResult(
        k=len(clusters), k_requested=k_requested, clusters=clusters, silhouette=silhouette, candidates=candidates
    )


def _validate(
    vectors: np.ndarray,
    ids: np.ndarray,
    *,
    k: int | None,
    seed: int,
    batch_size: int,
    k_min: int,
    k_max: int,
    sample_size: int,
    n_representatives: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Check arguments and return (unit float32 vectors, int64 ids) as fresh arrays, sorted by id."""
    _check_int("seed", seed, 0, 2**32 - 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("k_min", k_min, 2, reason="the silhouette needs at least two clusters")
    _check_int("k_max", k_max, 2)
    if k_min > k_max:
        raise ClusteringError(f"k_min ({k_min}) must not be larger than k_max ({k_max}).")
    _check_int("sample_size", sample_size, 3, reason="the silhouette needs at least three points")
    _check_int("n_representatives", n_representatives, 0)
    if k is not None:
        _check_int("k", k, 1)

    array = np.asarray(vectors)
    if array.ndim != 2:
        raise ClusteringError(f"The vectors must be a 2-D array of shape (n, d), not {array.ndim}-D.")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ClusteringError(f"The vectors must be real numbers, not {array.dtype}.")
    id_array = np.asarray(ids)
    if id_array.ndim != 1:
        raise ClusteringError(f"The ids must be a 1-D array, not {id_array.ndim}-D.")
    if len(id_array) and not np.issubdtype(id_array.dtype, np.integer):
        raise ClusteringError(f"The ids must be integers, not {id_array.dtype}.")
    if len(id_array) != len(array):
        raise ClusteringError(f"Got {len(array)} vectors but {len(id_array)} ids; they must match one to one.")
    id_array = id_array.astype(np.int64)
    # Everything downstream (sampling, k-means batches, tie-breaks) follows row order, so fix it by id.
    order = np.argsort(id_array, kind="stable")
    id_array = id_array[order]
    if (id_array[1:] == id_array[:-1]).any():
        raise ClusteringError("The ids must be unique, but some appear more than once.")
    if len(array) == 0:
        return np.zeros((0, array.shape[1]), dtype=np.float32), id_array
    if array.shape[1] == 0:
        raise ClusteringError("The vectors have no components (d = 0).")

    # Sorting makes the one copy we need (at 100k x 512 every extra copy is 200 MB).
    matrix = np.ascontiguousarray(array[order], dtype=np.float32)
    # Chunked checks and einsum avoid full-size temporaries (np.linalg.norm would square the whole matrix).
    if not all(np.isfinite(matrix[block]).all() for block in _chunks(len(matrix))):
        raise ClusteringError("The vectors contain NaN or infinite values.")
    norms = np.sqrt(np.einsum("ij,ij->i", matrix, matrix))[:, None]
    if not np.isfinite(norms).all():
        raise ClusteringError("Some vectors are too large to normalise in single precision.")
    if not (norms > 0).all():
        raise ClusteringError("Some vectors are all zeros, so they have no direction to cluster by.")
    matrix /= norms
    # -0.0 and 0.0 differ bytewise; adding 0.0 folds them so the distinct count sees equal vectors as equal.
    matrix += 0.0
    return matrix, id_array


def _check_int(name: str, value: object, minimum: int, maximum: int | None = None, *, reason: str = "") -> None:
    if isinstance(value, bool):
        raise ClusteringError(f"{name} must be an integer, not a boolean.")
    try:
        number = operator.index(value)  # type: ignore[arg-type]  # any object: the TypeError is the check
    except TypeError:
        raise ClusteringError(f"{name} must be an integer, not {type(value).__name__}.") from None
    if number < minimum or (maximum is not None and number > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        because = f" because {reason}" if reason else ""
        raise ClusteringError(f"{name} must be {bound}{because}, got {number}.")


def _row_keys(matrix: np.ndarray) -> np.ndarray:
    """Each row as one opaque byte string, so numpy can sort and compare whole rows quickly."""
    return np.ascontiguousarray(matrix).view(np.dtype((np.void, matrix.dtype.itemsize * matrix.shape[1]))).ravel()


def _distinct_count(matrix: np.ndarray, cap: int) -> int:
    """min(number of distinct rows, cap), exactly; rows are compared by their bytes.

    Counting all 100k x 512 rows costs ~0.5 s, so growing prefixes are counted and the search stops as soon as
    `cap` distinct rows are seen, which for ordinary data happens within the first few thousand rows.
    """
    rows = _row_keys(matrix)
    size = max(1024, 4 * cap)
    while True:
        count = len(np.unique(rows[:size]))
        if count >= cap:
            return cap
        if size >= len(rows):
            return count
        size *= 4


def _chunks(n: int, size: int = CHUNK_ROWS) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _normalise(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    return (rows / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def _distinct_rows(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of one row per distinct value (in byte order) and how many rows share it."""
    _, first, counts = np.unique(_row_keys(matrix), return_index=True, return_counts=True)
    return first, counts


def _seed_centres(matrix: np.ndarray, n_clusters: int, *, seed: int, init_size: int) -> np.ndarray:
    """Best (by inertia) of a few k-means++ seedings on a random subset of about init_size rows.

    MiniBatchKMeans seeds itself the same way, but draws its subset with replacement, which on small inputs drops
    a third of the rows and, with k near the number of points, puts several centres on one point. Here the subset
    is drawn without replacement and collapsed to distinct rows weighted by their count, so no two centres start on
    the same point. If heavy duplication left fewer distinct rows in the subset than k, the distinct rows of the
    whole matrix are used instead (there are at least k: the caller clamps k to them).
    """
    rng = np.random.RandomState(seed)
    size = min(len(matrix), max(init_size, 3 * n_clusters))
    subset = matrix if size == len(matrix) else matrix[np.sort(rng.choice(len(matrix), size, replace=False))]
    first, weights = _distinct_rows(subset)
    if len(first) < n_clusters:
        subset = matrix
        first, weights = _distinct_rows(matrix)
        if len(first) > size:
            keep = np.sort(rng.choice(len(first), size, replace=False))
            first, weights = first[keep], weights[keep]
    # float64: sklearn's float32 path upcasts chunk by chunk and is about twice as slow.
    points = subset[first].astype(np.float64)
    weights = weights.astype(np.float64)
    # Seeding costs O(rows * k * log k); fewer tries for large k keep it near the cost of N_INIT tries at k = 20.
    tries = max(1, min(N_INIT, N_INIT * 20 // n_clusters))
    best, best_inertia = points[:n_clusters], np.inf
    for _ in range(tries):
        centres, _ = kmeans_plusplus(points, n_clusters, sample_weight=weights, random_state=rng)
        # Centres are data rows, hence unit vectors: squared Euclidean distance is 2 - 2 cos.
        inertia = 0.0
        for block in _chunks(len(points), max(1, CHUNK_ROWS * 64 // n_clusters)):
            nearest = np.maximum(2.0 - 2.0 * (points[block] @ centres.T).max(axis=1), 0.0)
            inertia += float(nearest @ weights[block])
        if inertia < best_inertia:
            best, best_inertia = centres, inertia
    return np.asarray(best, dtype=np.float32)


def _fit(
    matrix: np.ndarray,
    n_clusters: int,
    *,
    seed: int,
    batch_size: int,
    init_size: int | None = None,
    init: np.ndarray | None = None,
) -> np.ndarray:
    """Centres (not normalised) of a k-means fit; k = 1 needs no fit. init_size defaults to sklearn's 3 * batch."""
    if n_clusters == 1:
        centre = matrix.astype(np.float64).mean(axis=0, keepdims=True)
        # Perfectly opposed vectors average to zero; any member then serves as a direction.
        return centre if np.linalg.norm(centre) > 0 else matrix[:1].astype(np.float64)
    init_size = 3 * batch_size if init_size is None else init_size
    if init is None:
        init = _seed_centres(matrix, n_clusters, seed=seed, init_size=init_size)
    model = MiniBatchKMeans(
        n_clusters=n_clusters,
        init=init,
        n_init=1,
        batch_size=batch_size,
        # Unused with explicit centres, but sklearn warns when it is below 3 * k.
        init_size=min(len(matrix), max(init_size, 3 * n_clusters)),
        reassignment_ratio=REASSIGNMENT_RATIO,
        random_state=seed,
    )
    centres: np.ndarray = model.fit(matrix).cluster_centers_
    return centres


def _candidate_ks(k_min: int, k_max: int) -> list[int]:
    if k_max - k_min + 1 <= MAX_CANDIDATES:
        return list(range(k_min, k_max + 1))
    dense = list(range(k_min, k_min + DENSE_CANDIDATES))
    sparse = np.geomspace(k_min + DENSE_CANDIDATES, k_max, MAX_CANDIDATES - DENSE_CANDIDATES)
    return dense + sorted({int(round(value)) for value in sparse})


def _auto_centres(
    matrix: np.ndarray,
    sample: np.ndarray,
    *,
    k_min: int,
    k_max: int,
    seed: int,
    batch_size: int,
) -> tuple[np.ndarray, dict[int, float]]:
    """Pick k by cosine silhouette on the sample, then fit that k on all rows."""
    sampled = matrix[sample]
    # Silhouette is defined for 2 <= k <= m - 1; more clusters than distinct points would only come out empty.
    upper = min(_distinct_count(sampled, k_max), len(sampled) - 1)
    if upper < k_min:
        # Too few points (or distinct ones) to score anything: the smallest allowed k the data supports.
        return _fit(matrix, _distinct_count(matrix, k_min), seed=seed, batch_size=batch_size), {}

    candidates: dict[int, float] = {}
    fits: dict[int, np.ndarray] = {}
    for n_clusters in _candidate_ks(k_min, upper):
        # Seeding from one batch of rows is enough on a sample of a few thousand, and a third of the default cost.
        centres = _fit(sampled, n_clusters, seed=seed, batch_size=batch_size, init_size=batch_size)
        score = _cosine_silhouette(sampled, _assign(sampled, centres))
        if score is not None:
            candidates[n_clusters] = score
            fits[n_clusters] = centres
    if not candidates:
        # Every candidate collapsed to a single cluster: nothing separates the points.
        return _fit(matrix, 1, seed=seed, batch_size=batch_size), {}

    best = max(candidates.values())
    chosen = min(n for n, score in candidates.items() if score >= best - SILHOUETTE_TIE)
    if len(sample) == len(matrix):
        return fits[chosen], candidates
    return _fit(matrix, chosen, seed=seed, batch_size=batch_size, init=fits[chosen]), candidates


def _assign(matrix: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Nearest centre by cosine, i.e. spherical assignment to the normalised centres."""
    directions = _normalise(centres).T
    labels = np.empty(len(matrix), dtype=np.int64)
    rows = max(1, CHUNK_ROWS * 64 // max(1, len(centres)))  # bound the (rows, k) block, not just the rows
    for block in _chunks(len(matrix), rows):
        labels[block] = np.argmax(matrix[block] @ directions, axis=1)
    return labels


def _build_clusters(
    matrix: np.ndarray, ids: np.ndarray, labels: np.ndarray, n_representatives: int
) -> tuple[list[Cluster], np.ndarray]:
    """Clusters numbered by decreasing size, and the row labels renumbered to match (empty clusters dropped)."""
    by_label = np.argsort(labels, kind="stable")  # rows stay in id order within each label
    counts = np.bincount(labels)
    groups = [rows for rows in np.split(by_label, np.cumsum(counts)[:-1]) if len(rows)]
    # Rows are sorted by id, so a group's first row holds its smallest id.
    groups.sort(key=lambda rows: (-len(rows), ids[rows[0]]))

    clusters: list[Cluster] = []
    renumbered = np.empty_like(labels)
    for label, rows in enumerate(groups):
        renumbered[rows] = label
        total = np.zeros(matrix.shape[1], dtype=np.float64)
        for block in _chunks(len(rows)):
            total += matrix[rows[block]].sum(axis=0, dtype=np.float64)
        # The centroid is the direction of the members' mean, so distances describe the members actually assigned.
        centroid = _normalise(total) if np.linalg.norm(total) > 0 else matrix[rows[0]].copy()
        distances = np.empty(len(rows), dtype=np.float32)
        for block in _chunks(len(rows)):
            distances[block] = 1.0 - matrix[rows[block]] @ centroid
        np.clip(distances, 0.0, 2.0, out=distances)
        member_order = np.lexsort((ids[rows], distances))
        member_ids = ids[rows][member_order]
        clusters.append(
            Cluster(
                label=label,
                member_ids=member_ids,
                distances=distances[member_order],
                representative_ids=member_ids[:n_representatives].copy(),
                centroid=centroid,
            )
        )
    return clusters, renumbered


def _cosine_silhouette(matrix: np.ndarray, labels: np.ndarray) -> float | None:
    """Mean silhouette with cosine distance, as sklearn.metrics.silhouette_score(..., metric="cosine") gives it.

    For unit vectors the summed distance from x to a cluster C is |C| - x . sum(C), so per-cluster sums replace
    the (m, m) distance matrix: O(m k d) instead of O(m^2 d). None when undefined (fewer than 2 clusters, or as
    many clusters as points).
    """
    _, compact = np.unique(labels, return_inverse=True)
    compact = compact.ravel()
    m = len(compact)
    sizes = np.bincount(compact).astype(np.float64)
    n_labels = len(sizes)
    if n_labels < 2 or n_labels > m - 1:
        return None

    rows = matrix.astype(np.float64)
    starts = np.concatenate(([0], np.cumsum(sizes[:-1]))).astype(np.int64)
    sums = np.add.reduceat(rows[np.argsort(compact, kind="stable")], starts, axis=0)
    scores = np.empty(m)
    block_rows = max(1, CHUNK_ROWS * 64 // n_labels)
    for block in _chunks(m, block_rows):
        own = compact[block]
        part = rows[block]
        # Clip: rounding can make a sum of (near-)zero distances slightly negative.
        totals = np.maximum(sizes - part @ sums.T, 0.0)
        picked = np.arange(len(own))
        self_distance = np.maximum(1.0 - np.einsum("ij,ij->i", part, part), 0.0)
        own_size = sizes[own]
        a = np.maximum(totals[picked, own] - self_distance, 0.0) / np.maximum(own_size - 1, 1)
        means = totals / sizes
        means[picked, own] = np.inf
        b = means.min(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            s = (b - a) / np.maximum(a, b)
        s = np.nan_to_num(s)  # a = b = 0: identical points split across clusters score 0, as in sklearn
        s[own_size == 1] = 0.0  # sklearn's convention for singleton clusters
        scores[block] = s
    return float(scores.mean())
