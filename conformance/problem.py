"""From a validated case to the `Problem` an adapter runs and the expected values it is held to."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, is_dataclass
from typing import Any

import numpy as np

from adapters.base import Adjustment, Check, Preceding, Problem, Renorm, Replicas
from conformance import reference, variants
from conformance.dtypes import round_to
from conformance.outputs import CHECKS, alternatives, outputs_of
from conformance.schema import Case, Params, Values
from conformance.validate import flat_numbers


def channel_shape(case: Case) -> tuple[int, ...]:
    shape = case.tensors[0].shape
    axes = case.params.axes
    return tuple(shape[a % len(shape)] for a in axes) if all(
        -len(shape) <= a < len(shape) for a in axes) else ()


def build(case: Case, check: Check) -> Problem:
    """The problem for one check: training feeds every step's batch, inference the last batch,
    gradients the batch of the last training step. Built once per case and check."""
    return case.memo(("problem", check), lambda: _frozen(_build(case, check)))


def _frozen(problem: Problem) -> Problem:
    """Make every array read-only: the problem is shared by the checks and the reference, so an
    adapter that wrote into its input (torch.from_numpy + an in-place update) would corrupt both."""
    for value in vars(problem).values():
        values = (vars(value).values() if is_dataclass(value)  # Preceding, Adjustment
                  else value if isinstance(value, tuple) else (value,))
        for array in values:
            if isinstance(array, np.ndarray):
                array.setflags(write=False)
    return problem


def _build(case: Case, check: Check) -> Problem:
    dtype = case.dtype
    tensors = [make_array(t, tuple(t.shape), dtype) for t in case.tensors]
    fed = tuple(tensors[i % len(tensors)] for i in range(case.steps))
    batches = {"every-step": fed, "last-fed": fed[-1:], "last-listed": (tensors[-1],)}[CHECKS[check].batches]
    channels = channel_shape(case)
    p = case.params
    upstream = None
    if check == "gradients":
        assert case.training is not None and case.training.gradients is not None
        upstream = make_array(case.training.gradients.upstream, batches[-1].shape, dtype)
    infer_after = check == "training" and "inference_output" in case.given("training")
    held = p.param_dtype or dtype  # gamma, beta and the moving statistics
    return Problem(
        case_id=case.id,
        dtype=dtype,
        batches=batches,
        axes=tuple(p.axes),
        momentum=p.momentum,
        epsilon=p.epsilon,
        center=p.center,
        scale=p.scale,
        gamma=per_channel(p.gamma, channels, 1.0, held),
        beta=per_channel(p.beta, channels, 0.0, held),
        moving_mean=per_channel(p.moving_mean, channels, 0.0, held),
        moving_variance=per_channel(p.moving_variance, channels, 1.0, held),
        upstream=upstream,
        infer_after_training=infer_after,
        **_features(p, channels, dtype),
        preceding=None if p.preceding is None else Preceding(
            weight=round_to(np.array(flat_numbers(p.preceding.weight, ())[0]).reshape(channels * 2), dtype),
            bias=per_channel(p.preceding.bias, channels, 0.0, dtype)),
        param_dtype=None if held == dtype else held,
        replicas=Replicas(p.replicas.count, p.replicas.synchronized) if p.replicas else None,
    )


def _features(p: Params, channels: tuple[int, ...], dtype: str) -> dict[str, Any]:
    """The optional feature fields (renorm, ghost batches, adjustment, running statistics)."""
    out: dict[str, Any] = {"virtual_batch_size": p.virtual_batch_size,
                           "track_running_stats": p.track_running_stats}
    if p.renorm is not None:
        r = p.renorm
        out["renorm"] = Renorm(momentum=r.momentum, rmax=r.rmax, rmin=r.rmin, dmax=r.dmax)
    if p.adjustment is not None:
        scale = per_channel(p.adjustment.scale, channels, 1.0, dtype)
        bias = per_channel(p.adjustment.bias, channels, 0.0, dtype)
        out["adjustment"] = Adjustment(scale=scale, bias=bias)
    return out


@dataclass
class Expected:
    """Expected arrays for one check under the conventions an adapter declares.

    An output the declared variants do not change is held to the case's value (or, where the case
    leaves it out, the reference's: "derived"). One they change is held to the case's field for
    that variant where the case gives one (`moving_variance_unbiased`), else to the variant's
    simulation, derived."""

    given: dict[str, np.ndarray]
    declared: tuple[str, ...]
    canonical: Callable[[], dict[str, np.ndarray]] = field(repr=False)  # computed only if asked
    under_declared: Callable[[], dict[str, np.ndarray]] = field(repr=False)
    alternatives: dict[str, dict[str, str]] = field(default_factory=dict)  # output -> variant -> field

    def asks_for(self, name: str) -> bool:
        """The case gives the output, or its field under some variant."""
        return name in self.given or any(f in self.given for f in self.alternatives.get(name, {}).values())

    def get(self, name: str) -> tuple[np.ndarray | None, bool, str]:
        """(array, derived?, the name it is shown under)."""
        if self.declared and self.changed(name):
            for variant in reversed(self.declared):
                alternative = self.alternatives.get(name, {}).get(variant)
                if alternative in self.given:
                    return self.given[alternative], False, alternative
            return self.under_declared().get(name), True, f"{name} ({', '.join(self.declared)})"
        if name in self.given:
            return self.given[name], False, name
        derived = self.canonical().get(name)
        return derived, derived is not None, name

    def changed(self, name: str) -> bool:
        a, b = self.canonical().get(name), self.under_declared().get(name)
        return a is not None and b is not None and not np.array_equal(a, b, equal_nan=True)


def expected(case: Case, check: Check, problem: Problem, declared: tuple[str, ...] = ()) -> Expected:
    """The case's expected values as arrays, converted once per case, check and declaration."""
    return case.memo(("expected", check, declared), lambda: _expected(case, check, problem, declared))


