"""`python -m bench all|ingest|search|cluster|health|startup|vectors|duplicates [--quick]`: figures against targets.

Exit status: 0 when every figure with a target meets it, 1 when one misses it (FAIL), 2 for bad usage.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench import clustering, data, duplicates, ingest, search
from bench import vectors as vector_indexes
from bench.models import full_blip, full_clip, tiny_blip, tiny_clip
from bench.report import Report
from ml.index import IndexLayout

RESULTS = Path(__file__).resolve().parent / "results"
SCENARIOS = ["ingest", "search", "cluster", "health", "startup", "vectors", "duplicates"]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("scenario", choices=["all", *SCENARIOS])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and models: checks the benchmarks run")
    parser.add_argument("--out", type=Path, help="JSON results file (default bench/results/<scenario>-<time>.json)")
    args = parser.parse_args()
    chosen = SCENARIOS if args.scenario == "all" else [args.scenario]
    quick = args.quick
    report = Report()
    clip = tiny_clip() if quick else full_clip()
    photo_size = (800, 600) if quick else data.PHOTO_SIZE
    files = data.dataset(photos=4, smalls=2, size=photo_size) if quick else data.dataset(photos=48, smalls=16)
    photos = [f for f in files if f[0].endswith(".jpg")]
    sizes = {"2k": 2_000} if quick else {"100k": 100_000, "1M": 1_000_000}
    samples = 20 if quick else 300
    print(f"machine: {report_machine()}", flush=True)
    if "ingest" in chosen:
        print("[ingest]", flush=True)
        ingest.run(report, clip=clip, files=files, naive_files=2 if quick else 16, quick=quick)
    if "cluster" in chosen:
        print("[cluster]", flush=True)
        vectors = data.clustered_vectors(2_000 if quick else 100_000)
        blip = tiny_blip() if quick else full_blip()
        clustering.run(report, vectors=vectors, blip=blip, photos=photos, k=20)
    if "duplicates" in chosen:
        print("[duplicates]", flush=True)
        duplicates.run(report, clip=clip, quick=quick)
    if "vectors" in chosen:
        print("[vectors]", flush=True)
        vector_indexes.run(report, sizes=sizes, samples=min(samples, 200))
    parts = {name for name in ("search", "health", "startup") if name in chosen}
    if parts:
        print(f"[{', '.join(sorted(parts))}]", flush=True)
        if parts == {"health"}:
            sizes = dict(list(sizes.items())[:1])
        elif parts == {"startup"}:
            sizes = dict(list(sizes.items())[-1:])
        # Quick runs switch to the approximate index at 1,000 vectors, so its path runs too.
        layout = IndexLayout(approximate_from=1_000) if quick else IndexLayout()
        search.run_search(report, clip=clip, layout=layout, sizes=sizes, photos=photos, samples=samples, parts=parts)
    print()
    print(report.table())
    out = args.out or RESULTS / f"{args.scenario}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    report.save(out)
    print(f"\nsaved {out}")
    failed = report.failed()
    if failed:
        print(f"\n{len(failed)} of {sum(f.passed is not None for f in report.figures)} targets missed:", flush=True)
        for figure in failed:
            print(f"  FAIL {figure.scenario} {figure.name}", flush=True)
        sys.exit(1)


def report_machine() -> str:
    from bench.report import machine

    m = machine()
    return f"{m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, torch {m['torch']} ({m['torch_threads']} threads)"


if __name__ == "__main__":
    main()
