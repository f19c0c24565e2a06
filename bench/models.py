"""Full-size CLIP ViT-B/32 and BLIP-base with random weights, built once from ../shared/models.

Their compute is exactly the real models' (same configs), so throughput and latency figures hold for the
real weights; what they say means nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_MODELS = Path(os.environ.get("SHARED_MODELS_DIR", REPO_ROOT.parent / "shared" / "models"))
CACHE = REPO_ROOT / ".models"


def _built(name: str, build: Callable[[Path], object]) -> Path:
    """`.models/<name>`, built by `build(target)` on first use."""
    target = CACHE / name
    if not (target / "config.json").is_file():
        build(target)
    return target


def full_clip() -> Path:
    """A saved random-weight ViT-B/32 CLIP with the real processor."""
    from transformers import AutoProcessor, CLIPConfig, CLIPModel

    def build(target: Path) -> None:
        source = SHARED_MODELS / "clip-vit-base-patch32"
        torch.manual_seed(0)
        CLIPModel(CLIPConfig.from_pretrained(source)).eval().save_pretrained(target)
        AutoProcessor.from_pretrained(source).save_pretrained(target)

    return _built("bench-clip-vit-base-patch32", build)


def full_blip() -> Path:
    """A saved random-weight BLIP-base captioner with the real processor."""
    from transformers import AutoProcessor, BlipConfig, BlipForConditionalGeneration

    def build(target: Path) -> None:
        source = SHARED_MODELS / "blip-image-captioning-base"
        torch.manual_seed(0)
        BlipForConditionalGeneration(BlipConfig.from_pretrained(source)).eval().save_pretrained(target)
        AutoProcessor.from_pretrained(source).save_pretrained(target)

    return _built("bench-blip-image-captioning-base", build)


def tiny_clip() -> Path:
    """The test suite's tiny CLIP, for `--quick` runs that only check the benchmarks themselves work."""
    from tests.conftest import build_tiny_clip

    return _built("bench-tiny-clip", build_tiny_clip)


def tiny_blip() -> Path:
    """The test suite's tiny BLIP, for `--quick` runs."""
    from tests.tiny_models import build_tiny_blip

    return _built("bench-tiny-blip", build_tiny_blip)
