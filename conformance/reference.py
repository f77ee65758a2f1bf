"""The float64 NumPy reference every expected value comes from.

Plain formulas, written to be read next to the papers and framework docs:

    y = gamma * (x - mean) / sqrt(var + eps) + beta      (training: batch mean, biased variance)
    moving = m * moving + (1 - m) * batch_stat            (decay form, momentum m)
    moving = (1 - 1/t) * moving + (1/t) * batch_stat      (momentum null: average of the t batches)

Statistics reduce over every axis except the channel axes, with the two-pass algorithm. A case with
`preceding` (a 1x1 convolution / dense layer before BN) applies it first, in float64: BN's input is
z = W·x + b along the channel axis, and dL/dx = Wᵀ·dL/dz.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import numpy as np

from adapters.base import Problem, to_ascending, to_case_order
from conformance.outputs import CHECKS


def reduce_axes(rank: int, channel_axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d for d in range(rank) if d not in channel_axes)


def to_channels(stat: np.ndarray, channel_axes: tuple[int, ...]) -> np.ndarray:
    """A statistic reduced with keepdims, laid out in the case's channel-axis order."""
    return to_case_order(stat.squeeze(axis=reduce_axes(stat.ndim, channel_axes)), channel_axes)


def broadcastable(per_channel: np.ndarray, rank: int, channel_axes: tuple[int, ...]) -> np.ndarray:
    """A per-channel array (case axis order) reshaped to broadcast against the input."""
    in_axis_order = to_ascending(per_channel, channel_axes)
    shape = [1] * rank
    for axis, size in zip(sorted(channel_axes), in_axis_order.shape, strict=True):
        shape[axis] = size
    return in_axis_order.reshape(shape)


def moments(x: np.ndarray, channel_axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, int]:
    """Batch mean and biased variance per channel (two-pass), and the count behind each."""
    axes = reduce_axes(x.ndim, channel_axes)
    with warnings.catch_warnings():  # an empty batch has no statistics: NaN, by design
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = x.mean(axis=axes, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    count = int(np.prod([x.shape[a] for a in axes]))
    return to_channels(mean, channel_axes), to_channels(var, channel_axes), count


def unbiased(var: np.ndarray, count: int) -> np.ndarray:
    """Bessel's correction n/(n-1); undefined (NaN) for a single element per channel."""
    if count < 2:
        return np.full_like(var, np.nan)
    return var * count / (count - 1)


def normalize(x: np.ndarray, p: Problem, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    axes = p.channel_axes

    def b(v: np.ndarray) -> np.ndarray:
        return broadcastable(v, x.ndim, axes)

    with np.errstate(divide="ignore", invalid="ignore"):
        return b(p.gamma) * (x - b(mean)) / np.sqrt(b(var) + p.epsilon) + b(p.beta)


def update(moving: np.ndarray, batch: np.ndarray, momentum: float | None, step: int) -> np.ndarray:
    """One moving-average update; `step` counts from 1."""
    m = 1.0 - 1.0 / step if momentum is None else momentum
    return m * moving + (1.0 - m) * batch


@dataclass
class TrainingReference:
    output: np.ndarray
    batch_mean: np.ndarray
    batch_variance: np.ndarray
    moving_mean: np.ndarray
    moving_variance: np.ndarray  # every update with the biased batch variance
    moving_variance_unbiased: np.ndarray  # every update with the Bessel-corrected one
    inference_output: np.ndarray  # the last batch, normalized with the state after training
    inference_output_unbiased: np.ndarray  # the same with the unbiased moving variance
    batch_variance_unbiased: np.ndarray


def bn_input(p: Problem) -> Problem:
    """The problem BN itself sees: with a preceding layer, the batches are that layer's float64
    outputs (and no preceding layer is left); otherwise `p`."""
    if p.preceding is None:
        return p
    axis = p.channel_axes[0]
    return replace(p, batches=tuple(p.preceding.apply(x, axis) for x in p.batches), preceding=None)


def train(p: Problem) -> TrainingReference:
    p = bn_input(p)
    moving_mean, moving_var, moving_var_unbiased = p.moving_mean, p.moving_variance, p.moving_variance
    for step, x in enumerate(p.batches, start=1):
        mean, var, count = moments(x, p.channel_axes)
        output = normalize(x, p, mean, var)
        moving_mean = update(moving_mean, mean, p.momentum, step)
        moving_var = update(moving_var, var, p.momentum, step)
        moving_var_unbiased = update(moving_var_unbiased, unbiased(var, count), p.momentum, step)
    return TrainingReference(
        output=output,
        batch_mean=mean,
        batch_variance=var,
        moving_mean=moving_mean,
        moving_variance=moving_var,
        moving_variance_unbiased=moving_var_unbiased,
        inference_output=normalize(p.batches[-1], p, moving_mean, moving_var),
        inference_output_unbiased=normalize(p.batches[-1], p, moving_mean, moving_var_unbiased),
        batch_variance_unbiased=unbiased(var, count),
    )


def infer(p: Problem) -> np.ndarray:
    p = bn_input(p)
    return normalize(p.batches[-1], p, p.moving_mean, p.moving_variance)


def gradients(p: Problem) -> dict[str, np.ndarray]:
    """Closed-form gradients of sum(upstream * y) for a training-mode forward of the last batch.

    With xhat = (x - mean) / s, s = sqrt(var + eps), and means over the reduced axes:
        dbeta = sum(dy),  dgamma = sum(dy * xhat),
        dx = gamma / s * (dy - mean(dy) - xhat * mean(dy * xhat))
    """
    preceding, p = p.preceding, bn_input(p)
    x, dy = p.batches[-1], p.upstream
    assert dy is not None, "gradients need an upstream gradient"
    axes = p.channel_axes
    red = reduce_axes(x.ndim, axes)
    mean, var, _ = moments(x, axes)

    def b(v: np.ndarray) -> np.ndarray:
        return broadcastable(v, x.ndim, axes)

    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an empty batch: means of nothing are NaN
        inv_std = 1.0 / np.sqrt(b(var) + p.epsilon)
        xhat = (x - b(mean)) * inv_std
        dx = b(p.gamma) * inv_std * (
            dy - dy.mean(axis=red, keepdims=True)
            - xhat * (dy * xhat).mean(axis=red, keepdims=True)
        )
    return {
        "input": dx if preceding is None else preceding.transpose_apply(dx, axes[0]),
        "gamma": to_channels((dy * xhat).sum(axis=red, keepdims=True), axes),
        "beta": to_channels(dy.sum(axis=red, keepdims=True), axes),
    }


def outputs(p: Problem, check: str) -> dict[str, np.ndarray]:
    """Every output of a check by its name in `conformance.outputs` (training adds the reference's
    own `*_unbiased` tracks, which tests/test_variants.py holds the variants' simulation to). A
    check is computed by the formula of the adapter method that runs it (the problem already holds
    the batches it feeds)."""
    method = CHECKS[check].method
    if method == "train":
        return vars(train(p))
    if method == "gradients":
        return gradients(p)
    return {"output": infer(p)}
