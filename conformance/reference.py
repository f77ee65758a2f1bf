"""The float64 NumPy reference every expected value comes from.

Plain formulas, written to be read next to the papers and framework docs:

    y = gamma * (x - mean) / sqrt(var + eps) + beta      (training: batch mean, biased variance)
    moving = m * moving + (1 - m) * batch_stat            (decay form, momentum m)
    moving = (1 - 1/t) * moving + (1/t) * batch_stat      (momentum null: average of the t batches)

Statistics reduce over every axis except the channel axes, with the two-pass algorithm.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

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


def train(p: Problem) -> TrainingReference:
    if p.replicas is not None and not p.replicas.synchronized:
        return train_unsynchronized(p)
    # synchronized replicas normalize with the whole batch's statistics: one device's BN exactly
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


def train_unsynchronized(p: Problem) -> TrainingReference:
    """Unsynchronized replicas: each shard is normalized with its own statistics and updates its
    replica's own moving statistics; what is read back is their mean over replicas (as a user who
    averages them before evaluating gets). Batch statistics are likewise the mean over replicas.
    The update is linear, so that mean is also the update with the replicas' mean statistics."""
    assert p.replicas is not None
    count = p.replicas.count
    state = [(p.moving_mean, p.moving_variance, p.moving_variance)] * count  # per replica
    for step, x in enumerate(p.batches, start=1):
        outputs, stats, new = [], [], []
        for shard, (mm, mv, mvu) in zip(p.replicas.shards(x), state, strict=True):
            mean, var, n = moments(shard, p.channel_axes)
            outputs.append(normalize(shard, p, mean, var))
            stats.append((mean, var, unbiased(var, n)))
            new.append((update(mm, mean, p.momentum, step), update(mv, var, p.momentum, step),
                        update(mvu, unbiased(var, n), p.momentum, step)))
        state = new

    def over_replicas(values: list[tuple[np.ndarray, ...]], i: int) -> np.ndarray:
        return np.mean([v[i] for v in values], axis=0)

    moving_mean, moving_var, moving_var_unbiased = (over_replicas(state, i) for i in range(3))
    return TrainingReference(
        output=np.concatenate(outputs, axis=0),
        batch_mean=over_replicas(stats, 0),
        batch_variance=over_replicas(stats, 1),
        moving_mean=moving_mean,
        moving_variance=moving_var,
        moving_variance_unbiased=moving_var_unbiased,
        inference_output=normalize(p.batches[-1], p, moving_mean, moving_var),
        inference_output_unbiased=normalize(p.batches[-1], p, moving_mean, moving_var_unbiased),
        batch_variance_unbiased=over_replicas(stats, 2),
    )


def infer(p: Problem) -> np.ndarray:
    return normalize(p.batches[-1], p, p.moving_mean, p.moving_variance)


def gradients(p: Problem) -> dict[str, np.ndarray]:
    """Closed-form gradients of sum(upstream * y) for a training-mode forward of the last batch.

    With xhat = (x - mean) / s, s = sqrt(var + eps), and means over the reduced axes:
        dbeta = sum(dy),  dgamma = sum(dy * xhat),
        dx = gamma / s * (dy - mean(dy) - xhat * mean(dy * xhat))
    """
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
        "input": dx,
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
