"""Browser tests: the real server (a uvicorn subprocess on a free loopback port, tiny models) and the page
driven by Debian's Chromium through Playwright. Skipped, with the reason, where Chromium is not installed."""

from __future__ import annotations

import contextlib
import json
import os
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.server import serve

REPO_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SCREENSHOTS = Path(os.environ.get("SCREENSHOT_DIR", REPO_ROOT / "artifacts" / "screenshots"))
STARTUP_SECONDS = 120


@dataclass
class Server:
    base: str
    storage: Path
    import_root: Path
    log: Path

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.base + path, timeout=30) as answer:
            return json.loads(answer.read())


@pytest.fixture
def server(
    request: pytest.FixtureRequest, tmp_path: Path, tiny_clip_dir: Path, tiny_blip_dir: Path, database_url: str
) -> Iterator[Server]:
    """A fresh service over empty storage, started as `run.sh` starts it, answering once CLIP is loaded.
    `@pytest.mark.server_env(NAME="value")` adds settings; parametrizing `database_url` with BACKENDS runs
    it on PostgreSQL too."""
    import_root = tmp_path / "imports"
    import_root.mkdir()
    storage = tmp_path / "storage"
    settings = {
        "CAPTION_MAX_TOKENS": "8",
        "TAG_MIN_SCORE": "0",
        "IMPORT_ROOTS": str(import_root),
        "EXECUTOR_WORKERS": "2",
    }
    if database_url:
        settings["DATABASE_URL"] = database_url
    marker = request.node.get_closest_marker("server_env")
    if marker is not None:
        settings.update(marker.kwargs)
    with contextlib.ExitStack() as stack:
        try:
            running = stack.enter_context(
                serve(storage, tiny_clip_dir, tiny_blip_dir, timeout=STARTUP_SECONDS, settings=settings)
            )
        except RuntimeError as exc:  # its message ends with the server's log
            pytest.fail(str(exc))
        yield Server(base=running.base, storage=storage, import_root=import_root, log=running.log)


# Module scope, not session: sync Playwright keeps an event loop running in the main thread while it is
# open, and async tests in later modules (pytest-asyncio) cannot start theirs beside it.
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(
            f"no Chromium at {CHROMIUM}: install Debian's package (apt-get install chromium; scripts/test.sh does "
            "this when run as root) or point CHROMIUM_PATH at one"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any, server: Server) -> Iterator[Any]:
    """The service's page at `/`, loaded; a script error in the page fails the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.set_default_timeout(30_000)
    page.goto(server.base + "/")
    page.wait_for_selector("#health-dot.ok")
    yield page
    context.close()
    assert not errors, f"the page raised script errors: {errors}"


def screenshot(page: Any, name: str) -> Path:
    """Save a full-page screenshot under SCREENSHOT_DIR (artifacts/screenshots by default)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def write_images(folder: Path, names_and_seeds: dict[str, int]) -> list[Path]:
    """Distinct JPEG files on disk, for the file picker and drag and drop."""
    from tests.helpers import make_image_bytes

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, seed in names_and_seeds.items():
        path = folder / name
        path.write_bytes(make_image_bytes(seed, size=(160, 120)))
        paths.append(path)
    return paths
