"""float32-saturated: OpenVINO runs a float64 model in float32 between two saturating Converts
(docs/repro/openvino_float64_saturated.py measured every value asserted here on the real runtime)."""

from __future__ import annotations

import dataclasses

import numpy as np

from adapters.base import Preceding, Problem
from conformance.variants import CATALOGUE, Knobs, simulate

MAX = float(np.finfo(np.float32).max)
SATURATED = Knobs(compute_dtype="float32", float32_saturated=True)
FOLDED = dataclasses.replace(SATURATED, folded_into_layer="centred", layer_bias_last=True)


Values = list[float]


def problem(x: list[Values], gamma: Values, beta: Values, mean: Values, variance: Values,
            weight: list[Values] | None = None) -> Problem:
    """float64, channels on axis 1, eps 0; `weight` a preceding layer without bias."""
    c = len(gamma)
    layer = None if weight is None else Preceding(np.array(weight), np.zeros(c))
    return Problem(case_id="t", dtype="float64", batches=(np.array(x),), axes=(1,), momentum=0.9,
                   epsilon=0.0, center=True, scale=True, gamma=np.array(gamma), beta=np.array(beta),
                   moving_mean=np.array(mean), moving_variance=np.array(variance), preceding=layer)


def same(a: np.ndarray, b: list[list[float]]) -> bool:
    return np.array_equal(a, np.array(b), equal_nan=True)


def test_an_infinite_output_goes_out_as_float32_max_and_an_input_past_it_comes_in_so():
    """(x - mean)/0 is ±inf, NaN where x is the mean; 1e300 comes in as 3.4e38; unfolded, so
    x = -0.5 with mean -0.1 is -inf·1, not -0.5·inf + 0.1·inf = NaN as in a float32 model."""
    p = problem([[-2.0, -0.5, 0.5, 2.0], [1e300, -1e300, 0.0, 1.0]], gamma=[1.0, 1.0, 2.0, -1.0],
                beta=[0.5, 0.0, 0.0, 1.0], mean=[0.1, -0.1, 0.0, 0.0], variance=[0.0] * 4)
    y = simulate(p, "inference", SATURATED)["output"]
    assert same(y, [[-MAX, -MAX, MAX, -MAX], [MAX, -MAX, np.nan, -MAX]])
    assert np.isinf(simulate(p, "inference", Knobs(compute_dtype="float32"))["output"][0]).all()


def test_a_finite_float64_output_past_float32_range_is_held_at_max():
    p = problem([[3e38, -3e38, 1e38]], gamma=[2.0] * 3, beta=[0.0] * 3, mean=[0.0] * 3, variance=[1.0] * 3)
    y = simulate(p, "inference", SATURATED)["output"]
    assert y[0, 0] == MAX and y[0, 1] == -MAX and y[0, 2] == np.float32(2e38)


def test_the_exporters_fold_is_saturated_and_summed_before_the_bias():
    """W' = W·inf and b' = -mean·inf are ±max; row 1 of channel 2 sums -0.25·max + max - 0.5·max =
    0.25·max and only then adds b' = -max: -0.75·max = -2.55e38, where starting from b' overflows."""
    p = problem([[0.5, -1.5, 0.75], [0.25, 1.0, -0.5]], gamma=[1.0] * 3, beta=[0.0] * 3,
                mean=[0.25, -0.75, 1.5], variance=[0.0] * 3,
                weight=[[1.0, 2.0, 0.5], [0.5, -1.0, 0.25], [-0.5, 0.25, 1.0]])
    y = simulate(p, "inference", FOLDED)["output"]
    assert same(y, [[-MAX, MAX, -MAX], [MAX, -MAX, np.float32(-2.55211775e38)]])
    first = simulate(p, "inference", dataclasses.replace(FOLDED, layer_bias_last=False))["output"]
    assert first[1, 2] == -MAX


def test_a_constant_subnormal_in_float32_is_read_as_0():
    """gamma 1e-200 over sqrt(1e-320) folds to s = 1e-40, subnormal in float32: W' reads as 0, so an
    input of 3.4e38 adds nothing and the output is b' = beta (measured: 1.18467343, draw 196)."""
    p = problem([[1e39, 0.0]], gamma=[1e-200, 1.0], beta=[1.18467343, 0.0], mean=[0.0, 0.0],
                variance=[1e-320, 1.0], weight=[[0.797, 0.0], [0.0, 1.0]])
    assert simulate(p, "inference", FOLDED)["output"][0, 0] == np.float32(1.18467343)


def test_the_variant_is_float64_only_and_folds_only_with_a_preceding_layer():
    variant = CATALOGUE["float32-saturated"]
    alone = problem([[1.0, 2.0]], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0])
    layered = problem([[1.0, 2.0]], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [[1.0, 0.0], [0.0, 1.0]])
    assert [form.get("folded_into_layer") for form in variant.forms(alone, "inference")] == [None]
    forms = variant.forms(layered, "inference")
    assert [form.get("layer_bias_last") for form in forms] == [None, True, False]
    assert not variant.applies(dataclasses.replace(alone, dtype="float32"), "inference")


def test_the_variant_applies_only_where_saturation_can_show():
    """Elsewhere it is compute-float32 exactly, and is not named beside it: |y| <= A·|gamma|/sqrt(eps)
    + |beta| with A = 2·max(|x|, |mean|) stays far inside float32's range here."""
    variant = CATALOGUE["float32-saturated"]
    ordinary = dataclasses.replace(problem([[1.0, 2.0]], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0]),
                                   epsilon=1e-3)
    assert not variant.applies(ordinary, "inference") and variant.forms(ordinary, "inference") == []
    assert variant.applies(dataclasses.replace(ordinary, epsilon=1e-50), "inference")  # float32 eps 0
    large = dataclasses.replace(ordinary, batches=(np.array([[1e36, 2.0]]),))
    assert variant.applies(large, "inference")  # 2e36·1/sqrt(1e-3) passes a quarter of float32 max
    assert variant.applies(dataclasses.replace(ordinary, batches=(np.array([[1e39, 2.0]]),)), "training")