def _expected(case: Case, check: Check, problem: Problem, declared: tuple[str, ...]) -> Expected:
    like = {"input": problem.batches[-1].shape, "channels": problem.gamma.shape}
    given = case.given(check)
    arrays = {o.name: as_array(given[o.name], like[o.shape]) for o in outputs_of(check) if o.name in given}

    def canonical() -> dict[str, np.ndarray]:
        return {} if case.expect_error else case.memo(("reference", check),
                                                      lambda: reference.outputs(problem, check))

    def under_declared() -> dict[str, np.ndarray]:
        return case.memo(("declared", check, declared), lambda: variants.simulate_named(
            problem, check, declared))

    return Expected(arrays, declared, canonical, under_declared,
                    {o.name: alternatives(check, o.name) for o in outputs_of(check)})


def conditioning(case: Case, check: Check, problem: Problem) -> float:
    """`input_conditioning` of the check's batches, once per case and check."""
    return case.memo(("conditioning", check), lambda: input_conditioning(problem))


def folded_magnitude(case: Case, check: Check, problem: Problem) -> np.ndarray | None:
    """`folded_magnitudes` of the check's problem, once per case and check; None without a
    preceding layer."""
    if problem.preceding is None or check == "gradients":
        return None
    return case.memo(("folded-magnitude", check), lambda: folded_magnitudes(problem, check))


