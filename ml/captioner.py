"""BLIP captioner: load once, then preprocess -> greedy generate -> decode, in batches.

Synchronous on purpose: callers run it in an executor. Knows nothing of HTTP or databases.

Captions are unconditional (no text prompt) and greedy, so the same image always gets the same caption. Images are
not cropped first: BLIP's processor resizes every image straight to a fixed square (384x384 for the base model)
without keeping the aspect ratio, so a very long image costs no more than any other, and squashing it is what the
model was evaluated with.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import BlipForConditionalGeneration

from ml.embedder import load_pretrained


@dataclass
class BlipCaptioner:
    """A loaded BLIP captioning model with its processor; captions come out stripped, possibly empty."""

    model_name: str
    device: str
    model: BlipForConditionalGeneration
    # A transformers processor (BlipProcessor); untyped attributes, as in ClipEmbedder.
    processor: Any
    batch_size: int = 8
    max_new_tokens: int = 30
    # fp32 (fp16 on CUDA), or bf16 through autocast (INFERENCE_PRECISION=bf16, on a CPU that has it).
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {self.batch_size}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, not {self.max_new_tokens}")
        # The processor's tokenizer is not safe to share between threads.
        self._tokenizer_lock = threading.Lock()

    @classmethod
    def load(
        cls,
        model_name: str,
        device: str = "auto",
        batch_size: int = 8,
        max_new_tokens: int = 30,
        precision: str = "fp32",
    ) -> BlipCaptioner:
        """Load by hub id or from a local directory holding a saved model and processor."""
        model, processor, resolved = load_pretrained(BlipForConditionalGeneration, model_name, device)
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"BLIP runs in fp32 or bf16, not {precision}")
        dtype = next(model.parameters()).dtype
        return cls(
            model_name=model_name,
            device=resolved,
            model=model,
            processor=processor,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            precision="fp16" if dtype == torch.float16 else precision,
        )

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB images -> pixel tensor of shape (n, 3, H, W) on the CPU."""
        image_processor = self.processor.image_processor
        pixel_values: torch.Tensor = image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        return pixel_values

    def caption_pixels(self, pixel_values: torch.Tensor) -> list[str]:
        """Caption preprocessed pixels, `batch_size` images per generate call; one string per image, in order."""
        captions: list[str] = []
        for start in range(0, pixel_values.shape[0], self.batch_size):
            chunk = pixel_values[start : start + self.batch_size].to(self.device, dtype=self.dtype)
            autocast = (
                torch.autocast("cpu" if self.device == "mps" else self.device, dtype=torch.bfloat16)
                if self.precision == "bf16"
                else contextlib.nullcontext()
            )
            with torch.inference_mode(), autocast:
                token_ids = self.model.generate(
                    pixel_values=chunk,
                    max_new_tokens=self.max_new_tokens,
                    num_beams=1,
                    do_sample=False,
                )
            with self._tokenizer_lock:
                texts = self.processor.tokenizer.batch_decode(
                    token_ids.cpu(), skip_special_tokens=True, clean_up_tokenization_spaces=True
                )
            captions.extend(" ".join(text.split()) for text in texts)
        return captions

    def caption_images(self, images: Sequence[Image.Image]) -> list[str]:
        if not images:
            return []
        return self.caption_pixels(self.preprocess(images))
