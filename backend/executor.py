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
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor as FuturesExecutor
from concurrent.futures import Future
from typing import Any, ParamSpec, TypeVar

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")
# How long shutdown waits for calls still running (a read that hangs on a dead network share, say).
SHUTDOWN_GRACE_SECONDS = 10.0


class DaemonThreadPool(FuturesExecutor):
    """A fixed pool of daemon threads. Unlike ThreadPoolExecutor, whose threads the interpreter joins at exit,
    a call that never returns (a read that hangs) cannot keep the process from stopping: shutdown waits a
    bounded time, and the process exits with the thread still blocked."""

    def __init__(
        self,
        workers: int,
        name: str,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
    ) -> None:
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        self._initializer, self._initargs = initializer, initargs
        self._threads = [threading.Thread(target=self._work, name=f"{name}_{n}", daemon=True) for n in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        with self._lock:
            if self._closed:
                raise RuntimeError("the executor is shut down")
            future: Future[T] = Future()
            self._queue.put((future, functools.partial(fn, *args, **kwargs)))
            return future

    def _work(self) -> None:
        if self._initializer is not None:
            self._initializer(*self._initargs)
        while (item := self._queue.get()) is not None:
            future, call = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = call()
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False, timeout: float | None = None) -> None:
        """Refuse new calls, cancel the queued ones (with `cancel_futures`), and wait at most `timeout` seconds
        for the running ones; a thread still busy after that is left to the process's exit."""
        with self._lock:
            self._closed = True
        if cancel_futures:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            deadline = None if timeout is None else time.monotonic() + timeout
            for thread in self._threads:
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            stuck = [thread.name for thread in self._threads if thread.is_alive()]
            if stuck:
                log.warning("%d worker threads were still busy at shutdown and are left behind: %s", len(stuck), stuck)


class Executor:
    """Owned by the app's lifespan: created at startup, shut down at exit."""

    def __init__(self, workers: int = 0, bulk_niceness: int = 0) -> None:
        self.workers = workers or max(2, os.cpu_count() or 2)
        self._pool = DaemonThreadPool(
            self.workers, "organizer-worker", initializer=lower_priority, initargs=(bulk_niceness,)
        )
        self._queries = DaemonThreadPool(self.workers, "organizer-query")

    async def run(self, func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Bulk work: uploads, imports, clustering, captions, file and index writes."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(func, *args, **kwargs))

    async def run_query(self, func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Short calls a person is waiting on (embedding a search query, an index lookup)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._queries, functools.partial(func, *args, **kwargs))

    def shutdown(self, grace: float | None = None) -> None:
        """Cancel what is queued; wait at most `grace` seconds in all (SHUTDOWN_GRACE_SECONDS) for what runs."""
        grace = SHUTDOWN_GRACE_SECONDS if grace is None else grace
        deadline = time.monotonic() + grace
        self._queries.shutdown(wait=True, cancel_futures=True, timeout=grace)
        self._pool.shutdown(wait=True, cancel_futures=True, timeout=max(0.0, deadline - time.monotonic()))


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
