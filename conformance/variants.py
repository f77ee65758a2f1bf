"""Named variants: the reference recomputed under one changed convention, to say *why* a framework
differs from it rather than only *that* it does.

`Knobs` holds every convention the simulation can change (defaults = the canonical reference),
`simulate` recomputes a check's outputs under them, `CATALOGUE` names the variants a diagnosis
tries (each realised by one or more `forms`, i.e. `Knobs` changes), and `apply` stacks the
variants an adapter declares with one more on top.

Tolerance rule (`tolerance_for`), c = worst channel |mean| / std as in compare.py:

- A variant simulated in float64 (momentum, estimators, epsilon, frozen or swapped statistics)
  is an exact model of the convention: it is judged at the case's own tolerance.
- A variant simulated in a lower dtype (compute-float32, compute-input-dtype) rounds each
  operation as that dtype would, but cannot reproduce a framework's summation order or fused
  formula bit for bit: it is judged at the default tolerance of the dtype it simulates, times
  (1 + c) as usual.
- variance-sum-of-squares cancels about u·c² (u = unit roundoff of the dtype the variance is
  evaluated in): which digits survive depends on the summation order, so the simulation only
  reproduces the size of the error. It is judged at rtol = atol = default(dtype)·(1 + c²).

None of these is ever tighter than the case's own tolerance. At large c the last rule accepts
nearly anything; a diagnosis should also ask whether the variant moves the result at all.
"""

from __future__ import annotations

import itertools
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from adapters.base import Check, Preceding, Problem
from conformance import reference
from conformance.compare import DEFAULT_TOLERANCE
from conformance.dtypes import eps as unit_roundoff_eps
from conformance.dtypes import finfo, round_to
from conformance.outputs import CHECKS

_CHOICES: dict[str, tuple[Any, ...]] = {
    "momentum_form": ("decay", "complement"),
    "momentum_float32": (None, "momentum", "complement"),
    "compute_dtype": (None, "float64", "float32", "float16", "bfloat16"),
    "variance": ("two-pass", "sum-of-squares", "sum-of-squares-unclamped"),
    "moving_variance_estimator": ("biased", "unbiased"),
    "batch_variance_estimator": ("biased", "unbiased"),
    "replica_stats": (None, "replica-0", "mean"),
    "flush_denormals": (None, "float32", "float64"),
    "folded_into_layer": (None, "centred", "shifted", "scale-after"),
}


@dataclass(frozen=True)
class Knobs:
    """Every convention the simulation can change; the defaults are the canonical reference."""

    momentum_form: str = "decay"  # "complement": moving = (1 - m)·moving + m·batch
    momentum_float32: str | None = None  # which of m ("momentum") or 1 - m ("complement") is float32
    compute_dtype: str | None = None  # None: float64; else the whole forward in that dtype
    variance: str = "two-pass"  # "sum-of-squares": E[x²] - E[x]², clamped at 0
    moving_variance_estimator: str = "biased"  # the batch variance fed to the moving update
    batch_variance_estimator: str = "biased"  # the batch variance reported
    stats_frozen: bool = False  # training leaves the moving statistics unchanged
    inference_uses_batch_stats: bool = False
    training_uses_moving_stats: bool = False  # the moving statistics as they were before the step
    epsilon_outside_sqrt: bool = False  # y = (x - mean) / (sqrt(var) + eps)
    epsilon: float | None = None  # replaces the case's epsilon
    normalize_folded: bool = False  # y = x·s + (beta - mean·s), s = gamma / sqrt(var + eps)
    empty_gamma_gradient_nan: bool = False  # dgamma = inv_std · Σ dy·(x - mean): NaN over no samples
    bessel_one_value: bool = False  # n/(n-1) taken as 1 for n = 1: the unbiased variance of one value is 0
    reduce_all_axes: bool = False  # statistics over every axis, the channel axes too
    ghost_interleaved: bool = False  # virtual batches of rows j, j + n/v, ... instead of consecutive rows
    # replicas normalize unsynchronized (each its shard's statistics, whatever the case asks) and
    # the statistics read back are replica 0's ("replica-0") or the mean over replicas ("mean")
    replica_stats: str | None = None
    # flush-to-zero / denormals-are-zero in this dtype: a subnormal momentum, product, moving
    # statistic, gamma or beta is 0 (TF's and XLA's CPU kernels)
    flush_denormals: str | None = None
    renorm_floor_epsilon_float32: bool = False  # renorm's floor sqrt(eps) of its std takes float32(eps)
    # folded s and beta - mean·s stored in float16, saturated at ±65504 (TFLite's float16 weights)
    folded_float16_weights: bool = False
    # folded s and beta - mean·s stored with ±inf replaced by ±float32 max (TFLite's converter)
    folded_inf_saturated: bool = False
    # BN folded into the preceding layer, W' = W·s, the bias (b - mean)·s + beta ("centred": torch's
    # fuse_conv_bn_weights) or b·s + (beta - mean·s) ("shifted": TFLite's converter, OpenVINO on an
    # exported Mul and Add); "scale-after": only the bias moves, (W·x)·s + b·s + shift (OpenVINO
    # after a Conv1D's Squeeze)
    folded_into_layer: str | None = None
    # a float64 model converted to float32 saturating (OpenVINO's CPU plugin): the input, the
    # parameters and the output held at ±float32 max where they pass it, ±inf too; NaN stays NaN
    float32_saturated: bool = False
    # a layer BN was folded into sums its products from 0 and adds the bias last (oneDNN's
    # convolution), not from the bias on (XNNPACK): it decides where saturated terms overflow
    layer_bias_last: bool = False

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"Knobs.{name} must be one of {allowed}, not {getattr(self, name)!r}")


CANONICAL = Knobs()


def _rounder(dtype: str | None) -> Callable[[Any], Any]:
    """Round an intermediate to `dtype`. One float64 operation then one rounding is the correctly
    rounded float32/float16 result of +, -, *, /, sqrt (53 >= 2p + 2 bits), so a simulation rounds
    after every operation and differs from a framework only in reduction order. (bfloat16 goes
    through float32 in ml_dtypes, as a framework computing in float32 and storing bfloat16 does.)"""
    if dtype in (None, "float64"):
        return lambda a: a
    return lambda a: round_to(a, dtype)


def _renorm_floor(p: Problem, k: Knobs) -> float | None:
    """The eps of renorm's floor sqrt(eps) where a variant replaces it (None: the case's)."""
    return _f32(p.epsilon) if k.renorm_floor_epsilon_float32 else None


def _f32(value: float) -> float:
    return float(np.float32(value))


def _lower(knobs: Knobs) -> bool:
    return knobs.compute_dtype not in (None, "float64")


def stats_dtype(knobs: Knobs, problem: Problem) -> str:
    """The dtype an E[x²] - E[x]² variance is evaluated in: the compute dtype, else the one a
    framework computes this case's statistics in (float64 for float64, float32 otherwise, as the
    frameworks upcast float16/bfloat16). In float64 a float32 case would hide the cancellation."""
    if knobs.compute_dtype is not None:
        return knobs.compute_dtype
    return "float64" if problem.dtype == "float64" else "float32"


# results of `_moments` and `_normalized` by their arguments' contents: most forms a diagnosis
# simulates (pairs of variants) compute the statistics, and many the outputs, as the declared
# conventions or one variant alone do (measured on the ONNX Runtime and TF items of a generated
# corpus: 22,335 of 23,772 statistics and 24,176 of 34,649 outputs found here); and the float64
# moments the bands and undetermined masks of every form start from (`reference.moments`). The
# most recently used, up to a budget of bytes (arguments and results).
_KEPT: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()
KEPT_BYTES = 32 * 2**20
_kept_bytes = 0


