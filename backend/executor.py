"""The thread pools that run every blocking call (model, FAISS, Pillow, hashing, file copies).

Two lanes: bulk work (ingest, clustering, captions, index saves) and queries (a search's text embedding
and index lookup). A search never waits in line behind a batch of uploads; both still share the CPU.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class Executor:
    """Owned by the app's lifespan: created at startup, shut down at exit."""

    def __init__(self, workers: int = 0) -> None:
        self.workers = workers or max(2, os.cpu_count() or 2)
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="organizer-worker")
        self._queries = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="organizer-query")

    async def run(self, func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Bulk work: uploads, imports, clustering, captions, file and index writes."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(func, *args, **kwargs))

    async def run_query(self, func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Short calls a person is waiting on (embedding a search query, an index lookup)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._queries, functools.partial(func, *args, **kwargs))

    def shutdown(self) -> None:
        self._queries.shutdown(wait=True, cancel_futures=True)
        self._pool.shutdown(wait=True, cancel_futures=True)
