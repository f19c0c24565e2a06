"""Scenario 1, ingest throughput: HTTP uploads end to end against the bare model and a naive pipeline.

All three are measured in the same run, one after the other, so the ratios compare like with like:
- bare model: `embed_pixels` on ready 224x224 tensors at its best batch size (the physical limit);
- naive: what a simple prototype does per image: full-resolution decode, `CLIPProcessor`, batch-1 forward;
- service: batches of files POSTed to /images by concurrent clients; decode, checks, hashing, thumbnail,
  files, SQLite and index included.
"""

from __future__ import annotations

import asyncio
import io
import tempfile
import time
from pathlib import Path

import httpx
import torch
from PIL import Image, ImageOps

from backend.services.imaging import decode_image
from bench.report import Figure, Report
from bench.server import serve
from ml.embedder import ClipEmbedder

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


def naive(embedder: ClipEmbedder, files: list[tuple[str, bytes]]) -> float:
    """images/s of the prototype way: one image at a time, full decode, the stock processor, batch 1."""
    model, processor = embedder.model, embedder.processor
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


def fidelity(embedder: ClipEmbedder, files: list[tuple[str, bytes]]) -> float | None:
    """Lowest cosine between the service's embedding (reduced JPEG decode, its preprocessing) and the
    reference one (full decode, the stock processor) over the photos; None when there was no photo to compare."""
    lowest: float | None = None
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files:
            path = Path(tmp) / name
            path.write_bytes(data)
            fast = embedder.embed_pixels(embedder.preprocess([decode_image(path, 10**9).rgb]))[0]
            image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
            pixels = embedder.processor(images=image, return_tensors="pt")["pixel_values"]
            reference = embedder.embed_pixels(pixels)[0]
            cosine = float(fast @ reference)
            lowest = cosine if lowest is None else min(lowest, cosine)
    return lowest


def fidelity_figure(lowest: float | None) -> Figure:
    """The fidelity figure against its target; nothing measured is a FAIL (NaN), never a free pass."""
    name = "reduced JPEG decode vs reference: lowest cosine"
    if lowest is None:
        return Figure(NAME, name, float("nan"), "", target=0.99, kind="min", note="no JPEG photo was measured")
    return Figure(NAME, name, lowest, "", target=0.99, kind="min")


def run(report: Report, *, clip: Path, files: list[tuple[str, bytes]], naive_files: int, quick: bool) -> None:
    embedder = ClipEmbedder.load(str(clip), "cpu")
    # The same mix of photos and small files as the upload, spread over the whole set.
    naive_rate = naive(embedder, files[:: max(1, len(files) // naive_files)])
    lowest_cosine = fidelity(embedder, [f for f in files if f[0].endswith(".jpg")][:naive_files])
    bare_rate, bare_batch = bare_model(embedder, [8, 16, 32] if not quick else [4], images=96 if not quick else 8)
    del embedder
    report.add(
        Figure(NAME, "bare model forward, ready tensors", bare_rate, "img/s", note=f"best batch {bare_batch}"),
        Figure(NAME, "naive pipeline (full decode, processor, batch 1)", naive_rate, "img/s"),
        fidelity_figure(lowest_cosine),
    )
    with tempfile.TemporaryDirectory() as tmp, serve(Path(tmp) / "storage", clip) as server:
        rate = asyncio.run(upload_all(server.base, files, per_request=8, clients=2))
    photos = sum(name.endswith(".jpg") for name, _ in files)
    report.add(
        Figure(NAME, f"HTTP upload, {photos} JPEG photos + {len(files) - photos} PNG/WebP", rate, "img/s"),
        Figure(NAME, "upload / bare model", rate / bare_rate, "x", target=0.75, kind="min"),
        Figure(NAME, "upload / naive pipeline", rate / naive_rate, "x", target=3.0, kind="min"),
    )