def _kept(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), computed once per function and contents of the arguments (an array by its layout
    and bytes, as a reduction's order follows the layout; anything else by its repr, which tells
    -0.0 from 0.0): fn must depend on its arguments only. The arrays it returns are read-only."""
    global _kept_bytes
    key = (fn, *((a.shape, a.strides, a.dtype.str, a.tobytes()) if isinstance(a, np.ndarray) else repr(a)
                 for a in args))
    if key in _KEPT:
        _KEPT.move_to_end(key)
        return _KEPT[key][0]
    out = fn(*args)
    arrays = [a for a in (out if isinstance(out, tuple) else (out,)) if isinstance(a, np.ndarray)]
    for array in arrays:
        array.setflags(write=False)
    size = sum(a.nbytes for a in arrays) + sum(a.nbytes for a in args if isinstance(a, np.ndarray))
    _KEPT[key] = out, size
    _kept_bytes += size
    while _kept_bytes > KEPT_BYTES:
        _kept_bytes -= _KEPT.popitem(last=False)[1][1]
    return out


def _stats(x: np.ndarray, p: Problem, k: Knobs) -> tuple[np.ndarray, np.ndarray, int]:
    """Batch mean and biased variance per channel, as reference.moments but under the knobs."""
    return _kept(_moments, x, p.channel_axes, stats_dtype(k, p), k.compute_dtype, k.variance,
                 k.reduce_all_axes, k.normalize_folded and k.compute_dtype == "float16")


def _moments(x: np.ndarray, axes: tuple[int, ...], squares_dtype: str, compute_dtype: str | None,
             variance: str, reduce_all_axes: bool, folded_float16: bool,
             ) -> tuple[np.ndarray, np.ndarray, int]:
    """`_stats`: `squares_dtype` is `stats_dtype`, `folded_float16` a folded float16 computation."""
    if folded_float16:  # tf.nn: float16 statistics in float32, cast back to float16
        mean, var, count = _moments(x, axes, "float32", "float32", variance, reduce_all_axes, False)
        f16 = _rounder("float16")  # (tf.nn.moments, nn_impl.py L1268 and L1283-1285): a variance below
        return f16(mean), f16(var), count  # 6.1e-5 keeps a subnormal's few digits
    red = tuple(range(x.ndim)) if reduce_all_axes else reference.reduce_axes(x.ndim, axes)
    count = int(np.prod([x.shape[a] for a in red]))
    r = _rounder(compute_dtype)

    def avg(a: np.ndarray, rr: Callable[[Any], Any] = r) -> np.ndarray:
        with warnings.catch_warnings():  # an empty batch has no statistics: NaN, by design
            warnings.simplefilter("ignore", RuntimeWarning)
            return rr(a.mean(axis=red, keepdims=True))  # float64 accumulation, one rounding

    x = r(x)
    # in float64 (the canonical simulation, reference.moments's numbers) a constant channel's mean is
    # its value; a lower compute dtype rounds the float64 mean once, as a framework's may
    mean = reference.exact_mean(x, red) if compute_dtype in (None, "float64") else avg(x)
    if variance == "two-pass":
        var = avg(r(r(x - mean) ** 2))
    else:  # Flax use_fast_variance=True, Keras-torch ops.moments
        s = _rounder(squares_dtype)
        xs = s(x)
        m = avg(xs, s)
        with np.errstate(invalid="ignore"):  # inf - inf where a square overflows the dtype: NaN
            var = s(avg(s(xs * xs), s) - s(m * m))
        if variance == "sum-of-squares":
            var = np.maximum(var, 0.0)
    if reduce_all_axes:  # one statistic for the whole tensor, the same for every channel
        shape = tuple(x.shape[a] for a in axes)
        return np.full(shape, mean.item()), np.full(shape, var.item()), count
    return reference.to_channels(mean, axes), reference.to_channels(var, axes), count


def _exact_moments(x: np.ndarray, p: Problem, k: Knobs) -> tuple[np.ndarray, np.ndarray, int]:
    """reference.moments (float64, two-pass) over the axes the knobs reduce: every axis under
    reduce-all-axes, where a 1-D input's channels of one value each share one noisy variance
    (Keras 3 on torch: measured on CUDA, a variance of -8 and 4.1 where the CPU's order gives 16
    and 0, cases/numerics/vector-large-mean-eps-0-float64)."""
    return _stats(x, p, replace(CANONICAL, reduce_all_axes=k.reduce_all_axes))


def _normalize(x: np.ndarray, p: Problem, k: Knobs, mean: np.ndarray, var: np.ndarray,
               affine: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """reference.normalize, operation for operation, under the knobs."""
    gamma, beta = (p.gamma, p.beta) if affine is None else affine
    if k.flush_denormals:  # denormals-are-zero reads a subnormal gamma as 0: TF's 1e-40·inf is NaN
        f = _read_flusher(k)
        gamma, beta = f(gamma), f(beta)
    return _kept(_normalized, x, mean, var, gamma, beta, p.channel_axes, p.epsilon, k.compute_dtype,
                 k.normalize_folded, k.folded_float16_weights, k.folded_inf_saturated, k.epsilon_outside_sqrt)


def _normalized(x: np.ndarray, mean: np.ndarray, var: np.ndarray, gamma: np.ndarray, beta: np.ndarray,
                axes: tuple[int, ...], epsilon: float, compute_dtype: str | None, folded: bool,
                float16_weights: bool, inf_saturated: bool, outside: bool) -> np.ndarray:
    """`_normalize`: `folded` is normalize_folded, `outside` epsilon_outside_sqrt."""
    r = _rounder(compute_dtype)

    def b(v: np.ndarray) -> np.ndarray:
        return r(reference.broadcastable(v, x.ndim, axes))

    eps = r(np.float64(epsilon))
    if folded:  # tf.nn.batch_normalization, Keras 3's jax backend: x·s + (beta - mean·s)
        s, shift = _folded_constants(b(mean), b(var), b(gamma), b(beta), eps, r, float16_weights,
                                     inf_saturated, converted=inf_saturated)
        with np.errstate(invalid="ignore"):
            return r(r(r(x) * s) + shift)
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = r(r(np.sqrt(b(var))) + eps) if outside else r(np.sqrt(r(b(var) + eps)))
        return r(r(r(b(gamma) * r(r(x) - b(mean))) / denom) + b(beta))


def _folded_constants(mean: np.ndarray, var: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float,
                      r: Callable[[Any], Any], float16_weights: bool = False, inf_saturated: bool = False,
                      converted: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The folded scale s = gamma/sqrt(var + eps) and shift beta - mean·s, rounded by `r` after each
    operation, as a folding kernel computes them or a converter stores them. `converted`: TFLite's
    converter folds them with TF's kernels, whose rsqrt is Eigen's packet one (`_packet_rsqrt_input`);
    `inf_saturated`: then stores ±inf as ±float32 max."""
    with np.errstate(divide="ignore", invalid="ignore"):
        s = r(_folded_inverse(var, eps, r, converted) * gamma)
        shift = r(beta - r(mean * s))
    if float16_weights:
        s, shift = _float16_saturated(s), _float16_saturated(shift)
    if inf_saturated:
        s, shift = _inf_saturated(s), _inf_saturated(shift)
    return s, shift


