"""Every runtime and precision the service can choose reproduces the reference vectors, by a measure that fails
the classic preprocessing bugs: the lowest centered cosine (ml/fidelity.py), on the tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ml import fidelity, onnx_clip
from ml.embedder import ClipEmbedder
from ml.inference import InferenceConfigError, PrecisionSetting, RuntimeSetting
from tests.tiny_models import CLIP_SOURCE, build_tiny_clip

PHOTOS = 12


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """Scenes that differ in layout, not colour (ml/fidelity.py says why)."""
    return fidelity.scenes(PHOTOS)


def measure(embedder: ClipEmbedder, model_dir: Path, photos: list[Image.Image]) -> tuple[float, float]:
    """(image, text) lowest centered cosine of the embedder's own path against the reference."""
    reference_images, reference_texts = fidelity.reference_vectors(str(model_dir), photos, fidelity.QUERIES)
    images = embedder.embed_images(photos)
    texts = embedder.embed_texts(list(fidelity.QUERIES))
    return (
        fidelity.lowest_centered_cosine(images, reference_images),
        fidelity.lowest_centered_cosine(texts, reference_texts),
    )


CHOICES: list[tuple[RuntimeSetting, PrecisionSetting]] = [("torch", "fp32"), ("onnx", "fp32"), ("torch", "bf16")]


@pytest.mark.parametrize(("runtime", "precision"), CHOICES)
def test_every_runtime_and_precision_keeps_its_bound(
    runtime: RuntimeSetting, precision: PrecisionSetting, tiny_clip_dir: Path, tmp_path: Path, photos: list[Image.Image]
) -> None:
    if precision == "bf16":
        # The service offers bf16 only where the CPU has it; its numbers are the same where it is emulated.
        embedder = ClipEmbedder._torch(str(tiny_clip_dir), "cpu", "key", 32, "bf16")
    else:
        embedder = ClipEmbedder.load(
            str(tiny_clip_dir),
            "cpu",
            runtime=runtime,
            precision=precision,
            cache_root=tmp_path,
        )
    assert (embedder.runtime, embedder.precision, embedder.fallback) == (runtime, precision, None)
    image, text = measure(embedder, tiny_clip_dir, photos)
    bound = fidelity.BOUNDS[precision]
    assert image >= bound, f"image tower: {image:.4f} < {bound}"
    assert text >= bound, f"text tower: {text:.4f} < {bound}"


@pytest.mark.parametrize("control", list(fidelity.CONTROLS))
def test_the_measure_fails_each_classic_bug(control: str, tiny_clip_dir: Path, photos: list[Image.Image]) -> None:
    """Mirrored, squashed and channel-swapped pixels each score below the loosest bound."""
    reference, _ = fidelity.reference_vectors(str(tiny_clip_dir), photos, fidelity.QUERIES[:2])
    broken, _ = fidelity.reference_vectors(
        str(tiny_clip_dir), [fidelity.CONTROLS[control](photo) for photo in photos], fidelity.QUERIES[:2]
    )
    plain = float((broken * reference).sum(axis=1).min())
    centered = fidelity.lowest_centered_cosine(broken, reference)
    assert centered < min(fidelity.BOUNDS.values()), f"{control}: {centered:.4f} passes the bound"
    assert centered < plain  # what centering is for: the plain cosine hides the bug better


def test_int8_is_refused_with_the_reason(tiny_clip_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InferenceConfigError, match="fidelity bound"):
        ClipEmbedder.load(str(tiny_clip_dir), "cpu", precision="int8", cache_root=tmp_path)


def test_a_second_load_reuses_the_exported_graphs(tiny_clip_dir: Path, tmp_path: Path) -> None:
    first = ClipEmbedder.load(str(tiny_clip_dir), "cpu", runtime="onnx", cache_root=tmp_path)
    graph = next(tmp_path.glob("*/visual/model.onnx"))
    written = graph.stat().st_mtime_ns
    second = ClipEmbedder.load(str(tiny_clip_dir), "cpu", runtime="onnx", cache_root=tmp_path)
    assert (first.graphs, second.graphs) == ("exported", "cache")
    assert graph.stat().st_mtime_ns == written
    np.testing.assert_array_equal(first.embed_texts(["sea"]), second.embed_texts(["sea"]))


