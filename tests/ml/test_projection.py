"""PCA projection for the collection map: shape, scale, determinism, independence from row order."""

from __future__ import annotations

import numpy as np

from ml.projection import project_2d


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, 32)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_project_gives_two_coordinates_inside_the_unit_disc() -> None:
    points = project_2d(_vectors(50))
    assert points.shape == (50, 2) and points.dtype == np.float32
    radii = np.hypot(points[:, 0], points[:, 1])
    assert abs(radii.max() - 1) < 1e-6


def test_project_is_deterministic_and_ignores_row_order() -> None:
    vectors = _vectors(200)
    order = np.random.default_rng(1).permutation(200)
    assert np.array_equal(project_2d(vectors), project_2d(vectors))
    assert np.allclose(project_2d(vectors)[order], project_2d(vectors[order]), atol=1e-5)


def test_project_keeps_separate_groups_apart() -> None:
    rng = np.random.default_rng(2)
    centres = np.eye(32, dtype=np.float32)[:2] * 5
    groups = [centre + rng.standard_normal((40, 32)).astype(np.float32) * 0.1 for centre in centres]
    points = project_2d(np.vstack(groups))
    a, b = points[:40].mean(axis=0), points[40:].mean(axis=0)
    spread = max(points[:40].std(axis=0).max(), points[40:].std(axis=0).max())
    assert np.linalg.norm(a - b) > 10 * spread


def test_project_handles_tiny_inputs_and_samples_large_ones() -> None:
    assert project_2d(np.empty((0, 8), dtype=np.float32)).shape == (0, 2)
    assert project_2d(_vectors(1)).tolist() == [[0.0, 0.0]]
    assert project_2d(_vectors(2)).shape == (2, 2)
    big = _vectors(3000)
    sampled = project_2d(big, fit_rows=500)
    assert sampled.shape == (3000, 2) and np.isfinite(sampled).all()
    assert np.array_equal(sampled, project_2d(big, fit_rows=500))
