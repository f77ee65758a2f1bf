"""`python -m reports RESULTS... -o report.html`: one self-contained HTML file from results files."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from reports.model import load
from reports.render import render


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reports", description=__doc__)
    parser.add_argument("results", nargs="+", type=Path, help="results JSON files (any machines)")
    parser.add_argument("-o", "--output", type=Path, default=Path("results/report.html"))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    missing = [p for p in args.results if not p.exists()]
    if missing:
        print(f"no such results file: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    report = load(args.results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render(report), encoding="utf-8")
    records = sum(report.counts().values())
    print(f"{args.output}: {len(report.cases)} cases x {len(report.columns)} adapters, {records} records "
          f"({time.perf_counter() - started:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
