"""Everything the app's lifespan creates and the services share, in one place."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from backend.config import Settings
from backend.executor import Executor
from backend.services.embedding import ModelService
from backend.services.jobs import JobService
from backend.services.storage import FileStore
from backend.services.tagging import TagService
from backend.services.vectors import IndexService
from ml.captioner import BlipCaptioner
from ml.embedder import ClipEmbedder


@dataclass
class AppContext:
    settings: Settings
    executor: Executor
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    store: FileStore
    models: ModelService[ClipEmbedder]
    captioner: ModelService[BlipCaptioner]
    vectors: IndexService
    tags: TagService
    jobs: JobService
    # The collection this context serves (see backend/collections.py).
    collection: str = "default"
    # Serialises the short commit phase of writes (file rename, row, index) so that
    # two uploads of the same bytes, or an upload and a delete, cannot interleave.
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # One bulk forward pass at a time (uploads, imports, re-embedding): two would split the cores between
    # them and finish no sooner, while the other executor worker can decode the next batch meanwhile.
    bulk_forward: asyncio.Lock = field(default_factory=asyncio.Lock)
