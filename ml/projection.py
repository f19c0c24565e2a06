"""Project CLIP vectors onto a plane for a map of the collection: PCA, deterministic, bounded cost.

Synchronous numpy / scikit-learn: callers run it in an executor. Knows nothing of HTTP or databases.

PCA rather than UMAP or t-SNE: it costs one pass over a sample and a matrix product, keeps distances
readable (nearby points look alike along the two directions of greatest variance), and needs no extra
native dependency. It is fitted on every call, so adding or removing images moves the other points (and
can turn the axes when no two directions dominate): compare maps of one collection, not across changes. The axes are
fitted on at most `fit_rows` rows and their signs are fixed so the same collection always draws the same
way up.
"""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA

FIT_ROWS = 20_000
CHUNK_ROWS = 65_536


def project_2d(vectors: np.ndarray, *, seed: int = 0, fit_rows: int = FIT_ROWS) -> np.ndarray:
    """(n, d) vectors -> (n, 2) float32 coordinates, scaled so the farthest point lies at distance 1."""
    n = len(vectors)
    if n == 0:
        return np.empty((0, 2), dtype=np.float32)
    if n == 1:
        return np.zeros((1, 2), dtype=np.float32)
    vectors = np.asarray(vectors, dtype=np.float32)
    rng = np.random.default_rng(seed)
    sample = vectors if n <= fit_rows else vectors[np.sort(rng.choice(n, size=fit_rows, replace=False))]
    components = min(2, sample.shape[1], len(sample))
    pca = PCA(n_components=components, svd_solver="full" if len(sample) <= 2_000 else "randomized", random_state=seed)
    pca.fit(sample)
    axes = pca.components_.astype(np.float32)
    # An eigenvector's sign is arbitrary: point each axis towards its largest loading, so reruns agree.
    signs = np.sign(axes[np.arange(components), np.abs(axes).argmax(axis=1)])
    axes *= np.where(signs == 0, 1, signs)[:, None]
    mean = pca.mean_.astype(np.float32)
    points = np.zeros((n, 2), dtype=np.float32)
    for start in range(0, n, CHUNK_ROWS):
        block = vectors[start : start + CHUNK_ROWS]
        points[start : start + len(block), :components] = (block - mean) @ axes.T
    radius = float(np.sqrt((points**2).sum(axis=1)).max())
    if radius > 0:
        points /= radius
    return points
