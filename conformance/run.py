"""`python -m conformance run`: every family in its own pytest process, one summary, the report."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import adapters as registry
from conformance import ROOT, known
from conformance.families import Group, groups_for, run_each, tail
from conformance.results import SEVERITY, Status, read


def pytest_command(group: Group, args: argparse.Namespace) -> list[str]:
    command = [sys.executable, "-m", "pytest", "conformance", f"--framework={','.join(group.adapter_ids)}",
               f"--results={results_path(group, args)}", f"--progress={progress_path(group, args)}",
               f"--device={args.device}", "-q", "-p", "no:cacheprovider"]
    return command + [f"--cases={folder}" for folder in args.cases or []]


def results_path(group: Group, args: argparse.Namespace) -> Path:
    return args.results_dir / f"{group.name}.json"


def progress_path(group: Group, args: argparse.Namespace) -> Path:
    return args.results_dir / "logs" / f"{group.name}.progress.json"


def progress_line(groups: list[Group], args: argparse.Namespace) -> str:
    """One line: each started family's items done of total, and its failures so far."""
    parts = []
    for g in groups:
        try:
            p = json.loads(progress_path(g, args).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        failed = f", {p['failed']} failed" if p["failed"] else ""
        parts.append(f"{g.name} {p['done']}/{p['total'] or '?'}{failed}")
    return "progress: " + "; ".join(parts) if parts else ""


def watch(groups: list[Group], args: argparse.Namespace, stop: threading.Event, every: float) -> None:
    """Print the progress line whenever it changed, at most every `every` seconds."""
    last = ""
    while not stop.wait(every):
        line = progress_line(groups, args)
        if line and line != last:
            print(line, flush=True)
            last = line


def collect(group: Group, args: argparse.Namespace) -> None:
    """Counts from the group's results file; a missing file or adapter is the group's problem."""
    path = results_path(group, args)
    if not path.exists():
        group.problem = group.problem or f"no results (pytest exit code {group.returncode})"
        return
    results = read(path)
    group.counts = {str(s): n for s, n in results.counts().items()}
    group.peak_rss_mb = results.environment.get("peak_rss_mb")
    group.cpu_s = results.environment.get("cpu_s")
    group.costs = results.environment.get("costs", {})
    unavailable = [f"{i}: {a['load_error']}" for i, a in results.environment["adapters"].items()
                   if "load_error" in a]
    if unavailable:
        group.problem = "could not import: " + "; ".join(unavailable)


def summary(groups: list[Group], seconds: float) -> str:
    shown = list(reversed(SEVERITY))
    head = f"{'process':<19}{'adapters':<38}" + "".join(f"{s[:8]:>9}" for s in shown) + "     time"
    lines = [head, "-" * len(head)]
    for g in groups:
        counts = "".join(f"{g.counts.get(str(s), 0):>9}" for s in shown)
        lines.append(f"{g.name[:18]:<19}{','.join(g.adapter_ids)[:37]:<38}{counts}{g.seconds:>8.1f}s")
    lines.append(f"total wall time {seconds:.1f} s")
    for g in groups:
        if g.problem:
            lines.append(f"\n{g.name}: {g.problem}\n  log: {g.log}\n" +
                         "\n".join(f"  | {line}" for line in tail(g.log).splitlines()))
    return "\n".join(lines)


def write_run_summary(groups: list[Group], seconds: float, path: Path) -> None:
    """What the run cost, per process and in all, for benchmarks/scale.py and anyone comparing runs."""
    path.write_text(json.dumps({
        "wall_s": round(seconds, 2),
        "cpu_s": round(sum(g.cpu_s or 0.0 for g in groups), 2),
        "groups": {g.name: {"adapters": g.adapter_ids, "wall_s": round(g.seconds, 2), "counts": g.counts,
                            "items": sum(g.counts.values()), "peak_rss_mb": g.peak_rss_mb,
                            "cpu_s": g.cpu_s, "costs": g.costs,
                            "returncode": g.returncode, "problem": g.problem} for g in groups},
    }, indent=1), encoding="utf-8")


def stale_rules(results: list[Path]) -> list[known.Rule]:
    """Rules that no record of these results files was known by: stale data, once the run covered
    every family over the repository's own cases."""
    used, ran = set(), []
    for path in results:
        result = read(path)
        used |= {rule.get("source") for r in result.records if r.rule
                 for rule in (r.rule, *r.rule.get("with", []))}
        ran += [(adapter_id, env.get("device", "cpu"), env.get("versions", {}))
                for adapter_id, env in result.environment.get("adapters", {}).items()]
    # a rule for another device or release (when.device, when.versions) cannot be reached by this run
    reachable = [rule for rule in known.load().rules
                 if any(a in rule.adapters and rule.when.suits(device, versions)
                        for a, device, versions in ran)]
    return [rule for rule in reachable if rule.source not in used]


def main(args: argparse.Namespace) -> int:
    groups = groups_for(args.framework)
    args.results_dir = Path(args.results_dir).resolve()
    for group in groups:
        results_path(group, args).unlink(missing_ok=True)
        progress_path(group, args).unlink(missing_ok=True)
    started = time.perf_counter()
    stop = threading.Event()
    watcher = threading.Thread(target=watch, args=(groups, args, stop, args.progress_every), daemon=True)
    watcher.start()
    try:
        run_each(groups, lambda g: pytest_command(g, args), args.results_dir / "logs", args.jobs,
                 args.timeout)
    finally:
        stop.set()
        watcher.join()
    for group in groups:
        collect(group, args)
    seconds = time.perf_counter() - started
    print(summary(groups, seconds))
    write_run_summary(groups, seconds, args.results_dir / "run.json")
    failed = any(g.problem or g.returncode != 0 for g in groups)
    results = [results_path(g, args) for g in groups if results_path(g, args).exists()]
    if results and not args.no_report:
        report = args.results_dir / "report.html"
        made = subprocess.run([sys.executable, "-m", "reports", *map(str, results), "-o", str(report)],
                              cwd=ROOT)
        if made.returncode == 0:
            print(f"report: {report}")
        else:
            failed = True
    if not args.cases and {i for g in groups for i in g.adapter_ids} == set(registry.ADAPTERS):
        stale = stale_rules(results)
        for rule in stale:
            print(f"stale known-divergence rule {rule.source}: no check of this full run over cases/ "
                  f"is {rule.explained_by} on {', '.join(rule.adapters)}; remove or correct it")
        failed = failed or bool(stale)
    total = {s: sum(g.counts.get(str(s), 0) for g in groups) for s in Status}
    # the plain closing line CI reads: known failures and not-expressible items count as skipped
    print(f"conformance: {total[Status.PASS]} passed, {total[Status.FAIL] + total[Status.ERROR]} failed, "
          f"{total[Status.KNOWN] + total[Status.NOT_EXPRESSIBLE]} skipped")
    return 1 if failed else 0
