"""The thread pools that run every blocking call (model, FAISS, Pillow, hashing, file copies).

Two lanes: bulk work (ingest, clustering, captions, index saves) and queries (a search's text embedding
and index lookup). A search never waits in line behind a batch of uploads. Both share the CPU, but the
bulk lane's threads run at a lower scheduling priority (a higher nice value; on Linux it is per thread,
and the threads torch, faiss and scikit-learn start from them inherit it), so when the cores are busy a
search, and the event loop answering requests, get them first. Bulk work still has every idle cycle.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")


class Executor:
    """Owned by the app's lifespan: created at startup, shut down at exit."""

    def __init__(self, workers: int = 0, bulk_niceness: int = 0) -> None:
        self.workers = workers or max(2, os.cpu_count() or 2)
        self._pool = ThreadPoolExecutor(
            max_workers=self.workers,
            thread_name_prefix="organizer-worker",
            initializer=lower_priority,
            initargs=(bulk_niceness,),
        )
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


def lower_priority(niceness: int) -> None:
    """Raise the calling thread's nice value by `niceness` (Linux schedules threads one by one; elsewhere
    this may apply to the whole process or not at all, which is harmless)."""
    if niceness <= 0 or not hasattr(os, "setpriority"):
        return
    thread = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + niceness))
    except OSError as exc:  # not allowed, or not supported here: run at the normal priority
        log.debug("could not lower the priority of bulk worker threads: %s", exc)
