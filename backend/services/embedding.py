"""Owns the CLIP model's lifecycle: load once in the executor, report its state, fail softly."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Literal

from backend.errors import ModelUnavailableError
from backend.executor import Executor
from ml.embedder import ClipEmbedder

log = logging.getLogger(__name__)

ModelState = Literal["not_loaded", "loading", "loaded", "failed"]
# After a failed load, the next request that needs the model tries again once this much time has passed.
RETRY_AFTER_SECONDS = 30.0


class ModelService:
    def __init__(self, *, model_name: str, device: str, batch_size: int, executor: Executor) -> None:
        self.model_name = model_name
        self.requested_device = device
        self.batch_size = batch_size
        self._executor = executor
        self._embedder: ClipEmbedder | None = None
        self._task: asyncio.Task[ClipEmbedder | None] | None = None
        self._error: str | None = None
        self._failed_at = 0.0

    @property
    def state(self) -> ModelState:
        if self._embedder is not None:
            return "loaded"
        if self._task is not None and not self._task.done():
            return "loading"
        if self._error is not None:
            return "failed"
        return "not_loaded"

    @property
    def error(self) -> str | None:
        return self._error

    @property
    def device(self) -> str | None:
        return self._embedder.device if self._embedder else None

    def start_loading(self) -> None:
        if self._embedder is None and (self._task is None or self._task.done()):
            self._error = None
            self._task = asyncio.create_task(self._load(), name="load-clip")

    async def _load(self) -> ClipEmbedder | None:
        started = time.perf_counter()
        try:
            embedder = await self._executor.run(
                ClipEmbedder.load, self.model_name, self.requested_device, self.batch_size
            )
        except Exception as exc:  # any failure (network, bad name, bad files) is reported, not fatal
            self._error = _describe(exc)
            self._failed_at = time.monotonic()
            log.error("could not load CLIP model %r: %s", self.model_name, self._error)
            return None
        self._embedder = embedder
        log.info(
            "loaded CLIP model %r on %s (dim %d) in %.1fs",
            self.model_name,
            embedder.device,
            embedder.dim,
            time.perf_counter() - started,
        )
        return embedder

    async def get(self) -> ClipEmbedder:
        """The loaded model, loading it first if needed; 503 with the reason when it cannot load."""
        if self._embedder is not None:
            return self._embedder
        if (
            self.state == "failed"
            and time.monotonic() - self._failed_at >= RETRY_AFTER_SECONDS
            or self.state == "not_loaded"
        ):
            self.start_loading()
        if self._task is not None:
            embedder = await asyncio.shield(self._task)
            if embedder is not None:
                return embedder
        raise ModelUnavailableError(f"CLIP model {self.model_name!r} is not available: {self._error}")

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            await self._task


def _describe(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:400]
