"""CLIP's two towers as ONNX Runtime sessions: exported from the transformers model, cached, or read from a
directory that already holds ONNX graphs (Immich's layout).

Layout, for a cached export and for a published directory alike::

    visual/model.onnx       pixels -> image embedding (not normalised)
    textual/model.onnx      token ids -> text embedding (not normalised)

A cached export also holds `manifest.json` (what it was made from, and how) and is named by a key made of
the model's id, its revision or content hash, the precision and the exporter's versions: a change of any of
them makes a new export instead of reusing a stale one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

# Bumped whenever the export or the quantization changes what the graphs compute.
EXPORT_FORMAT = 1
OPSET = 18
GRAPHS = ("visual", "textual")


def has_graphs(directory: Path) -> bool:
    return all((directory / tower / "model.onnx").is_file() for tower in GRAPHS)


class OnnxTowers:
    """The two sessions. The textual graph takes either `input_ids` and `attention_mask` (any length, our export)
    or one int32 input of ids padded to a fixed context length (open_clip's export, as Immich publishes it)."""

    def __init__(self, directory: Path, threads: int) -> None:
        self.threads = threads
        self.visual = open_session(directory / "visual" / "model.onnx", threads)
        self.image_input = self.visual.get_inputs()[0].name
        self.textual_path = directory / "textual" / "model.onnx"
        # Opened now, so a graph that cannot load fails the load; the query lane may make it again on its own
        # thread (reopen_text_session).
        self._textual = open_session(self.textual_path, threads)
        self._lock = threading.Lock()
        self.text_style = self._text_inputs(self._textual)

    @property
    def dim(self) -> int:
        return int(self.visual.get_outputs()[0].shape[-1])

    @staticmethod
    def _text_inputs(session: Any) -> str:
        names = [item.name for item in session.get_inputs()]
        return "input_ids" if "input_ids" in names else str(names[0])

    def reopen_text_session(self) -> None:
        """Make the text session on the calling thread. ONNX Runtime starts a session's worker threads when the
        session is made, and on Linux they inherit the scheduling priority of the thread that makes them: the
        query lane calls this so that queries run on threads of its priority, not the bulk lane's."""
        session = open_session(self.textual_path, self.threads)
        with self._lock:
            self._textual = session

    def image(self, pixel_values: np.ndarray) -> np.ndarray:
        output: np.ndarray = self.visual.run(None, {self.image_input: pixel_values.astype(np.float32, copy=False)})[0]
        return output

    def text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        with self._lock:
            session = self._textual
        if self.text_style == "input_ids":
            feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64)}
        else:
            feed = {self.text_style: input_ids.astype(np.int32)}
        output: np.ndarray = session.run(None, feed)[0]
        return output


def open_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Idle threads sleep instead of spinning: a spinning pool of one lane would take the cores from the other.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def graph_precision(path: Path) -> str:
    """`int8` when the graph holds dynamically quantized matrix products, otherwise the float type of its output."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    if any(node.op_type in {"MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul"} for node in graph.node):
        return "int8"
    elem = graph.output[0].type.tensor_type.elem_type
    return {onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16"}.get(elem, "fp32")


# --- the cache -------------------------------------------------------------------------------------------------


def source_revision(source: str, local: bool) -> str:
    """The hub's commit for a hub id (from its cached config); for a local directory a hash of its config and
    weight files' contents, so retraining in place is noticed."""
    if local:
        digest = hashlib.sha256()
        folder = Path(source)
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix in {".safetensors", ".bin", ".json"}:
                digest.update(path.name.encode() + b"\0")
                with open(path, "rb") as handle:
                    digest.update(hashlib.file_digest(handle, "sha256").digest())
        return "sha256:" + digest.hexdigest()
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    return str(getattr(config, "_commit_hash", None) or "unknown")


def exporter_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import transformers

    return {
        "format": str(EXPORT_FORMAT),
        "opset": str(OPSET),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def cache_key(model_name: str, revision: str, precision: str) -> dict[str, Any]:
    return {"model": model_name, "revision": revision, "precision": precision, "exporter": exporter_versions()}


def cache_dir(root: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", key["model"].strip("/"))[-60:] or "model"
    return root / f"{slug}-{key['precision']}-{digest}"


def read_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        manifest: dict[str, Any] = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest if has_graphs(directory) else None


@contextmanager
def _staging(target: Path) -> Iterator[Path]:
    """A temp folder beside `target`, renamed onto it when the block succeeds and removed when it fails, so a
    crash mid-export never leaves a half-written graph that a later start would trust."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export(model: Any, target: Path, key: dict[str, Any], calibration: tuple[Any, Any, Any]) -> dict[str, Any]:
    """Export `model` (a transformers CLIPModel in fp32) to `target` in fp32; returns the manifest.

    `calibration` is (pixel_values, input_ids, attention_mask): a few preprocessed images and texts, the export's
    sample inputs."""
    import warnings

    pixels, input_ids, attention_mask = calibration
    started = time.perf_counter()
    manifest: dict[str, Any] = {**key, "logit_scale": float(model.logit_scale.exp().item())}
    with _staging(target) as staging:
        visual, textual = staging / "visual", staging / "textual"
        visual.mkdir()
        textual.mkdir()
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # The tracer's notes on shapes it treats as constants: the exported graph is checked by the tests.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _ImageTower(model),
                (pixels[:2],),
                str(visual / "fp32.onnx"),
                input_names=["pixel_values"],
                output_names=["embedding"],
                dynamic_axes={"pixel_values": {0: "batch"}, "embedding": {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
            )
            torch.onnx.export(
                _TextTower(model),
                (input_ids[:2], attention_mask[:2]),
                str(textual / "fp32.onnx"),
                input_names=["input_ids", "attention_mask"],
                output_names=["embedding"],
                dynamic_axes={
                    "input_ids": {0: "batch", 1: "tokens"},
                    "attention_mask": {0: "batch", 1: "tokens"},
                    "embedding": {0: "batch"},
                },
                opset_version=OPSET,
                dynamo=False,
            )
        for folder in (visual, textual):
            (folder / "fp32.onnx").rename(folder / "model.onnx")
        manifest["export_seconds"] = round(time.perf_counter() - started, 1)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    log.info("exported %s to ONNX (%s) in %.0fs", key["model"], key["precision"], manifest["export_seconds"])
    return manifest


class _ImageTower(torch.nn.Module):
    """Pixels -> projected image embedding, as a module the exporter can trace."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.clip = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self.clip.get_image_features(pixel_values=pixel_values).pooler_output
        return features


class _TextTower(torch.nn.Module):
    """Token ids and mask -> projected text embedding."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.clip = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self.clip.get_text_features(
            input_ids=input_ids, attention_mask=attention_mask
        ).pooler_output
        return features
