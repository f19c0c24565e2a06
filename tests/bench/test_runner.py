"""The benchmarks themselves run: `python -m bench all --quick` with tiny data and a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_prints_every_figure_and_saves_them(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "all", "--quick", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    saved = json.loads(out.read_text())
    assert saved["machine"]["cores"] >= 1
    figures = saved["figures"]
    assert figures and all(isinstance(f["value"], float | int) for f in figures)
    for figure in figures:  # each one is in the printed table, with its verdict when it has a target
        assert figure["name"] in done.stdout
        assert (figure["passed"] is None) == (figure["target"] is None)
