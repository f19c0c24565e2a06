"""Schemathesis against the real server: every operation of /openapi.json, fuzzed with valid and invalid
input, answers without a server error, with a status code the schema documents, the content type it
declares and a body that validates against the declared response model.

How it runs, and why:
- The server is the real one (uvicorn in a subprocess on a loopback port, tiny models, as run.sh starts
  it): the app needs its lifespan (models, index, job service) and one event loop for its background
  jobs across requests, which an ASGI test client does not keep.
- Schemathesis runs through its CLI (`python -m schemathesis.cli run`) rather than its pytest plugin: the
  plugin's `from_fixture` loader, needed for a schema that only exists once the server is up, rewrites a
  pytest node attribute (`_nodeid`) that pytest 9 no longer has. The CLI also runs every phase: the
  schema's examples, the coverage phase (boundary and invalid values of every parameter, unexpected
  methods), random fuzzing, and stateful sequences through the links it infers.
- The server holds a few images, a finished clustering run and a folder to import before the run, so
  that small ids reach real records: fuzzed deletes, searches, captions, exports and cluster jobs run
  against real data, not only against 404s. Schemathesis's own upload samples are real tiny PNG, JPEG,
  GIF and WebP files, so uploads store images too.
- Nothing is excluded: routes that start jobs (clusters, import, reindex, captions) or destroy data
  (DELETE /images/{id}, DELETE /jobs/{id}) are fuzzed like the rest.
- Deterministic (`--generation-deterministic`): CI runs the same cases every time. Bounded by
  MAX_EXAMPLES random cases per operation (the other phases are bounded by the schema).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.server import RunningServer, serve
from tests.helpers import make_image_bytes

pytestmark = pytest.mark.slow

CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance", "response_schema_conformance")
MAX_EXAMPLES = 10
RUN_TIMEOUT = 600  # only guards against a hang; the run takes about 20 s


@pytest.fixture(scope="module")
def fuzz_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path, tiny_blip_dir: Path
) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("fuzz")
    import_root = root / "imports"
    (import_root / "nested").mkdir(parents=True)
    for seed in range(3):
        (import_root / "nested" / f"photo{seed}.jpg").write_bytes(make_image_bytes(500 + seed))
    settings = {
        "CAPTION_MAX_TOKENS": "4",
        "TAG_MIN_SCORE": "0",
        "IMPORT_ROOTS": str(import_root),
        "EXECUTOR_WORKERS": "2",
        "KMEANS_CLUSTERS": "2",
    }
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(
                serve(root / "storage", tiny_clip_dir, tiny_blip_dir, timeout=120, settings=settings)
            )
        except RuntimeError as exc:  # its message ends with the server's log
            pytest.fail(str(exc))
        with httpx.Client(base_url=server.base, timeout=60) as http:
            files = [("files", (f"seed{i}.jpg", make_image_bytes(i), "image/jpeg")) for i in range(6)]
            assert http.post("/images", files=files).status_code == 201
            job = http.post("/clusters", json={"k": 2}).json()
            deadline = time.monotonic() + 60
            while (status := http.get(f"/jobs/{job['id']}").json()["status"]) in ("queued", "running"):
                assert time.monotonic() < deadline, "the seeding clustering run did not finish"
                time.sleep(0.05)
            assert status == "succeeded", http.get(f"/jobs/{job['id']}").text
        yield server


def test_every_operation_answers_as_its_schema_says(fuzz_server: RunningServer, tmp_path: Path) -> None:
    schema = httpx.get(f"{fuzz_server.base}/openapi.json", timeout=30).json()
    operations = {f"{method.upper()} {path}" for path, item in schema["paths"].items() for method in item}
    junit = tmp_path / "junit.xml"
    command = [sys.executable, "-m", "schemathesis.cli", "run", f"{fuzz_server.base}/openapi.json"]
    command += ["--checks", ",".join(CHECKS), "--max-examples", str(MAX_EXAMPLES), "--generation-deterministic"]
    command += ["--workers", "1", "--request-timeout", "60", "--no-color", "--report", "junit"]
    command += ["--report-junit-path", str(junit)]
    # Run from the test's folder: the CLI keeps its .hypothesis/ and .schemathesis/ caches in the working directory.
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    report = run.stdout + run.stderr
    assert run.returncode == 0, f"schemathesis found problems:\n{report}"

    # Every operation of the schema was run, and none failed (the exit code says so; the report names them).
    cases = ET.parse(junit).getroot().iter("testcase")
    tested = {case.get("name", "") for case in cases if case.find("skipped") is None}
    assert not operations - tested, f"not tested: {sorted(operations - tested)}\n{report}"
    assert fuzz_server.process.poll() is None, "the server died during the run"
    log = fuzz_server.log.read_text(errors="replace")
    assert "Traceback" not in log, f"the server logged an unexpected error:\n{log[-6000:]}"