def folded_magnitudes(problem: Problem, check: Check) -> np.ndarray:
    """Per channel i, the size of the terms a folded output of channel i sums, in units of the
    output (compare.folded_tolerance says why the tolerance scales with it):

        T_i = |gamma_i| * (max_i(|W|·|x|) + max(|b_i|, |b_i - mean_i|)) / sqrt(var_i + eps)

    the max over channel i's elements of the batches the check feeds, the largest over every
    (mean, var) channel i is normalized with. Inference: the moving statistics (the batch's without
    them). Training: each batch's statistics (output), the reference's moving statistics after
    training (inference_output), and those it starts from, which an export that never updates them
    or normalizes with them in training uses (the variants `stats-frozen` and
    `training-uses-moving-stats`, judged at this tolerance). A channel whose var + eps is 0 counts
    0 (its output is undefined, NaN, anyway)."""
    preceding, bn = problem.preceding, reference.bn_input(problem)
    assert preceding is not None
    axis = problem.channel_axes[0]
    size = Preceding(np.abs(preceding.weight), np.zeros_like(preceding.bias))  # |W|·|x|
    largest = np.zeros(problem.gamma.shape)
    stats = []
    for raw, z in zip(problem.batches, bn.batches, strict=True):
        if not raw.size:
            continue
        terms = np.moveaxis(size.apply(np.abs(raw), axis), axis, -1)
        largest = np.maximum(largest, terms.reshape(-1, terms.shape[-1]).max(axis=0))
        if check == "training" or not problem.track_running_stats:
            for g in reference.normalized_together(z.shape[0], problem.virtual_batch_size):
                stats.append(reference.moments(z[g], problem.channel_axes)[:2])
    if problem.track_running_stats:
        stats.append((problem.moving_mean, problem.moving_variance))
        if check == "training":
            after = reference.train(problem)  # either estimator's moving variance
            stats += [(after.moving_mean, after.moving_variance),
                      (after.moving_mean, after.moving_variance_unbiased)]
    worst = np.zeros(problem.gamma.shape)
    for mean, var in stats:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            bias = np.maximum(np.abs(preceding.bias), np.abs(preceding.bias - mean))
            t = np.abs(problem.gamma) * (largest + bias) / np.sqrt(var + problem.epsilon)
        worst = np.maximum(worst, np.where(np.isfinite(t), t, 0.0))
    return worst


def gradient_scales(problem: Problem) -> dict[str, float]:
    """The size of the terms each gradient sums, for its absolute tolerance. A floating-point sum
    is off by about u * sum|a_i| (Higham, "Accuracy and Stability of Numerical Algorithms", 4.2),
    however small the sum itself: dL/dx = gamma/s * (dy - mean(dy) - xhat * mean(dy * xhat))
    cancels to 0 with two values per channel, leaving rounding of size u * |gamma|/s * |dy|.
    So the default atol is scaled by max |gamma|/s * max |dy| for dL/dx, by max over channels
    of sum |dy * xhat| for dL/dgamma and of sum |dy| for dL/dbeta (never below 1)."""
    preceding, problem = problem.preceding, reference.bn_input(problem)
    x, dy = problem.batches[-1], problem.upstream
    if dy is None or x.size == 0:
        return {}
    axes = problem.channel_axes
    red = reference.reduce_axes(x.ndim, axes)
    inv_max, dgamma_terms = 0.0, 0.0
    v = problem.virtual_batch_size  # ghost batches: xhat of each virtual batch, either grouping
    for groups in ([slice(None)],) if v is None else (reference.virtual_batches(x.shape[0], v),
                                                      reference.virtual_batches(x.shape[0], v, True)):
        xhat = np.empty_like(x)
        for g in groups:
            mean, var, _ = reference.moments(x[g], axes)
            with np.errstate(divide="ignore", invalid="ignore"):
                inv = np.abs(problem.gamma) / np.sqrt(var + problem.epsilon)
                xhat[g] = (x[g] - reference.broadcastable(mean, x.ndim, axes)) * reference.broadcastable(
                    1 / np.sqrt(var + problem.epsilon), x.ndim, axes)
            inv_max = max(inv_max, float(np.nanmax(inv)))
        dgamma_terms = max(dgamma_terms, float(np.nanmax(np.abs(dy * xhat).sum(axis=red))))
    through = 1.0 if preceding is None else float(np.abs(preceding.weight).sum(axis=0).max())  # Wᵀ dz
    scales = {"input": inv_max * float(np.abs(dy).max()) * through, "gamma": dgamma_terms,
              "beta": float(np.abs(dy).sum(axis=red).max())}
    return {k: max(1.0, v) for k, v in scales.items() if np.isfinite(v)}


