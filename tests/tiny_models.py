"""Tiny random models built from the real hub configs, saved like a hub snapshot so they load the normal way.

The configuration, tokenizer and preprocessing files come from `tests/fixtures/models/` (see its README):
the repository carries them, so nothing here needs the hub or anything outside the clone.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedConfig

MODEL_FILES = Path(__file__).resolve().parent / "fixtures" / "models"
CLIP_SOURCE = MODEL_FILES / "clip-vit-base-patch32"
BLIP_SOURCE = MODEL_FILES / "blip-image-captioning-base"
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def sub_config(config: PreTrainedConfig, name: str) -> PreTrainedConfig:
    """A tower's config (transformers types these attributes as optional dicts: they are configs once loaded)."""
    sub = getattr(config, name)
    assert isinstance(sub, PreTrainedConfig), name
    return sub


def build_tiny_clip(target: Path, seed: int = 0) -> Path:
    """A CLIP with 2 small layers per tower and the real tokenizer and preprocessing, saved as a snapshot."""
    from transformers import AutoProcessor, CLIPConfig, CLIPModel

    config = CLIPConfig.from_pretrained(CLIP_SOURCE)
    sub_config(config, "text_config").update(TINY)
    sub_config(config, "vision_config").update(TINY)
    config.projection_dim = 16
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(target)
    AutoProcessor.from_pretrained(CLIP_SOURCE).save_pretrained(target)
    return target


def build_tiny_blip(target: Path, seed: int = 0) -> Path:
    """A BLIP captioner with 2 small layers per tower and the real tokenizer and preprocessing, saved as a snapshot.

    Only the sizes shrink: the vocabulary (30524, with [DEC] and [ENC]), the special token ids and the 384x384
    preprocessing stay the real model's, so generation and decoding run exactly as they do on the hub weights.
    """
    from transformers import AutoProcessor, BlipConfig, BlipForConditionalGeneration

    config = BlipConfig.from_pretrained(BLIP_SOURCE)
    # A wider initialisation than the default 0.02 so that the random captions depend on the image: with 0.02 the
    # cross-attention barely moves the decoder and most images get the same caption, which would hide mix-ups.
    tiny = {**TINY, "initializer_range": 0.3}
    text, vision = sub_config(config, "text_config"), sub_config(config, "vision_config")
    text.update(tiny)
    vision.update(tiny)
    # BlipConfig copies the vision width into the decoder's cross-attention only when it is built; keep them equal
    # or the saved model does not load back.
    text.encoder_hidden_size = vision.hidden_size
    torch.manual_seed(seed)
    BlipForConditionalGeneration(config).eval().save_pretrained(target)
    AutoProcessor.from_pretrained(BLIP_SOURCE).save_pretrained(target)
    return target
