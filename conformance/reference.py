"""The float64 NumPy reference every expected value comes from.

Plain formulas, written to be read next to the papers and framework docs:

    y = gamma * (x - mean) / sqrt(var + eps) + beta      (training: batch mean, biased variance)
    moving = m * moving + (1 - m) * batch_stat            (decay form, momentum m)
    moving = (1 - 1/t) * moving + (1/t) * batch_stat      (momentum null: average of the t batches)

Statistics reduce over every axis except the channel axes, with the two-pass algorithm.

Optional features (docs/case-format.md):

- virtual_batch_size v (ghost batches): axis 0 is cut into consecutive virtual batches of v rows
  (rows 0..v-1 first); each is normalized with its own statistics. The step's statistics, which
  renorm and the moving update use and batch_mean / batch_variance report, are the averages over
  the virtual batches of their means and (biased, or for the unbiased track unbiased) variances:
  one moving update per step, as tf_keras does (batch_normalization.py, "new_mean =
  tf.reduce_mean(mean, axis=1)").
- renorm (Ioffe 2017, as tf_keras and Keras 3 implement it): with sigma_B = sqrt(var + eps) and
  the renorm statistics mu_r, sigma_r (starting at moving_mean and sqrt(moving_variance)),
      s = max(sigma_r, sqrt(eps)),  r = clip(sigma_B / s, rmin, rmax),  d = clip((mu_B - mu_r) / s, +-dmax)
      y = gamma * (r * xhat + d) + beta                     (r and d are constants for gradients)
      mu_r = rho * mu_r + (1 - rho) * mu_B,  sigma_r = rho * sigma_r + (1 - rho) * sigma_B
  The moving statistics keep a standard deviation sigma_m (starting at sqrt(moving_variance)):
      sigma_m = m * sigma_m + (1 - m) * sigma_B,  moving_variance = max(sigma_m**2 - eps, 0)
  so inference, sqrt(moving_variance + eps), divides by sigma_m as the paper does.
- adjustment (scale a, bias b; training only): y = gamma * (a * (r * xhat + d) + b) + beta.
- track_running_stats false: no moving statistics; inference normalizes with the statistics of
  the batch it is given (over the whole batch).
- preceding (a 1x1 convolution / dense layer before BN) is applied first, in float64: BN's input is
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


def exact_mean(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """x.mean over `axes` (keepdims), but a channel whose values are all equal gets that value, as
    exact arithmetic gives it: the float64 mean of n copies need not be the copy (54 copies of
    10000.1, 8 of 3.2), and a residue there would make the reference's own 0/0 a ±1 and its moving
    variance after momentum 0 a d² instead of 0. NaN for an empty batch, by design."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = x.mean(axis=axes, keepdims=True)
    if x.size == 0:
        return mean
    top = x.max(axis=axes, keepdims=True)
    return np.where(top == x.min(axis=axes, keepdims=True), top, mean)


def moments(x: np.ndarray, channel_axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, int]:
    """Batch mean and biased variance per channel (two-pass), and the count behind each."""
    axes = reduce_axes(x.ndim, channel_axes)
    with warnings.catch_warnings():  # an empty batch has no statistics: NaN, by design
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = exact_mean(x, axes)
        var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    count = int(np.prod([x.shape[a] for a in axes]))
    return to_channels(mean, channel_axes), to_channels(var, channel_axes), count


def constant_channels(x: np.ndarray, channel_axes: tuple[int, ...]) -> np.ndarray:
    """Per channel: more than one value, all equal (what `exact_mean` gives its value as the mean,
    and exact arithmetic 0/0 at eps 0). By the values, not `var == 0`, which a spread of 1e-170
    also underflows to."""
    red = reduce_axes(x.ndim, channel_axes)
    count = int(np.prod([x.shape[a] for a in red]))
    if count < 2:
        return np.zeros([x.shape[a] for a in channel_axes], bool)
    return to_channels(x.max(axis=red, keepdims=True) == x.min(axis=red, keepdims=True), channel_axes)


def unbiased(var: np.ndarray, count: int) -> np.ndarray:
    """Bessel's correction n/(n-1); undefined (NaN) for a single element per channel."""
    if count < 2:
        return np.full_like(var, np.nan)
    return var * count / (count - 1)


