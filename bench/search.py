"""Scenarios 2, 4 and 5: search latency at 100k and 1M stored vectors (idle and during an ingest),
/health under an ingest and a clustering job, and startup time and memory with 1M vectors."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np

from bench.data import clustered_vectors
from bench.ingest import upload_all
from bench.report import Figure, Report
from bench.seed import seed
from bench.server import RunningServer, serve
from ml.embedder import ClipEmbedder
from ml.index import IndexLayout, VectorIndex

SUBJECTS = ["dog", "cat", "beach", "mountain", "city street", "birthday cake", "car", "forest", "child", "boat"]
MOODS = ["at night", "in the snow", "at sunset", "in the rain", "from above", "close up", "in black and white"]


def embedding_dim(clip: Path) -> int:
    return int(json.loads((clip / "config.json").read_text())["projection_dim"])


def queries(count: int) -> list[str]:
    """Distinct sentences, so no answer comes from a cache of query embeddings."""
    rng = random.Random(0)
    return [f"a photo of a {rng.choice(SUBJECTS)} {rng.choice(MOODS)} number {i}" for i in range(count)]


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    p50, p95, p99 = np.percentile(np.array(samples) * 1000, [50, 95, 99])
    return float(p50), float(p95), float(p99)


def timed(http: httpx.Client, paths: list[str]) -> list[float]:
    samples = []
    for path in paths:
        start = time.perf_counter()
        answer = http.get(path)
        samples.append(time.perf_counter() - start)
        answer.raise_for_status()
    return samples


class Background:
    """Run blocking load (uploads, a clustering job) in a thread until stopped."""

    def __init__(self, work: Callable[[threading.Event], None]) -> None:
        self.stop = threading.Event()
        self.error: BaseException | None = None

        def target() -> None:
            try:
                work(self.stop)
            except BaseException as exc:  # reported by the caller
                self.error = exc

        self.thread = threading.Thread(target=target, daemon=True)

    def __enter__(self) -> Background:
        self.thread.start()
        time.sleep(2.0)  # let the load get going
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=600)
        if self.error is not None:
            raise RuntimeError(f"the background load failed: {self.error}") from self.error


def ingest_load(server: RunningServer, files: list[tuple[str, bytes]]) -> Callable[[threading.Event], None]:
    def work(stop: threading.Event) -> None:
        round_ = 0
        while not stop.is_set():
            # New bytes each round (a changed filename is not enough: the same bytes are a duplicate).
            batch = [(f"r{round_}-{name}", data + round_.to_bytes(4, "little")) for name, data in files]
            asyncio.run(upload_all(server.base, batch, per_request=8, clients=2))
            round_ += 1

    return work


def measure_search(report: Report, server: RunningServer, size: str, n: int, target_p50: float, samples: int) -> float:
    """Text and image search latency; returns the idle text p95."""
    with httpx.Client(base_url=server.base, timeout=60) as http:
        timed(http, [f"/search?q=warm+up+{i}" for i in range(5)])
        text = percentiles(timed(http, [f"/search?q={q}&top_k=10" for q in queries(samples)]))
        rng = random.Random(1)
        similar = percentiles(timed(http, [f"/images/{rng.randint(1, n)}/similar?top_k=10" for _ in range(samples)]))
    report.add(
        Figure("search", f"text search p50, {size} vectors", text[0], "ms", target=target_p50, kind="max"),
        Figure("search", f"text search p95, {size} vectors", text[1], "ms"),
        Figure("search", f"text search p99, {size} vectors", text[2], "ms"),
        Figure("search", f"image->image p50, {size} vectors", similar[0], "ms", target=target_p50, kind="max"),
        Figure("search", f"image->image p95, {size} vectors", similar[1], "ms"),
        Figure("search", f"image->image p99, {size} vectors", similar[2], "ms"),
    )
    return text[1]


def measure_recall(
    report: Report, *, index_file: Path, layout: IndexLayout, clip: Path, vectors: np.ndarray, size: str, samples: int
) -> None:
    """recall@10 of the saved index against an exact scan of the same vectors, for the text queries the
    latency figures use (embedded by the same model) and for stored images as queries (as /similar does)."""
    index = VectorIndex.load(index_file, layout)
    if not index.approximate:
        return
    text = ClipEmbedder.load(str(clip), device="cpu").embed_texts(queries(samples))
    images = vectors[np.random.default_rng(2).choice(len(vectors), size=samples, replace=False)]
    for name, query in (("text queries", text), ("image queries", images)):
        exact = np.argsort(-(query @ vectors.T), axis=1)[:, :10] + 1  # ids are 1..n
        found = index.search(query, 10)
        recall = np.mean([len(set(row) & {i for i, _ in hits}) / 10 for row, hits in zip(exact, found, strict=True)])
        report.add(
            Figure("search", f"recall@10 vs exact, {name}, {size}", float(recall), "", target=0.95, kind="min",
                   note=index.kind)
        )  # fmt: skip


def run_search(
    report: Report,
    *,
    clip: Path,
    layout: IndexLayout,
    sizes: dict[str, int],
    photos: list[tuple[str, bytes]],
    samples: int,
    parts: set[str],
) -> None:
    """For each collection size: search latency idle ("search"); at the first size also search under an
    ingest ("search") and /health under an ingest plus clustering ("health"); at the last size startup
    time and memory ("startup")."""
    with tempfile.TemporaryDirectory() as tmp:
        baseline_rss = 0.0
        if "startup" in parts:
            with serve(Path(tmp) / "empty", clip) as empty:
                baseline_rss = empty.rss_mb()
            report.add(Figure("startup", "empty collection: start to model loaded", empty.started_in, "s"),
                       Figure("startup", "empty collection: resident memory (models)", baseline_rss, "MB"))  # fmt: skip
        for position, (size, n) in enumerate(sizes.items()):
            storage = Path(tmp) / f"s{n}"
            vectors = clustered_vectors(n, dim=embedding_dim(clip))
            index_file = seed(storage, str(clip), vectors, layout)
            if "search" in parts:
                measure_recall(report, index_file=index_file, layout=layout, clip=clip, vectors=vectors, size=size,
                               samples=min(samples, 200))  # fmt: skip
            del vectors
            env = {"INDEX_APPROXIMATE_FROM": str(layout.approximate_from),
                   "INDEX_PROBE_FRACTION": str(layout.probe_fraction)}  # fmt: skip
            with serve(storage, clip, settings=env) as server:
                rss = server.rss_mb()
                if "search" in parts:
                    idle_p95 = measure_search(report, server, size, n, 40.0 if n <= 100_000 else 60.0, samples)
                    if position == 0:
                        with (
                            Background(ingest_load(server, photos)),
                            httpx.Client(base_url=server.base, timeout=60) as http,
                        ):
                            busy = percentiles(timed(http, [f"/search?q={q}&top_k=10" for q in queries(samples)]))
                        report.add(
                            Figure("search", f"text search p95 during ingest, {size}", busy[1], "ms"),
                            Figure("search", "p95 during ingest / idle p95", busy[1] / idle_p95, "x",
                                   target=2.0, kind="max"),
                        )  # fmt: skip
                if "health" in parts and position == 0:
                    measure_health(report, server, size, photos, samples)
                if "startup" in parts and position == len(sizes) - 1:
                    big = n >= 1_000_000
                    report.add(
                        Figure("startup", f"{size} vectors: start to model and index loaded", server.started_in, "s",
                               target=10.0 if big else None, kind="max" if big else None),
                        Figure("startup", f"{size} vectors: resident memory above the models", rss - baseline_rss, "MB",
                               target=2560.0 if big else None, kind="max" if big else None),
                    )  # fmt: skip
            shutil.rmtree(storage, ignore_errors=True)


def measure_health(
    report: Report, server: RunningServer, size: str, photos: list[tuple[str, bytes]], samples: int
) -> None:
    """Scenario 4: /health p99 while an ingest and clustering jobs run."""

    def clustering(stop: threading.Event) -> None:
        with httpx.Client(base_url=server.base, timeout=600) as http:
            while not stop.is_set():
                job = http.post("/clusters", json={"k": "auto", "captions": False}).json()
                while http.get(f"/jobs/{job['id']}").json()["status"] in ("queued", "running"):
                    if stop.wait(0.2):
                        break

    latencies: list[float] = []
    with (
        Background(ingest_load(server, photos)),
        Background(clustering),
        httpx.Client(base_url=server.base, timeout=60) as http,
    ):
        for _ in range(samples * 2):
            latencies.extend(timed(http, ["/health"]))
            time.sleep(0.02)
    _, p95, p99 = percentiles(latencies)
    report.add(
        Figure("health", f"/health p95 during ingest + clustering, {size}", p95, "ms"),
        Figure("health", f"/health p99 during ingest + clustering, {size}", p99, "ms", target=25.0, kind="max"),
    )
