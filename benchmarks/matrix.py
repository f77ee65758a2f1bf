"""Wall time and peak RSS of `python -m conformance run` per family, and of the full run (JSON out).

    .venv/bin/python benchmarks/matrix.py [--repeat 1] [--skip-full] [--cases DIR]

Each process group of `conformance.run.groups_for` (a family, or one extra Keras backend) runs
alone as the very pytest process `python -m conformance run` starts for it, one after another, so
no two disturb each other's timing; then one full `python -m conformance run --no-report` gives the total
wall time as users see it (families in parallel over the cores). Peak RSS is the largest resident
set of any process of the measured command: `getrusage(RUSAGE_CHILDREN).ru_maxrss` read in a
fresh wrapper process per command, since that figure only ever grows within one process.
Results go to a temporary folder, never to results/. With `--repeat N` the medians are printed.
JAX's persistent compilation cache (which the Flax adapters keep in results/.jax-cache) starts
empty for every measured command, as in a fresh clone; `--warm-jax-cache` gives every command one
cache that an untimed full run fills first, as a second `make test` finds it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from conformance.families import groups_for  # noqa: E402

RSS_LIMIT_MB = 2048
WALL_LIMIT_S = 120.0


def measure_here(command: list[str]) -> dict[str, float | int]:
    """Run `command` from this (fresh) process: wall seconds, exit code, and peak RSS in MB of the
    largest process in its tree (the kernel folds each waited-for descendant into RUSAGE_CHILDREN)."""
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - started
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # kilobytes on Linux
    lines = done.stdout.strip().splitlines()
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(peak_kb / 1024, 1), "exit_code": done.returncode,
            "summary": lines[-1] if lines else ""}


def measure(command: list[str], jax_cache: Path | None) -> dict[str, float | int]:
    """`measure_here` in a new wrapper process, so the peak RSS is this command's alone; with a
    JAX compilation cache of its own (empty unless given one)."""
    wrapper = [sys.executable, __file__, "--measure-json", json.dumps(command)]
    with tempfile.TemporaryDirectory(prefix="jax-cache-") as empty:
        # min compile time 0, as the Flax adapters set it for their own cache (JAX's default, 1 s,
        # would store none of this suite's compilations)
        env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(jax_cache or empty),
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
        out = subprocess.run(wrapper, cwd=ROOT, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out)


def run_command(results_dir: Path, cases: list[str]) -> list[str]:
    """The full run, as users type it (without the HTML report)."""
    command = [sys.executable, "-m", "conformance", "run", "--no-report", f"--results-dir={results_dir}"]
    return command + [f"--cases={c}" for c in cases]


def group_command(adapter_ids: list[str], results_dir: Path, cases: list[str]) -> list[str]:
    """The one pytest process `conformance.run.run_group` starts for a group. (`python -m conformance
    run --framework=keras` would start all three Keras backends: there `keras` names the family.)"""
    command = [sys.executable, "-m", "pytest", "conformance", f"--framework={','.join(adapter_ids)}",
               f"--results={results_dir / 'results.json'}", "-q", "-p", "no:cacheprovider"]
    return command + [f"--cases={c}" for c in cases]


def median_of(runs: list[dict[str, float | int]]) -> dict[str, float | int]:
    return {
        "wall_s": round(statistics.median(r["wall_s"] for r in runs), 2),
        "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in runs), 1),
        "exit_code": max(int(r["exit_code"]) for r in runs),
        "summary": runs[-1]["summary"],
        "runs_wall_s": [r["wall_s"] for r in runs],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=1, help="rounds (families alternate within one)")
    parser.add_argument("--skip-full", action="store_true", help="only the per-family runs")
    parser.add_argument("--cases", action="append", default=[], metavar="DIR")
    parser.add_argument("--warm-jax-cache", action="store_true",
                        help="one JAX compilation cache for all commands, filled by an untimed run first")
    parser.add_argument("--measure-json", help=argparse.SUPPRESS)  # internal: the wrapper process
    args = parser.parse_args(argv)
    if args.measure_json:
        print(json.dumps(measure_here(json.loads(args.measure_json))))
        return 0
    groups = {g.name: g.adapter_ids for g in groups_for(None)}
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {name: [] for name in [*groups, "full"]}
    with tempfile.TemporaryDirectory(prefix="matrix-bench-") as tmp:
        jax_cache = Path(tmp) / "jax-cache" if args.warm_jax_cache else None
        if jax_cache:
            measure(run_command(Path(tmp) / "warm-up", args.cases), jax_cache)
        for _ in range(args.repeat):
            for name in groups:
                command = group_command(groups[name], Path(tmp) / name, args.cases)
                runs[name].append(measure(command, jax_cache))
                print(f"{name}: {runs[name][-1]}", file=sys.stderr)
            if not args.skip_full:
                runs["full"].append(measure(run_command(Path(tmp) / "full", args.cases), jax_cache))
                print(f"full: {runs['full'][-1]}", file=sys.stderr)
    families = {name: median_of(runs[name]) for name in groups}
    out: dict = {
        "families": families,
        "sum_of_families_s": round(sum(f["wall_s"] for f in families.values()), 2),
        "jax_compilation_cache": "warm" if args.warm_jax_cache else "cold",
        "load_before": load_before,
        "cpu_count": os.cpu_count(),
        "targets": {"full_wall_s": WALL_LIMIT_S, "peak_rss_mb_per_family": RSS_LIMIT_MB},
    }
    if runs["full"]:
        out["full"] = median_of(runs["full"])
    out["load_after"] = os.getloadavg()[0]
    json.dump(out, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
