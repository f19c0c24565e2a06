"""Duplicates: how well the perceptual hash separates a photo's variants from unrelated photos, and how long
a full scan of a large collection takes in the real service.

Separation: each generated picture (`data.scene_bytes`) against its variants (`data.variants`: re-encodes at
quality 50-95, resizes to 25-75 %, PNG and WebP conversions, 5 % crops), every hash made as ingest makes it
(from the thumbnail). The figures are the largest distance of each kind of variant and the smallest distance
between unrelated pictures: DUPLICATES_HASH_DISTANCE must lie between the two.

Scan: a collection seeded with `size` CLIP-like vectors, 2 % of them near-copies of another image (a vector a
little off the original's, a hash a few bits off), then `POST /duplicates/scan` on the served collection.
"""

from __future__ import annotations

import io
import sqlite3
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from backend.config import Settings
from backend.services.imaging import make_thumbnail, thumbnail_hash
from bench.data import clustered_vectors, scene_bytes, variants
from bench.report import Figure, Report
from bench.search import embedding_dim
from bench.seed import seed
from bench.server import serve
from ml.index import IndexLayout

COPIES = 0.02


def _hash(data: bytes, size: int) -> int:
    with Image.open(io.BytesIO(data)) as opened:
        return int(thumbnail_hash(make_thumbnail(opened.convert("RGB"), size)), 16)


def separation(report: Report, pictures: int) -> None:
    size = Settings().thumbnail_size
    worst: dict[str, int] = {}
    originals: list[int] = []
    for n in range(pictures):
        original = scene_bytes(n)
        base = _hash(original, size)
        originals.append(base)
        for name, data in variants(original).items():
            worst[name] = max(worst.get(name, 0), (base ^ _hash(data, size)).bit_count())
    unrelated = [(a ^ b).bit_count() for i, a in enumerate(originals) for b in originals[i + 1 :]]
    threshold = Settings().duplicates_hash_distance
    for name, distance in worst.items():
        report.add(Figure("duplicates", f"pHash bits, worst {name} of {pictures}", distance, "bits",
                          target=threshold, kind="max"))  # fmt: skip
    report.add(
        Figure("duplicates", f"pHash bits, closest unrelated pair of {len(unrelated)}", min(unrelated), "bits",
               target=threshold + 1, kind="min"),
        Figure("duplicates", "pHash bits, unrelated pairs, 1st percentile", float(np.percentile(unrelated, 1)), "bits"),
    )  # fmt: skip


def _seed_hashes(database: Path, sources: np.ndarray, copies: np.ndarray, rng: np.random.Generator) -> None:
    """Random hashes for every image; each copy's hash a few bits off its source's."""
    with sqlite3.connect(database) as db:
        count = db.execute("SELECT max(id) FROM image").fetchone()[0]
        hashes = rng.integers(0, 2**63, count, dtype=np.int64).astype(np.uint64)
        for source, copy in zip(sources, copies, strict=True):
            flips = rng.choice(64, int(rng.integers(0, 8)), replace=False)
            hashes[copy] = hashes[source] ^ np.uint64(sum(1 << int(b) for b in flips))
        db.executemany(
            "UPDATE image SET phash = ? WHERE id = ?", [(f"{int(h):016x}", i + 1) for i, h in enumerate(hashes)]
        )
        db.commit()


def full_scan(report: Report, clip: Path, sizes: dict[str, int], target_seconds: float | None) -> None:
    layout = IndexLayout()
    rng = np.random.default_rng(7)
    for label, n in sizes.items():
        with tempfile.TemporaryDirectory() as tmp:
            storage = Path(tmp) / "storage"
            vectors = clustered_vectors(n, dim=embedding_dim(clip))
            copies = rng.choice(n, int(n * COPIES), replace=False)
            sources = rng.choice(np.setdiff1d(np.arange(n), copies), len(copies))
            noisy = vectors[sources] + rng.normal(0, 0.01, (len(copies), vectors.shape[1])).astype(np.float32)
            vectors[copies] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
            seed(storage, str(clip), vectors, layout)
            del vectors
            _seed_hashes(storage / "organizer.db", sources, copies, rng)
            env = {"INDEX_APPROXIMATE_FROM": str(layout.approximate_from)}
            with serve(storage, clip, settings=env) as server, httpx.Client(base_url=server.base, timeout=120) as http:
                start = time.perf_counter()
                job = http.post("/duplicates/scan").json()
                while job["status"] in ("queued", "running"):
                    time.sleep(0.5)
                    job = http.get(f"/jobs/{job['id']}").json()
                took = time.perf_counter() - start
                if job["status"] != "succeeded":
                    raise RuntimeError(f"the scan {job['status']}: {job.get('error')}")
                listed = time.perf_counter()
                first = http.get("/duplicates", params={"tier": "same_picture", "limit": 50}).json()
                list_ms = (time.perf_counter() - listed) * 1000
            found = first["count"]
            report.add(
                Figure("duplicates", f"full scan, {label} images", took, "s",
                       target=target_seconds, kind="max" if target_seconds else None),
                Figure("duplicates", f"same_picture groups found of {len(copies)} planted copies, {label}",
                       found, "groups", note="copies sharing a source form one group"),
                Figure("duplicates", f"GET /duplicates (first page), {label}", list_ms, "ms"),
            )  # fmt: skip


def run(report: Report, *, clip: Path, quick: bool) -> None:
    separation(report, pictures=6 if quick else 60)
    full_scan(report, clip, {"2k": 2_000} if quick else {"100k": 100_000}, None if quick else 300.0)