def test_changed_weights_make_a_new_export(tmp_path: Path) -> None:
    """The cache is keyed by the weights' content: a model saved again in place is exported again."""
    model_dir = build_tiny_clip(tmp_path / "clip", seed=0)
    before = ClipEmbedder.load(str(model_dir), "cpu", runtime="onnx", cache_root=tmp_path / "cache")
    build_tiny_clip(model_dir, seed=1)
    after = ClipEmbedder.load(str(model_dir), "cpu", runtime="onnx", cache_root=tmp_path / "cache")
    assert after.graphs == "exported"
    assert len(list((tmp_path / "cache").iterdir())) == 2
    assert not np.allclose(before.embed_texts(["sea"]), after.embed_texts(["sea"]))


def test_a_failed_export_falls_back_to_pytorch_with_the_reason(
    tiny_clip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("exporter crashed on purpose")

    monkeypatch.setattr(onnx_clip, "export", broken)
    embedder = ClipEmbedder.load(str(tiny_clip_dir), "cpu", runtime="onnx", cache_root=tmp_path)
    assert embedder.runtime == "torch"
    assert embedder.fallback is not None and "exporter crashed on purpose" in embedder.fallback
    assert embedder.embed_texts(["sea"]).shape == (1, embedder.dim)
    assert not any(tmp_path.iterdir())  # nothing half-written is left for the next start to trust


def immich_layout(model_dir: Path, target: Path) -> Path:
    """The tiny model exported the way Immich publishes CLIP: open_clip's graphs (an `image` input; a `text`
    input of int32 ids padded to 77), `preprocess_cfg.json`, the tokenizer files and `config.json`."""
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(model_dir).eval().requires_grad_(False)

    class Visual(torch.nn.Module):
        def forward(self, image: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = model.get_image_features(pixel_values=image).pooler_output
            return out

    class Textual(torch.nn.Module):
        def forward(self, text: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = model.get_text_features(input_ids=text.long()).pooler_output
            return out

    (target / "visual").mkdir(parents=True)
    (target / "textual").mkdir()
    with torch.no_grad():
        export_pair(Visual(), Textual(), target)

    preprocess = json.loads((CLIP_SOURCE / "preprocessor_config.json").read_text())
    (target / "visual" / "preprocess_cfg.json").write_text(
        json.dumps(
            {
                "size": [224, 224],
                "mode": "RGB",
                "mean": preprocess["image_mean"],
                "std": preprocess["image_std"],
                "interpolation": "bicubic",
                "resize_mode": "shortest",
            }
        )
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(CLIP_SOURCE / name, target / "textual" / name)
    (target / "config.json").write_text(json.dumps({"embed_dim": 16, "text_cfg": {"context_length": 77}}))
    return target


def export_pair(visual: torch.nn.Module, textual: torch.nn.Module, target: Path) -> None:
    torch.onnx.export(
        visual, (torch.zeros(1, 3, 224, 224),), str(target / "visual" / "model.onnx"), input_names=["image"],
        dynamic_axes={"image": {0: "batch"}}, dynamo=False,
    )  # fmt: skip
    torch.onnx.export(
        textual, (torch.zeros(1, 77, dtype=torch.int32),), str(target / "textual" / "model.onnx"),
        input_names=["text"], dynamic_axes={"text": {0: "batch"}}, dynamo=False,
    )  # fmt: skip


def test_a_directory_of_published_onnx_graphs_loads_directly(
    tiny_clip_dir: Path, tmp_path: Path, photos: list[Image.Image]
) -> None:
    folder = immich_layout(tiny_clip_dir, tmp_path / "immich")
    embedder = ClipEmbedder.load(str(folder), "cpu", cache_root=tmp_path / "cache")
    assert (embedder.runtime, embedder.precision, embedder.graphs) == ("onnx", "fp32", "directory")
    assert not (tmp_path / "cache").exists()  # nothing exported
    image, text = measure(embedder, tiny_clip_dir, photos)
    assert min(image, text) >= fidelity.BOUNDS["fp32"], (image, text)
