"""Scenario 3, clustering: k-means at 100k vectors with a fixed k and with k=auto; BLIP time per cluster."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from backend.services.imaging import decode_image
from bench.report import Figure, Report
from ml.captioner import BlipCaptioner
from ml.clustering import cluster_vectors

NAME = "cluster"


def run(report: Report, *, vectors: np.ndarray, blip: Path, photos: list[tuple[str, bytes]], k: int) -> None:
    ids = np.arange(1, len(vectors) + 1, dtype=np.int64)
    label = f"{len(vectors) // 1000}k" if len(vectors) >= 1000 else str(len(vectors))
    start = time.perf_counter()
    fixed = cluster_vectors(vectors, ids, k=k, seed=0)
    fixed_seconds = time.perf_counter() - start
    start = time.perf_counter()
    auto = cluster_vectors(vectors, ids, k=None, seed=0, k_max=20)
    auto_seconds = time.perf_counter() - start
    large = len(vectors) >= 100_000
    report.add(
        Figure(NAME, f"k-means, {label} vectors, k={fixed.k}", fixed_seconds, "s", target=5.0 if large else None,
               kind="max" if large else None),
        Figure(NAME, f"k-means, {label} vectors, k=auto (chose {auto.k})", auto_seconds, "s",
               target=10.0 if large else None, kind="max" if large else None),
    )  # fmt: skip

    captioner = BlipCaptioner.load(str(blip), "cpu", batch_size=8, max_new_tokens=30)
    with tempfile.TemporaryDirectory() as tmp:
        images = []
        for name, data in photos:
            path = Path(tmp) / name
            path.write_bytes(data)
            images.append(decode_image(path, 10**9).rgb)
    per_cluster = 4  # CLUSTER_REPRESENTATIVES: the images captioned for each cluster
    pixels = captioner.preprocess(images[:per_cluster])
    captioner.caption_pixels(pixels[:1])  # warm-up
    start = time.perf_counter()
    rounds = 2
    for _ in range(rounds):
        captioner.caption_pixels(pixels)
    seconds = (time.perf_counter() - start) / rounds
    report.add(
        Figure(NAME, f"BLIP captions per cluster ({per_cluster} representatives, 30 tokens)", seconds, "s",
               note=f"torch threads {torch.get_num_threads()}; random weights never stop early"),
    )  # fmt: skip
