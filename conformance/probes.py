"""Semantic probes: what each API does with its own defaults, measured by running it.

Each probe is a function of one adapter returning (value, detail): the value as the issue fixes
its type, the detail saying how it was measured. They use two things only: the adapter's
`default_layer` (a layer built with nothing but what the API requires) and the adapter's ordinary
`train`/`infer` on small canonical problems. What the frameworks' documentation says is kept apart,
as data in adapters/semantics/<family>.yaml, and compared with these measurements by the pytest
plugin.

`python -m conformance.probes --framework IDS --out FILE` measures in this process (the environment the
adapters need is set first); `python -m conformance semantics` starts one such process per family.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

import adapters as registry
from adapters.base import Adapter, NotExpressible, Observed, Problem, requested_device
from conformance import ROOT, reference
from conformance.dtypes import round_to
from conformance.results import write_atomically

SEMANTICS_DIR = ROOT / "adapters" / "semantics"
SHAPE = (2, 3, 4, 5)  # every axis a different size, so the normalized axis can be told apart
Value = float | str | bool | None
ProbeFn = Callable[[Adapter], tuple[Value, str]]


def sample(shape: tuple[int, ...] = SHAPE, mean: float = 2.0, std: float = 1.5, seed: int = 0,
           dtype: str = "float32") -> np.ndarray:
    return round_to(np.random.default_rng(seed).normal(mean, std, shape), dtype)


def problem(batches: list[np.ndarray], axes: tuple[int, ...], *, momentum: float | None = 0.9,
            epsilon: float = 1e-3, dtype: str = "float32") -> Problem:
    """A canonical problem with identity gamma/beta and the usual initial state."""
    channel_shape = tuple(batches[0].shape[a] for a in axes) if all(
        -batches[0].ndim <= a < batches[0].ndim for a in axes) else (1,)
    return Problem(case_id="probe", dtype=dtype, batches=tuple(batches), axes=axes, momentum=momentum,
                   epsilon=epsilon, center=True, scale=True, gamma=np.ones(channel_shape),
                   beta=np.zeros(channel_shape), moving_mean=np.zeros(channel_shape),
                   moving_variance=np.ones(channel_shape))


def sig(value: float, digits: int = 3) -> float:
    return float(f"{value:.{digits}g}")


def normalized_axes(x: np.ndarray, y: np.ndarray) -> list[int]:
    """Axes a such that y has mean ~0 and variance ~1 over all other axes, for every index of a."""
    found = []
    for a in range(x.ndim):
        others = tuple(d for d in range(x.ndim) if d != a)
        mean, var = y.mean(axis=others), y.var(axis=others)
        if np.all(np.abs(mean) < 1e-3) and np.all(np.abs(var - 1) < 2e-2):
            found.append(a)
    return found


def classify_mode(x: np.ndarray, obs: Observed) -> str:
    """"training" when the output is batch-normalized, "inference" when it is x/sqrt(1+eps)
    (fresh state: moving mean 0, variance 1), "other" otherwise."""
    if normalized_axes(x, obs.output):
        return "training"
    ratio = x / obs.output
    if np.allclose(ratio, ratio.flat[0], rtol=1e-3) and 0.9 < ratio.flat[0] < 1.1:
        return "inference"
    return "other"


@functools.cache
def _default_axis(adapter: Adapter) -> int:
    x = sample()
    obs = adapter.default_layer(SHAPE).train_step(x)
    axes = normalized_axes(x, obs.output)
    if len(axes) != 1:
        raise RuntimeError(f"a default layer's training output is normalized over axes {axes}")
    return axes[0]


def _channel_stats(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, int]:
    mean, var, count = reference.moments(x, (axis,))
    return mean, var, count


# ---------------------------------------------------------------- the probes


def default_axis(adapter: Adapter) -> tuple[Value, str]:
    axis = _default_axis(adapter)
    return axis - len(SHAPE), (f"default layer for a {list(SHAPE)} input, one training step: the output "
                               f"is normalized per index of axis {axis} only")


def default_momentum(adapter: Adapter) -> tuple[Value, str]:
    axis = _default_axis(adapter)
    x = sample()
    obs = adapter.default_layer(SHAPE).train_step(x)
    batch_mean, _, _ = _channel_stats(x, axis)
    m = 1 - np.asarray(obs.moving_mean).reshape(-1) / batch_mean
    return sig(float(np.median(m)), 4), (
        f"one training step of a default layer from moving_mean 0 on N(2, 1.5) {list(SHAPE)}: "
        f"m = 1 - moving_mean / batch_mean per channel = {[sig(v, 6) for v in m]} (decay form)")


def default_epsilon(adapter: Adapter) -> tuple[Value, str]:
    x = sample()
    obs = adapter.default_layer(SHAPE).call(x, "inference")
    eps = np.median((x / obs.output) ** 2 - 1)
    return sig(float(eps), 2), (
        "inference of a fresh default layer (moving mean 0, variance 1, gamma 1, beta 0): "
        f"y = x / sqrt(1 + eps), so eps = median((x / y)^2 - 1) = {float(eps):.4g} "
        f"(in {obs.output_dtype}, about two significant digits)")


def moving_variance_estimator(adapter: Adapter) -> tuple[Value, str]:
    axis = _default_axis(adapter)
    x = sample()
    obs = adapter.default_layer(SHAPE).train_step(x)
    batch_mean, biased, n = _channel_stats(x, axis)
    m = 1 - np.asarray(obs.moving_mean).reshape(-1) / batch_mean
    implied = (np.asarray(obs.moving_variance).reshape(-1) - m) / (1 - m)  # from moving var 1
    unbiased = biased * n / (n - 1)
    to_biased = float(np.max(np.abs(implied / biased - 1)))
    to_unbiased = float(np.max(np.abs(implied / unbiased - 1)))
    value = "biased" if to_biased < to_unbiased else "unbiased"
    return value, (f"one default training step from moving variance 1, {n} values per channel: the "
                   f"implied batch variance is off the biased one by {to_biased:.2g} and the unbiased "
                   f"(x {n}/{n - 1}) one by {to_unbiased:.2g} (relative)")


def default_mode(adapter: Adapter) -> tuple[Value, str]:
    x = sample()
    try:
        obs = adapter.default_layer(SHAPE).call(x, None)
    except NotExpressible:
        raise
    except Exception as exc:
        return "error", f"calling a fresh default layer with no mode argument raised {_short(exc)}"
    mode = classify_mode(x, obs)
    return mode, f"a fresh default layer called with no mode argument normalized like {mode} mode"


def stats_update_without_extra_step(adapter: Adapter) -> tuple[Value, str]:
    x = sample()
    obs = adapter.default_layer(SHAPE).call(x, "training")
    moved = not (np.allclose(obs.moving_mean, 0) and np.allclose(obs.moving_variance, 1))
    return moved, (f"after one training-mode call and nothing else, moving mean "
                   f"{[sig(v) for v in np.ravel(obs.moving_mean)]} and variance "
                   f"{[sig(v) for v in np.ravel(obs.moving_variance)]} (fresh: 0 and 1)")


def trainable_false_forces_inference(adapter: Adapter) -> tuple[Value, str]:
    x = sample()
    obs = adapter.default_layer(SHAPE, trainable=False).call(x, "training")
    mode = classify_mode(x, obs)
    return mode == "inference", (f"a layer built with trainable=False and called in training mode "
                                 f"normalized like {mode} mode")


def batch_of_one_training(adapter: Adapter) -> tuple[Value, str]:
    x = sample((1, 3))
    try:
        run = adapter.train(problem([x], (1,), epsilon=1e-3))
    except NotExpressible:
        raise
    except Exception as exc:
        return "error", f"training on a [1, 3] batch raised {_short(exc)}"
    y = run.output
    if np.all(np.isnan(y)):
        return "nan", "training on a [1, 3] batch gave NaN"
    if np.allclose(y, 0.0, atol=1e-6):
        return "beta", f"training on a [1, 3] batch gave beta (0) for every element: {y.ravel().tolist()}"
    return f"other: {[sig(v) for v in y.ravel()]}", "training on a [1, 3] batch"


def _axis_probe(adapter: Adapter, axis: int) -> tuple[Value, str]:
    x = sample()
    try:
        adapter.infer(problem([x], (axis,)))
    except NotExpressible:
        raise
    except Exception as exc:
        return "error", f"axis {axis} on a 4-D input: raised {_short(exc)}"
    return "accepted", f"axis {axis} on a 4-D input ran without an error"


def axis_equal_rank(adapter: Adapter) -> tuple[Value, str]:
    return _axis_probe(adapter, 4)


def axis_minus_rank_minus_one(adapter: Adapter) -> tuple[Value, str]:
    return _axis_probe(adapter, -5)


def _stated_or_run(adapter: Adapter, p: Problem, check: str, ok: Callable[[Any], bool],
                   good: str, what: str) -> tuple[Value, str]:
    reason = adapter.why_not_expressible(p, check)  # type: ignore[arg-type]
    if reason:
        return "not expressible", reason
    try:
        result = adapter.train(p)
    except NotExpressible as exc:
        return "not expressible", str(exc)
    except Exception as exc:
        return "error", f"{what} raised {_short(exc)}"
    return (good, f"{what} ran and matched the reference") if ok(result) else (
        "incorrect", f"{what} ran but did not match the reference")


def multi_axis(adapter: Adapter) -> tuple[Value, str]:
    p = problem([sample()], (1, 2))
    expected = reference.train(p).output
    return _stated_or_run(adapter, p, "training", lambda r: np.allclose(r.output, expected, atol=1e-4),
                          "supported", "axis [1, 2] on a 4-D input")


def momentum_none(adapter: Adapter) -> tuple[Value, str]:
    p = problem([sample((8, 3), seed=1), sample((8, 3), seed=2, mean=-1)], (1,), momentum=None)
    expected = reference.train(p).moving_mean
    return _stated_or_run(adapter, p, "training",
                          lambda r: np.allclose(r.moving_mean, expected, atol=1e-4), "cumulative",
                          "momentum null over two steps")


def eps_zero_constant_channel(adapter: Adapter) -> tuple[Value, str]:
    x = sample((4, 2))
    x[:, 1] = 7.0
    try:  # the framework's own answer, even where the adapter calls the case not expressible
        y = adapter.train(problem([x], (1,), epsilon=0.0)).output
    except NotExpressible:
        raise
    except Exception as exc:
        return "error", f"eps 0, training, constant channel: raised {_short(exc)}"
    constant = y[:, 1]
    value = "nan" if np.any(np.isnan(constant)) else "finite"
    return value, f"eps 0, training, a constant channel (variance 0) gave {constant.tolist()}"


def large_mean_output_std_rel_error(adapter: Adapter) -> tuple[Value, str]:
    x = round_to(1e4 + 1e-2 * np.random.default_rng(3).normal(size=(64, 2)), "float32")
    p = problem([x], (1,), epsilon=1e-6)
    y = adapter.train(p).output
    ref = reference.train(p).output
    error = float(np.max(np.abs(y.std(axis=0) - ref.std(axis=0)) / ref.std(axis=0)))
    return sig(error, 3), ("float32 training on 1e4 + 1e-2 N(0,1), [64, 2], eps 1e-6: max over channels "
                           "of |std(y) - std(y_ref)| / std(y_ref), y_ref the float64 reference")


def float16_output_dtype(adapter: Adapter) -> tuple[Value, str]:
    obs = adapter.default_layer(SHAPE, dtype="float16").train_step(sample(dtype="float16"))
    return obs.output_dtype, "dtype of the output of a float16 layer's training step on float16 input"


def float16_moving_stats_dtype(adapter: Adapter) -> tuple[Value, str]:
    obs = adapter.default_layer(SHAPE, dtype="float16").train_step(sample(dtype="float16"))
    return obs.stats_dtype, "dtype of the moving statistics of a float16 layer after a training step"


def variance_algorithm(adapter: Adapter) -> tuple[Value, str]:
    x = round_to(1e4 + np.random.default_rng(4).normal(size=(64, 2)), "float32")
    p = problem([x], (1,), epsilon=1e-3)
    y = adapter.train(p).output
    _, true_var, _ = reference.moments(x, (1,))
    used = true_var / y.var(axis=0) - p.epsilon  # y = (x - mean) / sqrt(used + eps)
    error = float(np.max(np.abs(used / true_var - 1)))
    value = "two-pass" if error < 0.05 else "sum-of-squares"
    return value, (f"float32 training on 1e4 + N(0,1): the variance the output implies is off the true one "
                   f"by {error:.2g} (relative); E[x^2]-E[x]^2 in float32 is off by O(1), two-pass by ~1e-3")


FEATURE_SHAPE = (8, 3)  # the channel axis last, where every API with these arguments defaults to it


def _renorm_steps(adapter: Adapter, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """x (mean 2, std 3) and the output of the last of `steps` training steps of a layer built with
    renorm=True and nothing else (gamma 1, beta 0, renorm mean 0 and standard deviation 1)."""
    x = sample(FEATURE_SHAPE, mean=2.0, std=3.0, seed=5)
    layer = adapter.feature_layer(FEATURE_SHAPE, {"renorm": True})
    for _ in range(steps):
        obs = layer.train_step(x)
    return x, obs.output


def renorm_default_clipping(adapter: Adapter) -> tuple[Value, str]:
    x, y = _renorm_steps(adapter, 1)
    # y = r * xhat + d per channel, xhat of mean 0: d = mean(y), r = std(y) / std(xhat); unclipped
    # from renorm statistics 0 and 1 that is r = sigma_B (about 3 here) and d = mu_B, so y = x
    r = y.std(axis=0) / x.std(axis=0) * np.sqrt(x.var(axis=0) + 1e-3)  # std(xhat), eps taken as 1e-3
    d = y.mean(axis=0)
    unclipped = np.allclose(y, x, rtol=1e-3, atol=1e-3)
    return ("none" if unclipped else "clipped"), (
        f"one step of renorm=True with nothing else on N(2, 3) {list(FEATURE_SHAPE)}: r = "
        f"{[sig(v) for v in r]} (sigma_B {[sig(v) for v in x.std(axis=0)]}), d = {[sig(v) for v in d]} "
        f"(mu_B {[sig(v) for v in x.mean(axis=0)]}); unclipped from renorm statistics 0 and 1, y = x")


def renorm_default_momentum(adapter: Adapter) -> tuple[Value, str]:
    x, y = _renorm_steps(adapter, 2)
    # step 2, unclipped: y = (x - (1 - rho) mu_B) / s, s = rho * 1 + (1 - rho) * sigma_B
    s = x.std(axis=0) / y.std(axis=0)
    sigma = np.sqrt(x.var(axis=0) + 1e-3)
    rho = (s - sigma) / (1 - sigma)
    return sig(float(np.median(rho)), 4), (
        f"two steps of renorm=True with nothing else on the same N(2, 3) {list(FEATURE_SHAPE)} batch: the "
        f"second divides by s = rho + (1 - rho) sigma_B = {[sig(v, 5) for v in s]}, so rho = "
        f"{[sig(v, 5) for v in rho]} (eps taken as 1e-3)")


def ghost_grouping(adapter: Adapter) -> tuple[Value, str]:
    x = sample(FEATURE_SHAPE, mean=0.0, std=1.0, seed=6)
    x[4:] += 5.0  # rows 4..7 far from rows 0..3: every grouping has its own group means
    y = adapter.feature_layer(FEATURE_SHAPE, {"virtual_batch_size": 2}).train_step(x).output
    groupings = {"consecutive": reference.virtual_batches(8, 2), "interleaved":
                 reference.virtual_batches(8, 2, interleaved=True), "whole batch": [slice(None)]}
    worst = {name: max(float(np.abs(y[g].mean(axis=0)).max()) for g in groups)
             for name, groups in groupings.items()}
    # finest first: zero means in consecutive or interleaved pairs give a zero whole-batch mean too
    value = next((name for name, w in worst.items() if w < 1e-3), "other")
    return value, (f"virtual_batch_size=2 on a batch of 8, one training step: the output has mean 0 per "
                   f"channel within the groups of that grouping; largest |group mean| per grouping: "
                   f"{ {k: sig(v) for k, v in worst.items()} }")


def trainable_false_freezes_stats(adapter: Adapter) -> tuple[Value, str]:
    x = sample()
    obs = adapter.default_layer(SHAPE, trainable=False).train_step(x)
    frozen = bool(np.allclose(obs.moving_mean, 0) and np.allclose(obs.moving_variance, 1))
    return frozen, (f"a layer built with trainable=False after one training step done the API's way: "
                    f"moving mean {[sig(v) for v in np.ravel(obs.moving_mean)]} and variance "
                    f"{[sig(v) for v in np.ravel(obs.moving_variance)]} (fresh: 0 and 1)")


def mixed_float16_stats_dtype(adapter: Adapter) -> tuple[Value, str]:
    x = round_to(2e-3 + 1e-3 * np.random.default_rng(5).normal(size=(4, 2, 2, 2)), "float16")
    p = replace(problem([x], (1,), epsilon=1e-7, dtype="float16"), param_dtype="float32",
                moving_variance=np.array([2e-6, 5e-7]))
    reason = adapter.why_not_expressible(p, "training")
    if reason:
        raise NotExpressible(reason)
    got = np.asarray(adapter.train(p).moving_variance, np.float64).reshape(-1)
    ref = reference.train(p)
    error = min(float(np.max(np.abs(got / np.ravel(r) - 1)))
                for r in (ref.moving_variance, ref.moving_variance_unbiased))
    value = "float32" if error < 1e-4 else "float16"
    return value, (f"float16 input, param_dtype float32 as the API states it, one step on variances near "
                   f"1e-6 (float16 subnormals, ~4 significant bits): the moving variance is off the float64 "
                   f"reference by {error:.2g} (relative; float32 storage ~1e-7, float16 ~1e-2)")


def mixed_float16_gamma_gradient_precision(adapter: Adapter) -> tuple[Value, str]:
    x = sample((4, 2, 3, 3), mean=0.5, std=1.5, seed=6, dtype="float16")
    p = replace(problem([x], (1,), dtype="float16"), param_dtype="float32", upstream=x)
    reason = adapter.why_not_expressible(p, "gradients")
    if reason:
        raise NotExpressible(reason)
    got = np.ravel(adapter.gradients(p).gamma)
    ref = np.ravel(reference.gradients(p)["gamma"])  # dy = x: sum(x * xhat) = n * std, far from 0
    error = float(np.max(np.abs(got / ref - 1)))
    value = "float32" if error < 1e-4 else "float16"
    return value, (f"float16 input, param_dtype float32 as the API states it, dL/dy = x: dL/dgamma is off "
                   f"the float64 reference by {error:.2g} (relative; computed in float32 ~1e-7, from "
                   f"float16-rounded statistics ~5e-4)")


PROBES: dict[str, ProbeFn] = {
    fn.__name__: fn
    for fn in (default_momentum, default_epsilon, moving_variance_estimator, default_axis, default_mode,
               stats_update_without_extra_step, trainable_false_forces_inference, batch_of_one_training,
               axis_equal_rank, axis_minus_rank_minus_one, multi_axis, momentum_none,
               eps_zero_constant_channel, large_mean_output_std_rel_error, float16_output_dtype,
               float16_moving_stats_dtype, variance_algorithm, renorm_default_clipping,
               renorm_default_momentum, ghost_grouping, trainable_false_freezes_stats,
               mixed_float16_stats_dtype, mixed_float16_gamma_gradient_precision)
}


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:200]}"


def measure(adapter: Adapter, name: str) -> dict[str, Value]:
    """One probe: {"value", "detail"}; null with the reason where the probe does not apply."""
    try:
        value, detail = PROBES[name](adapter)
    except NotExpressible as exc:
        value, detail = None, f"does not apply: {exc}"
    except Exception as exc:
        value, detail = None, f"probe could not measure: {_short(exc)}"
    if isinstance(value, float) and not math.isfinite(value):
        value = str(value)
    return {"value": value, "detail": detail}


# ---------------------------------------------------------------- documented values


def documented() -> dict[str, dict[str, dict[str, Any]]]:
    """adapter -> probe -> {value | min | max, source[, rtol]} from adapters/semantics/*.yaml."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for path in sorted(SEMANTICS_DIR.glob("*.yaml")):
        for adapter_id, probes in (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).items():
            out.setdefault(adapter_id, {}).update(probes or {})
    return out


def on_device(doc: dict[str, Any], device: str) -> dict[str, Any]:
    """A probe's documented entry where the adapter ran: the entry under the device's name (`cuda:`,
    a whole entry with its own source) where the source says the device's kernel differs, else the
    entry itself (what the CPU kernels do)."""
    return doc.get(device, doc)


def agrees(measured: Value, doc: dict[str, Any]) -> bool:
    """Numbers within the documented rtol (default 2%: 0.9 and 0.99 must differ), or within
    `min`/`max` bounds; anything else equal."""
    if "max" in doc or "min" in doc:
        return (isinstance(measured, int | float) and not isinstance(measured, bool)
                and doc.get("min", -math.inf) <= measured <= doc.get("max", math.inf))
    expected = doc.get("value")
    if isinstance(expected, bool) or isinstance(measured, bool):
        return measured is expected
    if isinstance(expected, int | float) and isinstance(measured, int | float):
        return math.isclose(measured, expected, rel_tol=doc.get("rtol", 0.02), abs_tol=doc.get("atol", 0.0))
    return measured == expected


# ---------------------------------------------------------------- `python -m conformance semantics`


def semantics_main(framework: str | None, as_json: bool, jobs: int | None) -> int:
    """Measure every selected family in its own process (as `run` does) and print one table."""
    import tempfile

    from conformance.families import Group, groups_for, run_each, tail

    groups = groups_for(framework)
    with tempfile.TemporaryDirectory(prefix="bnconform-semantics-") as tmp:
        folder = Path(tmp)
        def command(g: Group) -> list[str]:
            return [sys.executable, "-m", "conformance.probes", f"--out={folder}/{g.name}.json",
                    f"--framework={','.join(g.adapter_ids)}"]

        run_each(groups, command, folder / "logs", jobs)
        merged: dict[str, dict] = {}
        problems = []
        for g in groups:
            try:
                merged.update(json.loads((folder / f"{g.name}.json").read_text(encoding="utf-8")))
            except (OSError, json.JSONDecodeError):
                why = g.problem or f"exit {g.returncode}"
                problems.append(f"{','.join(g.adapter_ids)}: {why}\n{tail(g.log, 10)}")
                failed = {"value": None, "detail": f"probe process failed ({why})"}
                merged.update({i: dict.fromkeys(PROBES, failed) for i in g.adapter_ids})
    for problem in problems:
        print(problem, file=sys.stderr)
    if as_json:
        json.dump(merged, sys.stdout, indent=1)
        print()
    else:
        print(table(merged))
    return 1 if problems else 0


def table(measured: dict[str, dict[str, dict[str, Value]]]) -> str:
    """Probes as rows, adapters as columns; a value that differs from the documented one gets a *."""
    docs = documented()
    ids = list(measured)
    width = {i: max(len(i), 16) for i in ids}

    def shown(adapter_id: str, name: str) -> str:
        entry = measured[adapter_id][name]
        value = entry["value"]
        text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        doc = docs.get(adapter_id, {}).get(name)
        doc = None if doc is None else on_device(doc, requested_device())
        mark = "" if doc is None or agrees(value, doc) else "*"
        return (text[: width[adapter_id] - 1] + mark)

    rows = [f"{'probe':<34}" + " ".join(f"{i:<{width[i]}}" for i in ids)]
    for name in PROBES:
        rows.append(f"{name:<34}" + " ".join(f"{shown(i, name):<{width[i]}}" for i in ids))
    rows.append("* measured value differs from the documented one (adapters/semantics/<family>.yaml)")
    return "\n".join(rows)


# ---------------------------------------------------------------- one process's measurements


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.probes")
    parser.add_argument("--framework", required=True)
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    ids = registry.resolve(args.framework)
    os.environ.update(registry.environment_for(ids))
    out: dict[str, dict[str, dict[str, Value]]] = {}
    for adapter_id in ids:
        try:
            adapter = registry.load(adapter_id)
        except Exception as exc:
            out[adapter_id] = {name: {"value": None, "detail": f"adapter could not be loaded: {_short(exc)}"}
                               for name in PROBES}
            continue
        out[adapter_id] = {name: measure(adapter, name) for name in PROBES}
    write_atomically(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
