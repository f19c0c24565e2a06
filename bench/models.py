"""Full-size CLIP ViT-B/32 and BLIP-base with random weights, built once from ../shared/models.

Their compute is exactly the real models' (same configs), so throughput and latency figures hold for the
real weights; what they say means nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_MODELS = Path(os.environ.get("SHARED_MODELS_DIR", REPO_ROOT.parent / "shared" / "models"))
CACHE = REPO_ROOT / ".models"


def full_clip() -> Path:
    """A saved random-weight ViT-B/32 CLIP with the real processor; built on first use."""
    from transformers import AutoProcessor, CLIPConfig, CLIPModel

    target = CACHE / "bench-clip-vit-base-patch32"
    if not (target / "config.json").is_file():
        source = SHARED_MODELS / "clip-vit-base-patch32"
        torch.manual_seed(0)
        CLIPModel(CLIPConfig.from_pretrained(source)).eval().save_pretrained(target)
        AutoProcessor.from_pretrained(source).save_pretrained(target)
    return target


def full_blip() -> Path:
    """A saved random-weight BLIP-base captioner with the real processor; built on first use."""
    from transformers import AutoProcessor, BlipConfig, BlipForConditionalGeneration

    target = CACHE / "bench-blip-image-captioning-base"
    if not (target / "config.json").is_file():
        source = SHARED_MODELS / "blip-image-captioning-base"
        torch.manual_seed(0)
        BlipForConditionalGeneration(BlipConfig.from_pretrained(source)).eval().save_pretrained(target)
        AutoProcessor.from_pretrained(source).save_pretrained(target)
    return target


def tiny_clip() -> Path:
    """The test suite's tiny CLIP, for `--quick` runs that only check the benchmarks themselves work."""
    from tests.conftest import build_tiny_clip

    target = CACHE / "bench-tiny-clip"
    if not (target / "config.json").is_file():
        build_tiny_clip(target)
    return target


def tiny_blip() -> Path:
    """The test suite's tiny BLIP, for `--quick` runs."""
    from tests.tiny_models import build_tiny_blip

    target = CACHE / "bench-tiny-blip"
    if not (target / "config.json").is_file():
        build_tiny_blip(target)
    return target
