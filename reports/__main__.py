"""One self-contained HTML file from results files, or a comparison of two runs.

    python -m reports RESULTS... -o report.html
    python -m reports --compare OLD... --against NEW... -o diff.html
    python -m reports --merge SHARD... -o merged.json   # a sharded run's files as one results file

Exit status 0 when the page was written from readable files, 1 when some results file could not be
read (the page is still written and lists it), 2 on usage errors.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

from reports.model import Report


def _write(path: Path, text: str) -> None:
    """Write beside the target and rename, so a browser never opens half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _unreadable(*reports: Report) -> list[str]:
    return [f"{s.path}: {s.error}" for r in reports for s in r.sources if s.error]


def merge_files(paths: list[Path], output: Path | None, parser: argparse.ArgumentParser) -> int:
    from conformance.results import merge, read, write_atomically

    if not paths or output is None:
        parser.error("--merge takes results files and -o MERGED.json")
    merged = merge([read(p) for p in paths])
    write_atomically(output, merged)
    print(f"{output}: {len(merged.records)} records from {len(paths)} files")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reports", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="*", type=Path, help="results JSON files (any machines)")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="HTML file to write (default results/report.html, or results/diff.html)")
    parser.add_argument("--compare", nargs="+", type=Path, metavar="OLD",
                        help="results files of the old run")
    parser.add_argument("--against", nargs="+", type=Path, metavar="NEW", help="results files of the new run")
    parser.add_argument("--ulp-factor", type=float, default=2.0,
                        help="comparison: an output's max ULP must move by this factor (default 2)")
    parser.add_argument("--ulp-floor", type=float, default=1.0,
                        help="comparison: ... and by more than this many ULPs (default 1)")
    parser.add_argument("--merge", action="store_true",
                        help="write the results files (shards of one run) as one results file to -o")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    if args.merge:
        return merge_files(args.results, args.output, parser)
    comparing = args.compare is not None or args.against is not None
    if comparing and (not args.compare or not args.against or args.results):
        parser.error("a comparison takes --compare OLD... --against NEW... and no other results files")
    if not comparing and not args.results:
        parser.error("give results files, or --compare OLD... --against NEW...")
    paths = [*(args.compare or []), *(args.against or [])] if comparing else args.results
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        print(f"no such results file: {', '.join(missing)}", file=sys.stderr)
        return 2

    started = time.perf_counter()
    # One short-lived process whose objects (tens of thousands of records) all live until it ends:
    # the cyclic collector would only rescan them, about a third of a 1,000-case report's time.
    gc.disable()
    if comparing:
        from reports.diff import diff_runs
        from reports.render import render_diff

        diff = diff_runs(args.compare, args.against, args.ulp_factor, args.ulp_floor)
        output = args.output or Path("results/diff.html")
        _write(output, render_diff(diff, args.title or "bnconform comparison"))
        problems = _unreadable(diff.old, diff.new)
        kinds = ", ".join(f"{n} {k}" for k, n in diff.kinds.items()) or "no changes"
        summary = (f"{len(diff.changes)} changed ({kinds}), {len(diff.explanations)} explained differently, "
                   f"{diff.unchanged} unchanged")
    else:
        from reports.model import load
        from reports.render import render

        report = load(args.results)
        output = args.output or Path("results/report.html")
        _write(output, render(report, args.title or "bnconform report"))
        problems = _unreadable(report)
        summary = (f"{len(report.cases)} cases x {len(report.columns)} adapters, "
                   f"{report.record_count} records")
    for problem in problems:
        print(f"could not read {problem}", file=sys.stderr)
    print(f"{output}: {summary} ({time.perf_counter() - started:.2f} s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
