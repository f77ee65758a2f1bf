"""folded-into-layer: BN's folded scale multiplied into the preceding layer, as OpenVINO computes
it (docs/repro/openvino_inf_constants.py measures every value asserted here on the real runtime)."""

from __future__ import annotations

import dataclasses

import numpy as np

from adapters.base import Preceding, Problem
from conformance.variants import CATALOGUE, Knobs, simulate

NAN, INF = np.nan, np.inf


def problem(shape: tuple[int, ...], weight: list[list[float]], bias: list[float], mean: list[float],
            variance: float = 0.0, x: list[list[float]] | None = None) -> Problem:
    """Two channels last, eps 0, gamma 1, beta 0; rows x = [2, -1] and [1, 2] unless given."""
    rows = np.array(x or [[2.0, -1.0], [1.0, 2.0]])
    return Problem(case_id="t", dtype="float32", batches=(rows.reshape(shape),), axes=(len(shape) - 1,),
                   momentum=0.5, epsilon=0.0, center=True, scale=True, gamma=np.ones(2), beta=np.zeros(2),
                   moving_mean=np.array(mean), moving_variance=np.full(2, variance),
                   preceding=Preceding(np.array(weight), np.array(bias)), infer_after_training=True)


def fused(p: Problem, form: str, flush: bool = False) -> np.ndarray:
    knobs = Knobs(normalize_folded=True, compute_dtype="float32", folded_into_layer=form,
                  flush_denormals="float32" if flush else None)
    return simulate(p, "inference", knobs)["output"].reshape(2, 2)


def same(a: np.ndarray, b: list[list[float]]) -> bool:
    return np.array_equal(a, np.array(b), equal_nan=True)


# cases/export/preceding-zero-weight-variance-0-eps-0: z = W·x + b = [[-0.5, 3.25], [2.5, -0.75]]
ZERO_WEIGHT = dict(weight=[[0.0, 1.0], [1.0, -1.0]], bias=[0.5, 0.25], mean=[0.5, -1.0])


def test_a_zero_weight_times_an_infinite_scale_makes_its_channel_nan():
    """W·s = [[0·inf, inf], [inf, -inf]], b' = [0.5·inf - inf, 0.25·inf + inf] = [nan, inf]: channel 0
    is NaN on every row, row 1 of channel 1 is inf - 2·inf = NaN; the exported fold z·s + shift gives
    -inf at [0, 0] and the reference (z - mean)/0 is ±inf everywhere."""
    p = problem((2, 1, 1, 1, 2), **ZERO_WEIGHT)
    for form in ("shifted", "centred"):  # (b - mean)·s + beta = [0·inf, 1.25·inf]: the same here
        assert same(fused(p, form), [[NAN, INF], [NAN, NAN]])
    folded = Knobs(normalize_folded=True, compute_dtype="float32")
    assert same(simulate(p, "inference", folded)["output"].reshape(2, 2), [[-INF, INF], [NAN, NAN]])
    assert same(simulate(p, "inference")["output"].reshape(2, 2), [[-INF, INF], [INF, INF]])


def test_rank_3_keeps_the_scale_after_the_conv():
    """A Conv1D's Squeeze stops the fusion: (W·x)·s + b·s + shift, W·x = [[-1, 3], [2, -1]],
    b' = [0.5·inf + inf, 0.5·inf - inf] = [inf, nan] (the repro's R1), where s in the weights
    makes both channels NaN (W[0][0] = 0, b'[1] = NaN)."""
    p = problem((2, 1, 2), weight=[[0.0, 1.0], [1.0, -1.0]], bias=[0.5, 0.5], mean=[-1.0, 0.5])
    assert same(fused(p, "scale-after"), [[NAN, NAN], [INF, NAN]])
    assert same(fused(p, "shifted"), [[NAN, NAN], [NAN, NAN]])


def test_an_all_zero_bias_is_not_in_the_exported_graph():
    """Zero bias: b' = shift = -mean·s = inf, so positive products give inf, not 0·inf = NaN; one
    zero entry of a non-zero bias is kept, and its 0·inf is NaN."""
    kept = dict(weight=[[1.0, 1.0], [1.0, 1.0]], mean=[-1.0, -1.0], x=[[1.0, 2.0], [2.0, 1.0]])
    assert same(fused(problem((2, 2), bias=[0.0, 0.0], **kept), "shifted"), [[INF, INF], [INF, INF]])
    assert same(fused(problem((2, 2), bias=[0.0, 1.0], **kept), "shifted"), [[NAN, INF], [NAN, INF]])


def test_a_flushed_subnormal_variance_is_an_infinite_scale():
    """A stored 1e-40 read as 0 (denormals-flushed, tf2onnx's constant folding) gives the NaN of
    the zero weight; kept (OpenVINO's own BatchNormalization decomposition), s = 1e20 is finite."""
    p = problem((2, 1, 1, 1, 2), variance=1e-40, **ZERO_WEIGHT)
    assert same(fused(p, "shifted", flush=True), [[NAN, INF], [NAN, NAN]])
    kept = fused(p, "centred")
    assert np.isfinite(kept).all()
    # float32's 1e-40 is 9.99995e-41 (a subnormal keeps 17 bits): s is 1.0000027e20
    np.testing.assert_allclose(kept, simulate(p, "inference")["output"].reshape(2, 2), rtol=1e-5)


def test_the_variant_needs_a_preceding_layer_and_keeps_the_scale_after_a_conv1d_only():
    """Its forms: the bias centred or shifted in each compute dtype, and scale-after on 3-D input."""
    variant = CATALOGUE["folded-into-layer"]
    p = problem((2, 1, 2), **ZERO_WEIGHT)
    ways = [f["folded_into_layer"] for f in variant.forms(p, "inference")]
    assert ways == ["centred", "shifted", "scale-after"]
    assert "scale-after" not in [f["folded_into_layer"] for f in variant.forms(problem((2, 2), **ZERO_WEIGHT),
                                                                                "inference")]
    assert not variant.applies(dataclasses.replace(p, preceding=None), "inference")
