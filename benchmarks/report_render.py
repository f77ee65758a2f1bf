"""How long `python -m reports` takes on N synthetic records in the real results format (JSON out).

    .venv/bin/python benchmarks/report_render.py [--records 10000] [--files 1] [--repeat 3] [--compare]

Times the whole command as a user runs it (interpreter start, JSON parsing, rendering, writing), the
target being under 3 s for 10,000 records. The records come from `reports.synthetic`, whose format
tests/test_report.py holds to the harness's. `--compare` also times `--compare OLD --against NEW`
on two such runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reports import synthetic  # noqa: E402

LIMIT_S = 3.0


def timed(command: list[str], repeat: int) -> list[float]:
    """Wall seconds of each run of `command` (a fresh interpreter each time, as a user has)."""
    out = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
        out.append(round(time.perf_counter() - started, 3))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--files", type=int, default=1, help="split the records over this many results files")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--compare", action="store_true", help="also time a comparison of two such runs")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="report-bench-") as tmp:
        folder = Path(tmp)
        adapters = list(synthetic.ADAPTERS)
        per_file = -(-args.records // args.files)
        files = []
        for i in range(args.files):
            part = adapters[i::args.files] if args.files <= len(adapters) else adapters
            payload = synthetic.results(per_file, part, seed=i, hostname=f"host-{i}")
            files.append(synthetic.write(folder / f"run-{i}.json", payload))
        records = sum(len(json.loads(f.read_text())["records"]) for f in files)
        out = folder / "report.html"
        seconds = timed([sys.executable, "-m", "reports", *map(str, files), "-o", str(out)], args.repeat)
        result = {
            "benchmark": "report_render", "records": records, "files": len(files),
            "input_bytes": sum(f.stat().st_size for f in files), "html_bytes": out.stat().st_size,
            "seconds": seconds, "median_s": statistics.median(seconds), "best_s": min(seconds),
            "limit_s": LIMIT_S, "within_limit": statistics.median(seconds) < LIMIT_S,
            "cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
            "python": sys.version.split()[0],
        }
        if args.compare:
            other = synthetic.write(folder / "other.json", synthetic.results(args.records, adapters, seed=99))
            diff = folder / "diff.html"
            compare = timed([sys.executable, "-m", "reports", "--compare", str(files[0]), "--against",
                             str(other), "-o", str(diff)], args.repeat)
            result["compare_seconds"] = compare
            result["compare_median_s"] = statistics.median(compare)
    print(json.dumps(result, indent=1))
    return 0 if result["within_limit"] else 1


if __name__ == "__main__":
    sys.exit(main())
