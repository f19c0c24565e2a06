"""The app's executor: bulk work yields the CPU to searches and to the request loop."""

from __future__ import annotations

import os
import sys
import threading

import pytest
import torch

from backend.executor import Executor


def priority() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def threads_started_by_torch() -> list[int]:
    """Nice values of the threads a parallel torch op started from the calling thread."""
    before = set(os.listdir(f"/proc/{os.getpid()}/task"))
    torch.ones(1024, 1024) @ torch.ones(1024, 1024)
    started = set(os.listdir(f"/proc/{os.getpid()}/task")) - before
    return [os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in started]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are a Linux feature")
async def test_bulk_threads_run_at_a_lower_priority_than_queries() -> None:
    base = priority()
    executor = Executor(workers=2, bulk_niceness=5)
    try:
        assert await executor.run(priority) == min(19, base + 5)
        assert await executor.run_query(priority) == base
        assert priority() == base  # the event loop's thread is untouched
        if torch.get_num_threads() > 1:
            # The helper threads torch starts for a bulk thread's forward pass inherit its priority.
            started = await executor.run(threads_started_by_torch)
            assert started and set(started) == {min(19, base + 5)}
    finally:
        executor.shutdown()


async def test_zero_niceness_leaves_the_priority_alone() -> None:
    executor = Executor(workers=1, bulk_niceness=0)
    try:
        assert await executor.run(os.getpriority, os.PRIO_PROCESS, 0) == os.getpriority(os.PRIO_PROCESS, 0)
    finally:
        executor.shutdown()
