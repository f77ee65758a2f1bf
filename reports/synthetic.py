"""Synthetic results files in the harness's real format, for the report's tests and benchmark.

Real runs give a few hundred records and no probes yet; these give any number, every status, probes
(in the shape the probes work will write) and, on request, a hostile case whose id, title, tags,
variant names, rule and tolerance reason carry HTML and <script>. Records are made with
`conformance.results.Record`, so they have its keys; known records carry `explained_by` and the `rule`
that matched, failures either a variant no rule expected or, unexplained, the `closest` one.

    python -m reports.synthetic OUT.json [--records N] [--probes] [--hostile]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from conformance.results import FORMAT, Record, Status

ADAPTERS = {
    "tf-layers": "tf", "tf-keras": "tf", "tf-keras-unfused": "tf", "tf-nn": "tf", "tf-nn-fused": "tf",
    "keras": "keras", "keras-jax": "keras", "keras-torch": "keras", "torch": "torch",
    "torch-functional": "torch", "flax-linen": "jax", "flax-nnx": "jax", "onnxruntime": "onnx",
}
VERSIONS = {"tf": {"tensorflow": "2.21.0", "tf_keras": "2.21.0"}, "keras": {"keras": "3.15.1"},
            "torch": {"torch": "2.13.0+cpu"}, "jax": {"jax": "0.10.2", "flax": "0.12.8"},
            "onnx": {"onnx": "1.23.2", "onnxruntime": "1.32.0"}}
TAGS = ["training", "inference", "epsilon", "momentum", "channels-first", "channels-last", "float16",
        "bfloat16", "gradients", "affine", "multi-step", "large-mean"]
DTYPE_ULP = {"float32": 2.0 ** -23, "float64": 2.0 ** -52, "float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}
HOSTILE = '<script>document.documentElement.setAttribute("data-pwned","script")</script>'
HOSTILE_IMG = '<img src=x onerror="document.documentElement.setAttribute(\'data-pwned\',\'img\')">'


def metric(rng: random.Random, name: str, dtype: str, passed: bool, shape: list[int]) -> dict[str, Any]:
    """One `Metric.as_dict()`: the fields and JSON spellings of conformance/compare.py."""
    ulps = rng.lognormvariate(0.0, 1.2) if passed else 10 ** rng.uniform(2, 7)
    expected = rng.gauss(0.0, 1.5)
    abs_err = ulps * DTYPE_ULP[dtype] * max(abs(expected), 1.0)
    tol = {"float32": 1e-5, "float64": 1e-10, "float16": 4e-3, "bfloat16": 3e-2}[dtype] * 1.3
    return {"name": name, "passed": passed, "max_abs": abs_err, "max_rel": abs_err / max(abs(expected), 1e-3),
            "max_ulp": "inf" if not passed and rng.random() < 0.05 else ulps,
            "worst_index": [rng.randrange(n) for n in shape], "worst_expected": expected,
            "worst_got": expected + abs_err, "rtol": tol, "atol": tol,
            "derived": name.endswith("_unbiased") and rng.random() < 0.5, "note": "", "undetermined": 0}


def case_info(rng: random.Random, index: int) -> dict[str, Any]:
    dtype = rng.choice(["float32", "float32", "float64", "float16", "bfloat16"])
    return {"id": f"synthetic-{index:05d}", "title": f"Synthetic case {index}",
            "tags": rng.sample(TAGS, rng.randint(1, 3)), "dtype": dtype,
            "shapes": [[rng.randint(1, 8), rng.randint(1, 6), 4, 4]], "steps": rng.choice([1, 1, 3]),
            "params": {"axis": rng.choice([1, -1]), "momentum": rng.choice([0.9, 0.99, None]),
                       "epsilon": rng.choice([1e-5, 1e-3, 0.0]), "center": True, "scale": rng.random() < 0.9},
            "expect_error": False, "tolerance_override": None,
            "conditioning": round(10 ** rng.uniform(-1, 4), 3)}


VARIANTS = ["moving-variance-unbiased", "epsilon-outside-sqrt", "compute-input-dtype", "momentum-complement",
            "variance-sum-of-squares", "epsilon-1e-3", "stats-frozen", "compute-float32"]
# the variant each adapter's known-divergence rule names (its signature), and one no rule expects
KNOWN = {a: VARIANTS[i % len(VARIANTS)] for i, a in enumerate(ADAPTERS)}
UNEXPECTED = {a: VARIANTS[(i + 3) % len(VARIANTS)] for i, a in enumerate(ADAPTERS)}


def rule(adapter: str, check: str, variant: str) -> dict[str, Any]:
    """A known-divergence rule as the harness records the one that matched."""
    family = ADAPTERS.get(adapter, "torch")
    return {"adapters": [adapter], "when": {"dtype": ["float16", "bfloat16", "float32"]}, "checks": [check],
            "explained_by": variant, "reason": f"{adapter} computes with {variant}",
            "link": f"https://github.com/example/{family}/issues/{len(adapter) * 7}",
            "source": f"adapters/known/{family}.yaml:{3 + len(variant)}"}


def record(rng: random.Random, info: dict[str, Any], adapter: str, check: str) -> dict[str, Any]:
    """One record as the pytest plugin writes it (`CaseItem.runtest` + `Outcome.fill`)."""
    roll = rng.random()
    status = (Status.PASS if roll < 0.85 else Status.NOT_EXPRESSIBLE if roll < 0.91 else Status.KNOWN
              if roll < 0.95 else Status.FAIL if roll < 0.985 else Status.ERROR)
    shape = info["shapes"][0]
    names = (["output", "batch_mean", "batch_variance", "moving_mean", "moving_variance"]
             if check == "training" else ["input", "gamma", "beta"] if check == "gradients" else ["output"])
    out = Record(case=info["id"], file=f"/work/main/cases/synthetic/{info['id']}.yaml", line=2,
                 adapter=adapter, family=ADAPTERS.get(adapter, "torch"), check=check, status=status,
                 case_info={k: v for k, v in info.items() if k != "id"},
                 duration_s=round(rng.uniform(0.0005, 0.05), 6))
    if status is Status.NOT_EXPRESSIBLE:
        out.reason = f"{adapter} cannot state momentum=None"
        return out.to_json()
    out.conventions = conventions(adapter)["variants"]
    momentum = info["params"]["momentum"]
    out.translations = [f"momentum {momentum} -> momentum={_flip(momentum)} (1 - m)"]
    if status is Status.ERROR:
        out.reason = "RuntimeError: synthetic failure\n  in a framework frame"
        return out.to_json()
    bad = rng.randrange(len(names))
    out.metrics = [metric(rng, n, info["dtype"], status is Status.PASS or i != bad, shape)
                   for i, n in enumerate(names)]
    out.tolerance_rule = f"{info['dtype']} default x (1 + conditioning 0.3)"
    if status is Status.KNOWN:
        out.explained_by = [KNOWN.get(adapter, VARIANTS[0])]
        out.rule = rule(adapter, check, out.explained_by[0])
        out.reason = out.rule["reason"]
    elif status is Status.FAIL and rng.random() < 0.35:  # a variant explains it, but no rule expects that
        out.explained_by = [UNEXPECTED.get(adapter, VARIANTS[1])]
    elif status is Status.FAIL:
        out.closest = {"variant": rng.choice(VARIANTS), "badness": round(10 ** rng.uniform(0.2, 3), 3)}
    for m in out.metrics:  # an explained failure is as far off as its variant makes it
        size = variant_effect(out.explained_by[0], info) if out.explained_by and not m["passed"] else None
        if size is not None:
            m["max_rel"] = size * rng.uniform(0.8, 1.25)
    return out.to_json()


def variant_effect(variant: str, info: dict[str, Any]) -> float | None:
    """The relative error a variant's own arithmetic predicts for a case, so the report's plots of
    error against what drives it show the trend real runs show: 1/(n - 1) for a variance estimator
    over n values per channel, u * (mean/std)^2 for sum of squares (u the float32 unit roundoff)."""
    if variant.startswith("moving-variance"):
        shape = info["shapes"][0]
        n = 1
        for i, size in enumerate(shape):
            n *= 1 if i == info["params"]["axis"] % len(shape) else size
        return 1 / (n - 1) if n > 1 else None
    if variant == "variance-sum-of-squares":
        return 6e-8 * info.get("conditioning", 1.0) ** 2
    return None


def _flip(momentum: float | None) -> str:
    return "None" if momentum is None else f"{1 - momentum:.3g}"


def conventions(adapter: str) -> dict[str, Any]:
    """The environment's `conventions` of an adapter: the variants it declares, and notes."""
    unbiased = adapter.startswith("torch") or adapter in ("tf-nn-fused", "tf-keras")
    return {"variants": ["moving-variance-unbiased"] if unbiased else [],
            "notes": [f"synthetic convention note for {adapter}"]}


