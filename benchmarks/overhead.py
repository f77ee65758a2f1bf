"""What the harness costs over calling the framework directly, per adapter (JSON out).

    .venv/bin/python benchmarks/overhead.py [--rounds 7] [--framework IDS] [--verify]

For each adapter, the same items (case x check) run two ways, in alternating rounds in one process
(harness, bare, harness, bare, ...), after one untimed warm-up of each:

- harness: what one `pytest conformance` run does for them, minus pytest: load and validate every
  case file (`conformance.loader.load_folders`), build a fresh adapter (one per run, as a pytest
  process has), then for each item `conformance.runner.evaluate` (translation, run, comparison)
  and the record dict the plugin stores, and finally the records serialized as the results file is.
- bare: `benchmarks/bare.py`, the framework API called as a user script would, on the same
  Problems (built beforehand: a user has arrays, not YAML), with `bare.reset()` starting each round.

Items: the training and inference checks of every case in cases/ that the adapter can express and
runs (`evaluate` gives pass or fail, so xfails are in; not-expressible ones and expect_error cases
are out). Gradients are left out on both sides: the bare side has no comparable plain-user code
for them (each adapter's backward pass differs in kind: tf.gradients in a graph, GradientTape,
jax.vjp, .backward), so timing them would compare different work. Imports happen before timing.

Process-wide caches (jitted JAX functions, ONNX Runtime sessions) persist across rounds on both
sides, as they do across the items of one run; per-run state (the adapter object, TF1 graphs and
sessions, loaded cases) is rebuilt each round on both sides.

Each process group (a family, or one extra Keras backend, as `python -m conformance run` splits
them) runs in its own process, one after another, with the environment the registry gives it set
before any import; the parent merges their JSON: `{"<adapter-id>": {"harness_s", "bare_s",
"ratio"}}` with medians over the rounds (ratio = harness_s / bare_s of the medians).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import adapters as registry  # noqa: E402  (imports no framework)

CASES = ROOT / "cases"
CHECKS = ("training", "inference")
RATIO_TARGET = 1.3


def harness_round(adapter_id: str, items: set[tuple[str, str]], case_dirs: list[Path]) -> float:
    """One run through the harness: load the cases, evaluate each item, build and serialize records."""
    from conformance.evaluate import Outcome, evaluate
    from conformance.loader import load_folders
    from conformance.plugin import case_summary
    from conformance.results import Record, json_safe

    started = time.perf_counter()
    loaded, _ = load_folders(case_dirs)
    adapter = registry.load(adapter_id)
    family = registry.ADAPTERS[adapter_id].family
    records = []
    for lc in loaded:
        for check in lc.case.checks:
            if (lc.case.id, check) not in items:
                continue
            record = Record(case=lc.case.id, file=str(lc.path), line=lc.line, adapter=adapter_id,
                            family=family, check=check, case_info=case_summary(lc))
            outcome = Outcome()
            item_started = time.perf_counter()
            try:
                evaluate(adapter, lc.case, check, outcome)  # type: ignore[arg-type]
            finally:
                outcome.fill(record)
                record.duration_s = round(time.perf_counter() - item_started, 6)
            records.append(record.to_json())
    json.dumps(json_safe(records), allow_nan=False, default=str)
    return time.perf_counter() - started


def bare_round(function: Any, problems: list[tuple[Any, str]]) -> float:
    """One run of the bare script over the same items."""
    from benchmarks import bare

    started = time.perf_counter()
    bare.reset()
    for problem, check in problems:
        function(problem, check)
    return time.perf_counter() - started


def select(adapter_id: str, case_dirs: list[Path]) -> tuple[set[tuple[str, str]], dict[str, int]]:
    """The items this adapter runs (evaluate says pass or fail), found by running them once."""
    from conformance.evaluate import evaluate
    from conformance.loader import load_folders

    loaded, _ = load_folders(case_dirs)
    adapter = registry.load(adapter_id)
    items, left_out = set(), {"expect_error": 0, "not-expressible": 0, "error": 0, "gradients": 0}
    for lc in loaded:
        for check in lc.case.checks:
            if check not in CHECKS:
                left_out["gradients"] += 1
            elif lc.case.expect_error:
                left_out["expect_error"] += 1
            else:
                try:
                    status = evaluate(adapter, lc.case, check).status  # type: ignore[arg-type]
                except Exception:
                    status = "error"
                if status in ("pass", "fail"):
                    items.add((lc.case.id, check))
                else:
                    left_out[status] += 1
    return items, left_out


def verify(adapter_id: str, problems: list[tuple[Any, str]]) -> list[str]:
    """Bare and adapter outputs side by side: the bare code must compute what the adapter does."""
    from benchmarks.bare import BARE

    adapter = registry.load(adapter_id)
    problems_found = []
    for problem, check in problems:
        got = adapter.train(problem) if check == "training" else adapter.infer(problem)
        want = got.output if check == "training" else got
        if check == "training" and problem.infer_after_training:
            want = got.inference_output
        bare_out = BARE[adapter_id](problem, check)
        bare_y = bare_out[0] if isinstance(bare_out, tuple) else bare_out
        import numpy as np

        bare_y = np.asarray(bare_y, np.float64).reshape(np.shape(want))
        if not np.allclose(bare_y, want, rtol=1e-3, atol=1e-3, equal_nan=True):
            problems_found.append(f"{problem.case_id}/{check}: max diff {np.nanmax(np.abs(bare_y - want))}")
    return problems_found


def child(ids: list[str], rounds: int, case_dirs: list[Path], check_outputs: bool) -> dict[str, Any]:
    """Measure the given adapters in this process (their environment is already set)."""
    from benchmarks.bare import BARE
    from conformance import problem as problems
    from conformance.loader import load_folders

    out: dict[str, Any] = {}
    for adapter_id in ids:
        if adapter_id not in BARE:  # the replica adapters: several devices, no one-call counterpart
            out[adapter_id] = {"left_out": "no bare counterpart in benchmarks/bare.py"}
            continue
        registry.load(adapter_id)  # the framework import, outside any timing
        items, left_out = select(adapter_id, case_dirs)
        loaded, _ = load_folders(case_dirs)
        work = [(problems.build(lc.case, check), check)  # type: ignore[arg-type]
                for lc in loaded for check in lc.case.checks if (lc.case.id, check) in items]
        function = BARE[adapter_id]
        harness_round(adapter_id, items, case_dirs)  # warm-up: lazy initialisation, JIT compiles
        bare_round(function, work)
        harness_s, bare_s = [], []
        for _ in range(rounds):
            harness_s.append(harness_round(adapter_id, items, case_dirs))
            bare_s.append(bare_round(function, work))
        h, b = statistics.median(harness_s), statistics.median(bare_s)
        out[adapter_id] = {"harness_s": round(h, 4), "bare_s": round(b, 4), "ratio": round(h / b, 3),
                           "items": len(work), "left_out": left_out,
                           "rounds_harness_s": [round(t, 4) for t in harness_s],
                           "rounds_bare_s": [round(t, 4) for t in bare_s]}
        if check_outputs:
            out[adapter_id]["verify"] = verify(adapter_id, work) or "bare outputs match the adapter's"
        print(f"{adapter_id}: {out[adapter_id]['harness_s']} s vs {out[adapter_id]['bare_s']} s",
              file=sys.stderr)
    return out


def process_groups(selection: str | None) -> list[list[str]]:
    from conformance.families import groups_for

    return [g.adapter_ids for g in groups_for(selection)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--framework", default=None, help="families or adapter ids (default: all)")
    parser.add_argument("--cases", action="append", type=Path, metavar="DIR")
    parser.add_argument("--verify", action="store_true", help="also check bare outputs against the adapter's")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: adapter ids for this process
    args = parser.parse_args(argv)
    case_dirs = [p.resolve() for p in args.cases or [CASES]]
    if args.child:
        ids = args.child.split(",")
        os.environ.update(registry.environment_for(ids))  # before any framework is imported
        json.dump(child(ids, args.rounds, case_dirs, args.verify), sys.stdout)
        return 0
    merged: dict[str, Any] = {}
    load_before = os.getloadavg()[0]
    for ids in process_groups(args.framework):  # one after another: no two disturb each other
        command = [sys.executable, __file__, f"--child={','.join(ids)}", f"--rounds={args.rounds}",
                   *(f"--cases={d}" for d in case_dirs), *(["--verify"] if args.verify else [])]
        done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        if done.returncode != 0:
            merged.update({i: {"error": f"exit code {done.returncode}"} for i in ids})
            continue
        merged.update(json.loads(done.stdout))
    json.dump(merged, sys.stdout, indent=1)
    print()
    over = [i for i, r in merged.items() if ("ratio" in r and r["ratio"] > RATIO_TARGET) or "error" in r]
    print(f"load average {load_before:.2f} -> {os.getloadavg()[0]:.2f}; ratio > {RATIO_TARGET}: "
          f"{', '.join(over) or 'none'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
