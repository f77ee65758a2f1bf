"""From a validated case to the `Problem` an adapter runs and the expected values it is held to."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from adapters.base import Check, Problem
from conformance import reference
from conformance.cases import Case, as_array, make_array, per_channel

TRAINING_FIELDS = ("output", "batch_mean", "batch_variance", "moving_mean", "moving_variance",
                   "moving_variance_unbiased", "inference_output")
GRADIENT_FIELDS = ("input", "gamma", "beta")


def channel_shape(case: Case) -> tuple[int, ...]:
    shape = case.tensors[0].shape
    axes = case.params.axis if isinstance(case.params.axis, list) else [case.params.axis]
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
        for array in value if isinstance(value, tuple) else (value,):
            if isinstance(array, np.ndarray):
                array.setflags(write=False)
    return problem


def _build(case: Case, check: Check) -> Problem:
    dtype = case.dtype
    tensors = [make_array(t, tuple(t.shape), dtype) for t in case.tensors]
    if check == "inference":
        batches = (tensors[-1],)
    else:
        fed = tuple(tensors[i % len(tensors)] for i in range(case.steps))
        batches = fed if check == "training" else fed[-1:]
    channels = channel_shape(case)
    p = case.params
    upstream = None
    if check == "gradients":
        assert case.training is not None and case.training.gradients is not None
        upstream = make_array(case.training.gradients.upstream, batches[-1].shape, dtype)
    infer_after = bool(check == "training" and case.training is not None
                       and case.training.expected.inference_output is not None)
    return Problem(
        case_id=case.id,
        dtype=dtype,
        batches=batches,
        axes=tuple(p.axis if isinstance(p.axis, list) else [p.axis]),
        momentum=p.momentum,
        epsilon=p.epsilon,
        center=p.center,
        scale=p.scale,
        gamma=per_channel(p.gamma, channels, 1.0, dtype),
        beta=per_channel(p.beta, channels, 0.0, dtype),
        moving_mean=per_channel(p.moving_mean, channels, 0.0, dtype),
        moving_variance=per_channel(p.moving_variance, channels, 1.0, dtype),
        upstream=upstream,
        infer_after_training=infer_after,
    )


@dataclass
class Expected:
    """Expected arrays for one check: from the case, or derived from the reference on demand."""

    given: dict[str, np.ndarray]
    reference: Callable[[], dict[str, np.ndarray]] = field(repr=False)  # computed only if asked

    def get(self, name: str) -> tuple[np.ndarray | None, bool]:
        """(array, derived?): derived means the case left it out and the reference supplied it."""
        if name in self.given:
            return self.given[name], False
        derived = self.reference().get(name)
        return derived, derived is not None


def expected(case: Case, check: Check, problem: Problem) -> Expected:
    """The case's expected values as arrays, converted once per case and check."""
    return case.memo(("expected", check), lambda: _expected(case, check, problem))


def _expected(case: Case, check: Check, problem: Problem) -> Expected:
    given: dict[str, np.ndarray] = {}

    def ref() -> dict[str, np.ndarray]:
        if check != "training" or case.expect_error:
            return {}
        return case.memo("reference-training", lambda: vars(reference.train(problem)))

    if check == "training":
        assert case.training is not None
        shapes = {"output": problem.batches[-1].shape, "inference_output": problem.batches[-1].shape}
        for name in TRAINING_FIELDS:
            values = getattr(case.training.expected, name)
            if values is not None:
                given[name] = as_array(values, shapes.get(name, problem.gamma.shape))
    elif check == "gradients":
        assert case.training is not None and case.training.gradients is not None
        for name in GRADIENT_FIELDS:
            values = getattr(case.training.gradients.expected, name)
            if values is not None:
                shape = problem.batches[-1].shape if name == "input" else problem.gamma.shape
                given[name] = as_array(values, shape)
    else:
        assert case.inference is not None
        if case.inference.expected.output is not None:
            given["output"] = as_array(case.inference.expected.output, problem.batches[-1].shape)
    return Expected(given, ref)


def conditioning(case: Case, check: Check, problem: Problem) -> float:
    """`input_conditioning` of the check's batches, once per case and check."""
    return case.memo(("conditioning", check), lambda: input_conditioning(problem))


def input_conditioning(problem: Problem) -> float:
    """max over channels of |mean| / std of the batches fed: how many digits subtracting the mean
    cancels. Constant channels (std 0) do not count: their output is beta whatever the rounding."""
    worst = 0.0
    for x in problem.batches:
        mean, var, _ = reference.moments(x, problem.channel_axes)
        std = np.sqrt(var)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(std > 0, np.abs(mean) / std, 0.0)
        worst = max(worst, float(np.nanmax(ratio)) if ratio.size else 0.0)
    return worst