def names(adapter: str) -> dict[str, str]:
    """The environment's `names` of an adapter: its API's spelling of the canonical parameters."""
    if adapter.startswith("torch"):
        return {"momentum": "momentum (= 1 - m)", "epsilon": "eps", "axis": "dim 1 (no argument)",
                "center": "affine", "scale": "affine", "gamma": "weight", "beta": "bias",
                "moving_mean": "running_mean", "moving_variance": "running_var", "mode": ".train() / .eval()"}
    return {"momentum": "momentum", "epsilon": "epsilon", "axis": "axis", "center": "center",
            "scale": "scale", "gamma": "gamma", "beta": "beta", "moving_mean": "moving_mean",
            "moving_variance": "moving_variance", "mode": "training="}


def capabilities(adapter: str) -> dict[str, Any]:
    """The environment's `capabilities` of an adapter."""
    torch_like = adapter.startswith("torch")
    return {"dtypes": ["bfloat16", "float16", "float32", "float64"],
            "checks": ["gradients", "inference", "training"], "min_rank": 2,
            "max_rank": 5 if torch_like else None, "features": ["momentum-null"] if torch_like else [],
            "why": {"multi-axis": f"{adapter} normalizes over one channel axis"} if torch_like else {}}


def hostile_records(adapters: list[str]) -> list[dict[str, Any]]:
    """A case whose id, title, tags and tolerance reason are HTML and script: the report must show text."""
    info = {"id": f"xss-{HOSTILE}", "title": f"Title {HOSTILE_IMG} & \"quotes\" 'single'",
            "tags": [HOSTILE, "tag with space", "a'b\"c"], "dtype": "float32", "shapes": [[2, 3]], "steps": 1,
            "params": {"axis": 1, "momentum": 0.9, "epsilon": 1e-5, "center": True, "scale": True},
            "expect_error": False, "conditioning": 0.5,
            "tolerance_override": {"rtol": 1e-4, "atol": 1e-6, "reason": f"reason {HOSTILE}"}}
    out = []
    for i, adapter in enumerate(adapters):
        r = record(random.Random(0), info, adapter, "inference")
        r.update(status=str(Status.FAIL), reason=f"reason {HOSTILE_IMG}", translations=[HOSTILE],
                 tolerance_rule=f"case override: reason {HOSTILE}", conventions=[f"declared {HOSTILE}"],
                 metrics=[{**metric(random.Random(1), f"output{HOSTILE}", "float32", False, [2, 3]),
                           "note": HOSTILE_IMG}],
                 explained_by=[], closest={"variant": HOSTILE_IMG, "badness": 4.5}, rule=None)
        if i == 0:  # explained by a variant with a hostile name
            r.update(explained_by=[f"variant {HOSTILE}"], closest=None)
        if i == 1:  # known, by a hostile rule
            r.update(status=str(Status.KNOWN), explained_by=[f"variant {HOSTILE_IMG}"], closest=None,
                     rule={"adapters": [adapter], "when": {}, "checks": ["inference"],
                           "explained_by": HOSTILE, "reason": f"rule {HOSTILE}",
                           "link": "javascript:alert(1)", "source": HOSTILE_IMG})
        out.append(r)
    return out


