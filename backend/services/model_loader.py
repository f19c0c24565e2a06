"""Model loading: one `ModelLoader` per model (CLIP, BLIP) loads it once in the executor, reports its state
for /health, and fails softly (a 503 with the reason, another try later)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Generic, Literal, TypeVar

from backend.errors import ModelUnavailableError
from backend.executor import Executor
from ml.captioner import BlipCaptioner
from ml.embedder import ClipEmbedder

log = logging.getLogger(__name__)

ModelState = Literal["not_loaded", "loading", "loaded", "failed"]
# After a failed load, the next request that needs the model tries again once this much time has passed.
RETRY_AFTER_SECONDS = 30.0
M = TypeVar("M", ClipEmbedder, BlipCaptioner)


class ModelLoader(Generic[M]):
    """Loads one model on first use (or at startup), once; `get()` waits for it or says why it cannot load."""

    def __init__(self, *, label: str, model_name: str, loader: Callable[[], M], executor: Executor) -> None:
        self.label = label
        self.model_name = model_name
        self._loader: Callable[[], M] = loader
        self._executor = executor
        self._model: M | None = None
        self._task: asyncio.Task[M | None] | None = None
        self._error: str | None = None
        self._failed_at = 0.0

    @property
    def state(self) -> ModelState:
        if self._model is not None:
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
    def loaded(self) -> M | None:
        """The model once loaded (None before), without waiting or loading."""
        return self._model

    @property
    def device(self) -> str | None:
        return self._model.device if self._model else None

    def start_loading(self) -> None:
        if self._model is None and (self._task is None or self._task.done()):
            self._error = None
            self._task = asyncio.create_task(self._load(), name=f"load-{self.label.lower()}")

    async def _load(self) -> M | None:
        started = time.perf_counter()
        try:
            model = await self._executor.run(self._loader)
        except Exception as exc:  # any failure (network, bad name, bad files) is reported, not fatal
            self._error = _describe(exc)
            self._failed_at = time.monotonic()
            log.error("could not load %s model %r: %s", self.label, self.model_name, self._error)
            return None
        if isinstance(model, ClipEmbedder):
            # Queries' text sessions get threads of the query lane's priority (see ClipEmbedder.prepare_query_lane).
            try:
                await self._executor.run_query(model.prepare_query_lane)
            except Exception as exc:  # the bulk lane's session still answers
                log.warning("could not prepare the query lane's text session: %s", _describe(exc))
        self._model = model
        log.info(
            "loaded %s model %r on %s (%s) in %.1fs",
            self.label,
            self.model_name,
            model.device,
            getattr(model, "runtime", "torch") + " " + str(getattr(model, "precision", "")),
            time.perf_counter() - started,
        )
        return model

    async def get(self) -> M:
        """The loaded model, loading it first if needed; ModelUnavailableError with the reason when it cannot load."""
        if self._model is not None:
            return self._model
        if (
            self.state == "failed"
            and time.monotonic() - self._failed_at >= RETRY_AFTER_SECONDS
            or self.state == "not_loaded"
        ):
            self.start_loading()
        if self._task is not None:
            model = await asyncio.shield(self._task)
            if model is not None:
                return model
        raise ModelUnavailableError(f"{self.label} model {self.model_name!r} is not available: {self._error}")

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            await self._task


def _describe(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:400]
