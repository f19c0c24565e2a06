"""A stored collection without the model: rows written straight into SQLite and a matching saved index.

The rows look like uploads (filename, size, sha256, vector); there are no files on disk, which search,
clustering and startup never read.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from backend.db import create_engine, init_schema
from backend.services.index import index_file, vector_to_blob
from backend.services.storage import FileStore
from ml.index import IndexLayout, VectorIndex

CHUNK = 50_000


async def _schema(database: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{database}")
    await init_schema(engine)
    await engine.dispose()


def seed(storage: Path, model_name: str, vectors: np.ndarray, layout: IndexLayout) -> Path:
    """Store `vectors` as images 1..n embedded by `model_name`, and save the index a service with `layout`
    loads as it is (exact, or approximate past the threshold); returns the index file."""
    store = FileStore(storage)
    store.ensure_dirs()
    database = storage / "organizer.db"
    asyncio.run(_schema(database))
    now = datetime.now(UTC).replace(tzinfo=None).isoformat(sep=" ")
    with sqlite3.connect(database) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=OFF")
        for start in range(0, len(vectors), CHUNK):
            rows = []
            for i in range(start, min(len(vectors), start + CHUNK)):
                sha = hashlib.sha256(i.to_bytes(8, "little")).hexdigest()
                rows.append(
                    (f"photo-{i}.jpg", "image/jpeg", 4000, 3000, 3_500_000, sha, now, model_name, "JPEG",
                     f"originals/{sha[:2]}/{sha}.jpg", f"thumbnails/{sha[:2]}/{sha}.jpg", vectors.shape[1],
                     vector_to_blob(vectors[i]))
                )  # fmt: skip
            db.executemany(
                "INSERT INTO image (filename, content_type, width, height, size_bytes, sha256, created_at, "
                "embedding_model, format, storage_key, thumbnail_key, embedding_dim, embedding) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            db.commit()
        # A long-lived database has its pages in the main file, not in a 2 GB write-ahead log.
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    index = VectorIndex(layout=layout)
    index.reset(np.arange(1, len(vectors) + 1, dtype=np.int64), vectors)
    path = index_file(store.index_dir, model_name)
    index.save(path)
    return path
