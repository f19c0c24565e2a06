"""Tiny random models built from the real hub configs, saved like a hub snapshot so they load the normal way."""

from __future__ import annotations

import os
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_MODELS = Path(os.environ.get("SHARED_MODELS_DIR", REPO_ROOT.parent / "shared" / "models"))
BLIP_SOURCE = SHARED_MODELS / "blip-image-captioning-base"


def build_tiny_blip(target: Path, seed: int = 0) -> Path:
    """A BLIP captioner with 2 small layers per tower and the real tokenizer and preprocessing, saved as a snapshot.

    Only the sizes shrink: the vocabulary (30524, with [DEC] and [ENC]), the special token ids and the 384x384
    preprocessing stay the real model's, so generation and decoding run exactly as they do on the hub weights.
    """
    from transformers import AutoProcessor, BlipConfig, BlipForConditionalGeneration

    if not (BLIP_SOURCE / "config.json").is_file() or not (BLIP_SOURCE / "preprocessor_config.json").is_file():
        raise RuntimeError(
            f"BLIP description files not found at {BLIP_SOURCE}; set SHARED_MODELS_DIR to the folder "
            "holding blip-image-captioning-base/"
        )
    config = BlipConfig.from_pretrained(BLIP_SOURCE)
    # A wider initialisation than the default 0.02 so that the random captions depend on the image: with 0.02 the
    # cross-attention barely moves the decoder and most images get the same caption, which would hide mix-ups.
    tiny = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "initializer_range": 0.3,
    }
    config.text_config.update(tiny)
    config.vision_config.update(tiny)
    # BlipConfig copies the vision width into the decoder's cross-attention only when it is built; keep them equal
    # or the saved model does not load back.
    config.text_config.encoder_hidden_size = config.vision_config.hidden_size
    torch.manual_seed(seed)
    BlipForConditionalGeneration(config).eval().save_pretrained(target)
    AutoProcessor.from_pretrained(BLIP_SOURCE).save_pretrained(target)
    return target
