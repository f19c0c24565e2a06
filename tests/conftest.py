"""Shared fixtures: a tiny random CLIP saved like a real one, fresh storage, and clients with the lifespan running."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import httpx
import pytest
import torch
from asgi_lifespan import LifespanManager

from backend.config import Settings
from backend.context import AppContext
from backend.main import create_app
from bench.postgres import PostgresServer
from tests.tiny_models import build_tiny_blip, build_tiny_clip


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def tiny_blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_blip(tmp_path_factory.mktemp("tiny-blip"))


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> PostgresServer:
    """One real PostgreSQL 18 with pgvector for the session, on a socket under a temp folder."""
    return PostgresServer(tmp_path_factory.mktemp("postgres") / "data")


# Both database backends, for `@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)`:
# `-m sqlite` or `-m postgres` runs one of them. tests/api runs every test on both.
BACKENDS = [
    pytest.param("sqlite", marks=pytest.mark.sqlite),
    pytest.param("postgres", marks=pytest.mark.postgres),
]


def database_for(request: pytest.FixtureRequest, backend: str) -> Iterator[str]:
    """The DATABASE_URL of a test on `backend`: empty for SQLite (its file in the storage root), a fresh
    database on the session's PostgreSQL otherwise, dropped afterwards. `@pytest.mark.sqlite_only("why")`
    skips a test's PostgreSQL run."""
    if backend == "sqlite":
        yield ""
        return
    only = request.node.get_closest_marker("sqlite_only")
    if only is not None:
        pytest.skip(f"SQLite only: {only.args[0] if only.args else 'reads the SQLite file'}")
    server = request.getfixturevalue("postgres")
    url = server.create_database()
    yield url
    server.drop_database(url)


@pytest.fixture
def database_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The test's DATABASE_URL: SQLite unless parametrized with BACKENDS (or run in tests/api)."""
    yield from database_for(request, getattr(request, "param", "sqlite"))


@pytest.fixture
def another_database(request: pytest.FixtureRequest, database_url: str) -> Iterator[Callable[[], str]]:
    """Makes the DATABASE_URL of a second, empty library on the test's backend (on SQLite the storage root
    decides, so it is empty too); dropped at the end."""
    made: list[str] = []

    def make() -> str:
        if not database_url:
            return ""
        made.append(request.getfixturevalue("postgres").create_database())
        return made[-1]

    yield make
    for url in made:
        request.getfixturevalue("postgres").drop_database(url)


@pytest.fixture
def settings(tmp_path: Path, tiny_clip_dir: Path, tiny_blip_dir: Path, database_url: str) -> Settings:
    return Settings(
        _env_file=None,
        storage_root=tmp_path / "storage",
        database_url=database_url,
        clip_model_name=str(tiny_clip_dir),
        clip_device="cpu",
        # One ONNX export of the tiny model for the whole session, not one per test's storage.
        model_cache_dir=str(tiny_clip_dir.parent / "onnx-cache"),
        blip_model_name=str(tiny_blip_dir),
        blip_device="cpu",
        caption_max_tokens=8,
        # Random weights spread the softmax evenly: keep every top tag so tag behaviour is visible.
        tag_min_score=0.0,
        index_save_interval=0,
        executor_workers=2,
    )


def app_context(client: httpx.AsyncClient) -> AppContext:
    """The running app's context behind a client made by `run_app`."""
    return client.ctx  # type: ignore[attr-defined]  # set by run_app


AppRunner = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture
def run_app(settings: Settings) -> AppRunner:
    """`async with run_app(**overrides) as client`: a fresh app over the test's storage; a second call is a restart."""

    @asynccontextmanager
    async def runner(**overrides: object) -> AsyncIterator[httpx.AsyncClient]:
        app = create_app(settings.model_copy(update=overrides))
        async with LifespanManager(app, startup_timeout=60, shutdown_timeout=60) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
                client.ctx = app.state.ctx  # type: ignore[attr-defined]  # for tests that look inside
                yield client

    return runner


@pytest.fixture
async def client(run_app: AppRunner) -> AsyncIterator[httpx.AsyncClient]:
    async with run_app() as client:
        yield client


@pytest.fixture
def caption_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts BLIP's work: the batch size of every caption_pixels call, in order."""
    from ml.captioner import BlipCaptioner

    calls: list[int] = []
    original = BlipCaptioner.caption_pixels

    def counting(self: BlipCaptioner, pixel_values: torch.Tensor) -> list[str]:
        calls.append(len(pixel_values))
        return original(self, pixel_values)

    monkeypatch.setattr(BlipCaptioner, "caption_pixels", counting)
    return calls