def normalize(x: np.ndarray, p: Problem, mean: np.ndarray, var: np.ndarray,
              affine: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """gamma * (x - mean) / sqrt(var + eps) + beta; `affine` replaces (gamma, beta) (`training_affine`)."""
    axes = p.channel_axes
    gamma, beta = (p.gamma, p.beta) if affine is None else affine

    def b(v: np.ndarray) -> np.ndarray:
        return broadcastable(v, x.ndim, axes)

    with np.errstate(divide="ignore", invalid="ignore"):
        return b(gamma) * (x - b(mean)) / np.sqrt(b(var) + p.epsilon) + b(beta)


def virtual_batches(n: int, v: int | None, interleaved: bool = False) -> list[slice]:
    """The rows of axis 0 each (ghost) batch takes: all of them without `v`; else n/v batches of v
    consecutive rows, or, `interleaved` (the ghost-interleaved variant: tf_keras reshapes to
    [v, n/v, ...] and reduces over the first dim), rows j, j + n/v, j + 2n/v, ..."""
    if v is None or n == 0:
        return [slice(None)]
    k = n // v
    return [slice(j, None, k) if interleaved else slice(j * v, (j + 1) * v) for j in range(k)]


def normalized_together(n: int, p: Problem) -> list[slice]:
    """Every group of a batch's n rows some adapter normalizes with one set of statistics, for
    tolerances: the whole batch, or each virtual batch, consecutive or interleaved
    (ghost-interleaved), and each unsynchronized replica's shard (its own statistics, canonically)."""
    v, replicas = p.virtual_batch_size, p.replicas
    groups = [slice(None)] if v is None else [*virtual_batches(n, v), *virtual_batches(n, v, True)]
    if replicas is not None and not replicas.synchronized and replicas.count > 1:
        groups += replicas.slices(n)
    return groups


def batch_moments(x: np.ndarray, p: Problem) -> tuple[list[slice], list[tuple[np.ndarray, np.ndarray, int]]]:
    """A training step's virtual batches of `x` and each one's moments: what it normalizes each with."""
    groups = virtual_batches(x.shape[0], p.virtual_batch_size)
    return groups, [moments(x[g], p.channel_axes) for g in groups]


def pooled(parts: list[tuple[np.ndarray, np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The step's batch statistics from its virtual batches' moments: mean, biased and unbiased
    variance, each averaged over the virtual batches (the unbiased one corrected per part)."""
    return (average([m for m, _, _ in parts]), average([v for _, v, _ in parts]),
            average([unbiased(v, n) for _, v, n in parts]))


def average(parts: list[np.ndarray]) -> np.ndarray:
    """The mean over virtual batches (one batch: itself, bit for bit)."""
    return parts[0] if len(parts) == 1 else np.mean(parts, axis=0)


def renorm_correction(p: Problem, mean: np.ndarray, var: np.ndarray, renorm_mean: np.ndarray,
                      renorm_stddev: np.ndarray, floor_epsilon: float | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(r, d) of batch renormalization, clipped (see the module docstring); `floor_epsilon`, where
    a variant says so, replaces eps in the floor sqrt(eps) of the renorm standard deviation."""
    assert p.renorm is not None
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.maximum(renorm_stddev, np.sqrt(p.epsilon if floor_epsilon is None else floor_epsilon))
        r = np.sqrt(var + p.epsilon) / s
        d = (mean - renorm_mean) / s
    c = p.renorm
    r = r if c.rmin is None else np.maximum(r, c.rmin)
    r = r if c.rmax is None else np.minimum(r, c.rmax)
    d = d if c.dmax is None else np.clip(d, -c.dmax, c.dmax)
    return r, d


def training_affine(p: Problem, rd: tuple[np.ndarray, np.ndarray] | None,
                    ) -> tuple[np.ndarray, np.ndarray] | None:
    """gamma * (a * (r * xhat + d) + b) + beta as one scale and offset on xhat; None without renorm
    and adjustment (plain gamma and beta)."""
    if rd is None and p.adjustment is None:
        return None
    r, d, a, b = corrections(p, rd)
    return p.gamma * a * r, p.gamma * (a * d + b) + p.beta


def corrections(p: Problem, rd: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, ...]:
    """(r, d, adjustment scale, adjustment bias) per channel; ones and zeros where not used."""
    ones, zeros = np.ones_like(p.gamma), np.zeros_like(p.gamma)
    r, d = (ones, zeros) if rd is None else rd
    a, b = (p.adjustment.scale, p.adjustment.bias) if p.adjustment is not None else (ones, zeros)
    return r, d, a, b


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
    renorm_mean: np.ndarray | None = None  # with renorm: mu_r and sigma_r after the last step
    renorm_stddev: np.ndarray | None = None


def bn_input(p: Problem) -> Problem:
    """The problem BN itself sees: with a preceding layer, the batches are that layer's float64
    outputs (and no preceding layer is left); otherwise `p`."""
    if p.preceding is None:
        return p
    axis = p.channel_axes[0]
    return replace(p, batches=tuple(p.preceding.apply(x, axis) for x in p.batches), preceding=None)


def train(p: Problem) -> TrainingReference:
    p = bn_input(p)
    if p.replicas is not None and not p.replicas.synchronized:
        return train_unsynchronized(p)
    # synchronized replicas normalize with the whole batch's statistics: one device's BN exactly
    moving_mean, moving_var, moving_var_unbiased = p.moving_mean, p.moving_variance, p.moving_variance
    renorm_mean, renorm_std = p.moving_mean, np.sqrt(p.moving_variance)
    moving_std, moving_std_unbiased = renorm_std, renorm_std
    for step, x in enumerate(p.batches, start=1):
        groups, parts = batch_moments(x, p)
        mean, var, var_unbiased = pooled(parts)
        rd = None if p.renorm is None else renorm_correction(p, mean, var, renorm_mean, renorm_std)
        affine = training_affine(p, rd)
        output = np.empty_like(x)
        for g, (m, v, _) in zip(groups, parts, strict=True):
            output[g] = normalize(x[g], p, m, v, affine)
        moving_mean = update(moving_mean, mean, p.momentum, step)
        if p.renorm is None:
            moving_var = update(moving_var, var, p.momentum, step)
            moving_var_unbiased = update(moving_var_unbiased, var_unbiased, p.momentum, step)
        else:
            renorm_mean = update(renorm_mean, mean, p.renorm.momentum, step)
            renorm_std = update(renorm_std, np.sqrt(var + p.epsilon), p.renorm.momentum, step)
            moving_std = update(moving_std, np.sqrt(var + p.epsilon), p.momentum, step)
            moving_std_unbiased = update(moving_std_unbiased, np.sqrt(var_unbiased + p.epsilon),
                                         p.momentum, step)
            moving_var = np.maximum(moving_std * moving_std - p.epsilon, 0.0)
            moving_var_unbiased = np.maximum(moving_std_unbiased * moving_std_unbiased - p.epsilon, 0.0)
    last = p.batches[-1]
    if p.track_running_stats:
        inference_output = normalize(last, p, moving_mean, moving_var)
        inference_output_unbiased = normalize(last, p, moving_mean, moving_var_unbiased)
    else:
        inference_output = inference_output_unbiased = normalize(last, p, *moments(last, p.channel_axes)[:2])
    return TrainingReference(
        output=output,
        batch_mean=mean,
        batch_variance=var,
        moving_mean=moving_mean,
        moving_variance=moving_var,
        moving_variance_unbiased=moving_var_unbiased,
        inference_output=inference_output,
        inference_output_unbiased=inference_output_unbiased,
        batch_variance_unbiased=var_unbiased,
        **({} if p.renorm is None else {"renorm_mean": renorm_mean, "renorm_stddev": renorm_std}),
    )


def train_unsynchronized(p: Problem) -> TrainingReference:
    """Unsynchronized replicas: each replica trains one device's BN on its own shard of every batch;
    what is read back is the mean over replicas of their moving statistics (as a user who averages
    them before evaluating gets). Batch statistics are likewise the mean over replicas. The update
    is linear, so that mean is also the update with the replicas' mean statistics."""
    assert p.replicas is not None
    r = p.replicas
    runs = [train(replace(p, batches=tuple(r.shards(x)[i] for x in p.batches), replicas=None))
            for i in range(r.count)]

    def over_replicas(name: str) -> np.ndarray:
        return np.mean([getattr(run, name) for run in runs], axis=0)

    moving_mean, moving_var, moving_var_unbiased = (
        over_replicas(name) for name in ("moving_mean", "moving_variance", "moving_variance_unbiased"))
    return TrainingReference(
        output=np.concatenate([run.output for run in runs], axis=0),
        batch_mean=over_replicas("batch_mean"),
        batch_variance=over_replicas("batch_variance"),
        moving_mean=moving_mean,
        moving_variance=moving_var,
        moving_variance_unbiased=moving_var_unbiased,
        inference_output=normalize(p.batches[-1], p, moving_mean, moving_var),
        inference_output_unbiased=normalize(p.batches[-1], p, moving_mean, moving_var_unbiased),
        batch_variance_unbiased=over_replicas("batch_variance_unbiased"),
    )


def infer(p: Problem) -> np.ndarray:
    """With moving statistics: those of the case. Without (track_running_stats false): the batch's."""
    p = bn_input(p)
    x = p.batches[-1]
    if not p.track_running_stats:
        return normalize(x, p, *moments(x, p.channel_axes)[:2])
    return normalize(x, p, p.moving_mean, p.moving_variance)


def gradients(p: Problem) -> dict[str, np.ndarray]:
    """Closed-form gradients of sum(upstream * y) for a training-mode forward of the last batch.

    With xhat = (x - mean) / s, s = sqrt(var + eps), and means over the reduced axes:
        dbeta = sum(dy),  dgamma = sum(dy * xhat),
        dx = gamma / s * (dy - mean(dy) - xhat * mean(dy * xhat))
    Ghost batches: each virtual batch by this formula with its own statistics. Renorm and
    adjustment (r, d constants): y = G * xhat + B with G = gamma * a * r, so dx uses G for gamma,
    and dgamma = sum(dy * (a * (r * xhat + d) + b)).
    """
    preceding, p = p.preceding, bn_input(p)
    x, dy = p.batches[-1], p.upstream
    assert dy is not None, "gradients need an upstream gradient"
    axes = p.channel_axes
    red = reduce_axes(x.ndim, axes)
    groups = virtual_batches(x.shape[0], p.virtual_batch_size)
    parts = [moments(x[g], axes) for g in groups]
    rd = None
    if p.renorm is not None:
        mean, var = average([m for m, _, _ in parts]), average([v for _, v, _ in parts])
        rd = renorm_correction(p, mean, var, p.moving_mean, np.sqrt(p.moving_variance))
    affine = training_affine(p, rd)
    gamma = p.gamma if affine is None else affine[0]

    def b(v: np.ndarray) -> np.ndarray:
        return broadcastable(v, x.ndim, axes)

    xhat, dx = np.empty_like(x), np.empty_like(x)
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an empty batch: means of nothing are NaN
        for g, (mean, var, _) in zip(groups, parts, strict=True):
            inv_std = 1.0 / np.sqrt(b(var) + p.epsilon)
            xhat[g] = (x[g] - b(mean)) * inv_std
            dx[g] = b(gamma) * inv_std * (
                dy[g] - dy[g].mean(axis=red, keepdims=True)
                - xhat[g] * (dy[g] * xhat[g]).mean(axis=red, keepdims=True)
            )
    z = xhat  # what gamma multiplies
    if affine is not None:
        r, d, a, c = corrections(p, rd)
        z = b(a) * (b(r) * xhat + b(d)) + b(c)
    return {
        "input": dx if preceding is None else preceding.transpose_apply(dx, axes[0]),
        "gamma": to_channels((dy * z).sum(axis=red, keepdims=True), axes),
        "beta": to_channels(dy.sum(axis=red, keepdims=True), axes),
    }


def outputs(p: Problem, check: str) -> dict[str, np.ndarray]:
    """Every output of a check by its name in `conformance.outputs` (training adds the reference's
    own `*_unbiased` tracks, which tests/test_variants.py holds the variants' simulation to). A
    check is computed by the formula of the adapter method that runs it (the problem already holds
    the batches it feeds)."""
    method = CHECKS[check].method
    if method == "train":  # without renorm there are no renorm statistics (None): not an output
        return {name: value for name, value in vars(train(p)).items() if value is not None}
    if method == "gradients":
        return gradients(p)
    return {"output": infer(p)}
