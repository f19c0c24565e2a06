"""How closely a runtime and precision reproduce the reference vectors: the lowest *centered* cosine.

A random-weight CLIP maps every photo near one direction, so the plain cosine of two vectors of one photo
is near 1 even when the pixels went wrong (a mirrored photo scores 0.99 on the full-size random model).
Subtracting the reference vectors' mean from both sides removes that shared direction, and then the same
mistakes score far below any bound. The controls (mirrored, squashed, channels swapped) are such
mistakes: a measure that does not fail them proves nothing.

The reference path is the stock `CLIPProcessor` plus the transformers model in fp32 on PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageOps

# The lowest centered cosine each precision must keep against the reference, image and text tower alike.
BOUNDS = {"fp32": 0.999, "fp16": 0.98, "bf16": 0.98, "int8": 0.98}


def lowest_centered_cosine(vectors: np.ndarray, reference: np.ndarray) -> float:
    """min over rows of cos(v - mean(reference), r - mean(reference)); needs at least two reference rows."""
    if len(reference) < 2 or vectors.shape != reference.shape:
        raise ValueError("need two or more rows of matching vectors and reference vectors")
    centre = reference.mean(axis=0)
    a, b = vectors - centre, reference - centre
    cosines = (a * b).sum(axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return float(cosines.min())


def reference_vectors(model_dir: str, images: Sequence[Image.Image], texts: Sequence[str]) -> tuple[Any, Any]:
    """(image vectors, text vectors) of the reference path, L2-normalised."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = CLIPProcessor.from_pretrained(model_dir)
    with torch.inference_mode():
        pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
        image = model.get_image_features(pixel_values=pixels).pooler_output
        tokens = processor.tokenizer(list(texts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        text = model.get_text_features(**tokens).pooler_output
    return _unit(image.numpy()), _unit(text.numpy())


def _unit(vectors: np.ndarray) -> np.ndarray:
    unit: np.ndarray = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return unit


def scenes(count: int, size: tuple[int, int] = (640, 320)) -> list[Image.Image]:
    """Test images that differ in layout, not in colour: the same four coloured rectangles on one grey, at
    seeded places. Centered on such a set, what is left of a vector is where things are, which is what a
    mirrored or squashed image gets wrong (photos that differ mostly in colour hide those bugs from small models)."""
    images = []
    for seed in range(count):
        rng = np.random.default_rng(seed)
        image = Image.new("RGB", size, (120, 130, 140))
        draw = ImageDraw.Draw(image)
        for colour in ((230, 40, 40), (40, 200, 60), (30, 60, 220), (240, 220, 40)):
            x, y = int(rng.integers(0, size[0] * 7 // 8)), int(rng.integers(0, size[1] * 3 // 4))
            w, h = (int(v) for v in rng.integers(size[1] // 8, size[1] * 3 // 8, 2))
            draw.rectangle((x, y, x + w, y + h), fill=colour)
        images.append(image)
    return images


def mirrored(image: Image.Image) -> Image.Image:
    return ImageOps.mirror(image)


def squashed(image: Image.Image) -> Image.Image:
    """Stretched to a square instead of centre-cropped (the classic resize bug)."""
    side = min(image.size)
    return image.resize((side, side), Image.Resampling.BICUBIC)


def channels_swapped(image: Image.Image) -> Image.Image:
    """BGR read as RGB (the classic OpenCV bug)."""
    red, green, blue = image.convert("RGB").split()
    return Image.merge("RGB", (blue, green, red))


CONTROLS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "mirrored": mirrored,
    "squashed": squashed,
    "channels swapped": channels_swapped,
}

# Everyday search queries, for the text tower's fidelity.
QUERIES = (
    "a photo of a dog",
    "sunset over the sea",
    "two people at a wedding",
    "a plate of food on a table",
    "snow on the mountains",
    "a red car parked in a street at night",
    "children playing football in a park",
    "a cat asleep on a sofa",
    "an old stone church",
    "fireworks",
    "a birthday cake with candles",
    "the view from an airplane window",
)
