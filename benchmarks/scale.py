"""The suite at scale, every figure from one run (JSON out): a generated corpus through the whole
matrix, and the harness's cost per item beside pytest's own floor and bare framework calls.

    .venv/bin/python benchmarks/scale.py [--count 1000] [--seed 0] [--framework all]
                                         [--ratio-for torch,onnxruntime] [--out FILE]

1. Corpus: `python -m conformance.generate --count N --seed S` (the fuzzer's generator), so the
   same seed gives the same cases on every machine.
2. Matrix: `python -m conformance run --cases CORPUS --no-report`, as users type it, twice: with an
   empty JAX compilation cache (cold, as in a fresh clone) and again with the cache that run filled
   (warm, as a second run finds it). Per process group: wall seconds, items, items per second and
   peak RSS (the process's own `ru_maxrss`, which its results file records), CPU seconds (on 2
   cores the matrix cannot take less wall time than half their sum) and, for JAX processes, XLA's
   compile and cache-load seconds (`costs`, from JAX's monitoring events), from the run's
   `run.json`.
3. Per item in pytest mode, for each adapter of `--ratio-for`, three processes one after another
   on the training and inference items of the corpus (gradients have no bare counterpart):
   - harness: `pytest conformance --framework=ID --cases CORPUS -k "ID-training or ID-inference"`,
     wall time (ID's own items, also where ID names a family too);
   - floor: pytest on the same number of trivial parametrized items, wall time (pytest's own cost:
     start-up, collection, reporting);
   - bare: benchmarks/bare.py's user-script calls on the same arrays, timed from the framework
     import to the last call, with the reuse its adapter is allowed (one jitted function per
     configuration, ONNX Runtime sessions, TF1 graphs per signature).
   ratio = harness / (floor + bare); the target is at most 2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import adapters as registry  # noqa: E402  (imports no framework)
from benchmarks.matrix import run_command  # noqa: E402  (the full run, as users type it)

TARGETS = {"full_cold_wall_s": 150.0, "full_warm_wall_s": 120.0, "ratio": 2.0, "peak_rss_mb": 2048.0}


def timed(command: list[str], env: dict[str, str] | None = None) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, **(env or {})})
    return time.perf_counter() - started, done


def matrix(corpus: Path, out_dir: Path, framework: str, jax_cache: Path) -> dict[str, Any]:
    """One full run; its own run.json gives the per-process figures."""
    env = {"JAX_COMPILATION_CACHE_DIR": str(jax_cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    wall, done = timed([*run_command(out_dir, [str(corpus)]), f"--framework={framework}"], env)
    summary = json.loads((out_dir / "run.json").read_text(encoding="utf-8"))
    groups = {name: {"wall_s": g["wall_s"], "items": g["items"],
                     "items_per_s": round(g["items"] / g["wall_s"], 1) if g["wall_s"] else None,
                     "peak_rss_mb": g["peak_rss_mb"], "cpu_s": g.get("cpu_s"), "costs": g.get("costs", {}),
                     "counts": g["counts"],
                     **({"problem": g["problem"]} if g["problem"] else {})}
              for name, g in summary["groups"].items()}
    closing = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    cpu = summary.get("cpu_s") or 0.0
    return {"wall_s": round(wall, 2), "exit_code": done.returncode, "closing_line": closing,
            # no schedule on these cores can take less wall time than this
            "cpu_s": cpu, "wall_floor_s": round(cpu / (os.cpu_count() or 1), 1),
            "xla_backend_s": round(sum(g["costs"].get("xla_backend_s", 0.0) for g in groups.values()), 1),
            "groups": groups}


FLOOR_TEST = """import pytest

@pytest.mark.parametrize("i", range({n}))
def test_item(i):
    assert i >= 0
"""


def floor(items: int, tmp: Path) -> float:
    """pytest's own cost for `items` trivial items, in a fresh process (no bnconform plugin)."""
    folder = tmp / "floor"
    folder.mkdir(exist_ok=True)
    (folder / "test_floor.py").write_text(FLOOR_TEST.format(n=items), encoding="utf-8")
    wall, done = timed([sys.executable, "-m", "pytest", str(folder / "test_floor.py"), "-q",
                        "-p", "no:cacheprovider", "-c", os.devnull, "--rootdir", str(folder)])
    if done.returncode != 0:
        raise SystemExit(f"the floor run failed:\n{done.stdout[-2000:]}")
    return wall


