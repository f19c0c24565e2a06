"""`python -m bench all|ingest|search|cluster|health|startup [--quick]`: figures against targets."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench import data, ingest
from bench.models import full_clip, tiny_clip
from bench.report import Report

RESULTS = Path(__file__).resolve().parent / "results"
SCENARIOS = ["ingest"]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("scenario", choices=["all", *SCENARIOS])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the benchmarks themselves run")
    parser.add_argument("--out", type=Path, help="JSON results file (default bench/results/<scenario>-<time>.json)")
    args = parser.parse_args()
    chosen = SCENARIOS if args.scenario == "all" else [args.scenario]
    report = Report()
    clip = tiny_clip() if args.quick else full_clip()
    for name in chosen:
        print(f"[{name}]", flush=True)
        if name == "ingest":
            if args.quick:
                files = data.dataset(photos=4, smalls=2, size=(800, 600))
            else:
                files = data.dataset(photos=48, smalls=16)
            ingest.run(report, clip=clip, files=files, naive_files=16 if not args.quick else 2, quick=args.quick)
    print()
    print(report.table())
    out = args.out or RESULTS / f"{args.scenario}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    report.save(out)
    print(f"\nsaved {out}")


if __name__ == "__main__":
    main()
