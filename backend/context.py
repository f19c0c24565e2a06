"""One collection's context: what every service call works on.

A collection is a whole library of its own (database, files, vector index, jobs). Its context holds those,
together with what all collections share and none owns: the settings, the executor, the image pipeline, the
model loaders and the tag vocabulary (see backend/collections.py). Services receive the context of the
caller's collection and never reach another.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from backend.config import Settings
from backend.executor import Executor
from backend.services.index import IndexService
from backend.services.jobs import JobService
from backend.services.model_loader import ModelLoader
from backend.services.pgvector_index import PgVectorIndex
from backend.services.pipeline import ImagePipeline
from backend.services.storage import FileStore
from backend.services.tagging import TagService
from ml.captioner import BlipCaptioner
from ml.embedder import ClipEmbedder


@dataclass
class AppContext:
    settings: Settings
    executor: Executor
    pipeline: ImagePipeline
    # The collection's own: database, files, index, jobs.
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    store: FileStore
    index: IndexService | PgVectorIndex
    jobs: JobService
    # Shared: the CLIP and BLIP loaders and the zero-shot tag vocabulary.
    clip: ModelLoader[ClipEmbedder]
    blip: ModelLoader[BlipCaptioner]
    tags: TagService
    # The collection this context serves (see backend/collections.py).
    collection: str = "default"
    # Serialises the short commit phase of writes (file rename, row, index) so that
    # two uploads of the same bytes, or an upload and a delete, cannot interleave.
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Set when a library is added, changed or removed: the watcher follows the new set of folders.
    libraries_changed: asyncio.Event = field(default_factory=asyncio.Event)
    # The task that follows the libraries' folders (services/libraries.LibraryWatcher), when this process runs one.
    watcher: Any = None
