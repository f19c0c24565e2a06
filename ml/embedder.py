"""CLIP wrapper: load once, then preprocess -> forward -> normalise, in batches.

Synchronous on purpose: callers run it in an executor. Knows nothing of HTTP or databases.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, CLIPModel, PreTrainedModel

from ml import fidelity, inference, onnx_clip
from ml.inference import PrecisionSetting, RuntimeSetting

log = logging.getLogger(__name__)

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
    source, _ = model_source(model_name)
    resolved = resolve_device(device)
    dtype = torch.float16 if resolved == "cuda" else torch.float32
    with _LOAD_LOCK:
        model = model_class.from_pretrained(source, dtype=dtype)
        processor = AutoProcessor.from_pretrained(source)
    # transformers wraps PreTrainedModel.to in a decorator whose type loses the method's binding of `self`.
    model.to(resolved).eval()  # type: ignore[arg-type]  # see the comment above
    return model, processor, resolved


class TorchTowers:
    """Both towers on PyTorch: fp32 (fp16 on CUDA), or bf16 through autocast."""

    def __init__(self, model: CLIPModel, device: str, precision: str) -> None:
        self.model = model
        self.device = device
        self.precision = precision
        self.dtype = next(model.parameters()).dtype

    def _autocast(self) -> Any:
        if self.precision == "bf16":
            return torch.autocast(self.device if self.device != "mps" else "cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def image(self, pixel_values: np.ndarray) -> np.ndarray:
        chunk = torch.from_numpy(pixel_values).to(self.device, dtype=self.dtype)
        with torch.inference_mode(), self._autocast():
            features = self.model.get_image_features(pixel_values=chunk).pooler_output
        return np.asarray(features.float().cpu().numpy(), dtype=np.float32)

    def text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(input_ids).to(self.device)
        mask = torch.from_numpy(attention_mask).to(self.device)
        with torch.inference_mode(), self._autocast():
            features = self.model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        return np.asarray(features.float().cpu().numpy(), dtype=np.float32)

    def reopen_text_session(self) -> None:
        """Torch has one thread pool for every caller; nothing to reopen."""


class Towers(Protocol):
    def image(self, pixel_values: np.ndarray) -> np.ndarray: ...
    def text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray: ...
    def reopen_text_session(self) -> None: ...


@dataclass
class ClipEmbedder:
    """A loaded CLIP (both towers on one runtime, at one precision) with its preprocessing and tokenizer; all
    vectors come out L2-normalised float32."""

    model_name: str
    device: str
    towers: Towers
    # A transformers image processor (CLIPImageProcessor) and a callable tokenizer; untyped in transformers.
    image_processor: Any
    tokenizer: Any
    dim: int
    logit_scale: float
    runtime: str
    precision: str
    # The catalog's key for these vectors (ml.inference.embedding_key).
    embedding_model: str
    batch_size: int = 32
    # Why the planned runtime is not the one serving (an export that failed), or None.
    fallback: str | None = None
    # Where the ONNX graphs came from: "exported" (this start), "cache", "directory" (published graphs), or None.
    graphs: str | None = None
    # Fixed context length of a textual graph that wants its ids padded (open_clip's export), else None.
    pad_to: int | None = None

    def __post_init__(self) -> None:
        # The tokenizer is not safe to share between threads.
        self._tokenizer_lock = threading.Lock()

    @classmethod
    def load(
        cls,
        model_name: str,
        device: str = "auto",
        batch_size: int = 32,
        *,
        runtime: RuntimeSetting = "auto",
        precision: PrecisionSetting = "auto",
        cache_root: Path | None = None,
        threads: int = 0,
    ) -> ClipEmbedder:
        """Load by hub id or from a local directory holding a saved model and processor, or ONNX graphs.

        ONNX Runtime graphs are exported from the transformers model on first load and kept in `cache_root`
        (default ~/.cache/ai-image-organizer/onnx); an export that fails falls back to PyTorch, saying why in
        `fallback`."""
        source, local = model_source(model_name)
        threads = threads or torch.get_num_threads()
        if local and onnx_clip.has_graphs(Path(source)):
            return cls._from_graphs(model_name, Path(source), batch_size, threads)
        resolved = resolve_device(device)
        chosen = inference.plan(model_name, resolved, runtime, precision)
        if chosen.runtime == "onnx":
            # Reading the model's own files fails the same on every runtime: that error is the load's, an OSError
            # as on PyTorch's path (a folder that holds no model, a processor that cannot be read).
            if local and not (Path(source) / "config.json").is_file():
                raise OSError(f"{source} holds no model (no config.json)")
            with _LOAD_LOCK:
                try:
                    processor = AutoProcessor.from_pretrained(source)
                except ValueError as exc:
                    raise OSError(f"cannot read the processor of {model_name}: {exc}") from exc
            revision = onnx_clip.source_revision(source, local)
            try:
                return cls._exported(model_name, processor, revision, chosen, batch_size, threads, cache_root)
            except Exception as exc:  # any failure of the export or of ONNX Runtime: PyTorch still serves
                reason = f"ONNX export failed, serving on PyTorch fp32: {type(exc).__name__}: {exc}"[:400]
                log.error("%s", reason)
                # The vectors keep the planned precision's key: fp32 ones are within its fidelity bound of
                # what it would give, and /health says which runtime and precision actually serve.
                embedder = cls._torch(model_name, resolved, chosen.embedding_model, batch_size, "fp32")
                embedder.fallback = reason
                return embedder
        return cls._torch(model_name, resolved, chosen.embedding_model, batch_size, chosen.precision)

    @classmethod
    def _torch(cls, model_name: str, device: str, key: str, batch_size: int, precision: str) -> ClipEmbedder:
        model, processor, resolved = load_pretrained(CLIPModel, model_name, device)
        dtype = next(model.parameters()).dtype
        return cls(
            model_name=model_name,
            device=resolved,
            towers=TorchTowers(model, resolved, precision),
            image_processor=processor.image_processor,
            tokenizer=processor.tokenizer,
            dim=int(model.config.projection_dim or 0),
            logit_scale=float(model.logit_scale.exp().item()),
            runtime="torch",
            precision="fp16" if dtype == torch.float16 else precision,
            embedding_model=key,
            batch_size=batch_size,
        )

    @classmethod
    def _exported(
        cls,
        model_name: str,
        processor: Any,
        revision: str,
        chosen: inference.InferencePlan,
        batch_size: int,
        threads: int,
        cache_root: Path | None,
    ) -> ClipEmbedder:
        root = cache_root or Path.home() / ".cache" / "ai-image-organizer" / "onnx"
        key = onnx_clip.cache_key(model_name, revision, chosen.precision)
        directory = onnx_clip.cache_dir(root, key)
        manifest = onnx_clip.read_manifest(directory)
        graphs = "cache"
        if manifest is None or manifest.get("model") != model_name:
            model, _, _ = load_pretrained(CLIPModel, model_name, "cpu")
            manifest = onnx_clip.export(model, directory, key, calibration_inputs(processor))
            del model
            graphs = "exported"
        towers = onnx_clip.OnnxTowers(directory, threads)
        return cls(
            model_name=model_name,
            device="cpu",
            towers=towers,
            image_processor=processor.image_processor,
            tokenizer=processor.tokenizer,
            dim=towers.dim,
            logit_scale=float(manifest["logit_scale"]),
            runtime="onnx",
            precision=chosen.precision,
            embedding_model=chosen.embedding_model,
            batch_size=batch_size,
            graphs=graphs,
        )

    @classmethod
    def _from_graphs(cls, model_name: str, folder: Path, batch_size: int, threads: int) -> ClipEmbedder:
        """A directory of published ONNX graphs (Immich's layout): loaded as they are, at their own precision."""
        image_processor, tokenizer, pad_to, logit_scale = published_preprocessing(folder)
        towers = onnx_clip.OnnxTowers(folder, threads)
        precision = onnx_clip.graph_precision(folder / "visual" / "model.onnx")
        return cls(
            model_name=model_name,
            device="cpu",
            towers=towers,
            image_processor=image_processor,
            tokenizer=tokenizer,
            dim=towers.dim,
            logit_scale=logit_scale,
            runtime="onnx",
            precision=precision,
            embedding_model=inference.embedding_key(model_name, precision),  # type: ignore[arg-type]
            batch_size=batch_size,
            graphs="directory",
            pad_to=pad_to if towers.text_style != "input_ids" else None,
        )

    def prepare_query_lane(self) -> None:
        """Called once from the query lane's thread: the text session's threads then run at its priority."""
        self.towers.reopen_text_session()

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB images -> pixel tensor of shape (n, 3, H, W) on the CPU."""
        image_processor = self.image_processor
        if getattr(image_processor, "do_center_crop", False):
            # The processor scales the short side to 224 and keeps the centre square, so cropping very
            # long images first changes nothing but stops a 10000x1 image from becoming 2240000x224.
            images = [crop_to_aspect(image, MAX_ASPECT) for image in images]
        pixel_values: torch.Tensor = image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        return pixel_values

    def embed_pixels(self, pixel_values: torch.Tensor) -> np.ndarray:
        """Forward preprocessed pixels in batches; returns (n, dim) unit vectors."""
        out = np.empty((pixel_values.shape[0], self.dim), dtype=np.float32)
        array = pixel_values.numpy() if isinstance(pixel_values, torch.Tensor) else np.asarray(pixel_values)
        for start in range(0, array.shape[0], self.batch_size):
            chunk = np.ascontiguousarray(array[start : start + self.batch_size], dtype=np.float32)
            out[start : start + len(chunk)] = _normalise(self.towers.image(chunk))
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
                tokens = self.tokenizer(
                    chunk,
                    padding="max_length" if self.pad_to else True,
                    truncation=True,
                    max_length=self.pad_to or MAX_TEXT_TOKENS,
                    return_tensors="np",
                )
            ids = np.asarray(tokens["input_ids"])
            mask = np.asarray(tokens.get("attention_mask", np.ones_like(ids)))
            out[start : start + len(chunk)] = _normalise(self.towers.text(ids, mask))
        return out


def model_source(model_name: str) -> tuple[str, bool]:
    """(what to load, whether it is a local directory). A name that looks like a path must be an existing
    directory (FileNotFoundError otherwise), so a typo is not sent to the hub."""
    looks_local = model_name.startswith(("/", "./", "../", "~")) or Path(model_name).exists()
    if looks_local and not Path(model_name).expanduser().is_dir():
        raise FileNotFoundError(f"model directory {model_name} does not exist")
    return (str(Path(model_name).expanduser()), True) if looks_local else (model_name, False)


def calibration_inputs(processor: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample inputs for the export: 8 generated images (gradients, blocks and noise) and 8 of the everyday
    queries in ml/fidelity.py, preprocessed by the model's own processor. Deterministic."""
    rng = np.random.default_rng(0)
    images = []
    for n in range(8):
        yy, xx = np.mgrid[0:256, 0:320].astype(np.float32)
        base = rng.uniform(0, 255, 3) * (yy / 256)[..., None] + rng.uniform(0, 255, 3) * (xx / 320)[..., None] / 2
        block = rng.integers(0, 200), rng.integers(0, 260)
        base[block[0] : block[0] + 60, block[1] : block[1] + 60] = rng.uniform(0, 255, 3)
        noisy = base + rng.normal(0, 12 + n, base.shape)
        images.append(Image.fromarray(noisy.clip(0, 255).astype(np.uint8)))
    texts = list(fidelity.QUERIES[:8])
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    tokens = processor.tokenizer(texts, padding=True, truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="pt")
    return pixels, tokens["input_ids"], tokens["attention_mask"]


def published_preprocessing(folder: Path) -> tuple[Any, Any, int | None, float]:
    """(image processor, tokenizer, context length to pad to, logit scale) of a directory of published graphs.

    Our own layout keeps a transformers processor beside the graphs; Immich's keeps open_clip's
    `visual/preprocess_cfg.json` and `textual/tokenizer.json` with a `config.json` naming the context length."""
    if (folder / "preprocessor_config.json").is_file():
        processor = AutoProcessor.from_pretrained(str(folder))
        manifest = onnx_clip.read_manifest(folder) or {}
        return processor.image_processor, processor.tokenizer, None, float(manifest.get("logit_scale", 100.0))
    from transformers import CLIPImageProcessor, PreTrainedTokenizerFast

    cfg = json.loads((folder / "visual" / "preprocess_cfg.json").read_text())
    size = cfg["size"][0] if isinstance(cfg["size"], list) else int(cfg["size"])
    squash = cfg.get("resize_mode", "shortest") == "squash"
    resample = {"bilinear": 2, "bicubic": 3}.get(str(cfg.get("interpolation", "bicubic")), 3)
    image_processor = CLIPImageProcessor(
        size={"height": size, "width": size} if squash else {"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_center_crop=not squash,
        image_mean=cfg["mean"],
        image_std=cfg["std"],
        resample=resample,
    )
    model_cfg = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    context = int(model_cfg.get("text_cfg", {}).get("context_length", MAX_TEXT_TOKENS))
    token_cfg_path = folder / "textual" / "tokenizer_config.json"
    token_cfg = json.loads(token_cfg_path.read_text()) if token_cfg_path.is_file() else {}

    def token(name: str, default: str) -> str:
        value = token_cfg.get(name, default)
        return str(value["content"] if isinstance(value, dict) else value)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "textual" / "tokenizer.json"),
        pad_token=token("pad_token", "<|endoftext|>"),
        bos_token=token("bos_token", "<|startoftext|>"),
        eos_token=token("eos_token", "<|endoftext|>"),
    )
    return image_processor, tokenizer, context, float(model_cfg.get("logit_scale", 100.0))


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


def _normalise(features: np.ndarray) -> np.ndarray:
    vectors = np.asarray(features, dtype=np.float32)
    normalised: np.ndarray = vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
    return normalised
