"""The BLIP wrapper on a tiny random model: one caption per image, in order, deterministic, clean, bounded.

Random weights carry no meaning, so nothing here looks at what a caption says.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ml.captioner import BlipCaptioner
from ml.embedder import ClipEmbedder
from tests.tiny_models import build_tiny_blip, sub_config

SPECIAL_TOKENS = ("[SEP]", "[CLS]", "[PAD]", "[DEC]", "[ENC]", "[MASK]", "[UNK]")
SEP_TOKEN_ID = 102
# A bias on [SEP] that makes the tiny model stop after a few tokens on some of `images(6)` and run on for the others,
# so a batch holds finished rows padded with [PAD] next to unfinished ones. Tied to the tiny model's seed.
EARLY_STOP_SEP_BIAS = 7.0


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_blip(tmp_path_factory.mktemp("tiny-blip"))


@pytest.fixture(scope="module")
def captioner(blip_dir: Path) -> BlipCaptioner:
    return BlipCaptioner.load(str(blip_dir), "cpu", batch_size=2)


@pytest.fixture(scope="module")
def early_stopper(blip_dir: Path) -> BlipCaptioner:
    """The tiny model with [SEP] made likelier, so that captions end at different lengths within a batch."""
    loaded = BlipCaptioner.load(str(blip_dir), "cpu", batch_size=6)
    with torch.no_grad():
        loaded.model.text_decoder.cls.predictions.decoder.bias[SEP_TOKEN_ID] = EARLY_STOP_SEP_BIAS
    return loaded


def images(count: int) -> list[Image.Image]:
    """Distinct, textured RGB images of different sizes."""
    out = []
    for seed in range(count):
        rng = np.random.default_rng(seed)
        width, height = 64 + 16 * seed, 48 + 8 * (seed % 3)
        yy, xx = np.mgrid[0:height, 0:width]
        gradient = np.stack([xx * (seed + 1), yy * 3, xx + yy], axis=-1)
        pixels = (rng.integers(0, 256, size=3) + gradient + rng.integers(0, 40, (height, width, 3))) % 256
        out.append(Image.fromarray(pixels.astype(np.uint8), "RGB"))
    return out


def test_loads_from_a_local_directory(captioner: BlipCaptioner, blip_dir: Path) -> None:
    assert captioner.model_name == str(blip_dir)
    assert captioner.device == "cpu"
    assert captioner.dtype == torch.float32
    assert (captioner.batch_size, captioner.max_new_tokens) == (2, 30)
    assert sub_config(captioner.model.config, "text_config").vocab_size == len(captioner.processor.tokenizer) == 30524


def test_missing_or_empty_model_directory_fails_to_load(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        BlipCaptioner.load(str(tmp_path / "typo"), "cpu")
    with pytest.raises(OSError):
        BlipCaptioner.load(str(tmp_path), "cpu")  # exists, but holds no model


def test_settings_must_be_positive(captioner: BlipCaptioner) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        dataclasses.replace(captioner, batch_size=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        dataclasses.replace(captioner, max_new_tokens=0)


def test_one_caption_per_image_across_batches(captioner: BlipCaptioner) -> None:
    captions = captioner.caption_images(images(5))  # batches of 2, 2, 1
    assert len(captions) == 5
    assert all(isinstance(caption, str) for caption in captions)
    assert all(caption == " ".join(caption.split()) for caption in captions)  # stripped, single spaces
    assert len(set(captions)) > 1, "the tiny model should caption distinct images differently"


def test_no_images_give_no_captions(captioner: BlipCaptioner) -> None:
    assert captioner.caption_images([]) == []
    assert captioner.caption_pixels(torch.empty((0, 3, 384, 384))) == []


def test_preprocess_gives_cpu_pixels_of_the_processor_size(captioner: BlipCaptioner) -> None:
    pixels = captioner.preprocess(images(3))
    assert pixels.shape == (3, 3, 384, 384)
    assert pixels.device.type == "cpu"
    assert pixels.dtype == torch.float32


def test_captions_are_deterministic_and_independent_of_batching(captioner: BlipCaptioner) -> None:
    batch = images(5)
    first = captioner.caption_images(batch)
    assert captioner.caption_images(batch) == first
    assert [captioner.caption_images([image])[0] for image in batch] == first
    assert dataclasses.replace(captioner, batch_size=8).caption_images(batch) == first
    assert captioner.caption_images(batch[::-1]) == first[::-1]


def test_padding_of_finished_captions_does_not_leak(early_stopper: BlipCaptioner) -> None:
    batch = images(6)
    token_ids = early_stopper.model.generate(pixel_values=early_stopper.preprocess(batch), max_new_tokens=30)
    pad = sub_config(early_stopper.model.config, "text_config").pad_token_id
    lengths = {int((row != pad).sum()) for row in token_ids}
    assert len(lengths) > 1, "precondition: captions should end at different lengths; retune EARLY_STOP_SEP_BIAS"
    together = early_stopper.caption_images(batch)
    assert together == [early_stopper.caption_images([image])[0] for image in batch]
    for caption in together:
        assert not any(token in caption for token in SPECIAL_TOKENS), caption


def test_captions_hold_no_special_tokens(captioner: BlipCaptioner) -> None:
    for caption in captioner.caption_images(images(5)):
        assert not any(token in caption for token in SPECIAL_TOKENS), caption


def test_a_caption_that_ends_at_once_is_empty(blip_dir: Path) -> None:
    silent = BlipCaptioner.load(str(blip_dir), "cpu")
    with torch.no_grad():
        silent.model.text_decoder.cls.predictions.decoder.bias[SEP_TOKEN_ID] = 1e4
    assert silent.caption_images(images(3)) == ["", "", ""]


def test_max_new_tokens_bounds_the_caption(captioner: BlipCaptioner) -> None:
    batch = images(3)
    full = captioner.caption_images(batch)
    assert all(len(caption.split()) > 3 for caption in full), "precondition: random captions run long"
    for limit in (1, 3):
        short = dataclasses.replace(captioner, max_new_tokens=limit).caption_images(batch)
        for caption, longer in zip(short, full, strict=True):
            # WordPiece decoding makes at most one word per token; greedy decoding makes the short one a prefix.
            assert 1 <= len(caption.split()) <= limit
            assert longer.startswith(caption)


def test_very_long_and_tiny_images_are_captioned(captioner: BlipCaptioner) -> None:
    rng = np.random.default_rng(7)
    odd = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(1, 4000), (4000, 1), (1, 1)]]
    assert captioner.preprocess(odd).shape == (3, 3, 384, 384)
    assert len(captioner.caption_images(odd)) == 3


def test_threads_share_one_captioner(captioner: BlipCaptioner) -> None:
    batch = images(4)
    expected = [captioner.caption_images([image])[0] for image in batch]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda image: captioner.caption_images([image])[0], batch))
    assert got == expected


def test_clip_and_blip_can_load_at_the_same_time(tiny_clip_dir: Path, tiny_blip_dir: Path) -> None:
    # The service loads CLIP in the background at startup while a first caption request may load BLIP.
    for _ in range(3):
        with ThreadPoolExecutor(2) as pool:
            clip = pool.submit(ClipEmbedder.load, str(tiny_clip_dir), "cpu")
            blip = pool.submit(BlipCaptioner.load, str(tiny_blip_dir), "cpu")
            assert clip.result().dim == 16
            assert blip.result().caption_images([Image.new("RGB", (32, 32), "red")])[0] is not None
