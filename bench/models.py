"""Full-size CLIP ViT-B/32 and BLIP-base with random weights, built once from tests/fixtures/models.

Their compute is exactly the real models' (same configs), so throughput and latency figures hold for the
real weights; what they say means nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE = REPO_ROOT / ".models"


def _built(name: str, build: Callable[[Path], object]) -> Path:
    """`.models/<name>`, built by `build(target)` on first use."""
    target = CACHE / name
    if not (target / "config.json").is_file():
        build(target)
    return target


def _full_random(name: str, source_name: str, model_class: str, config_class: str) -> Path:
    """`.models/<name>`: a random-weight (seed 0) model of `tests/fixtures/models/<source_name>`'s exact shape, with
    the real processor; `model_class` and `config_class` are transformers class names."""
    import transformers

    from tests.tiny_models import MODEL_FILES

    def build(target: Path) -> None:
        source = MODEL_FILES / source_name
        config = getattr(transformers, config_class).from_pretrained(source)
        torch.manual_seed(0)
        getattr(transformers, model_class)(config).eval().save_pretrained(target)
        transformers.AutoProcessor.from_pretrained(source).save_pretrained(target)

    return _built(name, build)


def full_clip() -> Path:
    """A saved random-weight ViT-B/32 CLIP with the real processor."""
    return _full_random("bench-clip-vit-base-patch32", "clip-vit-base-patch32", "CLIPModel", "CLIPConfig")


def full_blip() -> Path:
    """A saved random-weight BLIP-base captioner with the real processor."""
    return _full_random(
        "bench-blip-image-captioning-base", "blip-image-captioning-base", "BlipForConditionalGeneration", "BlipConfig"
    )


def tiny_clip() -> Path:
    """The test suite's tiny CLIP, for `--quick` runs that only check the benchmarks themselves work."""
    from tests.tiny_models import build_tiny_clip

    return _built("bench-tiny-clip", build_tiny_clip)


def tiny_blip() -> Path:
    """The test suite's tiny BLIP, for `--quick` runs."""
    from tests.tiny_models import build_tiny_blip

    return _built("bench-tiny-blip", build_tiny_blip)
