"""params.preceding: the layer before BN, in the reference, the variants, validation and capabilities."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from adapters.base import Capabilities, Preceding, Problem
from conformance import reference, variants
from conformance.loader import load_file
from conformance.problem import input_conditioning

CASE = """\
id: pre
input: {shape: [4, 3, 2], random: {seed: 3}}
params:
  axis: 1
  preceding: {weight: [[1, 2, 0], [0, 1, 0], [0.5, 0, -1]], bias: [1, 0, -1]}
training: {gradients: {upstream: {random: {seed: 4}}}}
inference: {}
"""


def problem(weight: np.ndarray, bias: np.ndarray, axis: int = 1) -> Problem:
    rng = np.random.default_rng(0)
    shape = (5, 3, 2) if axis == 1 else (5, 2, 3)
    return Problem(case_id="t", dtype="float64", batches=(rng.normal(1, 2, shape), rng.normal(0, 1, shape)),
                   axes=(axis,), momentum=0.9, epsilon=1e-3, center=True, scale=True,
                   gamma=rng.normal(size=3), beta=rng.normal(size=3), moving_mean=rng.normal(size=3),
                   moving_variance=rng.uniform(0.5, 2, 3), upstream=rng.normal(size=shape),
                   preceding=Preceding(weight, bias))


W = np.array([[1.0, 2.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, -1.0]])
B = np.array([1.0, 0.0, -1.0])


@pytest.mark.parametrize("axis", [1, -1])
def test_bn_sees_the_preceding_layers_output(axis):
    p = problem(W, B, axis)
    moved = [np.moveaxis(x, axis, -1) @ W.T + B for x in p.batches]
    plain = replace(p, batches=tuple(np.moveaxis(z, -1, axis) for z in moved), preceding=None)
    got, want = reference.train(p), reference.train(plain)
    for name in ("output", "moving_mean", "moving_variance", "inference_output"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-13)
    np.testing.assert_allclose(reference.infer(p), reference.infer(plain), rtol=1e-13)


def test_identity_preceding_changes_nothing():
    p = problem(np.eye(3), np.zeros(3))
    for check in ("training", "inference", "gradients"):
        got, want = reference.outputs(p, check), reference.outputs(replace(p, preceding=None), check)
        for name, value in want.items():
            # the same values; a transposed copy may sum in another order (last bits)
            np.testing.assert_allclose(got[name], value, rtol=1e-13, atol=1e-14)


def test_input_gradient_goes_back_through_the_weight():
    """dL/dx against central differences of L = sum(upstream * y) over the last batch."""
    p = replace(problem(W, B), batches=problem(W, B).batches[-1:])

    def loss(x: np.ndarray) -> float:
        q = replace(p, batches=(x,))
        return float((q.upstream * reference.train(q).output).sum())

    x, h = p.batches[0], 1e-6
    numeric = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[i] = h
        numeric[i] = (loss(x + step) - loss(x - step)) / (2 * h)
    np.testing.assert_allclose(reference.gradients(p)["input"], numeric, rtol=1e-6, atol=1e-7)


def test_variants_simulate_through_it():
    p = problem(W, B)
    for check in ("training", "inference", "gradients"):
        canonical = variants.simulate(p, check)
        for name, value in reference.outputs(p, check).items():
            if name in canonical:
                np.testing.assert_allclose(canonical[name], value, rtol=1e-12, atol=1e-14)


def test_conditioning_counts_the_products():
    """Cancelling products (z near its mean, |W|·|x| large) raise c above the plain |mean|/std."""
    p = problem(np.array([[100.0, -100.0, 0], [0, 1, 0], [0, 0, 1]]), np.zeros(3))
    close = [x.copy() for x in p.batches]
    for x in close:  # channel 1 within 1e-3 of channel 0: their difference cancels
        x[:, 1] = x[:, 0] + 1e-3 * np.random.default_rng(1).normal(size=x[:, 0].shape)
    p = replace(p, batches=tuple(close))
    plain = replace(reference.bn_input(p), preceding=None)
    assert input_conditioning(p) > 10 * input_conditioning(plain)


def test_an_adapter_without_the_feature_reports_it():
    reason = Capabilities().missing(problem(W, B), "inference")
    assert reason == "a preceding 1x1 convolution / dense layer (params.preceding) is not supported"


def test_validation_names_the_field(write_case):
    loaded, errors = load_file(write_case("p.yaml", CASE))
    assert not errors and loaded[0].case.params.preceding is not None
    _, errors = load_file(write_case("bad.yaml", CASE.replace("[0.5, 0, -1]", "[0.5, 0]")))
    assert any("preceding.weight" in str(e) and "channels x channels" in str(e) for e in errors)
    _, errors = load_file(write_case("multi.yaml", CASE.replace("axis: 1", "axis: [1, 2]")))
    assert any("preceding" in str(e) and "exactly one channel axis" in str(e) for e in errors)
