"""The CLIP wrapper on a tiny random model: shapes, norms, determinism, batching consistency."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml.embedder import ClipEmbedder, resolve_device


@pytest.fixture(scope="module")
def embedder(tiny_clip_dir: Path) -> ClipEmbedder:
    return ClipEmbedder.load(str(tiny_clip_dir), "cpu", batch_size=2)


def images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (50 + i, 70, 3), dtype=np.uint8)) for i in range(count)]


def test_image_vectors_are_unit_float32(embedder: ClipEmbedder) -> None:
    vectors = embedder.embed_images(images(5))
    assert vectors.shape == (5, embedder.dim) == (5, 16)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


def test_batching_does_not_change_image_vectors(embedder: ClipEmbedder) -> None:
    batch = images(5)
    together = embedder.embed_images(batch)  # batches of 2, 2, 1
    alone = np.stack([embedder.embed_images([image])[0] for image in batch])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_text_vectors_do_not_depend_on_batch_mates(embedder: ClipEmbedder) -> None:
    """Queries are padded to the longest in their batch only, and padding must not leak into the result."""
    alone = embedder.embed_texts(["a dog"])[0]
    with_long = embedder.embed_texts(["a dog", "a very long description of a busy street market at dusk"])[0]
    np.testing.assert_allclose(alone, with_long, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(alone), 1.0, rtol=1e-5)


def test_text_longer_than_77_tokens_is_truncated_not_refused(embedder: ClipEmbedder) -> None:
    vectors = embedder.embed_texts(["word " * 300])
    assert vectors.shape == (1, embedder.dim)
    assert np.isfinite(vectors).all()


def test_loading_twice_gives_identical_vectors(embedder: ClipEmbedder, tiny_clip_dir: Path) -> None:
    again = ClipEmbedder.load(str(tiny_clip_dir), "cpu")
    np.testing.assert_allclose(again.embed_images(images(2)), embedder.embed_images(images(2)), atol=1e-6)
    np.testing.assert_allclose(again.embed_texts(["sea"]), embedder.embed_texts(["sea"]), atol=1e-6)


def test_empty_inputs_give_empty_arrays(embedder: ClipEmbedder) -> None:
    assert embedder.embed_images([]).shape == (0, embedder.dim)
    assert embedder.embed_texts([]).shape == (0, embedder.dim)


def test_auto_device_falls_back_to_cpu_without_accelerators() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; auto picks it")
    assert resolve_device("auto") in {"cpu", "mps"}
    with pytest.raises(RuntimeError, match="no CUDA"):
        resolve_device("cuda")


def test_unknown_model_directory_fails_to_load(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        ClipEmbedder.load(str(tmp_path), "cpu")  # exists, but holds no model
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ClipEmbedder.load(str(tmp_path / "typo"), "cpu")


def test_very_long_images_embed_like_their_centre(embedder: ClipEmbedder) -> None:
    rng = np.random.default_rng(5)
    strip = Image.fromarray(rng.integers(0, 256, (4, 6000, 3), dtype=np.uint8))
    vector = embedder.embed_images([strip])
    assert vector.shape == (1, embedder.dim)
    assert embedder.preprocess([strip]).shape[-2:] == (224, 224)
    centre = strip.crop((2998, 0, 3002, 4))  # the square the processor would keep
    np.testing.assert_allclose(vector[0], embedder.embed_images([centre])[0], atol=0.05)


def test_crop_to_aspect_keeps_the_centre() -> None:
    from ml.embedder import crop_to_aspect

    assert crop_to_aspect(Image.new("RGB", (1000, 100)), 2.0).size == (200, 100)
    assert crop_to_aspect(Image.new("RGB", (100, 1000)), 2.0).size == (100, 200)
    assert crop_to_aspect(Image.new("RGB", (150, 100)), 2.0).size == (150, 100)
