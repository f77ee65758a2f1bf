"""params.preceding: the layer before BN, in the reference, the variants, validation and capabilities."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from adapters.base import Capabilities, Preceding, Problem
from conformance import reference, variants
from conformance.compare import compare, folded_tolerance
from conformance.evaluate import tolerances
from conformance.loader import load_file
from conformance.problem import build, conditioning, folded_magnitudes, input_conditioning

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


def test_equal_inputs_give_equal_outputs_at_every_position():
    """Fuzz case 164cc707: 27 positions of float32(3.2) in all 8 input channels through the row
    below. Each position computes the same sum of the same products, so z is one value, as every
    framework sees it (0/0 for BN with eps 0); a BLAS matmul's blocking gave two values."""
    row = [1e-08, 0.9, 1.0282818780030785e-143, -1.359097441743848, -1.4076185969496011,
           1.3252319952224925, 1.9, -1.4343384329304085e-222]
    layer = Preceding(np.array([row] * 8), np.zeros(8))
    x = np.full((27, 8), float(np.float32(3.2)))
    assert np.unique(layer.apply(x, 1)[:, 0]).size == 1
    assert np.unique(layer.transpose_apply(x, 1)[:, 0]).size == 1


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


def test_folded_magnitude_by_hand():
    """T_i = |gamma_i| (max |W|·|x| + max(|b_i|, |b_i - mean_i|)) / sqrt(var_i + eps), inference:
    the moving statistics. |W|·|x| rows: channel 0 [2+2, 6+1] -> 7, channel 1 [2, 1] -> 2; bias
    terms max(3, |3 - 1|) = 3 and 0; sqrt(var + eps) = [2, 1]: T = [2·10/2, 0.5·2/1] = [10, 1]."""
    p = Problem(case_id="t", dtype="float32", batches=(np.array([[1.0, 2.0], [-3.0, 1.0]]),), axes=(1,),
                momentum=0.9, epsilon=1.0, center=True, scale=True, gamma=np.array([2.0, -0.5]),
                beta=np.zeros(2), moving_mean=np.array([1.0, 0.0]), moving_variance=np.array([3.0, 0.0]),
                preceding=Preceding(np.array([[2.0, -1.0], [0.0, 1.0]]), np.array([3.0, 0.0])))
    np.testing.assert_allclose(folded_magnitudes(p, "inference"), [10.0, 1.0])
    # training also counts the batch's statistics and those after the step: never below inference's
    assert np.all(folded_magnitudes(p, "training") >= folded_magnitudes(p, "inference"))


def test_folded_outputs_are_held_per_channel():
    """The same error passes in a channel of large products and fails in one of small products."""
    tol = folded_tolerance("float32", np.array([10.0, 1.0]), axis=1, ndim=2)
    expected = np.zeros((2, 2))
    error = 5e-5  # within 1e-5 x (1 + 10), beyond 1e-5 x (1 + 1)
    assert compare("y", expected, np.array([[error, 0.0], [0.0, 0.0]]), "float32", tol).passed
    failed = compare("y", expected, np.array([[0.0, error], [0.0, 0.0]]), "float32", tol)
    assert not failed.passed and failed.worst_index == [0, 1] and failed.atol == pytest.approx(2e-5)
    assert compare("y", np.zeros((0, 0)), np.zeros((0, 0)), "float32",  # no channels (fuzz, seed 7)
                   folded_tolerance("float32", np.zeros(0), axis=1, ndim=2)).passed


def test_only_folded_outputs_get_the_per_channel_tolerance(write_case):
    """y of training and inference; not the statistics, and not dL/dx (Wᵀ mixes the channels)."""
    (case,), _ = load_file(write_case("p.yaml", CASE))
    case = case.case
    for check, folded in (("training", {"output", "inference_output"}), ("inference", {"output"}),
                          ("gradients", set())):
        problem_ = build(case, check)
        tol, per_output = tolerances(problem_, check, conditioning(case, check, problem_), case)
        assert {name for name, t in per_output.items() if np.ndim(t.rtol)} == folded
        assert np.ndim(tol.rtol) == 0 and ("folded, per channel" in tol.rule) == bool(folded)