def _folded_inverse(var: np.ndarray, eps: float, r: Callable[[Any], Any],
                    converted: bool = False) -> np.ndarray:
    """1/sqrt(var + eps) rounded by `r` after each operation (`converted`: as TF's packet rsqrt reads it)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        total = r(var + eps)
        return r(1.0 / r(np.sqrt(_packet_rsqrt_input(total) if converted else total)))


AVX_FLOAT_LANES = 8  # TF's x86 build: Eigen's Packet8f


def _packet_rsqrt_input(v: np.ndarray) -> np.ndarray:
    """What Eigen's rsqrt reads of var + eps, channel by channel: TF's Rsqrt kernel evaluates whole
    8-float AVX packets with `_mm256_rsqrt_ps` plus a Newton step (Eigen/src/Core/arch/AVX/
    MathFunctions.h L57-64, prsqrt<Packet8f>, in TF 2.21's headers), and the instruction takes a
    subnormal as 0 (rsqrt inf); the last C mod 8 channels go through the exact scalar path. Measured
    on TFLite's converted constants, moving variance 1e-40, eps 0: 4 channels all 1e20, 8 and 16 all
    inf, 9 and 17 the last one 1e20 (docs/repro/tflite_inf_constants.py)."""
    flat = np.array(v, dtype=np.float64).reshape(-1)
    packed = flat.size // AVX_FLOAT_LANES * AVX_FLOAT_LANES
    tiny = float(finfo("float32").tiny)
    flat[:packed] = np.where(np.abs(flat[:packed]) < tiny, 0.0, flat[:packed])
    return flat.reshape(np.shape(v))


@dataclass(frozen=True)
class _Layer:
    """The preceding layer and the last batch before it, for a converter that folds BN into the
    layer's weights (`_folded_into_layer`)."""

    preceding: Preceding
    x: np.ndarray


def _output(x: np.ndarray, p: Problem, k: Knobs, mean: np.ndarray, var: np.ndarray,
            layer: _Layer | None) -> np.ndarray:
    """The last batch normalized with stored (or batch) statistics, as the artefact that runs
    inference computes it: BN folded into the preceding layer where `layer` is given."""
    if layer is None:
        return _normalize(x, p, k, mean, var)
    return _folded_into_layer(layer, p, k, mean, var)


def _folded_into_layer(layer: _Layer, p: Problem, k: Knobs, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """BN folded into the preceding dense layer or 1x1 convolution: W' = W·s and b' = (b - mean)·s +
    beta (`centred`, torch/nn/utils/fusion.py fuse_conv_bn_weights) or b·s + shift (`shifted`, a
    whole-zero bias not in the graph: shift), in the compute dtype, then z = Σ x_i·W'_i + b'; or
    (Σ x_i·W_i)·s + b' (`scale-after`: OpenVINO moves only the bias past a Conv1D's Squeeze,
    docs/repro/openvino_inf_constants.py). With s = inf a weight, input or bias of 0 gives 0·inf =
    NaN, and the sum is NaN where ±inf terms meet, in any order. TFLite's converter (with
    folded_inf_saturated; folded_float16_weights: as float16, saturated at ±65504) stores ±inf as
    ±float32 max, and two of its rewrites see whole zero tensors first: a zero bias is dropped
    before the fold for ranks 2 and 3 (b' = shift), and a zero weight stays 0 for rank 3 (Conv1D's
    ExpandDims form); XNNPACK then accumulates acc = b'; acc = fma(x_i,
    W'_i, acc) in input-channel order, which with saturated terms decides between ±inf, NaN and a
    finite value (measured: docs/repro/tflite_inf_constants.py). The loop below is that fma: a float64
    product of two float32 values is exact, so product + acc rounds once. With float32_saturated
    (OpenVINO on a float64 model the TorchScript exporter folded) the fold is the exporter's, in
    float64; OpenVINO converts W' and b' to float32 saturating and reads a subnormal one as 0, and
    its convolution sums the fma's from 0 and adds b' last (layer_bias_last) or, in the kernel oneDNN
    picks for some one-channel Conv2d/3d, from b' on (measured: docs/repro/openvino_float64_saturated.py)."""
    r = _rounder(k.compute_dtype)
    gamma, beta = p.gamma, p.beta
    if k.flush_denormals:  # as `_normalize`: TF reads a subnormal gamma or beta as 0
        gamma, beta = _flusher("float32")(gamma), _flusher("float32")(beta)
    tflite = k.folded_inf_saturated or k.folded_float16_weights  # TFLite's converter, either way
    fold = _rounder(None) if k.float32_saturated else r  # the exporter folds a float64 model in float64
    eps = fold(np.float64(p.epsilon))
    # saturated once folded into the layer: W·inf is NaN where W is 0, not 0·float32 max
    s, shift = _folded_constants(mean, var, gamma, beta, eps, fold, converted=tflite)
    weight, bias, rank = layer.preceding.weight, layer.preceding.bias, layer.x.ndim
    stored = _stored_constant(k, r)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if k.folded_into_layer == "centred":  # ((b - mean)·rsqrt(var + eps))·gamma + beta, torch's order:
            # in float16 (b - mean)·rsqrt can overflow before a gamma of 0 makes it inf·0 = NaN
            inverse = _folded_inverse(var, eps, fold, tflite)
            folded_bias = stored(fold(fold(fold(fold(bias - mean) * inverse) * gamma) + beta))
        elif not bias.any() and not (tflite and rank == 4):  # a zero bias is not in the graph
            folded_bias = stored(shift)
        else:
            folded_bias = stored(fold(fold(bias * s) + shift))
        axis = p.channel_axes[0]
        x = np.moveaxis(r(layer.x), axis, -1)
        if k.folded_into_layer == "scale-after":  # (W·x)·s + b': the layer's own sum, then the scale
            z = np.zeros(x.shape)
            for i in range(weight.shape[1]):
                z = r(r(x[..., i : i + 1] * weight[:, i]) + z)
            return np.moveaxis(r(r(z * s) + folded_bias), -1, axis)
        kernel = weight if tflite and rank == 3 and not weight.any() else stored(fold(weight * s[:, None]))
        start = np.zeros(x.shape) if k.layer_bias_last else np.broadcast_to(folded_bias, x.shape)
        acc = start.astype(np.float64)
        for i in range(weight.shape[1]):
            acc = r(x[..., i : i + 1] * kernel[:, i] + acc)
        if k.layer_bias_last:
            acc = r(acc + folded_bias)
    return np.moveaxis(acc, -1, axis)


def _stored_constant(k: Knobs, r: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """How an artefact holds a folded constant: TFLite's converter with ±inf as ±float32 max, or as
    float16 weights saturated at ±65504; OpenVINO converting a float64 one to float32 saturating, a
    float32-subnormal one read as 0; else as computed."""
    if k.folded_inf_saturated:
        return _inf_saturated
    if k.folded_float16_weights:
        return _float16_saturated
    if k.float32_saturated:
        return lambda v: _flusher("float32")(r(_saturated(v, "float32")))
    return lambda v: v


def _update(moving: np.ndarray, batch: np.ndarray, m: float, k: Knobs) -> np.ndarray:
    """reference.update under the knobs. Moving statistics are float32 whenever a lower compute dtype
    is set (Keras keeps float16 layers' statistics in float32 and updates a float64 layer's in
    float32 off tensorflow)."""
    rs = _rounder("float32" if _lower(k) else None)
    # flushed in the dtype the statistics are kept in: float32 where a lower compute dtype is set
    # (Keras 3 on jax computes a float64 layer in float32: a float32-subnormal momentum is 0)
    f = _read_flusher(k)
    if k.momentum_form == "complement":
        m = 1.0 - m
    if k.momentum_float32 == "complement":  # tf_keras unfused: moving -= (moving - batch) * decay
        decay = f(_f32(1.0 - m))
        return f(rs(moving - f(rs(rs(moving - batch) * decay))))
    if k.momentum_float32 == "momentum":  # ONNX: m32 * moving + (1 - m32) * batch
        m = _f32(m)
    m = f(rs(m))
    return f(rs(f(rs(m * moving)) + f(rs(rs(1.0 - m) * batch))))


def _flusher(dtype: str | None) -> Callable[[Any], Any]:
    """Flush-to-zero in `dtype`: values below its smallest normal become 0; None: no flushing."""
    if dtype is None:
        return lambda v: v
    tiny = float(finfo(dtype).tiny)
    return lambda v: np.where(np.abs(v) < tiny, 0.0, v)


def _unbiased(var: np.ndarray, count: int, k: Knobs) -> np.ndarray:
    """var * n/(n-1), rounded as the knobs say; with `bessel_one_value` a single value keeps
    factor 1 (TF's fused kernel: rest_size_minus_one = rest_size > 1 ? rest_size - 1 : 1)."""
    if count == 1 and k.bessel_one_value:
        return var
    return _rounder(k.compute_dtype)(reference.unbiased(var, count))


def _momenta(p: Problem) -> list[float]:
    """The decay-form momentum of each step (1 - 1/t when the case's is None)."""
    return [1.0 - 1.0 / t if p.momentum is None else p.momentum for t in range(1, len(p.batches) + 1)]


def _groups(x: np.ndarray, p: Problem, k: Knobs) -> list[slice]:
    return reference.virtual_batches(x.shape[0], p.virtual_batch_size, k.ghost_interleaved)


def _shards(p: Problem, k: Knobs, x: np.ndarray) -> list[np.ndarray]:
    """The parts of a batch normalized separately: one per replica when replicas do not
    synchronize (or a replica variant says they do not), else the whole batch."""
    r = p.replicas
    if r is None or (r.synchronized and k.replica_stats is None):
        return [x]
    return r.shards(x)


def _read_back(k: Knobs, per_replica: list[np.ndarray]) -> np.ndarray:
    """What is read back of per-replica values: replica 0's, or their mean (canonical)."""
    if k.replica_stats == "replica-0" or len(per_replica) == 1:  # the mean of one is that one, exactly
        return per_replica[0]
    return np.mean(per_replica, axis=0)


def _train(p: Problem, k: Knobs, layer: _Layer | None = None) -> dict[str, np.ndarray]:
    """reference.train under the knobs (ghost batches, renorm and adjustment as it defines them)."""
    rs = _rounder("float32" if _lower(k) else None)
    # the converter's constants (saturated, float16) are the exported model's, not the source's
    source = replace(k, folded_inf_saturated=False, folded_float16_weights=False)
    state: list[tuple[np.ndarray, ...]] | None = None  # per replica (one without replicas)
    for x, m in zip(p.batches, _momenta(p), strict=True):
        shards = _shards(p, k, x)
        start = rs(np.sqrt(p.moving_variance))  # renorm's mean and both standard deviations start so
        state = state or [(rs(p.moving_mean), rs(p.moving_variance), rs(p.moving_mean), start, start)] * len(
            shards)
        outputs, stats, new = [], [], []
        for shard, (moving_mean, moving_var, renorm_mean, renorm_std, moving_std) in zip(shards, state,
                                                                                         strict=True):
            groups = _groups(shard, p, k)
            parts = [_stats(shard[g], p, k) for g in groups]
            mean = reference.average([a for a, _, _ in parts])
            var = reference.average([v for _, v, _ in parts])
            rd = None
            if p.renorm is not None:
                rd = tuple(_rounder(k.compute_dtype)(c) for c in reference.renorm_correction(
                    p, mean, var, renorm_mean, renorm_std, _renorm_floor(p, k)))
            affine = reference.training_affine(p, rd)  # type: ignore[arg-type]
            output = np.empty_like(shard)
            for g, (gm, gv, _) in zip(groups, parts, strict=True):
                used = _read_stored(k, moving_mean, moving_var) if k.training_uses_moving_stats else (gm, gv)
                output[g] = _normalize(shard[g], p, source, *used, affine)
            outputs.append(output)
            if not k.stats_frozen:
                fed = (reference.average([_unbiased(v, n, k) for _, v, n in parts])
                       if k.moving_variance_estimator == "unbiased" else var)
                moving_mean = _update(moving_mean, mean, m, k)
                if p.renorm is None:
                    moving_var = _update(moving_var, fed, m, k)
                else:
                    renorm_mean = rs(reference.update(renorm_mean, mean, p.renorm.momentum, 1))
                    renorm_std = rs(reference.update(renorm_std, np.sqrt(var + p.epsilon), p.renorm.momentum,
                                                     1))
                    moving_std = _update(moving_std, np.sqrt(fed + p.epsilon), m, k)
                    # relu(std·std - eps) (Keras 3, batch_normalization.py L584-586): a subnormal
                    # square is flushed too (float64 1e-155² on tensorflow, float32 5e-21² on jax)
                    f = _read_flusher(k)
                    moving_var = f(rs(np.maximum(f(rs(moving_std * moving_std)) - p.epsilon, 0.0)))
            reported = (reference.average([_unbiased(v, n, k) for _, v, n in parts])
                        if k.batch_variance_estimator == "unbiased" else var)
            stats.append((mean, var, reported))
            new.append((moving_mean, moving_var, renorm_mean, renorm_std, moving_std))
        state = new
    assert state is not None
    mean, var, reported = (_read_back(k, [s[i] for s in stats]) for i in range(3))
    moving_mean, moving_var, renorm_mean, renorm_std = (rs(_read_back(k, [s[i] for s in state]))
                                                        for i in range(4))
    # inference with batch statistics: the whole last batch's (no running statistics, or the variant),
    # or with replicas the statistics read back
    if not p.track_running_stats or (k.inference_uses_batch_stats and p.replicas is None):
        last = _stats(p.batches[-1], p, k)[:2]
    else:
        last = (mean, var) if k.inference_uses_batch_stats else (moving_mean, moving_var)
    return {
        "output": np.concatenate(outputs, axis=0),
        "batch_mean": mean,
        "batch_variance": reported,
        "moving_mean": moving_mean,
        "moving_variance": moving_var,
        "inference_output": _output(p.batches[-1], p, k, *last, layer),
        **({} if p.renorm is None else {"renorm_mean": renorm_mean, "renorm_stddev": renorm_std}),
    }


def _read_flusher(k: Knobs) -> Callable[[Any], Any]:
    """Flush-to-zero / denormals-are-zero as the knobs apply it, to a statistic, update or operand:
    in float32 where a lower compute dtype is set, else in the flushing dtype (none without it)."""
    return _flusher("float32" if k.flush_denormals and _lower(k) else k.flush_denormals)


def _read_stored(k: Knobs, mean: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stored statistics as a normalization reads them: under denormals-are-zero a subnormal is 0."""
    f = _read_flusher(k)
    return f(mean), f(var)


def _infer(p: Problem, k: Knobs, layer: _Layer | None = None) -> dict[str, np.ndarray]:
    x = p.batches[-1]
    whole = not p.track_running_stats or k.inference_uses_batch_stats
    used = _stats(x, p, k)[:2] if whole else _read_stored(k, p.moving_mean, p.moving_variance)
    return {"output": _output(x, p, k, *used, layer)}


def _gradients(p: Problem, k: Knobs) -> dict[str, np.ndarray]:
    """reference.gradients under compute_dtype, variance, epsilon, epsilon_outside_sqrt and
    training_uses_moving_stats (the other knobs do not touch a training-mode backward pass).

    Epsilon outside the root, s = sigma + eps: ds/dvar = 1/(2 sigma) instead of 1/(2 s), so the
    xhat term is scaled by s / sigma. Moving statistics are constants: dx = gamma / s * dy."""
    assert p.upstream is not None, "gradients need an upstream gradient"
    r = _rounder(k.compute_dtype)
    axes = p.channel_axes
    x, dy = r(p.batches[-1]), r(p.upstream)
    red = reference.reduce_axes(x.ndim, axes)
    groups = _groups(x, p, k)
    if k.training_uses_moving_stats:
        parts = [(p.moving_mean, p.moving_variance)] * len(groups)
    else:
        parts = [_stats(x[g], p, k)[:2] for g in groups]
    rd = None
    if p.renorm is not None:
        mean, var = reference.average([a for a, _ in parts]), reference.average([v for _, v in parts])
        rd = tuple(r(c) for c in reference.renorm_correction(p, mean, var, p.moving_mean,
                                                             np.sqrt(p.moving_variance), _renorm_floor(p, k)))
    affine = reference.training_affine(p, rd)  # type: ignore[arg-type]
    gamma = p.gamma if affine is None else affine[0]

    def b(v: np.ndarray) -> np.ndarray:
        return r(reference.broadcastable(v, x.ndim, axes))

    def avg(a: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():  # an empty batch: means of nothing are NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            return r(a.mean(axis=tuple(range(x.ndim)) if k.reduce_all_axes else red, keepdims=True))

    def total(a: np.ndarray) -> np.ndarray:
        return reference.to_channels(r(a.sum(axis=red, keepdims=True)), axes)

    eps = r(np.float64(p.epsilon))
    if k.normalize_folded:
        return _folded_gradients(p, k, x, dy, groups, parts, eps, rd)
    xhat, dx = np.empty_like(x), np.empty_like(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        for g, (mean, var) in zip(groups, parts, strict=True):
            sigma = r(np.sqrt(b(var)))
            s = r(sigma + eps) if k.epsilon_outside_sqrt else r(np.sqrt(r(b(var) + eps)))
            inv_std = r(1.0 / s)
            xhat[g] = r(r(x[g] - b(mean)) * inv_std)
            if k.training_uses_moving_stats:
                dx[g] = r(r(b(gamma) * inv_std) * dy[g])
            else:
                correction = r(xhat[g] * avg(r(dy[g] * xhat[g])))
                if k.epsilon_outside_sqrt:
                    correction = r(correction * r(s / sigma))
                dx[g] = r(r(b(gamma) * inv_std) * r(r(dy[g] - avg(dy[g])) - correction))
    z = xhat
    if affine is not None:
        rr, d, a, c = reference.corrections(p, rd)  # type: ignore[arg-type]
        z = r(r(b(a) * r(r(b(rr) * xhat) + b(d))) + b(c))
    gamma_grad = total(r(dy * z))
    if k.empty_gamma_gradient_nan and x.size == 0:
        gamma_grad = np.full_like(gamma_grad, np.nan)
    return {"input": dx, "gamma": gamma_grad, "beta": total(dy)}


def _folded_gradients(p: Problem, k: Knobs, x: np.ndarray, dy: np.ndarray, groups: list[slice],
                      parts: list[tuple[np.ndarray, np.ndarray]], eps: Any,
                      rd: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The backward pass of y = x·s + (beta - mean·s), s = gamma·inv, inv = 1/sqrt(var + eps), as
    autodiff takes it through tf.nn.batch_normalization (nn_impl.py L1490-1497), in the compute
    dtype: dL/ds = Σ dy·x - mean·Σ dy, two large sums that cancel for a large |mean| (their exact
    difference is Σ dy·(x - mean)); dL/dgamma = inv·dL/ds; dL/dvar = -inv³/2·gamma·dL/ds in
    RsqrtGrad's order (0 for a zero dL/ds);
    dL/dmean = -s·Σ dy; dL/dx = dy·s + (dL/dmean + dL/dvar·2(x - mean)) / n. Renorm (`rd`, r and d
    stop-gradient constants): Keras 3 folds gamma·r and gamma·d + beta (keras/src/layers/
    normalization/batch_normalization.py L517-547), so gamma·r stands for gamma above and dL/dgamma
    = r·inv·dL/ds + d·Σ dy; tf_keras's adjustment (a, b) likewise, gamma·a·r and gamma·(a·d + b) +
    beta (`reference.corrections`; batch_normalization.py L650-661, L733)."""
    r = _rounder(k.compute_dtype)
    axes = p.channel_axes
    red = reference.reduce_axes(x.ndim, axes)

    def b(v: np.ndarray) -> np.ndarray:
        return r(reference.broadcastable(v, x.ndim, axes))

    def total(a: np.ndarray) -> np.ndarray:
        return r(a.sum(axis=red, keepdims=True))

    plain = rd is None and p.adjustment is None
    renorm_r, renorm_d, adj_a, adj_b = reference.corrections(p, rd)
    ratio, shift = r(adj_a * renorm_r), r(r(adj_a * renorm_d) + adj_b)
    effective = r(p.gamma * ratio)
    dx, gamma_grad = np.empty_like(x), 0.0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for g, (mean, var) in zip(groups, parts, strict=True):
            n = max(1, int(np.prod([x[g].shape[a] for a in red])))
            m, inv = b(mean), r(1.0 / r(np.sqrt(r(b(var) + eps))))
            s = r(b(effective) * inv)
            sum_dy = total(dy[g])
            ds = r(total(r(dy[g] * x[g])) - r(m * sum_dy))
            through = r(ds * inv) if plain else r(r(b(ratio) * r(ds * inv)) + r(b(shift) * sum_dy))
            gamma_grad = r(gamma_grad + through)
            # rsqrt's gradient as TF's RsqrtGrad takes it (tensorflow/core/kernels/cwise_ops_gradients.h
            # L129-L150, packet path): mul_no_nan(-0.5·(inv·inv), mul_no_nan(inv, d)), d = dL/dinv, each
            # product in the compute dtype. So a zero d gives 0, not 0·inf = NaN, and any other d gives
            # ±inf once inv·inv passes the range (float16: inv > 256, var + eps < 1.5e-5). Measured: a
            # float16 constant channel of 1e4, eps 1e-5 (inv 316): dL/dx finite where dL/ds is 0, NaN in
            # the other channels; std 1e-3, eps 1e-5 (inv 301): ±inf dL/dx
            inv_d = r(inv * r(b(effective) * ds))
            dvar = np.where(inv_d == 0, 0.0, r(r(-0.5 * r(inv * inv)) * inv_d))
            dmean = r(-r(s * sum_dy))
            dx[g] = r(r(dy[g] * s) + r(r(dmean + r(r(2.0 * dvar) * r(x[g] - m))) / n))
    gamma = reference.to_channels(np.broadcast_to(gamma_grad, b(p.gamma).shape), axes)
    if k.empty_gamma_gradient_nan and x.size == 0:
        gamma = np.full_like(gamma, np.nan)
    return {"input": dx, "gamma": gamma, "beta": reference.to_channels(total(dy), axes)}


def folded_gradient_atol(knobs: Knobs, problem: Problem, check: Check) -> dict[str, float]:
    """Per gradient, the absolute error two folded evaluations may show: dL/dgamma = inv·(Σ dy·x -
    mean·Σ dy) sums terms of size |dy·x| and |mean·dy|, so as every gradient sum here it is off by
    about u·Σ|terms| (problem.gradient_scales), judged as default(dtype)·inv·(Σ|dy·x| + |mean|·Σ|dy|)
    (max over channels) in the compute dtype, instead of the unfolded terms |dy·xhat|; with renorm
    or an adjustment, times |a·r| (`_folded_gradients`). Empty outside a folded gradient check."""
    if check != "gradients" or not knobs.normalize_folded or problem.upstream is None:
        return {}
    problem = reference.bn_input(problem)
    x, dy = problem.batches[-1], problem.upstream
    if x.size == 0:
        return {}
    eps = problem.epsilon if knobs.epsilon is None else knobs.epsilon
    red = reference.reduce_axes(x.ndim, problem.channel_axes)
    mean, var, _ = _kept(reference.moments, x, problem.channel_axes)
    rd = None if problem.renorm is None else reference.renorm_correction(
        problem, mean, var, problem.moving_mean, np.sqrt(problem.moving_variance))
    renorm_r, _, adj_a, _ = reference.corrections(problem, rd)  # r and the adjustment's a multiply gamma
    ratio = np.abs(adj_a * renorm_r)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / np.sqrt(var + eps)
        terms = (np.abs(dy * x).sum(axis=red) + np.abs(mean) * np.abs(dy).sum(axis=red)) * inv * ratio
    finite = terms[np.isfinite(terms)]
    return {"gamma": DEFAULT_TOLERANCE[knobs.compute_dtype or "float64"] * float(finite.max())} \
        if finite.size else {}


def sum_of_squares_atol(knobs: Knobs, problem: Problem, check: Check) -> dict[str, float]:
    """Per variance output of a training check, the absolute error E[x²] - E[x]² can leave in it:
    the cancellation's default(d)·(var + mean²) (as `undetermined` takes it), the largest over the
    channels of the batches fed with more than one value per channel (one value's E[x²] and E[x]² are
    the same rounded square), times n/(n-1) where the moving update is Bessel-corrected. Absolute,
    because a channel with var + eps = 0 (a constant channel, eps 0) has no conditioning to scale
    the relative band default(d)·(1 + c²) with: a constant bfloat16 channel of 100 leaves Flax's
    float32 variance at 7.5e-5, not 0. In a gradient check, the error that noise leaves in dL/dx
    and dL/dgamma (`_sum_of_squares_gradient_atol`). Empty outside a sum of squares."""
    if knobs.variance == "two-pass":
        return {}
    if check == "gradients":
        return _sum_of_squares_gradient_atol(knobs, problem)
    if check != "training":
        return {}
    problem = reference.bn_input(problem)
    width = DEFAULT_TOLERANCE[stats_dtype(knobs, problem)]
    worst = 0.0
    for x in (shard for batch in problem.batches for shard in _shards(problem, CANONICAL, batch)):
        mean, var, count = _exact_moments(x, problem, knobs)
        if count < 2 or mean.size == 0:
            continue
        bessel = count / (count - 1) if knobs.moving_variance_estimator == "unbiased" and count > 1 else 1.0
        worst = max(worst, float(np.max(var + mean * mean)) * bessel)
    band = width * worst
    return {"batch_variance": band, "moving_variance": band} if band > 0 else {}


def _sum_of_squares_gradient_atol(knobs: Knobs, problem: Problem) -> dict[str, float]:
    """The absolute error a sum-of-squares variance leaves in dL/dx and dL/dgamma (dL/dbeta = Σ dy
    does not read the variance), the largest over the elements of each group normalized together.

    Forward noise. Per group (n > 1 values over the axes the knobs reduce), the variance is off by up
    to default(d)·(var + mean²), the band `sum_of_squares_atol` gives it in training, so the
    framework normalizes with sigma'² = sigma²·(1 + delta), sigma² = var + eps, |delta| <= D =
    default(d)·(var + mean²)/sigma². Its backward pass reads that sigma': with xhat = (x - mean)/sigma,
    A = dy - mean(dy) and B = xhat·mean(dy·xhat) (exact), dL/dx = gamma/sigma·(A·(1 + delta)^-1/2 -
    B·(1 + delta)^-3/2) and dL/dgamma = Σ dy·xhat·(1 + delta)^-1/2. The band is the largest change
    over |delta| <= D: at ±D or where the derivative vanishes, 1 + delta = 3B/A. Where A = B, as
    with two values (xhat = ±1), the exact dL/dx is 0 and what comes out is this noise alone:
    Keras 3 on torch, two float64 values near 3.06 of std 0.024 in float32, variance 5.6744e-4
    against 5.6652e-4 (delta 1.6e-3), dL/dx -0.0161 and 0.0159 (cases/numerics/
    vector-two-values-float64-gradients-cancel); D is 0.165 there, the band 2.2 against max|dy|/sigma
    = 34.5: as wide as the variance's own band, which any gradient within it is consistent with.
    Where D >= 1 the variance can be 0 or negative: `undetermined` leaves those out.

    Backward noise. Autodiff of E[x²] - E[x]² gives dL/dx the terms 2x/n·dL/dvar and
    -2·mean/n·dL/dvar apart (through the mean of squares and the squared mean), which cancel to
    2(x - mean)/n·dL/dvar, |dL/dvar| = |gamma·Σ dy·xhat|/(2 sigma²): each rounds to default(d) of
    itself, default(d)·|gamma|·(|mean| + |x - mean|)·|mean(dy·xhat)|/sigma² (Keras 3 on torch: 2.6e-4
    in the same case, where 2x/n·dL/dvar is 1285 in float32). Both are in the statistics' dtype d;
    with a preceding layer dL/dx is Wᵀ·dL/dz, scaled by max Σ|W| as in problem.gradient_scales. A
    folded backward's own band (`folded_gradient_atol`) is kept where it is wider."""
    preceding, problem = problem.preceding, reference.bn_input(problem)
    x, dy = problem.batches[-1], problem.upstream
    if dy is None or x.size == 0 or knobs.training_uses_moving_stats:
        return {}
    width = DEFAULT_TOLERANCE[stats_dtype(knobs, problem)]
    eps = problem.epsilon if knobs.epsilon is None else knobs.epsilon
    axes = problem.channel_axes
    red = reference.reduce_axes(x.ndim, axes)
    together = tuple(range(x.ndim)) if knobs.reduce_all_axes else red
    dx_band, dgamma_band = 0.0, 0.0
    for g in _groups(x, problem, knobs):
        xg, dyg = x[g], dy[g]
        mean, var, count = _exact_moments(xg, problem, knobs)
        if count < 2:  # one value: E[x²] and E[x]² are the same rounded square
            continue
        m, v, gamma = (reference.broadcastable(c, x.ndim, axes) for c in (mean, var, np.abs(problem.gamma)))
        sigma2 = v + eps
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            d = width * (v + m * m) / sigma2
            d = np.where(d < 1, d, np.nan)  # noise as large as the variance: undetermined
            sigma = np.sqrt(sigma2)
            xhat = (xg - m) / sigma
            a = dyg - dyg.mean(axis=together, keepdims=True)
            corr = (dyg * xhat).mean(axis=together, keepdims=True)
            b = xhat * corr
            turn = np.clip(np.divide(3 * b, a, out=np.zeros_like(a), where=a != 0) - 1, -d, d)
            change = np.max([np.abs(gamma / sigma * (a * ((1 + t) ** -0.5 - 1) - b * ((1 + t) ** -1.5 - 1)))
                             for t in (-d, d, turn)], axis=0)  # dL/dx(delta) - dL/dx(0)
            backward = width * gamma * (np.abs(m) + np.abs(xg - m)) * np.abs(corr) / sigma2
            dgamma = np.abs((dyg * xhat).sum(axis=red, keepdims=True)) * ((1 - d) ** -0.5 - 1)
        dx_band = max(dx_band, _largest(change + backward))
        dgamma_band = max(dgamma_band, _largest(dgamma))
    through = 1.0 if preceding is None else float(np.abs(preceding.weight).sum(axis=0).max())  # Wᵀ dz
    dgamma_band = max(dgamma_band if problem.scale else 0.0,
                      folded_gradient_atol(knobs, problem, "gradients").get("gamma", 0.0))
    bands = {"input": dx_band * through, "gamma": dgamma_band}
    return {name: band for name, band in bands.items() if band > 0}


def _largest(a: np.ndarray) -> float:
    """The largest finite element (0 with none)."""
    finite = a[np.isfinite(a)]
    return float(finite.max()) if finite.size else 0.0


def undetermined(problem: Problem, check: Check, knobs: Knobs) -> dict[str, np.ndarray]:
    """Per output, the elements a simulation cannot predict: for a sum of squares, those of channels
    where the true variance + eps is within the cancellation error default(d)·(var + mean²), where
    the framework's variance + eps may come out 0 (a constant channel with eps 0: 0/0), a tiny
    positive value (x - mean over a tiny root: 0 where x equals the mean, any size elsewhere) or,
    unclamped, negative (NaN): which one is a matter of summation order. Clamped, only what is
    normalized with that batch's statistics is undetermined; unclamped, the NaN can also reach the
    batch and moving variances. Clamped, inference after training is undetermined too in a channel
    whose moving variance + eps is no larger than the error the noise can leave in it
    (`sum_of_squares_atol`): a constant float16 channel of 1e4 gives Flax a float32 batch variance
    of about 3 where the moving variance should decay to 0.125. Folded (`normalize_folded`): a 0/0
    channel (`zero_variance`) rounds x·s and mean·s by about u·|x·gamma|/|d|, up to 4|gamma|, so its
    output and dL/dgamma are undetermined too (where the reference accepts beta ± gamma), as is a
    folded backward pass's overflow (`_folded_overflow`). Empty where everything is predictable."""
    if knobs.normalize_folded:  # its overflow and its 0/0 channels, with the rest's masks
        masks = undetermined(problem, check, replace(knobs, normalize_folded=False))
        extra = _folded_overflow(problem, knobs) if check == "gradients" else {}
        zero = zero_variance(problem, check, knobs.epsilon)
        if zero is not None:  # x·s and mean·s each round by u|x|·|gamma|/|d|, up to about 4|gamma|
            if check == "gradients":
                of_zero = {"input": zero_variance_inputs(problem, zero), "gamma": zero}
            else:
                x = problem.batches[-1]
                like = reference.broadcastable(zero, x.ndim, problem.channel_axes)
                of_zero = {"output": np.broadcast_to(like, x.shape)}
            extra = {name: extra[name] | mask if name in extra else mask for name, mask in of_zero.items()}
        for name, mask in extra.items():
            masks[name] = mask | masks[name] if name in masks else mask
        return masks
    if knobs.variance == "two-pass":
        return {}
    clamped = knobs.variance == "sum-of-squares"
    noisy_moving = None
    if clamped and check == "training" and problem.track_running_stats:
        band = sum_of_squares_atol(knobs, problem, check).get("moving_variance", 0.0)
        with np.errstate(invalid="ignore"):
            noisy_moving = simulate(problem, check, knobs)["moving_variance"] + problem.epsilon <= band
    problem = reference.bn_input(problem)  # masks are per element, so W mixing them is not tracked
    eps = problem.epsilon if knobs.epsilon is None else knobs.epsilon
    width = DEFAULT_TOLERANCE[stats_dtype(knobs, problem)]
    fed = problem.batches if check == "training" else problem.batches[-1:]
    masks = []
    for batch in fed:  # one value per channel (in every shard normalized apart) cancels nothing
        noisy = [(var + eps <= width * (var + mean * mean)) & (count > 1) for mean, var, count in
                 (_exact_moments(x, problem, knobs) for x in _shards(problem, CANONICAL, batch))]
        masks.append(np.logical_or.reduce(noisy))
    last, ever = masks[-1], np.logical_or.reduce(masks)
    none = np.zeros_like(last)

    def like_input(channels: np.ndarray) -> np.ndarray:
        x = problem.batches[-1]
        return np.broadcast_to(reference.broadcastable(channels, x.ndim, problem.channel_axes), x.shape)

    if check == "training":
        after = (last if noisy_moving is None else ever & noisy_moving) if clamped else ever
        return {"output": like_input(last), "batch_mean": none, "batch_variance": none if clamped else last,
                "moving_mean": none, "moving_variance": none if clamped else ever,
                # renorm's moving std follows the batch std as the moving variance does
                "renorm_mean": none, "renorm_stddev": none if clamped else ever,
                "inference_output": like_input(after)}
    return {name: like_input(last) if name in ("input", "output") else none if clamped and name == "beta"
            else last for name in ("input", "gamma", "beta", "output")}


def zero_variance(problem: Problem, check: Check, epsilon: float | None = None) -> np.ndarray | None:
    """Per channel, where the check normalizes a batch with its own statistics and var + eps is 0
    there in exact arithmetic (a constant channel with more than one value, eps 0; `epsilon`
    replaces the case's): 0/0, and a framework's rounded mean of equal values need not equal them
    (`problem.undetermined`; the reference's is exact, `reference.exact_mean`). None where no
    channel is. Renorm's r and d and an adjustment's (a, b) are affine maps of xhat = ±1
    (`problem.zero_variance_affine`). With a preceding layer, the
    channels of what BN sees, z = W·x + b: a channel z whose inputs are equal at every position is
    equal too, each position computing the same sum of the same products
    (measured: Keras 3 on jax and on tensorflow after a 1x1 Conv, the source models of keras-jax-onnx
    and keras-tflite, give ±1 = beta ± gamma in z channels of inputs 3.2 and -0.7; on jax a moving
    variance of 2^-44 = d², d one float32 ulp of z = -3.9757). With renorm too: its r and d scale
    and shift the ±1 (`problem.zero_variance_affine`; measured: Keras 3 on tensorflow and jax,
    float64 copies of 3.2, rmin 0.7, dmax 0.5, 1.0 and -0.1875 in folded form for -0.7 + 0.5)."""
    eps = problem.epsilon if epsilon is None else epsilon
    problem = reference.bn_input(problem)
    x = problem.batches[-1]
    if (check == "inference" and problem.track_running_stats) or x.size == 0 or eps != 0.0:
        return None
    # one value in some part normalized apart (a shard, a virtual batch): its mean is exact, 0/0 is NaN
    parts = [shard[g] for shard in _shards(problem, CANONICAL, x)
             for g in reference.virtual_batches(shard.shape[0], problem.virtual_batch_size)]
    if min(_count(problem, part) for part in parts) < 2:
        return None
    zero = reference.constant_channels(x, problem.channel_axes)
    return zero if zero.any() else None


def zero_variance_inputs(problem: Problem, zero: np.ndarray) -> np.ndarray:
    """The elements of dL/dx a 0/0 channel (`zero_variance`, over BN's channels) leaves
    undetermined: that channel's, and with a preceding layer every one, dL/dx = Wᵀ·dL/dz mixing
    each channel's dL/dz into every input channel (the reference's NaN·0 included)."""
    x = problem.batches[-1]
    if problem.preceding is not None:
        return np.ones(x.shape, bool)
    return np.broadcast_to(reference.broadcastable(zero, x.ndim, problem.channel_axes), x.shape)


def _folded_overflow(problem: Problem, knobs: Knobs) -> dict[str, np.ndarray]:
    """A folded backward pass whose overflow depends on rounding: per channel, the sums Σ dy·x and
    mean·Σ dy (T = Σ|dy·x| + |mean|·Σ|dy| bounds them) may pass the compute dtype's range in a
    partial sum, and dL/ds = Σ dy·x - mean·Σ dy, exact Σ dy·(x - mean) but off by the rounding
    noise default(d)·T, times |gamma|·inv³/2 in the variance's gradient may pass it too (then dL/dx
    is inf or NaN). Where T reaches the range, or (|Σ dy·(x - mean)| + default(d)·T)·|gamma|·inv³/2
    does, whether and where it overflows is a matter of summation order, which the simulation
    (float64 sums, rounded once) does not follow: those channels' dL/dx and dL/dgamma are
    undetermined. Measured: tf-nn on float16 constant channels of 1e4 (NaN in channels whose
    float64 sums stay finite), and std 1e-3 with eps 1e-5 (inv³ = 2.7e7: ±inf dL/dx). Empty where
    nothing can overflow."""
    problem = reference.bn_input(problem)
    x, dy = problem.batches[-1], problem.upstream
    if dy is None or x.size == 0:
        return {}
    dtype = knobs.compute_dtype or "float64"
    top = float(finfo(dtype).max)
    axes = problem.channel_axes
    red = reference.reduce_axes(x.ndim, axes)
    eps = problem.epsilon if knobs.epsilon is None else knobs.epsilon
    mean, var, _ = _kept(reference.moments, x, axes)

    def total(a: np.ndarray) -> np.ndarray:
        return reference.to_channels(a.sum(axis=red, keepdims=True), axes)

    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        terms = total(np.abs(dy * x)) + np.abs(mean) * total(np.abs(dy))
        ds = np.abs(total(dy * (x - reference.broadcastable(mean, x.ndim, axes))))
        dvar = (ds + DEFAULT_TOLERANCE[dtype] * terms) * np.abs(problem.gamma) * 0.5 / (var + eps) ** 1.5
        over = (terms >= top) | (dvar >= top)
    if not over.any():
        return {}
    return {"input": np.broadcast_to(reference.broadcastable(over, x.ndim, axes), x.shape), "gamma": over}


# simulations of the last few problems, by the problem's identity (the problem itself is kept with
# them, so its id is not reused): the harness builds one problem per case and check and every
# adapter's diagnosis of it simulates largely the same knobs (measured on the tf family over 150
# generated cases: 3,327 simulations, 839 distinct)
_SIMULATED: OrderedDict[int, tuple[Problem, dict[tuple[Check, Knobs], dict[str, np.ndarray]]]] = OrderedDict()
PROBLEMS_KEPT = 8  # a case's checks, several cases back


def simulate(problem: Problem, check: Check, knobs: Knobs = CANONICAL) -> dict[str, np.ndarray]:
    """The check's outputs (float64) under `knobs`; with CANONICAL they are reference.train / infer /
    gradients. training: output, batch_mean, batch_variance (last step), moving_mean,
    moving_variance (after all steps), inference_output; inference: output; gradients: input,
    gamma, beta. Computed once per problem object, check and knobs (read-only arrays)."""
    kept = _SIMULATED.pop(id(problem), None)
    if kept is None or kept[0] is not problem:
        kept = (problem, {})
    _SIMULATED[id(problem)] = kept
    while len(_SIMULATED) > PROBLEMS_KEPT:
        _SIMULATED.popitem(last=False)
    if (check, knobs) not in kept[1]:
        out = _simulate(problem, check, knobs)
        for array in out.values():
            if isinstance(array, np.ndarray):
                array.setflags(write=False)
        kept[1][check, knobs] = out
    return dict(kept[1][check, knobs])


def _simulate(problem: Problem, check: Check, knobs: Knobs) -> dict[str, np.ndarray]:
    if knobs.float32_saturated:  # converted in, computed as the other knobs say, converted out
        out = _simulate_converted(_saturated_problem(problem), check, knobs)
        return {name: _saturated(v, "float32") if isinstance(v, np.ndarray) else v for name, v in out.items()}
    return _simulate_converted(problem, check, knobs)


def _simulate_converted(problem: Problem, check: Check, knobs: Knobs) -> dict[str, np.ndarray]:
    method = CHECKS[check].method
    bn = reference.bn_input(problem)  # a preceding layer: in float64, before BN
    if knobs.epsilon is not None:  # every formula, renorm's too, takes the variant's epsilon
        bn = replace(bn, epsilon=knobs.epsilon)
    if method == "gradients":
        out = _gradients(bn, knobs)
    else:  # an artefact whose converter folded BN into the preceding layer
        folds = knobs.folded_into_layer is not None and problem.preceding is not None
        layer = _Layer(problem.preceding, problem.batches[-1]) if folds else None  # type: ignore[arg-type]
        out = (_train if method == "train" else _infer)(bn, knobs, layer)
    if problem.preceding is not None and "input" in out:  # dL/dx = Wᵀ dL/dz
        out["input"] = problem.preceding.transpose_apply(out["input"], problem.channel_axes[0])
    return out


def _saturated_problem(p: Problem) -> Problem:
    """`p` as a saturating float64 -> float32 conversion hands it on: every input and parameter held
    at ±float32 max (OpenVINO's Convert: dst = max(min(src, ubound), lbound) over the float32 range,
    src/plugins/intel_cpu/src/nodes/common/cpu_convert.cpp ConvertPrecision; its ConvertPrecision
    pass does the same to constants)."""
    def f(v: Any) -> Any:
        return _saturated(v, "float32")
    layer = p.preceding if p.preceding is None else replace(p.preceding, weight=f(p.preceding.weight),
                                                             bias=f(p.preceding.bias))
    return replace(p, batches=tuple(f(x) for x in p.batches), gamma=f(p.gamma), beta=f(p.beta),
                   moving_mean=f(p.moving_mean), moving_variance=f(p.moving_variance), preceding=layer)


def tolerance_for(knobs: Knobs, problem: Problem, check: Check, base_rtol: float | np.ndarray,
                  base_atol: float | np.ndarray, conditioning: float,
                  held_conditioning: float = 0.0) -> tuple[Any, Any]:
    """(rtol, atol) a framework is held to when compared with `simulate(problem, check, knobs)`.

    base_* is the output's tolerance (its dtype's default x (1 + c), or its override); float64
    conventions keep it. A lower compute dtype d widens it to default(d)·(1 + c): rounding is
    simulated, summation order is not. There c is the larger of the input's `conditioning` and the
    one the output's own tolerance was widened by (`held_conditioning`; inference after training:
    |moving mean| / sqrt(moving variance + eps), `problem.moving_conditioning`): a moving mean one
    ulp of d off the simulated one (Keras 3 on torch updates it in another order) moves that output
    by u_d·|moving mean| / sqrt(moving variance + eps) just as it does in the case's dtype.
    E[x²] - E[x]² in dtype d is off by about u_d·c² (the input's c) in an order-dependent way:
    default(d)·(1 + c²). The widest rule that applies wins."""
    c = conditioning
    widths = [0.0]
    if _lower(knobs):
        widths.append(DEFAULT_TOLERANCE[knobs.compute_dtype] * (1.0 + max(c, held_conditioning)))  # type: ignore[index]
    if knobs.variance != "two-pass":
        widths.append(DEFAULT_TOLERANCE[stats_dtype(knobs, problem)] * (1.0 + c * c))
    atol_widths = [folded_error(knobs, problem, check)] if knobs.normalize_folded else []
    # np.maximum: a folded output's base tolerance is one value per channel (compare.folded_tolerance)
    return np.maximum(base_rtol, max(widths)), np.maximum(base_atol, max(widths + atol_widths))


def folded_error(knobs: Knobs, problem: Problem, check: Check) -> float:
    """How far two folded evaluations may differ: x·s and mean·s each round to u|x·s|, and their sum
    cancels to a value near beta, so each is off by up to 2u·max|x·s|; two of them by 4u·max|x·s|
    (u = eps/2 of the compute dtype). s = gamma/sqrt(var + eps) with each variance the check
    normalizes with: a training step's batch variance (one value per channel: 0, s = gamma/sqrt(eps)),
    the moving variance in inference (fuzz seed 14: tf-nn's float16 fold of one value per channel
    off by one ulp of x·s = 22, where the batch's 0 left no band) and after training."""
    dtype = knobs.compute_dtype or "float64"
    eps = problem.epsilon if knobs.epsilon is None else knobs.epsilon
    bn = reference.bn_input(problem)
    stored = bn.track_running_stats and not knobs.inference_uses_batch_stats
    normalized = []  # (x, the variances it is normalized with)
    if check == "training" or not stored:
        batches = bn.batches if check == "training" else bn.batches[-1:]
        for batch in batches:
            for g in reference.normalized_together(batch.shape[0], bn):
                if batch[g].size:
                    normalized.append((batch[g], _kept(reference.moments, batch[g], bn.channel_axes)[1]))
    if stored and bn.batches[-1].size:
        moving = simulate(problem, check, knobs).get("moving_variance") if check == "training" else \
            bn.moving_variance
        if moving is not None:
            normalized.append((bn.batches[-1], moving))
    worst = 0.0
    for x, var in normalized:
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.abs(bn.gamma) / np.sqrt(var + eps)
            xs = np.abs(x) * reference.broadcastable(s, x.ndim, bn.channel_axes)
        finite = xs[np.isfinite(xs)]
        worst = max(worst, float(finite.max()) if finite.size else 0.0)
    return 2.0 * unit_roundoff_eps(dtype) * worst


@dataclass(frozen=True)
class Variant:
    """One named convention: where it can change an output and how it is realised as Knobs."""

    name: str
    summary: str  # one line, for reports
    when: Callable[[Problem, Check], bool]  # the checks and cases whose outputs it can change
    # Knobs changes, or a function of the problem giving the forms that change something there
    ways: dict[str, Any] | Callable[[Problem], list[dict[str, Any]]] = field(default_factory=dict)
    raises: bool = False  # explains whether it raises, not values: nothing to simulate

    def forms(self, problem: Problem, check: Check) -> list[dict[str, Any]]:
        """The Knobs changes that realise the convention (several where frameworks differ)."""
        if self.raises:
            return []
        return self.ways(problem) if callable(self.ways) else [dict(self.ways)]

    def applies(self, problem: Problem, check: Check) -> bool:
        """False where the convention cannot change any output of this check."""
        return self.when(problem, check) and (self.raises or bool(self.forms(problem, check)))


def _updates(p: Problem, c: Check) -> bool:
    """Training where the moving statistics move: momentum 1 keeps them, except that an empty batch's
    NaN statistics still reach them (1 * moving + 0 * NaN is NaN)."""
    return c == "training" and (p.momentum != 1.0 or any(x.size == 0 for x in p.batches))


def _batch_stats(p: Problem, c: Check) -> bool:
    """The checks whose output is normalized with the batch's own statistics."""
    return c in ("training", "gradients")


def _saturation_can_show(p: Problem) -> bool:
    """Whether a float32 computation of `p` can meet a value past ±float32 max, where saturating it
    differs from IEEE float32 (compute-float32): an input or parameter past it or not finite, eps 0
    in float32 (a variance of 0 divides by 0), or a bound on the outputs past a quarter of it. With
    |x - mean| <= A (A: the largest |z| plus the largest |mean|, a batch's or the moving one) and
    var + eps >= eps, |y| <= A·max|gamma|/sqrt(eps) + max|beta|; a folded layer's terms sum to the
    same bound (|W|·|x| + |b| for z); (x - mean)² stays finite for A < 1e19."""
    top = float(finfo("float32").max)
    layer = p.preceding
    given = [*p.batches, p.gamma, p.beta, p.moving_mean, p.moving_variance,
             *(() if layer is None else (layer.weight, layer.bias))]
    if any(v.size and not np.all(np.abs(v) <= top) for v in given) or _f32(p.epsilon) == 0.0:
        return True
    axis = p.channel_axes[0]
    z = p.batches if layer is None else [layer.absolute().apply(np.abs(x), axis) for x in p.batches]
    largest = max((float(np.abs(x).max()) for x in z if x.size), default=0.0)
    a = 2 * max(largest, float(np.abs(p.moving_mean).max(initial=0.0)))
    bound = a * float(np.abs(p.gamma).max(initial=0.0)) / np.sqrt(_f32(p.epsilon)) + float(
        np.abs(p.beta).max(initial=0.0))
    return a >= 1e19 or bound > top / 4


def _saturated_forms(p: Problem) -> list[dict[str, Any]]:
    """float32-saturated's forms where saturation can show (none elsewhere): BN alone, and with a layer
    before BN folded into it by the exporter (the TorchScript one, a Conv), whose sum adds the bias
    last or, in one oneDNN kernel, first."""
    if not _saturation_can_show(p):
        return []
    saturated = {"compute_dtype": "float32", "float32_saturated": True}
    folded = [{**saturated, "folded_into_layer": "centred", "layer_bias_last": last}
              for last in (True, False)]
    return [saturated, *(folded if p.preceding is not None else [])]


def _momentum_float32(p: Problem) -> list[dict[str, Any]]:
    # ONNX Runtime: momentum is a float32 attribute, also in double models (m32·moving + (1-m32)·batch).
    # tf_keras unfused float64 layer: decay = float32(1 - momentum); moving -= (moving - batch)·decay.
    ms = _momenta(p)
    forms = []
    if any(_f32(m) != m for m in ms):
        forms.append({"momentum_float32": "momentum"})
    if any(_f32(1.0 - m) != 1.0 - m for m in ms):
        forms.append({"momentum_float32": "complement"})
    return forms


def _count(p: Problem, x: np.ndarray) -> int:
    return int(np.prod([x.shape[a] for a in reference.reduce_axes(x.ndim, p.channel_axes)]))


def _interleaving_differs(p: Problem) -> bool:
    """Ghost batches whose interleaved rows differ from the consecutive ones (v > 1 and n/v > 1)."""
    v = p.virtual_batch_size
    return v is not None and any(v < x.shape[0] and v > 1 for x in p.batches)


def _saturated(v: Any, dtype: str) -> Any:
    """v held at ±`dtype` max where it passes it, ±inf included; NaN stays NaN."""
    top = float(finfo(dtype).max)
    return np.clip(v, -top, top)


def _float16_saturated(v: np.ndarray) -> np.ndarray:
    """v stored as float16 weights by TFLite's float16 quantization: past ±65504 it saturates."""
    with np.errstate(invalid="ignore"):
        return round_to(_saturated(v, "float16"), "float16")


def _inf_saturated(v: np.ndarray) -> np.ndarray:
    """v (float32 values) stored by TFLite's converter, whose CanonicalizeBoundaryValuePass replaces
    a constant ±inf by ±float32 max (NaN stays NaN)."""
    return _saturated(v, "float32")


def _folded(p: Problem) -> list[dict[str, Any]]:
    """Folded in float64 for float64 cases, in float32 for float32, and for float16/bfloat16 in
    float32 (Keras upcasts) or in the input dtype (tf.nn on a float16 tensor)."""
    if p.dtype == "float64":
        return [{"normalize_folded": True}]
    low = [{"normalize_folded": True, "compute_dtype": p.dtype}] if p.dtype != "float32" else []
    return [{"normalize_folded": True, "compute_dtype": "float32"}, *low]


def _into_layer(p: Problem) -> list[dict[str, Any]]:
    """folded-into-layer's forms: the bias centred (torch's fusions) or shifted (OpenVINO on an exported
    Mul and Add), and on 3-D input the scale after the layer (OpenVINO, Conv1D), in each compute
    dtype `_folded` gives."""
    ways = ["centred", "shifted"] + (["scale-after"] if p.rank == 3 else [])
    return [{**form, "folded_into_layer": way} for way in ways for form in _folded(p)]


VARIANTS = [
    # An adapter or user passing torch's momentum (weight of the batch) to a TF-form API.
    Variant("momentum-complement", "moving = (1 - m)·moving + m·batch: torch and TF momentum forms swapped",
            lambda p, c: c == "training" and p.momentum != 0.5,
            lambda p: [] if p.momentum is None else [{"momentum_form": "complement"}]),
    Variant("momentum-float32", "momentum m, or 1 - m, held in float32 for the moving update",
            lambda p, c: c == "training" and p.dtype == "float64", _momentum_float32),
    # Keras 3 on jax/torch: a float64 layer computes in result_type(float64, float32) = float32.
    Variant("compute-float32", "a float64 case computed in float32",
            lambda p, c: p.dtype == "float64", {"compute_dtype": "float32"}),
    # OpenVINO's CPU plugin has no f64 kernels: ConvertPrecision runs a float64 model in float32,
    # and its Convert saturates both ways (src/plugins/intel_cpu/src/nodes/common/cpu_convert.cpp,
    # ConvertPrecision: dst = max(min(src, ubound), lbound), the bounds float32's), so an input or
    # constant past float32's range, ±inf too, comes in as ±3.4e38, and an output that is ±inf in
    # float32 goes out as ±3.4e38. Measured (docs/repro/openvino_float64_saturated.py): the graph
    # runs ((x - mean)·s) + beta, unfolded, in float32 between two Converts; a moving variance of 0
    # with eps 0 gives ±3.4e38 where the reference gives ±inf.
    # Elsewhere nothing passes float32's range and it computes what compute-float32 does: it applies
    # only where saturation can show, so that it is not named beside compute-float32 for every
    # framework that computes a float64 case in float32.
    Variant("float32-saturated", "a float64 model run in float32 through saturating conversions: the "
            "input, parameters and output held at ±float32 max where they pass it (±inf too)",
            lambda p, c: p.dtype == "float64", _saturated_forms),
    Variant("compute-input-dtype", "float16/bfloat16 statistics computed in that dtype, not float32",
            lambda p, c: p.dtype in ("float16", "bfloat16"), lambda p: [{"compute_dtype": p.dtype}]),
    # torch, and TF's fused kernel: the moving variance is updated with var·n/(n-1).
    Variant("moving-variance-unbiased", "moving variance updated with the Bessel-corrected batch variance",
            _updates, {"moving_variance_estimator": "unbiased"}),
    Variant("moving-variance-biased", "moving variance updated with the biased batch variance",
            _updates, {"moving_variance_estimator": "biased"}),
    # tf.compat.v1.nn.fused_batch_norm returns var(ddof=1) as batch variance; y uses the biased one.
    Variant("batch-variance-unbiased", "reported batch variance Bessel-corrected (y uses the biased one)",
            lambda p, c: c == "training", {"batch_variance_estimator": "unbiased"}),
    # Flax use_fast_variance=True (the default); Keras 3 ops.moments on torch.
    Variant("variance-sum-of-squares", "batch variance as E[x²] - E[x]² (clamped at 0) in the compute dtype",
            _batch_stats, {"variance": "sum-of-squares"}),
    # TF's kernels and XLA's CPU code run with flush-to-zero and denormals-are-zero
    # (tensorflow/core/platform/denormal.h, ScopedFlushDenormal; measured: tf and jax.jit give 0 for
    # 2.2250738585e-313 * 0.01 in float64 where NumPy and torch give 2.2e-315): a subnormal momentum
    # or moving statistic is 0, so with eps 0 a moving variance that should be subnormal gives 0/0.
    # In inference the stored statistics are read so too (denormals-are-zero), and gamma and beta in
    # every normalization (measured: TF's tf.constant([1e-40]) * inf is [nan]).
    Variant("denormals-flushed", "a subnormal momentum or moving statistic taken as 0 (flush-to-zero)",
            lambda p, c: _updates(p, c) or (c == "inference" and p.track_running_stats),
            lambda p: [{"flush_denormals": "float64" if p.dtype == "float64" else "float32"}]),
    # TF1 tf.compat.v1.layers run without the UPDATE_OPS dependency.
    Variant("stats-frozen", "training leaves the moving statistics unchanged",
            _updates, {"stats_frozen": True}),
    # torch with track_running_stats=False; a model left in training mode.
    Variant("inference-uses-batch-stats", "inference normalizes with the batch's own statistics",
            lambda p, c: c == "inference" or (c == "training" and p.infer_after_training),
            {"inference_uses_batch_stats": True}),
    # Keras trainable=False (a frozen layer runs in inference mode); a model left in eval mode.
    Variant("training-uses-moving-stats", "training normalizes with the moving statistics",
            _batch_stats, {"training_uses_moving_stats": True}),
    # tensorflow/python/ops/nn_impl.py batch_normalization (L1491-1497) and Keras 3's jax backend
    # (keras/src/backend/jax/nn.py L1080-1090) fold the normalization: the output of a channel with
    # one value (var 0, s = gamma/sqrt(eps)) is beta plus the rounding of x·s, not beta exactly.
    Variant("normalize-folded", "y = x·s + (beta - mean·s), s = gamma/sqrt(var + eps), in the compute dtype",
            lambda p, c: c in ("training", "inference", "gradients"), _folded),
    # TFLite's post-training float16 quantization: the folded scale and shift become float16 weights,
    # saturated at ±65504 where they pass it, and the model computes in float32. Measured on
    # cases/export/conv-bn-float16-large-mean-folded-overflow: mean·s = 95346 is stored as 65504.
    Variant("folded-float16-weights", "y = x·s + (beta - mean·s) in float32, s and the shift stored as "
            "float16 weights saturated at ±65504", lambda p, c: c in ("training", "inference")
            or (c == "gradients" and p.renorm is None and p.adjustment is None),  # as normalize-folded
            lambda p: [{"normalize_folded": True, "compute_dtype": "float32", "folded_float16_weights": True,
                        # into a preceding layer's float16 weights, as folded-inf-saturated says
                        "folded_into_layer": "shifted" if p.preceding is not None and p.rank < 5 else None}]
            if p.dtype == "float16" else []),  # float16 cases only: the quantization's
    # TFLite's converter folds BN's constants and then replaces every constant ±inf by ±float32 max
    # (tensorflow/compiler/mlir/lite/transforms/canonicalize_boundary_value_pass.cc,
    # ClampInfToMinMaxFloat): with a moving variance of 0 and eps 0 (a flushed subnormal) the folded
    # s = inf is stored as 3.4e38 and the shift beta - mean·s = ∓inf as ∓3.4e38, so x·s + shift is
    # finite (±1.7e38), ±inf or 0 instead of the fold's NaN. Measured on
    # cases/numerics/denormal-moving-variance-inference-eps-0 (docs/repro/tflite_inf_constants.py).
    Variant("folded-inf-saturated", "y = x·s + (beta - mean·s) in float32, an infinite s or shift stored "
            "as ±float32 max", lambda p, c: c in ("training", "inference"),
            lambda p: [{"normalize_folded": True, "compute_dtype": "float32", "folded_inf_saturated": True,
                        # folded into a preceding layer for 2-D to 4-D models (a CONV_3D keeps MUL, ADD)
                        "folded_into_layer": "shifted" if p.preceding is not None and p.rank < 5 else None}]
            if p.dtype == "float32" else []),
    # torch's fuse_conv_bn_eval and the ONNX exporters' Conv+BN fusion fold BN into the layer before
    # it: W' = W·s, b' = (b - mean)·s + beta (torch/nn/utils/fusion.py fuse_conv_bn_weights), so
    # with s = inf (moving variance 0, eps 0) a weight of 0 gives NaN and the layer's sum meets ±inf
    # terms: NaN or ±inf per output, not (z - mean)/0. Measured on cases/export/preceding-folded-*.
    # OpenVINO does the same to an exported model's Mul and Add (b·s + shift) or BatchNormalization
    # node (centred), and after a Conv1D's Squeeze moves only the bias (scale-after):
    # docs/repro/openvino_inf_constants.py.
    Variant("folded-into-layer", "BN folded into the preceding layer: W' = W·s, b' = (b - mean)·s + beta "
            "or b·s + (beta - mean·s), in the compute dtype",
            lambda p, c: c in ("training", "inference") and p.preceding is not None, _into_layer),
    # Every framework here but torch: with no samples the statistics are NaN and dL/dgamma, computed
    # through them, is NaN; the reference's sum over no elements is 0 (torch returns early, 0).
    Variant("empty-gamma-gradient-nan", "dL/dgamma of an empty batch is NaN (through NaN statistics)",
            lambda p, c: c == "gradients" and p.scale and p.batches[-1].size == 0,
            {"empty_gamma_gradient_nan": True}),
    # Keras 3's torch backend (keras/src/backend/torch/nn.py moments, L976-982): no clamp, so a variance
    # that cancels below -eps gives NaN. Which channels go negative depends on the summation order, so
    # where the true variance + eps lies inside the cancellation error the outputs are not compared
    # (`undetermined`, as for the clamped form, whose variance there is noise or 0); everywhere else it
    # is judged as variance-sum-of-squares.
    Variant("variance-sum-of-squares-unclamped", "E[x²] - E[x]², not clamped at 0 (NaN below -eps)",
            _batch_stats, {"variance": "sum-of-squares-unclamped"}),
    # Keras 3's torch backend on a 1-D input: ops.moments reduces axes=() with torch.mean(dim=()),
    # which reduces every axis, so the whole vector shares one mean and variance.
    Variant("reduce-all-axes", "statistics over every axis, the channel axes too (one per tensor)",
            lambda p, c: _batch_stats(p, c) and p.rank > 0 and p.gamma.size > 1, {"reduce_all_axes": True}),
    # TF's fused kernel (FusedBatchNormV3 CPU): rest_size_minus_one = rest_size > 1 ? rest_size - 1 : 1.
    Variant("bessel-one-value", "n/(n-1) taken as 1 for one value per channel (unbiased variance 0, not NaN)",
            lambda p, c: c == "training" and any(_count(p, part) == 1 for x in p.batches
                                                 for part in _shards(p, CANONICAL, x)),
            {"bessel_one_value": True}),
    # ONNX attributes are 32-bit floats: a double model runs with float32(epsilon).
    Variant("epsilon-float32", "epsilon held in float32",
            lambda p, c: p.dtype == "float64" and _f32(p.epsilon) != p.epsilon,
            lambda p: [{"epsilon": _f32(p.epsilon)}]),
    # Keras 3 on tensorflow: _renorm_correction_and_moments floors the renorm std at
    # ops.sqrt(ops.cast(self.epsilon, mean.dtype)), and casting the Python float converts it to a
    # float32 tensor first, so a float64 layer's floor is sqrt(float32(eps)) (measured: d off by
    # 2.4e-8 relative with eps 1e-3); the renorm std's own update adds the exact eps.
    Variant("renorm-floor-epsilon-float32", "renorm's floor sqrt(eps) of its std takes eps in float32",
            lambda p, c: c == "training" and p.renorm is not None and p.dtype == "float64"
            and _f32(p.epsilon) != p.epsilon, {"renorm_floor_epsilon_float32": True}),
    Variant("epsilon-outside-sqrt", "y = (x - mean) / (sqrt(var) + eps)",
            lambda p, c: p.epsilon != 0.0, {"epsilon_outside_sqrt": True}),
    Variant("epsilon-1e-3", "epsilon 1e-3 (the TF/Keras default) instead of the case's",
            lambda p, c: p.epsilon != 1e-3, {"epsilon": 1e-3}),
    Variant("epsilon-1e-5", "epsilon 1e-5 (the torch/ONNX/Flax default) instead of the case's",
            lambda p, c: p.epsilon != 1e-5, {"epsilon": 1e-5}),
    # tf_keras ghost batches (batch_normalization.py call(): reshape to [virtual_batch_size, -1, ...],
    # statistics over the first dim) group rows j, j + n/v, ...; the canonical groups are consecutive.
    Variant("ghost-interleaved", "virtual batches of rows j, j + n/v, j + 2n/v, ... not consecutive rows",
            lambda p, c: c in ("training", "gradients") and _interleaving_differs(p),
            {"ghost_interleaved": True}),
    # Keras 3 under tf.distribute.MirroredStrategy: the moving statistics are MirroredVariables with
    # aggregation NONE, so each replica's assign writes its own copy and reading gives replica 0's;
    # a pmap loop that saves flax.jax_utils.unreplicate(state) does the same.
    Variant("replica-0-stats", "unsynchronized replicas: the moving statistics read back are replica 0's",
            lambda p, c: c == "training" and p.replicas is not None and p.replicas.count > 1,
            {"replica_stats": "replica-0"}),
    # tf_keras: ON_READ variables with aggregation MEAN; the Flax ImageNet example's sync_batch_stats.
    # The canonical reading of unsynchronized replicas, so it moves only a synchronized case (a layer
    # that was asked to synchronize and did not).
    Variant("replica-mean-stats", "unsynchronized replicas: the moving statistics read back are the "
            "mean over replicas", lambda p, c: c == "training" and p.replicas is not None
            and p.replicas.count > 1, {"replica_stats": "mean"}),
    Variant("rejects", "the framework raises where the reference computes a value",
            lambda p, c: True, raises=True),
    # its mirror, for `expect_error` cases: linen accepts axis -5 on 4-D input (no range check)
    Variant("accepts", "the framework runs a case the canonical convention rejects",
            lambda p, c: True, raises=True),
]
CATALOGUE: dict[str, Variant] = {v.name: v for v in VARIANTS}

RESERVED: dict[str, str] = {}  # named, not computable: the case fields they need do not exist yet


def apply(declared: list[str], extra: str | None, problem: Problem, check: Check) -> list[Knobs]:
    """Knobs for the declared variants with `extra` on top: one per combination of forms, without
    duplicates. A variant that does not apply here is skipped; a later one overrides an earlier
    one's fields (biased after unbiased: biased). [] when `extra` does not apply or explains an
    exception (rejects): there is nothing to simulate."""
    names = [*declared, *([extra] if extra is not None else [])]
    for name in names:
        if name not in CATALOGUE:
            why = "reserved, not computable yet" if name in RESERVED else "unknown"
            raise ValueError(f"variant {name!r}: {why}")
    if extra is not None and (CATALOGUE[extra].raises or not CATALOGUE[extra].applies(problem, check)):
        return []
    combos: list[dict[str, Any]] = [{}]
    for name in names:
        variant = CATALOGUE[name]
        if variant.applies(problem, check) and not variant.raises:
            forms = variant.forms(problem, check)
            combos = [{**a, **b} for a, b in itertools.product(combos, forms)]
    return list(dict.fromkeys(Knobs(**c) for c in combos))


def simulate_named(problem: Problem, check: Check, declared: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The check's outputs under an adapter's declared variants: the expected values it is held to.
    Declared conventions are exact float64 ones with one form; where a variant has several, the
    first (as listed by `forms`) is used. Outputs they do not touch equal the reference bit for bit."""
    return simulate(problem, check, apply(list(declared), None, problem, check)[0])

