"""From a validated case to the `Problem` an adapter runs and the expected values it is held to."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, is_dataclass, replace
from typing import Any

import numpy as np

from adapters.base import Adjustment, Check, Preceding, Problem, Renorm, Replicas
from conformance import reference, variants
from conformance.compare import DEFAULT_TOLERANCE, Undetermined
from conformance.dtypes import eps as unit_roundoff_eps
from conformance.dtypes import finfo, round_to
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
            for g in reference.normalized_together(z.shape[0], problem):
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


def stored_resolution(problem: Problem) -> float:
    """Delta: the absolute error rounding into the dtype the moving statistics are stored in (a
    float16 layer's float16; `param_dtype` under mixed precision) can leave in them after training,
    beyond the relative u·|value| every rounding leaves. Round to nearest puts a value below the
    smallest normal within half the smallest subnormal s of it (IEEE 754: the subnormal spacing is
    s), and an update stores at most three such roundings per step (the batch statistic cast to the
    dtype, its product with 1 - m, the sum; Keras computes in float32 and rounds once on assign,
    tf.nn's assign_moving_average in the variable's dtype), each carried on with a weight m <= 1:
    Delta = 3·steps·s/2. float16: 8.9e-8 per step; float32 2.1e-45; float64 7.4e-324. A framework
    that flushes subnormals to zero is off by up to the smallest normal instead: that is the
    `denormals-flushed` variant, judged by rules, not this tolerance."""
    dtype = problem.param_dtype or problem.dtype
    return 3.0 * len(problem.batches) * float(finfo(dtype).smallest_subnormal) / 2.0


def stored_variance(problem: Problem) -> tuple[np.ndarray, np.ndarray]:
    """Per channel, what the moving variance's storage resolution (`stored_resolution`, Delta)
    does to inference after training, y - beta = gamma (x - mean) / sqrt(v + eps):
    (undetermined, rho). A stored v' within Delta of v scales y - beta by sqrt((v + eps) /
    (v' + eps)), at worst 1 + rho with rho = sqrt((v + eps) / (v + eps - Delta)) - 1. Where
    0 < v + eps <= Delta the stored variance may be 0 (with eps 0: (x - mean)/0 = ±inf, NaN where
    x = mean) or anything up to 2 Delta: the output is undetermined. (v + eps = 0 is the exact 0 of
    a zero batch variance and momentum or moving variance, which a framework stores as well.) rho
    counts only where Delta exceeds the u·(v + eps) the dtype's default tolerance already covers;
    elsewhere 0. Measured:
    Keras 3 on jax, a float16 layer, eps 0, momentum 5e-324, std 1e-3: moving variances 1.66e-8
    and 3.18e-8 stored as 0 and 5.96e-8 (the float16 subnormal), inference after training inf and
    0.73 where the reference gives 1 (cases/numerics/float16-inference-after-training-moving-
    variance-below-subnormal). Either estimator's moving variance: the smaller.

    The update's own rounding (`update_rounding`, E) counts the same way, added to Delta per
    channel, where it exceeds what the output's default tolerance covers (E > default(dtype)·(v +
    eps)) and v + eps is a normal number (a subnormal one is flush-to-zero's domain,
    `denormals-flushed`, judged by rules): a momentum below u leaves v = m·v_prev, far below the
    error of v_prev - (v_prev - b)(1 - m)."""
    none = np.zeros(problem.gamma.shape, bool)
    if not problem.track_running_stats or not problem.infer_after_training:
        return none, np.zeros(problem.gamma.shape)
    stored = stored_resolution(problem)
    dtype = problem.param_dtype or problem.dtype
    u = unit_roundoff_eps(dtype) / 2.0
    v = smallest_moving_variance(problem) + problem.epsilon
    rounding = update_rounding(problem)
    with np.errstate(invalid="ignore", divide="ignore"):  # past the output's default tolerance of
        # v + eps, where v + eps is a normal number (below, flush-to-zero's: the denormals-flushed rules)
        counted = (rounding > DEFAULT_TOLERANCE[problem.dtype] * v) & (v >= float(finfo(dtype).tiny))
        extra = np.where(counted, rounding, 0.0)
        delta = stored + extra
        lost = (v > 0) & (v <= delta)  # v + eps = 0: the exact 0 a framework stores as well
        rho = np.where((v > delta) & ((v * u < stored) | (extra > 0)), np.sqrt(v / (v - delta)) - 1.0, 0.0)
    return lost, np.where(np.isfinite(rho), rho, 0.0)


def update_rounding(problem: Problem) -> np.ndarray:
    """Per channel, how far rounding can leave the stored moving variance from the reference's,
    however the update of a (the moving variance) with b (the batch's, either estimator) is
    evaluated in the storage dtype (unit roundoff u): as m·a + (1 - m)·b, off by u·(m·a + 2(1 -
    m)·|b| + |new|) <= 2u·(|new| + (1 - m)·|b|) (a, b >= 0), or as tf_keras's a - (a - b)·(1 - m)
    (tf_keras/src/layers/normalization/batch_normalization.py L865-885, _assign_moving_average's
    assign_sub of (variable - value)·decay; TF1's assign_moving_average, moving_averages.py L43),
    whose 1 - m, a - b and product round by u·(1 - m)·|a - b| each and whose sum by u·|new|. Both
    are within gamma_4·((1 - m)·(|a| + |b|) + |new|) per step, carried on with weight m by the
    later steps. Where b is far below a (momentum 0 after a large moving variance) that is large
    against the result: tf_keras gives 1.19e-6 for 1.29e-6 from a = 2.67 (inference after training
    off by 0.086, atol 0.0097: tf-layers, tf-keras, tf-keras-unfused, tf-slim on
    cases/momentum/momentum-0-tiny-variance-after-large; found by the fuzz24 replay). u is float32's
    for a float16 or bfloat16 layer, whose statistics tf_keras keeps in float32 (`_param_dtype`,
    L319-324). Without renorm (its moving variance comes from a moving std); 0 elsewhere."""
    if problem.renorm is not None or not problem.track_running_stats:
        return np.zeros(problem.gamma.shape)
    bn = reference.bn_input(problem)
    stored = problem.param_dtype or problem.dtype
    ku = 4.0 * unit_roundoff_eps("float32" if stored in ("float16", "bfloat16") else stored) / 2.0
    gamma4 = ku / (1.0 - ku)
    biased = unbiased = bn.moving_variance
    delta = np.zeros(problem.gamma.shape)
    for step, x in enumerate(bn.batches, start=1):
        _, var, var_unbiased = reference.pooled(reference.batch_moments(x, bn)[1])
        weight = 1.0 / step if bn.momentum is None else 1.0 - bn.momentum  # 1 - m
        new, new_unbiased = (reference.update(biased, var, bn.momentum, step),
                             reference.update(unbiased, var_unbiased, bn.momentum, step))
        with np.errstate(invalid="ignore"):
            size = np.fmax(weight * (np.abs(biased) + np.abs(var)) + np.abs(new),
                           weight * (np.abs(unbiased) + np.abs(var_unbiased)) + np.abs(new_unbiased))
        delta = reference.update(delta, np.zeros_like(delta), bn.momentum, step) + gamma4 * size
        biased, unbiased = new, new_unbiased
    return np.where(np.isfinite(delta), delta, 0.0)


def moving_conditioning(problem: Problem) -> float:
    """max over channels of |moving mean| / sqrt(moving variance + eps) after training (either
    estimator's variance): what inference after training cancels. The moving mean is computed, so a
    framework holds it to about u |moving mean| in the dtype it keeps it in (a float16 layer's
    float16), and inference after training divides that by sqrt(moving variance + eps): the
    argument of `input_conditioning` for the batch mean. A constant float16 channel of 100.0625
    with eps 0 and momentum 0.04 leaves 100.0561 over sqrt(6.4e-5): float16 holds 100.0625, and
    0.8 becomes 0 (Keras, ONNX Runtime, nnx, TFLite; cases/numerics/
    float16-inference-after-training-moving-mean-rounds). Below the smallest normal the stored mean
    is off by up to Delta (`stored_resolution`) instead: |moving mean| counts as at least Delta/u.
    0 without moving statistics; a channel whose moving variance + eps is within Delta
    (`stored_variance`: undetermined, 0/0 included) is left out."""
    if not problem.track_running_stats:
        return 0.0
    after = reference.train(problem)
    lost, _ = stored_variance(problem)
    delta = stored_resolution(problem)
    floor = delta / (unit_roundoff_eps(problem.param_dtype or problem.dtype) / 2.0)
    worst = 0.0
    for var in (after.moving_variance, after.moving_variance_unbiased):
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.maximum(np.abs(after.moving_mean), floor) / np.sqrt(var + problem.epsilon)
        finite = ratio[np.isfinite(ratio) & ~lost]
        worst = max(worst, float(finite.max()) if finite.size else 0.0)
    return worst


def undetermined(case: Case, check: Check, problem: Problem) -> dict[str, Undetermined]:
    """Per output, the elements rounding leaves undetermined and what is accepted there (compare.
    Undetermined), once per case and check:

    - A channel of the batch the check normalizes with its own statistics whose var + eps is 0
      (a constant channel, eps 0): exact arithmetic gives 0/0 (the reference's NaN), but a rounded
      mean of n equal values need not equal them (TF's float32 mean of 48 copies of 3.2 is 6 ulps
      below it), and then x - mean is one nonzero residue d for every element and var = d²: y =
      beta ± gamma exactly, or ±inf where d² underflows, or NaN where the mean is exact. Accepted:
      non-finite, or beta + gamma or beta - gamma within tolerance (gen-0-0218 of the scale corpus;
      cases/numerics/constant-channel-eps-0-mean-rounds). Gradients: dL/dgamma = Σ dy·xhat is
      ±Σ dy; dL/dx = gamma/|d|·(...) is scaled by 1/|d|, a rounding residue: any value.
      With renorm, gamma·(±r + d) + beta and dL/dgamma = (±r + d)·Σ dy; with an adjustment
      (training only), xhat = ±1 goes through a·xhat + b first (`zero_variance_affine`); with a
      preceding layer, the channels of its output z
      (`variants.zero_variance`), and dL/dx = Wᵀ·dL/dz is undetermined throughout. The batch
      variance there is d², accepted from 0 to the bound on d² (`residue_variance`).
    - inference after training, channels whose moving variance + eps is within the storage
      dtype's resolution (`stored_variance`), or within the residues d² such 0/0 batches may add
      to it (exactly 0 included: `residue_moving_variance`): any value."""
    return case.memo(("undetermined", check), lambda: _undetermined(check, problem))


def _undetermined(check: Check, problem: Problem) -> dict[str, Undetermined]:
    out: dict[str, Undetermined] = {}
    bn = reference.bn_input(problem)
    x = bn.batches[-1]
    axes = bn.channel_axes

    def like_x(channels: np.ndarray) -> np.ndarray:
        return np.broadcast_to(reference.broadcastable(channels, x.ndim, axes), x.shape)

    zero = variants.zero_variance(problem, check)
    if check == "training":
        lost, _ = stored_variance(problem)
        v = smallest_moving_variance(problem) + problem.epsilon
        residue = residue_moving_variance(problem, zero, v)
        stored = stored_resolution(problem)
        by_update = lost & (v > stored)
        whys = [f"moving variance + eps within {stored:.3g}, the resolution of "
                f"{problem.param_dtype or problem.dtype} storage"] if (lost & ~by_update).any() else []
        if by_update.any():
            whys.append("moving variance + eps within the rounding of its updates, v - (v - b)(1 - m)")
        if residue.any():
            whys.append("moving variance + eps within what 0/0 batches' rounded means add (residues d²)")
        if whys:
            out["inference_output"] = Undetermined(like_x(lost | residue), anything=True, why="; ".join(whys))
    if zero is None:
        return out
    why = "var + eps = 0 (0/0): a rounded mean leaves x - mean one residue d, so beta ± gamma, ±inf or NaN"
    scale, offset, pinned = zero_variance_affine(bn, check)
    if bn.renorm is not None:
        why = ("var + eps = 0 (0/0): a rounded mean leaves x - mean one residue d, so gamma·(±r + d) + "
               "beta, ±inf or NaN, with renorm's r = clip(|d|/sigma_r)")
    unpinned = bool((zero & ~pinned).any())
    if unpinned:
        why += "; r = |d|/sigma_r not clipped to rmin: any value"
    if check == "training":
        out["batch_variance"] = Undetermined(zero, upto=residue_variance(problem), why=(
            "var + eps = 0 (0/0): a rounded mean leaves the residue d in x - mean, so var is d² from 0 "
            "to (n·u·|mean|)²"))
    if check in ("training", "inference"):
        out["output"] = Undetermined(like_x(zero), (like_x(offset + scale), like_x(offset - scale)),
                                     anything=unpinned, why=why)
    else:
        if bn.upstream is not None:  # dL/dgamma = Σ dy·(r·xhat + d), the affine of gamma 1, beta 0
            red = reference.reduce_axes(x.ndim, axes)
            total = reference.to_channels(bn.upstream.sum(axis=red, keepdims=True), axes)
            unit = replace(bn, gamma=np.ones_like(bn.gamma), beta=np.zeros_like(bn.beta),
                           scale=True, center=True)
            r, d, _ = zero_variance_affine(unit, check)
            out["gamma"] = Undetermined(zero, (total * (d + r), total * (d - r)), anything=unpinned, why=why)
        out["input"] = Undetermined(variants.zero_variance_inputs(problem, zero), anything=True,
                                    why=f"{why}; dL/dx scales with 1/|d|")
    return out


def zero_variance_affine(bn: Problem, check: Check) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scale, offset, pinned) per channel: the check's last normalization is y = scale·xhat +
    offset, so a 0/0 channel (`variants.zero_variance`), whose rounded xhat is ±1, gives offset ±
    scale. Plain: gamma and beta. Renorm (training and gradients), as Keras 3 composes it
    (keras/src/layers/normalization/batch_normalization.py L489-515 and L517-547): scale = gamma·r,
    offset = gamma·d + beta, r = clip(sigma_B/s, rmin, rmax), d = clip((mu_B - mu_r)/s, ±dmax),
    s = max(sigma_r, sqrt(eps)) from the renorm statistics before the last step. There sigma_B =
    sqrt(var + eps) is the residue |d_B| of the framework's rounded mean (0 in exact arithmetic),
    so r is the reference's only where the clip pins it at rmin: `pinned` where rmin > 0, s > 0
    and |d_B| < rmin·s, |d_B| bounded by n·u·|mean| (n values per channel: n additions, each
    rounding by at most u·n·|mean|, then divided by n; u that of the coarser of the case dtype and
    float32, the dtype Keras and tf_keras compute half and, Keras off tensorflow, float64 in).
    Elsewhere r = |d_B|/s is a rounding residue (s = 0: |d_B|/0 = inf, clipped to rmax), and
    unsynchronized replicas each have their own r and d: nothing pinned."""
    gamma = bn.gamma if bn.scale else np.ones_like(bn.gamma)
    beta = bn.beta if bn.center else np.zeros_like(bn.beta)
    if bn.adjustment is not None and check != "inference":  # gamma·(a·(r·xhat + d) + b) + beta:
        # tf_keras composes the adjustment into gamma and beta first, then renorm's r and d
        # (`_compose_transforms`, batch_normalization.py L637-661 and L733), as reference.training_affine
        a, b = bn.adjustment.scale, bn.adjustment.bias
        return zero_variance_affine(replace(bn, adjustment=None, gamma=gamma * a, beta=gamma * b + beta,
                                            scale=True, center=True), check)
    if bn.renorm is None or check == "inference":
        return gamma, beta, np.ones(gamma.shape, bool)
    if bn.replicas is not None and not bn.replicas.synchronized:  # r and d per replica: not one value
        return gamma, beta, np.zeros(gamma.shape, bool)
    if check == "training" and len(bn.batches) > 1:
        before = reference.train(replace(bn, batches=bn.batches[:-1]))
        mu_r, sigma_r = before.renorm_mean, before.renorm_stddev
    else:  # the first step's, and reference.gradients's, renorm statistics
        mu_r, sigma_r = bn.moving_mean, np.sqrt(bn.moving_variance)
    assert mu_r is not None and sigma_r is not None
    _, parts = reference.batch_moments(bn.batches[-1], bn)
    mean, var, _ = reference.pooled(parts)
    affine = replace(bn, gamma=gamma, beta=beta)
    rd = reference.renorm_correction(affine, mean, var, mu_r, sigma_r)
    scale, offset = reference.training_affine(affine, rd) or (gamma, beta)
    u = max(unit_roundoff_eps(bn.dtype), unit_roundoff_eps("float32")) / 2.0
    count = max(n for _, _, n in parts)
    s = np.maximum(sigma_r, np.sqrt(bn.epsilon))
    with np.errstate(invalid="ignore"):
        pinned = (s > 0) & (count * u * np.abs(mean) < (bn.renorm.rmin or 0.0) * s)
    return scale, offset, pinned


def mean_residue(problem: Problem) -> tuple[np.ndarray, np.ndarray]:
    """Per channel of the last batch, (D, B): bounds on how far a framework's mean of a constant
    channel is from its value, and on the batch variance that residue leaves (either estimator).
    A channel of n equal values c in a float dtype of unit roundoff u: any summation order errs by
    at most gamma_{n-1}·n·|c| (Higham, Accuracy and Stability of Numerical Algorithms, eq. 4.4;
    gamma_k = k·u/(1 - k·u)), the division by n by u more, so the mean is c + d with |d| <= D =
    gamma_n·|c|. x - (c + d) is -d exactly for every element (Sterbenz), so a two-pass variance is
    the mean of n roundings of d², at most B = (1 + gamma_{n+1})·D², times n/(n - 1) for the
    unbiased one (2 where parts are normalized apart: a shard or a virtual batch of 2). u is the
    case dtype's, the coarsest any framework computes in (tf.nn.moments keeps bfloat16, nn_impl.py
    L1268); no bound (inf) once k·u reaches 1 (float16 past 2048 values). Measured: tf.nn.moments
    of 96 float32 copies of 10000.099609375 gives 7.72e-5 = (9 ulps)², under D² = (0.0572)² =
    3.3e-3 (the fuzz24 replay, tf-nn)."""
    p = reference.bn_input(problem)
    x = p.batches[-1]
    n = int(x.size // max(problem.gamma.size, 1))
    u = unit_roundoff_eps(problem.dtype) / 2.0

    def gamma(k: int) -> float:
        return k * u / (1.0 - k * u) if k * u < 1.0 else np.inf

    red = reference.reduce_axes(x.ndim, p.channel_axes)
    c = reference.to_channels(np.abs(x).max(axis=red, keepdims=True), p.channel_axes) if x.size \
        else np.zeros(problem.gamma.shape)
    bessel = 2.0 if p.virtual_batch_size is not None or p.replicas is not None else n / max(n - 1, 1)
    d = gamma(n) * c
    return d, (1.0 + gamma(n + 1)) * bessel * d * d


def residue_variance(problem: Problem) -> np.ndarray:
    """Per channel, the largest batch variance a framework can report for a constant channel of
    the last batch (`mean_residue`'s B): accepted from 0 to it where exact arithmetic gives 0."""
    return mean_residue(problem)[1]


def residue_moving_variance(problem: Problem, zero: np.ndarray | None,
                            v: np.ndarray | None = None) -> np.ndarray:
    """Per channel, where inference after training divides by a moving variance + eps (`v`, where
    the caller has it: `smallest_moving_variance` + eps) no larger
    than the residues a framework's rounded means of constant channels may have added to it
    (`residue_bands`, R; exactly 0 after a last batch whose channel is 0/0, `zero`,
    `variants.zero_variance`, included): the stored value is anything in [v, v + R] and the moving
    mean is off by the residues d too, so the output, x - mean' over a root of a residue, is any
    value. Measured: Keras 3 on jax, a float64 layer computed in float32 (copies of 10000.1,
    momentum 0): moving mean 10000.1005859375 and moving variance 9.54e-7 = d², inference after
    training 0.25, -0.25 and 1.0 (gamma -0.217, 0.303, -1.286 in the fold x·inv + (-mean·inv))
    where the reference gives 0/0."""
    none = np.zeros(problem.gamma.shape, bool)
    if not problem.track_running_stats or not problem.infer_after_training:
        return none
    _, band = residue_bands(problem)
    last = none if zero is None else zero
    if v is None:
        v = smallest_moving_variance(problem) + problem.epsilon
    return (last | (band > 0)) & (v <= band)


def residue_bands(problem: Problem) -> tuple[np.ndarray, np.ndarray]:
    """Per channel, (M, R): how far from the reference's a framework's moving mean may be (either
    side), and how far above it its moving variance, after the steps whose batch has the channel
    constant (0/0 at eps 0, `variants.zero_variance`). Zeros where no step's is.

    A step k whose batch has the channel constant leaves the framework's mean off by d_k, |d_k| <=
    D_k, and its batch variance b_k = d_k² in [0, B_k] (`mean_residue`, per step). The moving
    statistics are linear in the batch's: each is carried on with the weight w_k = (1 - m_k)·
    m_{k+1}···m_K of the reference's update, so the framework's moving variance is v + sum_k w_k·b_k:
    R = sum_k w_k·B_k, the reference's update run on B_k from 0; the moving mean likewise M =
    sum_k w_k·D_k. Measured (tf-keras's unfused path, 96 float32 copies of 10000.1 per channel,
    momentum 0.738, 2 steps from 0.001): 5.80e-4 where v = 5.44e-4, a mean 9 ulps (d = 8.8e-3)
    off, within D = 0.0572, R = 1.51e-3 (cases/numerics/constant-channel-eps-0-moving-variance-
    residue). A sum-of-squares variance is noisier still: its variants' bands
    (`variants.sum_of_squares_atol`)."""
    mean_band, band = np.zeros(problem.gamma.shape), np.zeros(problem.gamma.shape)
    if not problem.track_running_stats:
        return mean_band, band
    for step in range(1, len(problem.batches) + 1):
        if reference.update(0.0, 1.0, problem.momentum, step) == 0.0:  # momentum 1: the batch's
            continue  # weight is 0, so is what its residues (inf past k·u = 1) add: not 0·inf = NaN
        prefix = replace(problem, batches=problem.batches[:step])
        zero = variants.zero_variance(prefix, "training")
        d_bound = bound = np.zeros(problem.gamma.shape)
        if zero is not None:
            d, b = mean_residue(prefix)
            d_bound, bound = np.where(zero, d, 0.0), np.where(zero, b, 0.0)
        mean_band = reference.update(mean_band, d_bound, problem.momentum, step)
        band = reference.update(band, bound, problem.momentum, step)
    return mean_band, band


def smallest_moving_variance(problem: Problem) -> np.ndarray:
    """Per channel, the smaller of the two estimators' moving variances after training: the one
    inference after training is most sensitive to, whichever a framework keeps."""
    after = reference.train(problem)
    return np.fmin(after.moving_variance, after.moving_variance_unbiased)


def input_conditioning(problem: Problem) -> float:
    """max over channels of |mean| / sqrt(var + eps) of the batches fed: how many digits
    subtracting the mean cancels, relative to what the output is divided by. An element rounded to
    one ulp of its own magnitude (and a mean rounded likewise) leaves (x - mean) off by about
    u |mean|, which the normalization scales by 1 / sqrt(var + eps): for a constant channel that is
    1 / sqrt(eps), not 0 (a float32 mean of equal values need not equal them). A constant channel
    with eps 0 is left out: 0/0 (the reference's mean of a constant channel is exact, its variance
    0), its output is undetermined (`undetermined`).

    With a preceding layer the statistics are those of its output z = W·x + b, and z itself, held
    in the case dtype, is off by about u·(|W|·|x| + |b|) per element (every product rounds, however
    much their sum cancels): that magnitude over sqrt(var + eps) counts like |mean| does. It is also
    what bounds a folded layer's output error, W'·x + b' with W' = s·W (s = gamma/sqrt(var + eps)):
    u·s·(|W|·|x| + |b - mean|), i.e. c ulps of gamma, per channel at most."""
    worst = 0.0
    bn = reference.bn_input(problem)
    for raw, x in zip(problem.batches, bn.batches, strict=True):
        # the whole batch, ghost batches, unsynchronized replicas' shards
        for g in reference.normalized_together(x.shape[0], problem):
            mean, var, _ = reference.moments(x[g], problem.channel_axes)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.abs(mean) / np.sqrt(var + problem.epsilon)
                if problem.preceding is not None and x[g].size:
                    axis = problem.channel_axes[0]
                    size = problem.preceding.absolute()
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
