"""The real service as a subprocess (`image-organizer serve` on a free loopback port), as run.sh starts it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class RunningServer:
    base: str
    process: subprocess.Popen[bytes]
    started_in: float  # seconds from spawn to a loaded model and index
    log: Path  # the server's output

    def rss_mb(self) -> float:
        """Resident memory of the server process now."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(
    storage: Path,
    clip: Path,
    blip: Path | None = None,
    timeout: float = 600,
    settings: dict[str, str] | None = None,
    name: str = "server",
) -> Iterator[RunningServer]:
    """Start the service over `storage` as run.sh does, on a free loopback port; yields once /health says the
    model is loaded. `settings` are extra environment variables ({"IMPORT_ROOTS": "..."}, ...); its output goes
    to <storage>-<name>.log beside the storage (replicas on one storage have a name each)."""
    port = free_port()
    env = {
        **os.environ,
        "STORAGE_ROOT": str(storage),
        "CLIP_MODEL_NAME": str(clip),
        "CLIP_DEVICE": "cpu",
        "BLIP_MODEL_NAME": str(blip or clip),
        "BLIP_DEVICE": "cpu",
        **(settings or {}),
    }
    log_path = storage.parent / f"{storage.name}-{name}.log"
    log = log_path.open("wb")
    command = [sys.executable, "-m", "backend.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--log-level", "warning"]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                health = httpx.get(base + "/health", timeout=5).json()
                if health["model"]["state"] == "loaded":
                    break
                if health["model"]["state"] == "failed":
                    raise RuntimeError(f"the model did not load: {health['model']['error']}{_tail(log_path)}")
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.perf_counter() - start > timeout:
                raise RuntimeError(f"the server did not start{_tail(log_path)}")
            time.sleep(0.05)
        yield RunningServer(base=base, process=process, started_in=time.perf_counter() - start, log=log_path)
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _tail(log: Path) -> str:
    return f"; the end of its log ({log}):\n{log.read_text(errors='replace')[-4000:]}"