def moving_conditioning(problem: Problem) -> float:
    """max over channels of |moving mean| / sqrt(moving variance + eps) after training (either
    estimator's variance): what inference after training cancels. The moving mean is computed, so a
    framework holds it to about u |moving mean| in the dtype it keeps it in (a float16 layer's
    float16), and inference after training divides that by sqrt(moving variance + eps): the
    argument of `input_conditioning` for the batch mean. A constant float16 channel of 100.0625
    with eps 0 and momentum 0.04 leaves 100.0561 over sqrt(6.4e-5): float16 holds 100.0625, and
    0.8 becomes 0 (Keras, ONNX Runtime, nnx, TFLite; cases/numerics/
    float16-inference-after-training-moving-mean-rounds). 0 without moving statistics; a
    channel with moving variance + eps = 0 is left out, as there."""
    if not problem.track_running_stats:
        return 0.0
    after = reference.train(problem)
    worst = 0.0
    for var in (after.moving_variance, after.moving_variance_unbiased):
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.abs(after.moving_mean) / np.sqrt(var + problem.epsilon)
        finite = ratio[np.isfinite(ratio)]
        worst = max(worst, float(finite.max()) if finite.size else 0.0)
    return worst


def input_conditioning(problem: Problem) -> float:
    """max over channels of |mean| / sqrt(var + eps) of the batches fed: how many digits
    subtracting the mean cancels, relative to what the output is divided by. An element rounded to
    one ulp of its own magnitude (and a mean rounded likewise) leaves (x - mean) off by about
    u |mean|, which the normalization scales by 1 / sqrt(var + eps): for a constant channel that is
    1 / sqrt(eps), not 0 (a float32 mean of equal values need not equal them). A channel with
    var + eps = 0 (eps 0, constant) is left out: its output is undefined (NaN) anyway.

    With a preceding layer the statistics are those of its output z = W·x + b, and z itself, held
    in the case dtype, is off by about u·(|W|·|x| + |b|) per element (every product rounds, however
    much their sum cancels): that magnitude over sqrt(var + eps) counts like |mean| does. It is also
    what bounds a folded layer's output error, W'·x + b' with W' = s·W (s = gamma/sqrt(var + eps)):
    u·s·(|W|·|x| + |b - mean|), i.e. c ulps of gamma, per channel at most."""
    worst = 0.0
    bn = reference.bn_input(problem)
    for raw, x in zip(problem.batches, bn.batches, strict=True):
        for g in reference.normalized_together(x.shape[0], problem.virtual_batch_size):  # ghost batches
            mean, var, _ = reference.moments(x[g], problem.channel_axes)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.abs(mean) / np.sqrt(var + problem.epsilon)
                if problem.preceding is not None and x[g].size:
                    axis = problem.channel_axes[0]
                    size = Preceding(np.abs(problem.preceding.weight), np.abs(problem.preceding.bias))
                    largest = np.moveaxis(size.apply(np.abs(raw[g]), axis), axis, -1).reshape(
                        -1, x.shape[axis])
                    ratio = np.maximum(ratio, largest.max(axis=0) / np.sqrt(var + problem.epsilon))
            finite = ratio[np.isfinite(ratio)]
            worst = max(worst, float(finite.max()) if finite.size else 0.0)
    return worst


# ---------------------------------------------------------------- arrays from the case


def make_array(values: Values, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """float64 array of the given shape holding values representable in `dtype`."""
    if values.values is not None:
        raw = floats(values.values, shape)
    else:
        spec = values.random
        assert spec is not None
        rng = np.random.default_rng(spec.seed)
        if spec.distribution == "normal":
            raw = rng.normal(spec.mean, spec.std, size=shape)
        else:
            raw = rng.uniform(spec.low, spec.high, size=shape)
    return round_to(raw, dtype)


def per_channel(values: list[Any] | None, channel_shape: tuple[int, ...], default: float,
                dtype: str) -> np.ndarray:
    if values is None:
        return np.full(channel_shape, default, dtype=np.float64)
    return round_to(floats(values, channel_shape), dtype)


def as_array(values: list[Any], shape: tuple[int, ...]) -> np.ndarray:
    """An expected field as a float64 array (no rounding: expected values are float64)."""
    return floats(values, shape)


def floats(values: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Validated numbers, nested as the shape or not, as a float64 array of `shape` (C order).
    NumPy reads a regular nesting in C; a ragged one ([[], []] for a [2, 0, 3] tensor) is
    flattened element by element."""
    try:
        array = np.array(values, dtype=np.float64)
    except ValueError:  # ragged
        array = np.array(flat_numbers(values, ())[0], dtype=np.float64)
    return array.reshape(shape)