def bare_child(adapter_id: str, corpus: Path) -> dict[str, Any]:
    """In the adapter's own process: the Problems built untimed (a user has arrays, not YAML), then
    the framework import and every training/inference call, timed."""
    from benchmarks.bare import BARE
    from conformance import problem as problems
    from conformance.loader import load_folders

    loaded, _ = load_folders([corpus])
    work = []
    for lc in loaded:
        if lc.case.expect_error:
            continue
        for check in lc.case.checks:
            if check == "gradients":
                continue
            try:
                work.append((problems.build(lc.case, check), check))
            except Exception:  # a case the reference cannot build is not bare work
                continue
    function = BARE[adapter_id]
    started = time.perf_counter()
    registry.load(adapter_id)  # the framework import, as the harness process pays it
    done = skipped = 0
    for problem, check in work:
        try:
            function(problem, check)
            done += 1
        except Exception:  # what the API rejects: the harness reports it, bare moves on
            skipped += 1
    return {"bare_s": round(time.perf_counter() - started, 3), "calls": done, "rejected": skipped}


def ratio(adapter_id: str, corpus: Path, tmp: Path) -> dict[str, Any]:
    results = tmp / f"ratio-{adapter_id}.json"
    # the items the bare loop does the calls of: this adapter's training and inference checks (names
    # end "[ID-CHECK]"). `--framework=torch` names the torch family (torch, torch-functional,
    # torch-sync), and "not gradients" would also drop every case tagged `gradients`.
    only = f"{adapter_id}-training or {adapter_id}-inference"
    harness_s, done = timed([sys.executable, "-m", "pytest", "conformance", f"--framework={adapter_id}",
                             f"--cases={corpus}", "-k", only, f"--results={results}", "-q",
                             "-p", "no:cacheprovider"])
    if not results.exists():
        return {"error": f"pytest exit code {done.returncode}: {done.stdout[-500:]}"}
    items = len(json.loads(results.read_text(encoding="utf-8"))["records"])
    floor_s = floor(items, tmp)
    env = {**os.environ, **registry.environment_for([adapter_id])}
    child = subprocess.run([sys.executable, __file__, "--bare-child", adapter_id, "--corpus", str(corpus)],
                           cwd=ROOT, stdout=subprocess.PIPE, text=True, env=env, check=True)
    bare = json.loads(child.stdout)
    return {"items": items, "harness_s": round(harness_s, 2), "floor_s": round(floor_s, 2), **bare,
            "harness_per_item_ms": round(1000 * harness_s / items, 2),
            "floor_per_item_ms": round(1000 * floor_s / items, 2),
            "bare_per_call_ms": round(1000 * bare["bare_s"] / max(bare["calls"], 1), 2),
            "ratio": round(harness_s / (floor_s + bare["bare_s"]), 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--framework", default="all", help="families or adapter ids for the matrix")
    parser.add_argument("--ratio-for", default="torch,onnxruntime", help="adapter ids ('' for none)")
    parser.add_argument("--no-warm", action="store_true", help="only the cold matrix run")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--bare-child", help=argparse.SUPPRESS)  # internal: one adapter's bare loop
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bare_child:
        print(json.dumps(bare_child(args.bare_child, args.corpus)))
        return 0
    out: dict[str, Any] = {"count": args.count, "seed": args.seed, "cpu_count": os.cpu_count(),
                           "load_before": round(os.getloadavg()[0], 2), "targets": TARGETS}
    with tempfile.TemporaryDirectory(prefix="bnconform-scale-") as name:
        tmp = Path(name)
        corpus = tmp / "corpus"
        subprocess.run([sys.executable, "-m", "conformance.generate", "--count", str(args.count),
                        "--seed", str(args.seed), "--out", str(corpus)], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        jax_cache = tmp / "jax-cache"
        out["cold"] = matrix(corpus, tmp / "cold", args.framework, jax_cache)
        print(f"cold: {out['cold']['wall_s']} s", file=sys.stderr)
        if not args.no_warm:
            out["warm"] = matrix(corpus, tmp / "warm", args.framework, jax_cache)
            print(f"warm: {out['warm']['wall_s']} s", file=sys.stderr)
        out["per_item"] = {}
        for adapter_id in filter(None, args.ratio_for.split(",")):
            out["per_item"][adapter_id] = ratio(adapter_id, corpus, tmp)
            print(f"{adapter_id}: {out['per_item'][adapter_id]}", file=sys.stderr)
    out["load_after"] = round(os.getloadavg()[0], 2)
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
