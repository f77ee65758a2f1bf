"""A process per family: the one runner behind `python -m conformance run` and `semantics`.

Frameworks fix process-wide state at import (Keras's backend, TF's legacy-Keras switch, JAX's x64),
so each family, and each extra Keras backend, gets a process of its own. A process that crashes,
hangs past its timeout or exits without its output is reported with the tail of its log; the
other groups' results are kept.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import adapters as registry
from conformance import ROOT

# started first, so the last process to start is a short one
LONG_FAMILIES = ("tf", "jax", "keras", "keras-jax", "torch-compile", "torch-export", "tf-export",
                 "keras-export")


@dataclass
class Group:
    """One process: a family, or one adapter that needs a process of its own."""

    name: str
    adapter_ids: list[str]
    log: Path = Path()
    returncode: int | None = None
    seconds: float = 0.0
    problem: str = ""  # crashed / timed out, with the log's tail shown by the caller
    counts: dict[str, int] = field(default_factory=dict)
    peak_rss_mb: float | None = None  # the process's own, from its results file
    cpu_s: float | None = None  # likewise
    costs: dict[str, float] = field(default_factory=dict)  # its frameworks' (adapters.base.PROCESS_COSTS)


def groups_for(selection: str | None) -> list[Group]:
    """Split a selection into processes: by family, with each own-process adapter alone."""
    try:
        ids = registry.resolve(selection or "all", own_process_too=True)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    groups: dict[str, Group] = {}
    for adapter_id in ids:
        key = adapter_id if adapter_id in registry.OWN_PROCESS else registry.ADAPTERS[adapter_id].family
        groups.setdefault(key, Group(key, [])).adapter_ids.append(adapter_id)
    return list(groups.values())


def run_each(groups: list[Group], command: Callable[[Group], list[str]], log_dir: Path,
             jobs: int | None = None, timeout: float = 1800,
             first: Callable[[Group], Any] | None = None) -> list[Group]:
    """Run `command(group)` for every group, `jobs` at a time, output to log_dir/<group>.log; the
    groups start in the order of `first` (a sort key), else LONG_FAMILIES first."""
    log_dir.mkdir(parents=True, exist_ok=True)

    def run_one(group: Group) -> Group:
        group.log = log_dir / f"{group.name}.log"
        started = time.perf_counter()
        with group.log.open("w", encoding="utf-8") as log:
            proc = subprocess.Popen(command(group), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                group.returncode = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                group.problem = f"timed out after {timeout:g} s"
        group.seconds = time.perf_counter() - started
        if not group.problem and group.returncode is not None and group.returncode < 0:
            group.problem = f"crashed ({signal.Signals(-group.returncode).name})"
        return group

    order = sorted(groups, key=first or (lambda g: g.name not in LONG_FAMILIES))
    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        list(pool.map(run_one, order))
    return groups


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
