"""`python -m conformance run`: every family in its own pytest process, then one summary.

Frameworks fix process-wide state at import (Keras's backend, TF's legacy-Keras switch, JAX's x64),
so each family, and each extra Keras backend, gets a process of its own. A process that crashes,
hangs past its timeout or cannot import its framework is reported with the tail of its output;
the other families' results are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import adapters as registry

ROOT = Path(__file__).resolve().parent.parent
STATUSES = ("pass", "fail", "xfail", "not-expressible", "error")


@dataclass
class Group:
    """One pytest process: a family, or one Keras backend."""

    name: str
    adapter_ids: list[str]
    results: Path = Path()
    log: Path = Path()
    returncode: int | None = None
    seconds: float = 0.0
    problem: str = ""  # crashed / timed out / could not import, with the output's tail
    counts: dict[str, int] = field(default_factory=dict)


def groups_for(selection: str | None) -> list[Group]:
    """Split a selection into processes: by family, with each own-process adapter alone."""
    names = [n.strip() for n in (selection or ",".join(registry.FAMILIES)).split(",") if n.strip()]
    ids: list[str] = []
    for name in names:
        if name == "all":
            chosen = list(registry.ADAPTERS)
        elif name in registry.FAMILIES:
            chosen = registry.FAMILIES[name]
        elif name in registry.ADAPTERS:
            chosen = [name]
        else:
            valid = ", ".join(["all", *registry.FAMILIES, *registry.ADAPTERS])
            raise SystemExit(f"unknown framework {name!r}; valid names: {valid}")
        ids.extend(i for i in chosen if i not in ids)
    groups: dict[str, Group] = {}
    for adapter_id in ids:
        key = adapter_id if adapter_id in registry.OWN_PROCESS else registry.ADAPTERS[adapter_id].family
        groups.setdefault(key, Group(key, [])).adapter_ids.append(adapter_id)
    return list(groups.values())


def run_group(group: Group, args: argparse.Namespace) -> Group:
    group.results = args.results_dir / f"{group.name}.json"
    group.log = args.results_dir / "logs" / f"{group.name}.log"
    group.log.parent.mkdir(parents=True, exist_ok=True)
    group.results.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", "conformance", f"--framework={','.join(group.adapter_ids)}",
               f"--results={group.results}", "-q", "-p", "no:cacheprovider"]
    for folder in args.cases or []:
        command.append(f"--cases={folder}")
    started = time.perf_counter()
    with group.log.open("w", encoding="utf-8") as log:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            group.returncode = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            group.problem = f"timed out after {args.timeout:g} s"
    group.seconds = time.perf_counter() - started
    if not group.problem and group.returncode is not None and group.returncode < 0:
        group.problem = f"crashed ({signal.Signals(-group.returncode).name})"
    if group.results.exists():
        data = json.loads(group.results.read_text(encoding="utf-8"))
        for record in data["records"]:
            group.counts[record.get("status", "?")] = group.counts.get(record.get("status", "?"), 0) + 1
        unavailable = [f"{i}: {a['load_error']}" for i, a in data["environment"]["adapters"].items()
                       if "load_error" in a]
        if unavailable:
            group.problem = "could not import: " + "; ".join(unavailable)
    elif not group.problem:
        group.problem = f"no results (pytest exit code {group.returncode})"
    return group


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def summary(groups: list[Group], seconds: float) -> str:
    head = f"{'process':<13}{'adapters':<44}" + "".join(f"{s:>9}" for s in ("pass", "fail", "xfail",
                                                                         "not-expr", "error")) + "     time"
    lines = [head, "-" * len(head)]
    for g in groups:
        counts = "".join(f"{g.counts.get(s, 0):>9}" for s in STATUSES)
        lines.append(f"{g.name:<13}{','.join(g.adapter_ids)[:43]:<44}{counts}{g.seconds:>8.1f}s")
    lines.append(f"total wall time {seconds:.1f} s")
    for g in groups:
        if g.problem:
            lines.append(f"\n{g.name}: {g.problem}\n  log: {g.log}\n" +
                         "\n".join(f"  | {line}" for line in tail(g.log).splitlines()))
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    groups = groups_for(args.framework)
    args.results_dir = Path(args.results_dir).resolve()
    jobs = args.jobs or os.cpu_count() or 1
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        # the longest families first, so the last process to start is a short one
        order = sorted(groups, key=lambda g: g.name not in ("tf", "jax", "keras"))
        list(pool.map(lambda g: run_group(g, args), order))
    print(summary(groups, time.perf_counter() - started))
    failed = any(g.problem or g.returncode != 0 for g in groups)
    results = [g.results for g in groups if g.results.exists()]
    if results and not args.no_report:
        report = args.results_dir / "report.html"
        made = subprocess.run([sys.executable, "-m", "reports", *map(str, results), "-o", str(report)],
                              cwd=ROOT)
        if made.returncode == 0:
            print(f"report: {report}")
        else:
            failed = True
    total = {s: sum(g.counts.get(s, 0) for g in groups) for s in STATUSES}
    # the plain closing line CI reads: expected failures and not-expressible items count as skipped
    print(f"conformance: {total['pass']} passed, {total['fail'] + total['error']} failed, "
          f"{total['xfail'] + total['not-expressible']} skipped")
    return 1 if failed else 0
