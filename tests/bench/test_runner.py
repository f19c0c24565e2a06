"""The benchmarks themselves run: `python -m bench all --quick` with tiny data and a tiny model; each printed
verdict agrees with its figure and target, and the exit status says whether a target was missed."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

from bench.ingest import fidelity_figure, fidelity_jpeg
from bench.report import Figure, Report
from ml.embedder import ClipEmbedder

REPO_ROOT = Path(__file__).resolve().parents[2]


def _table_rows(stdout: str) -> list[list[str]]:
    """The cells of the printed results table, cut at the columns its dashed rule marks."""
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("scenario ") and line.endswith("result"))
    spans = [m.span() for m in re.finditer(r"-+", lines[header + 1])]
    assert len(spans) == 5, lines[header + 1]
    rows = []
    for line in lines[header + 2 :]:
        if not line.strip():
            break
        ends = [start for start, _ in spans[1:]] + [len(line)]
        rows.append([line[start:end].strip() for (start, _), end in zip(spans, ends, strict=True)])
    return rows


def _number(cell: str) -> float:
    """The number a printed value or target starts with ("1,234 img/s", "<= 25.0 ms", "nan")."""
    return float(cell.removeprefix(">= ").removeprefix("<= ").split(" ")[0].replace(",", ""))


def _meets(value: float, target: float, kind: str) -> bool:
    return value >= target if kind == "min" else value <= target


def test_quick_run_prints_every_figure_with_a_verdict_that_agrees_and_exits_by_it(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "all", "--quick", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr, output
    saved = json.loads(out.read_text())  # written at the end of the run: it ran to completion
    assert saved["machine"]["cores"] >= 1
    figures = saved["figures"]
    assert figures and all(isinstance(f["value"], float | int) for f in figures), figures
    rows = _table_rows(done.stdout)
    assert len(rows) == len(figures), rows
    for figure, (scenario, name, value, target, verdict) in zip(figures, rows, strict=True):
        assert (scenario, name) == (figure["scenario"], figure["name"])
        if figure["target"] is None:
            assert figure["passed"] is None and target == "" and verdict == "-", (figure, verdict)
            continue
        # The verdict is the raw figure against its target, in the JSON and in the table alike.
        expected = _meets(figure["value"], figure["target"], figure["kind"])
        assert figure["passed"] is expected and verdict == ("PASS" if expected else "FAIL"), (figure, verdict)
        assert target.startswith(">= " if figure["kind"] == "min" else "<= "), target
        # And it agrees with the printed numbers wherever their rounding still tells them apart.
        shown, wanted = _number(value), _number(target)
        if shown != wanted:
            assert _meets(shown, wanted, figure["kind"]) is expected, (value, target, verdict)
    missed = [f for f in figures if f["passed"] is False]
    # 0 only when every target is met; 1 when one is missed, and the end of the output names each one.
    assert done.returncode == (1 if missed else 0), output
    if missed:
        summary = done.stdout[done.stdout.index("targets missed:") :]
        assert [line.strip() for line in summary.splitlines()[1:]] == [
            f"FAIL {f['scenario']} {f['name']}" for f in missed
        ]


def test_a_figure_with_nothing_measured_fails_its_target(tiny_clip_dir: Path, tmp_path: Path) -> None:
    """No JPEG photo among the files: the fidelity figure is a FAIL saying so, never the 1.0 it used to be."""
    embedder = ClipEmbedder.load(str(tiny_clip_dir), "cpu", runtime="torch")
    assert fidelity_jpeg(embedder, []) is None
    empty = fidelity_figure(None)
    assert math.isnan(empty.value) and empty.passed is False and empty.verdict() == "FAIL"
    assert "no JPEG" in empty.note
    report = Report()
    report.add(empty, fidelity_figure(0.995), Figure("x", "no target", 3.0, "s"))
    assert [f.verdict() for f in report.figures] == ["FAIL", "PASS", "-"]
    assert report.failed() == [empty]
    assert "FAIL" in report.table().splitlines()[2] and "nan" in report.table().splitlines()[2]
    report.save(tmp_path / "r.json")
    saved = json.loads((tmp_path / "r.json").read_text())["figures"][0]  # strict JSON: NaN is saved as null
    assert saved["value"] is None and saved["passed"] is False
