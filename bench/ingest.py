"""Scenario 1, ingest throughput: HTTP uploads end to end against the bare model and a naive pipeline.

All of it is measured in the same run, one after the other, so the ratios compare like with like:
- bare model: `embed_pixels` on ready 224x224 tensors at its best batch size, for PyTorch fp32 (the
  reference the upload is compared with) and for every runtime and precision the service can choose here;
- text encode: one 8-token query at a time on each runtime (p50);
- fidelity: the lowest centered cosine of each runtime against the reference path (ml/fidelity.py);
- naive: what a simple prototype does per image: full-resolution decode, `CLIPProcessor`, batch-1 forward;
- service: batches of files POSTed to /images by concurrent clients; decode, checks, hashing, thumbnail,
  files, SQLite and index included.
"""

from __future__ import annotations

import asyncio
import io
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch
from PIL import Image, ImageOps

from backend.services.imaging import decode_image
from bench.report import Figure, Report
from bench.server import serve
from ml import fidelity
from ml.embedder import ClipEmbedder
from ml.fidelity import BOUNDS
from ml.inference import PrecisionSetting, RuntimeSetting, cpu_flags, has_bf16

NAME = "ingest"


def bare_model(embedder: ClipEmbedder, batch_sizes: list[int], images: int) -> tuple[float, int]:
    """Best images/s of the forward pass alone on ready tensors, and the batch size that gave it."""
    best = (0.0, 0)
    for batch in batch_sizes:
        pixels = torch.randn(batch, 3, 224, 224)
        embedder.embed_pixels(pixels)  # warm-up
        rounds = max(1, images // batch)
        start = time.perf_counter()
        for _ in range(rounds):
            embedder.embed_pixels(pixels)
        rate = rounds * batch / (time.perf_counter() - start)
        best = max(best, (rate, batch))
    return best


def naive(clip: Path, files: list[tuple[str, bytes]]) -> float:
    """images/s of the prototype way: one image at a time, full decode, the stock processor, PyTorch fp32, batch 1."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(clip).eval(), CLIPProcessor.from_pretrained(clip)
    start = time.perf_counter()
    for _, data in files:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        inputs = processor(images=image, return_tensors="pt")
        with torch.no_grad():
            model.get_image_features(pixel_values=inputs["pixel_values"])
    return len(files) / (time.perf_counter() - start)


async def upload_all(base: str, files: list[tuple[str, bytes]], per_request: int, clients: int) -> float:
    """images/s of uploading every file, `per_request` files per POST, `clients` requests at once."""
    batches = [files[i : i + per_request] for i in range(0, len(files), per_request)]
    queue: asyncio.Queue[list[tuple[str, bytes]]] = asyncio.Queue()
    for batch in batches:
        queue.put_nowait(batch)

    async def client() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=600) as http:
            while not queue.empty():
                batch = queue.get_nowait()
                parts = [("files", (name, data, "application/octet-stream")) for name, data in batch]
                answer = await http.post("/images", files=parts)
                answer.raise_for_status()
                body = answer.json()
                if body["failed"]:
                    raise RuntimeError(f"uploads failed: {[i['error'] for i in body['items'] if i['error']]}")

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return len(files) / (time.perf_counter() - start)


def fidelity_jpeg(embedder: ClipEmbedder, files: list[tuple[str, bytes]]) -> float | None:
    """Lowest cosine between the service's embedding (reduced JPEG decode, its preprocessing) and the
    reference one (full decode, the stock processor) over the photos; None when there was no photo to compare."""
    lowest: float | None = None
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files:
            path = Path(tmp) / name
            path.write_bytes(data)
            fast = embedder.embed_pixels(embedder.preprocess([decode_image(path, 10**9).rgb]))[0]
            image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
            pixels = embedder.image_processor(images=image, return_tensors="pt")["pixel_values"]
            reference = embedder.embed_pixels(pixels.numpy())[0]
            cosine = float(fast @ reference)
            lowest = cosine if lowest is None else min(lowest, cosine)
    return lowest


def fidelity_figure(lowest: float | None) -> Figure:
    """The fidelity figure against its target; nothing measured is a FAIL (NaN), never a free pass."""
    name = "reduced JPEG decode vs reference: lowest cosine"
    if lowest is None:
        return Figure(NAME, name, float("nan"), "", target=0.99, kind="min", note="no JPEG photo was measured")
    return Figure(NAME, name, lowest, "", target=0.99, kind="min")


def text_p50(embedder: ClipEmbedder, rounds: int) -> float:
    """Median ms of embedding one 8-token query, alone, as a search does."""
    query = ["a photo of a dog at the beach"]
    for _ in range(3):
        embedder.embed_texts(query)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        embedder.embed_texts(query)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def runtime_fidelity(embedder: ClipEmbedder, clip: Path) -> tuple[float, float]:
    """(image, text) lowest centered cosine against the reference path, on layout scenes and everyday queries."""
    images = fidelity.scenes(12)
    reference_images, reference_texts = fidelity.reference_vectors(str(clip), images, fidelity.QUERIES)
    return (
        fidelity.lowest_centered_cosine(embedder.embed_images(images), reference_images),
        fidelity.lowest_centered_cosine(embedder.embed_texts(list(fidelity.QUERIES)), reference_texts),
    )


def choices() -> list[tuple[RuntimeSetting, PrecisionSetting]]:
    """The runtimes and precisions the service can choose on this machine."""
    offered: list[tuple[RuntimeSetting, PrecisionSetting]] = [("torch", "fp32"), ("onnx", "fp32")]
    if has_bf16(cpu_flags()):
        offered.append(("torch", "bf16"))
    return offered


def run(report: Report, *, clip: Path, files: list[tuple[str, bytes]], naive_files: int, quick: bool) -> None:
    naive_rate = naive(clip, files[:: max(1, len(files) // naive_files)])
    report.add(Figure(NAME, "naive pipeline (full decode, processor, torch fp32, batch 1)", naive_rate, "img/s"))
    batches = [8, 16, 32] if not quick else [4]
    bare: dict[tuple[RuntimeSetting, PrecisionSetting], float] = {}
    with tempfile.TemporaryDirectory() as cache:
        for runtime, precision in choices():
            label = f"{runtime} {precision}"
            started = time.perf_counter()
            embedder = ClipEmbedder.load(
                str(clip),
                "cpu",
                runtime=runtime,
                precision=precision,
                cache_root=Path(cache),
            )
            load_seconds = time.perf_counter() - started
            if runtime == "onnx":
                report.add(Figure(NAME, f"{label}: first load, export included", load_seconds, "s"))
                started = time.perf_counter()
                embedder = ClipEmbedder.load(str(clip), "cpu", runtime="onnx", cache_root=Path(cache))
                report.add(Figure(NAME, f"{label}: second load, from the cache", time.perf_counter() - started, "s"))
            if (runtime, precision) == ("torch", "fp32"):
                lowest = fidelity_figure(
                    fidelity_jpeg(embedder, [f for f in files if f[0].endswith(".jpg")][:naive_files])
                )
                report.add(lowest)
            rate, batch = bare_model(embedder, batches, images=96 if not quick else 8)
            bare[(runtime, precision)] = rate
            image_fidelity, text_fidelity = runtime_fidelity(embedder, clip)
            bound = BOUNDS[precision]
            report.add(
                Figure(NAME, f"bare forward, {label}", rate, "img/s", note=f"best batch {batch}"),
                Figure(NAME, f"text encode p50, {label}", text_p50(embedder, 40 if not quick else 5), "ms"),
                Figure(NAME, f"fidelity, {label}: lowest centered cosine, image", image_fidelity, "", bound, "min"),
                Figure(NAME, f"fidelity, {label}: lowest centered cosine, text", text_fidelity, "", bound, "min"),
            )
            del embedder
    with tempfile.TemporaryDirectory() as tmp, serve(Path(tmp) / "storage", clip) as server:
        rate = asyncio.run(upload_all(server.base, files, per_request=8, clients=2))
    photos = sum(name.endswith(".jpg") for name, _ in files)
    reference = bare[("torch", "fp32")]
    report.add(
        Figure(NAME, f"HTTP upload (defaults), {photos} JPEG photos + {len(files) - photos} PNG/WebP", rate, "img/s"),
        Figure(NAME, "upload / bare torch fp32 model", rate / reference, "x", target=1.0, kind="min"),
        Figure(NAME, "upload / naive pipeline", rate / naive_rate, "x", target=3.0, kind="min"),
    )
