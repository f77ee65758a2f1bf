"""Error figures, ULPs and the tolerance rule."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from conformance.compare import DEFAULT_TOLERANCE, compare, held_dtype, tolerance
from conformance.dtypes import round_to, ulp
from conformance.schema import ToleranceOverride


def test_ulp_matches_numpy_spacing():
    values = np.array([1.0, 3.5, 1e-3, 1e4, -2.5])
    for dtype, np_type in [("float32", np.float32), ("float16", np.float16), ("float64", np.float64)]:
        np.testing.assert_array_equal(ulp(values, dtype), np.abs(np.spacing(values.astype(np_type))))


def test_bfloat16_ulp_and_rounding():
    assert ulp(np.array([1.0]), "bfloat16")[0] == 2.0**-7
    assert round_to(np.array([1.0 + 2.0**-9]), "bfloat16")[0] == 1.0
    assert float(ml_dtypes.bfloat16(3.0)) == round_to(np.array([3.0]), "bfloat16")[0]


def test_one_ulp_off_in_float32():
    expected = np.array([1.0, 2.0])
    got = expected + np.array([2.0**-23, 0.0])
    m = compare("output", expected, got, "float32", tolerance("float32", 0.0, None))
    assert m.passed and m.max_ulp == 1.0 and m.worst_index == [0]


def test_failure_reports_worst_element():
    expected = np.zeros((2, 2))
    got = expected.copy()
    got[1, 0] = 0.5
    m = compare("output", expected, got, "float32", tolerance("float32", 0.0, None))
    assert not m.passed and m.worst_index == [1, 0] and m.worst_got == 0.5 and m.max_abs == 0.5


def test_nan_expected_requires_nan_at_the_same_place():
    expected = np.array([np.nan, 1.0])
    tol = tolerance("float32", 0.0, None)
    assert compare("o", expected, np.array([np.nan, 1.0]), "float32", tol).passed
    assert not compare("o", expected, np.array([0.0, 1.0]), "float32", tol).passed
    assert not compare("o", np.array([0.0, 1.0]), np.array([np.nan, 1.0]), "float32", tol).passed


def test_conditioning_widens_the_default_tolerance():
    t = tolerance("float32", 99.0, None)
    assert math.isclose(t.rtol, DEFAULT_TOLERANCE["float32"] * 100)
    assert "conditioning" in t.rule


def test_override_keeps_its_reason():
    t = tolerance("float32", 0.0, ToleranceOverride(rtol=0.5, reason="large-mean input"))
    assert t.rtol == 0.5 and t.atol == DEFAULT_TOLERANCE["float32"] and "large-mean input" in t.rule


def test_shape_mismatch_fails_with_a_note():
    m = compare("o", np.zeros(3), np.zeros(4), "float32", tolerance("float32", 0, None))
    assert not m.passed and "shape" in m.note


def test_mixed_precision_holds_each_output_to_the_dtype_it_is_kept_in():
    """param_dtype float32 on float16 input: moving statistics and dL/dgamma at float32's tolerance,
    y and dL/dx at float16's, inference after training (stored statistics, float16 output) at the
    coarser; without param_dtype one tolerance serves every output."""
    from conformance.evaluate import tolerances
    from conformance.problem import build
    from conformance.schema import Case

    def case(params: dict) -> Case:
        return Case.model_validate({"id": "m", "dtype": "float16", "params": {"axis": 1, **params},
                                    "input": {"shape": [4, 2], "random": {"seed": 0}},
                                    "training": {"expected": {}}})

    mixed = case({"param_dtype": "float32"})
    tol, per_output = tolerances(build(mixed, "training"), "training", 0.0, mixed)
    assert tol.rtol == 4e-3
    assert set(per_output) == {"moving_mean", "moving_variance", "moving_variance_unbiased"}
    assert per_output["moving_mean"].rtol == 1e-5
    assert held_dtype("both", "float16", "float32") == "float16"
    assert held_dtype("params", "float32", "float16") == "float16"
    plain = case({})
    assert tolerances(build(plain, "training"), "training", 0.0, plain)[1] == {}
