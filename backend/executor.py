"""The one thread pool that runs every blocking call (model, FAISS, Pillow, hashing, file copies)."""

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

    async def run(self, func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(func, *args, **kwargs))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
