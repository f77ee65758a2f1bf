"""How long `python -m reports` takes on N synthetic records in the real results format, and how
long the page takes to open in headless Chromium (JSON out).

    .venv/bin/python benchmarks/report_render.py [--records 10000 | --cases 1000] [--files 1]
        [--repeat 3] [--compare] [--browser]

Times the whole command as a user runs it (interpreter start, JSON parsing, rendering, writing), the
target being under 3 s for 10,000 records. The records come from `reports.synthetic`, whose format
tests/test_report.py holds to the harness's. `--cases N` makes N cases x every adapter x 3 checks
(1,000 cases: 39,000 records, the size of a 1,000-case run over all 13 adapters). `--compare` also
times `--compare OLD --against NEW` on two such runs. `--browser` opens the report in headless
Chromium (CHROMIUM, default /usr/bin/chromium) `--repeat` times, each with a fresh profile, and
reads the time the page's script ended, counted by the page itself from navigation start
(`performance.now()` in `data-ready-ms`): parsing the HTML and the embedded data, drawing the
first screen, the matrix's first page; the target is under 2 s for 1,000 cases. The process's
wall time (Chromium's own start and exit included) is given beside it, and that of an empty page.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reports import synthetic  # noqa: E402

LIMIT_S = 3.0  # per 10,000 records (more records: in proportion)
OPEN_LIMIT_S = 2.0
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def chromium_dom(url: str, profile: Path) -> tuple[str, float]:
    """The DOM headless Chromium serialises after loading `url` (fresh profile), and its wall time."""
    started = time.perf_counter()
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update",
                          f"--user-data-dir={profile}", "--window-size=1400,900", "--dump-dom", url],
                         capture_output=True, text=True, check=True).stdout
    return dom, round(time.perf_counter() - started, 3)


def browser_times(page: Path, repeat: int, folder: Path) -> tuple[list[float], list[float], list[float]]:
    """(seconds until the page's script ended, as the page counted them; Chromium's wall seconds;
    Chromium's wall seconds for an empty page, its own start and exit)."""
    opened, wall, blank = [], [], []
    for i in range(repeat):
        dom, seconds = chromium_dom(page.as_uri(), folder / f"profile-{i}")
        wall.append(seconds)
        found = re.search(r'data-ready-ms="([0-9]+)"', dom)
        if found is None:
            raise SystemExit("the page's script did not finish (no data-ready-ms in the DOM)")
        opened.append(int(found.group(1)) / 1000)
        blank.append(chromium_dom("about:blank", folder / f"profile-blank-{i}")[1])
    return opened, wall, blank


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
    parser.add_argument("--cases", type=int, default=None,
                        help="instead of --records: this many cases x every adapter x 3 checks")
    parser.add_argument("--browser", action="store_true", help="also time opening the page in Chromium")
    parser.add_argument("--files", type=int, default=1, help="split the records over this many results files")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--compare", action="store_true", help="also time a comparison of two such runs")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="report-bench-") as tmp:
        folder = Path(tmp)
        adapters = list(synthetic.ADAPTERS)
        every = 5
        if args.cases:
            args.records, every = args.cases * len(adapters) * 3, 1
        per_file = -(-args.records // args.files)
        files = []
        for i in range(args.files):
            part = adapters[i::args.files] if args.files <= len(adapters) else adapters
            payload = synthetic.results(per_file, part, seed=i, hostname=f"host-{i}", gradients_every=every)
            files.append(synthetic.write(folder / f"run-{i}.json", payload))
        records = sum(len(json.loads(f.read_text())["records"]) for f in files)
        out = folder / "report.html"
        seconds = timed([sys.executable, "-m", "reports", *map(str, files), "-o", str(out)], args.repeat)
        limit = LIMIT_S * max(1.0, records / 10_000)
        result = {
            "benchmark": "report_render", "records": records, "files": len(files),
            "input_bytes": sum(f.stat().st_size for f in files), "html_bytes": out.stat().st_size,
            "seconds": seconds, "median_s": statistics.median(seconds), "best_s": min(seconds),
            "limit_s": limit, "within_limit": statistics.median(seconds) < limit,
            "cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
            "python": sys.version.split()[0],
        }
        if args.browser:
            opened, wall, blank = browser_times(out, args.repeat, folder)
            median = statistics.median(opened)
            result.update(open_seconds=opened, open_median_s=median, open_limit_s=OPEN_LIMIT_S,
                          open_within_limit=median < OPEN_LIMIT_S, chromium_wall_seconds=wall,
                          chromium_blank_page_wall_seconds=blank)
        if args.compare:
            other = synthetic.write(folder / "other.json", synthetic.results(args.records, adapters, seed=99,
                                                                         gradients_every=every))
            diff = folder / "diff.html"
            compare = timed([sys.executable, "-m", "reports", "--compare", str(files[0]), "--against",
                             str(other), "-o", str(diff)], args.repeat)
            result["compare_seconds"] = compare
            result["compare_median_s"] = statistics.median(compare)
    print(json.dumps(result, indent=1))
    return 0 if result["within_limit"] and result.get("open_within_limit", True) else 1


if __name__ == "__main__":
    sys.exit(main())