def probes(adapters: list[str], hostile: bool = False) -> dict[str, dict[str, dict[str, Any]]]:
    """The `probes` key in the shape the semantic-probe work writes."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for adapter in adapters:
        torch_like = adapter.startswith("torch") or adapter == "onnxruntime"
        momentum = 0.9 if torch_like else 0.99
        estimator = "unbiased" if "moving-variance-unbiased" in conventions(adapter)["variants"] else "biased"
        entries = {
            "default_momentum": {"value": momentum,
                                 "detail": "one step from moving_mean=0 on a constant batch",
                                 "documented": momentum, "source": "https://example.org/docs/bn#momentum",
                                 "agrees": True},
            "default_epsilon": {"value": 1e-5 if torch_like else 1e-3, "detail": "output on a known batch",
                                "documented": 1e-5 if torch_like else 1e-3,
                                "source": f"adapters/{adapter}.py:12", "agrees": True},
            "moving_variance_estimator": {"value": estimator,
                                          "detail": "moving variance after one step vs n/(n-1)",
                                          "documented": "unbiased" if torch_like else "biased",
                                          "source": "https://example.org/docs/bn#variance",
                                          "agrees": estimator == ("unbiased" if torch_like else "biased")},
            "default_axis": {"value": 1 if torch_like else -1,
                             "detail": "which axis keeps its own statistics",
                             "documented": 1 if torch_like else -1, "source": "docs", "agrees": True},
            "default_mode": {"value": "training" if torch_like else "inference",
                                 "detail": "output of a fresh layer called without a mode", "agrees": None},
            "stats_update_without_extra_step": {"value": adapter != "tf-layers",
                                           "detail": "moving mean after one training call",
                                           "documented": True, "source": "https://example.org/update-ops",
                                           "agrees": adapter != "tf-layers"},
            "batch_of_one_training": {"value": "error" if torch_like else "beta", "detail": "training on N=1",
                                      "documented": None, "source": "", "agrees": None},
            "epsilon_relative_error": {"value": 0.002, "detail": "eps recovered from y = x / sqrt(1 + eps)",
                                       "documented": {"max": 0.01}, "source": "float32 rounding",
                                       "agrees": True},
        }
        if adapter != "onnxruntime":
            entries["axis_equal_rank"] = {"value": "error", "detail": "axis=4 on rank 4", "agrees": None}
        if hostile:
            entries[f"probe {HOSTILE}"] = {"value": HOSTILE, "detail": HOSTILE_IMG, "documented": HOSTILE,
                                           "source": "javascript:alert(1)", "agrees": False}
        out[adapter] = entries
    return out


def results(records: int = 1000, adapters: list[str] | None = None, seed: int = 0, with_probes: bool = True,
            hostile: bool = False, hostname: str = "synthetic", gradients_every: int = 5) -> dict[str, Any]:
    """A whole results file with about `records` records spread over cases x adapters x checks;
    every `gradients_every`-th case has a gradients check too (1: every case, the full 3 checks)."""
    rng = random.Random(seed)
    adapters = adapters or list(ADAPTERS)
    out: list[dict[str, Any]] = []
    index = 0
    while len(out) < records:
        info = case_info(rng, index)
        checks = ["training", "inference"] + (["gradients"] if index % gradients_every == 0 else [])
        for adapter in adapters:
            for check in checks:
                if len(out) < records:
                    out.append(record(rng, info, adapter, check))
        index += 1
    if hostile:
        out.extend(hostile_records(adapters))
    env_adapters = {a: {"family": ADAPTERS.get(a, "torch"), "versions": VERSIONS[ADAPTERS.get(a, "torch")],
                        "conventions": conventions(a), "capabilities": capabilities(a), "device": "cpu",
                        "names": names(a)}
                    for a in adapters}
    payload: dict[str, Any] = {
        "format": FORMAT,
        "environment": {"selection": ",".join(adapters), "adapters": env_adapters, "case_dirs": ["cases"],
                        "keras_backend": None, "python": "3.11.7", "os": "Linux-synthetic-x86_64",
                        "machine": "x86_64", "cpu_count": 2, "hostname": hostname, "argv": ["synthetic"],
                        "started": "2026-01-01T00:00:00+00:00", "finished": "2026-01-01T00:01:00+00:00"},
        "records": out,
    }
    if with_probes:
        payload["probes"] = probes(adapters, hostile)
    return payload


def write(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, allow_nan=False), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reports.synthetic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path)
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-probes", action="store_true")
    parser.add_argument("--hostile", action="store_true")
    args = parser.parse_args(argv)
    write(args.output, results(args.records, seed=args.seed, with_probes=not args.no_probes,
                               hostile=args.hostile))
    print(args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

