"""Figures with their targets: the printed table and the JSON file."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


@dataclass
class Figure:
    scenario: str
    name: str
    value: float
    unit: str
    target: float | None = None
    # "min": value must be >= target; "max": value must be <= target; None: reported, no target.
    kind: str | None = None
    note: str = ""

    @property
    def passed(self) -> bool | None:
        if self.target is None or self.kind is None:
            return None
        if math.isnan(self.value):  # nothing was measured: it cannot meet a target
            return False
        return self.value >= self.target if self.kind == "min" else self.value <= self.target

    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "-"}[self.passed]


@dataclass
class Report:
    figures: list[Figure] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def add(self, *figures: Figure) -> None:
        for figure in figures:
            self.figures.append(figure)
            print(f"  {figure.scenario:<10} {figure.name:<52} {_fmt(figure.value)} {figure.unit}", flush=True)

    def table(self) -> str:
        rows = [("scenario", "figure", "value", "target", "result")]
        for f in self.figures:
            target = "" if f.target is None else f"{'>=' if f.kind == 'min' else '<='} {_fmt(f.target)} {f.unit}"
            rows.append((f.scenario, f.name, f"{_fmt(f.value)} {f.unit}", target, f.verdict()))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def failed(self) -> list[Figure]:
        """The figures that missed their target."""
        return [f for f in self.figures if f.passed is False]

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "machine": machine(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "seconds": round(time.time() - self.started, 1),
            # NaN (nothing measured) is not JSON: it is saved as null, with its FAIL.
            "figures": [
                {**asdict(f), "value": None if math.isnan(f.value) else f.value, "passed": f.passed}
                for f in self.figures
            ],
        }
        path.write_text(json.dumps(data, indent=2))


def machine() -> dict[str, object]:
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "",
        )
    memory = 0
    with contextlib.suppress(ValueError, OSError):
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(memory / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.is_available(),
    }


def _fmt(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.4g}"
