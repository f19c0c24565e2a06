"""CLIP wrapper: load once, then preprocess -> forward -> normalise, in batches.

Synchronous on purpose: callers run it in an executor. Knows nothing of HTTP or databases.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, CLIPModel, PreTrainedModel

# CLIP's text tower has 77 positions; queries are padded only to the longest in the batch.
MAX_TEXT_TOKENS = 77
# Images longer than this ratio are centre-cropped before preprocessing (see `preprocess`).
MAX_ASPECT = 2.0


def resolve_device(requested: str) -> str:
    """`auto` picks cuda, then mps, then cpu; an explicit device must be available."""
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CLIP_DEVICE=cuda but no CUDA device is available")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("CLIP_DEVICE=mps but no MPS device is available")
    return requested


PreTrained = TypeVar("PreTrained", bound=PreTrainedModel)
# from_pretrained is not thread-safe: while one load builds its model on the meta device, another load in a
# parallel thread can end up with meta tensors ("Cannot copy out of meta tensor"). One load at a time.
_LOAD_LOCK = threading.Lock()


def load_pretrained(model_class: type[PreTrained], model_name: str, device: str) -> tuple[PreTrained, Any, str]:
    """(model in eval mode on its device, processor, device) by hub id or from a local directory.

    A name that looks like a path must be an existing directory (FileNotFoundError otherwise), so a typo
    is not sent to the hub. fp16 on CUDA, fp32 elsewhere.
    """
    looks_local = model_name.startswith(("/", "./", "../", "~")) or Path(model_name).exists()
    if looks_local and not Path(model_name).expanduser().is_dir():
        raise FileNotFoundError(f"model directory {model_name} does not exist")
    source = str(Path(model_name).expanduser()) if looks_local else model_name
    resolved = resolve_device(device)
    dtype = torch.float16 if resolved == "cuda" else torch.float32
    with _LOAD_LOCK:
        model = model_class.from_pretrained(source, dtype=dtype)
        processor = AutoProcessor.from_pretrained(source)
    # transformers wraps PreTrainedModel.to in a decorator whose type loses the method's binding of `self`.
    model.to(resolved).eval()  # type: ignore[arg-type]  # see the comment above
    return model, processor, resolved


@dataclass
class ClipEmbedder:
    """A loaded CLIP model with its processor; all vectors come out L2-normalised float32."""

    model_name: str
    device: str
    model: CLIPModel
    # A transformers processor (CLIPProcessor): its image_processor and tokenizer are attributes transformers
    # does not type, so it is Any.
    processor: Any
    dim: int
    batch_size: int = 32

    def __post_init__(self) -> None:
        # The processor's tokenizer is not safe to share between threads.
        self._tokenizer_lock = threading.Lock()

    @classmethod
    def load(cls, model_name: str, device: str = "auto", batch_size: int = 32) -> ClipEmbedder:
        """Load by hub id or from a local directory holding a saved model and processor."""
        model, processor, resolved = load_pretrained(CLIPModel, model_name, device)
        return cls(
            model_name=model_name,
            device=resolved,
            model=model,
            processor=processor,
            dim=int(model.config.projection_dim or 0),
            batch_size=batch_size,
        )

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB images -> pixel tensor of shape (n, 3, H, W) on the CPU."""
        image_processor = self.processor.image_processor
        if getattr(image_processor, "do_center_crop", False):
            # The processor scales the short side to 224 and keeps the centre square, so cropping very
            # long images first changes nothing but stops a 10000x1 image from becoming 2240000x224.
            images = [crop_to_aspect(image, MAX_ASPECT) for image in images]
        pixel_values: torch.Tensor = image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        return pixel_values

    def embed_pixels(self, pixel_values: torch.Tensor) -> np.ndarray:
        """Forward preprocessed pixels in batches; returns (n, dim) unit vectors."""
        out = np.empty((pixel_values.shape[0], self.dim), dtype=np.float32)
        for start in range(0, pixel_values.shape[0], self.batch_size):
            chunk = pixel_values[start : start + self.batch_size].to(self.device, dtype=self.dtype)
            with torch.inference_mode():
                features = self.model.get_image_features(pixel_values=chunk).pooler_output
            out[start : start + len(chunk)] = _normalise(features)
        return out

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.empty((0, self.dim), dtype=np.float32)
        return self.embed_pixels(self.preprocess(images))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Text -> (n, dim) unit vectors; padded to the longest text, truncated at 77 tokens."""
        if not texts:
            return np.empty((0, self.dim), dtype=np.float32)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start : start + self.batch_size])
            with self._tokenizer_lock:
                tokens = self.processor.tokenizer(
                    chunk, padding=True, truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="pt"
                )
            tokens = {key: value.to(self.device) for key, value in tokens.items()}
            with torch.inference_mode():
                features = self.model.get_text_features(**tokens).pooler_output
            out[start : start + len(chunk)] = _normalise(features)
        return out


def crop_to_aspect(image: Image.Image, max_aspect: float) -> Image.Image:
    """Centre-crop the long side so that long / short <= max_aspect."""
    width, height = image.size
    short = max(1, min(width, height))
    limit = int(short * max_aspect)
    if width > limit:
        left = (width - limit) // 2
        return image.crop((left, 0, left + limit, height))
    if height > limit:
        top = (height - limit) // 2
        return image.crop((0, top, width, top + limit))
    return image


def _normalise(features: torch.Tensor) -> np.ndarray:
    vectors = features.float()
    vectors = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return np.asarray(vectors.cpu().numpy(), dtype=np.float32)
