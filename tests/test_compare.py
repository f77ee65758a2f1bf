"""Error figures, ULPs and the tolerance rule."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

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


def test_undetermined_accepts_non_finite_or_beta_plus_minus_gamma_and_nothing_else():
    """A 0/0 channel (constant, eps 0): NaN, ±inf or beta ± gamma within tolerance pass and are
    counted as undetermined; a wrong finite value (0, beta + 2·gamma) still fails, as it does
    without the set."""
    from conformance.compare import Undetermined

    beta, gamma = 0.25, -1.78
    expected = np.full(4, np.nan)
    tol = tolerance("float32", 0.0, None)
    zero_over_zero = Undetermined(np.ones(4, bool), (np.full(4, beta + gamma), np.full(4, beta - gamma)),
                                  why="var + eps = 0 (0/0)")
    got = np.array([beta - gamma, beta + gamma + 1e-6, np.nan, -np.inf])
    m = compare("output", expected, got, "float32", tol, undetermined=zero_over_zero)
    assert m.passed and m.undetermined == 4 and "0/0" in m.note
    assert not compare("output", expected, got, "float32", tol).passed  # the set is what accepts it
    for wrong in (0.0, beta + 2 * gamma, beta - gamma + 1e-3):
        m = compare("output", expected, np.full(4, wrong), "float32", tol, undetermined=zero_over_zero)
        assert not m.passed and m.undetermined == 4
    anything = Undetermined(np.array([True, False, False, False]), anything=True, why="stored")
    first, second = np.array([np.inf, 1, 1, 1]), np.array([1, np.inf, 1, 1])
    assert compare("o", np.ones(4), first, "float32", tol, undetermined=anything).passed
    assert not compare("o", np.ones(4), second, "float32", tol, undetermined=anything).passed


def _case(path: str):
    from pathlib import Path

    from conformance.loader import load_one

    return load_one(Path(__file__).parent.parent / path)[0].case


def _first_channel(value: float) -> Callable[[np.ndarray], np.ndarray]:
    """A measurement whose channel 0 (a per-channel output, dL/dgamma) is `value`."""
    def change(a: np.ndarray) -> np.ndarray:
        a[0] = value
        return a
    return change


def _measured(case, check: str, changes: dict[str, Callable[[np.ndarray], np.ndarray]]) -> dict[str, bool]:
    """Each output's pass/fail when a framework returns the reference's values with `changes`
    applied, judged as evaluate judges them (tolerances, undetermined sets)."""
    from conformance import problem as problems
    from conformance.evaluate import measure, tolerances

    p = problems.build(case, check)
    tol, per_output = tolerances(p, check, problems.conditioning(case, check, p), case)
    expected = problems.expected(case, check, p)
    got = {name: changes.get(name, lambda a: a)(np.array(a, np.float64))
           for name, a in expected.canonical().items()}
    return {name: m.passed for name, _, _, m in measure(check, expected, got, case.dtype, tol, {}, per_output,
                                                       problems.undetermined(case, check, p))}


def test_a_constant_channel_with_eps_0_is_undetermined_but_a_wrong_value_fails():
    """cases/numerics/constant-channel-eps-0-mean-rounds: channel 0 is 3.2 throughout, eps 0. The
    fused TF kernel's beta - gamma passes; 0 and beta + 2·gamma fail; dL/dgamma accepts ±Σ dy only."""
    from conformance import problem as problems

    case = _case("cases/numerics/constant-channel-eps-0-mean-rounds.yaml")
    beta, gamma = 0.25, float(np.float32(-1.78))
    p = problems.build(case, "training")
    unsure = problems.undetermined(case, "training", p)
    assert set(unsure) == {"output", "batch_variance"} and int(np.sum(unsure["output"].mask)) == 48
    assert np.all(unsure["output"].mask[:, 0]) and not np.any(unsure["output"].mask[:, 1])

    def channel_0(value: float) -> Callable[[np.ndarray], np.ndarray]:
        def change(a: np.ndarray) -> np.ndarray:
            a[:, 0] = value
            return a
        return change

    assert all(_measured(case, "training", {"output": channel_0(beta - gamma)}).values())
    assert all(_measured(case, "training", {"output": channel_0(beta + gamma)}).values())
    for wrong in (0.0, beta + 2 * gamma):
        assert not _measured(case, "training", {"output": channel_0(wrong)})["output"]
    grads = problems.undetermined(case, "gradients", problems.build(case, "gradients"))
    assert set(grads) == {"gamma", "input"} and grads["input"].anything
    sum_dy = float(problems.build(case, "gradients").upstream[:, 0].sum())

    assert _measured(case, "gradients", {"gamma": _first_channel(-sum_dy)})["gamma"]
    assert not _measured(case, "gradients", {"gamma": _first_channel(0.0)})["gamma"]
    from conformance.variants import zero_variance

    assert zero_variance(p, "training") is not None
    assert zero_variance(dataclasses.replace(p, epsilon=1e-3), "training") is None
    one_row = dataclasses.replace(p, batches=(p.batches[-1][:1, :, :1, :1],))  # one value: its mean is exact
    assert zero_variance(one_row, "training") is None


def test_the_batch_variance_of_a_constant_channel_with_eps_0_is_a_residue_up_to_its_bound():
    """cases/numerics/constant-channel-eps-0-large-mean-batch-variance: 96 float32 copies of
    10000.099609375, eps 0. tf.nn.moments' rounded mean leaves d = 9 ulps and a batch variance
    d² = 7.72e-5 where the reference's is 0 (beyond float32's atol 1e-5): accepted up to
    (gamma_96·|v|)²·(1 + gamma_97)·96/95 = 3.3e-3; 1e-2, a negative value and NaN still fail."""
    from conformance import problem as problems

    case = _case("cases/numerics/constant-channel-eps-0-large-mean-batch-variance.yaml")
    p = problems.build(case, "training")
    bound = problems.residue_variance(p)
    u = float(np.finfo(np.float32).eps) / 2
    d = 96 * u / (1 - 96 * u) * 10000.099609375
    assert np.allclose(bound, d * d * (1 + 97 * u / (1 - 97 * u)) * 96 / 95) and 3.2e-3 < bound[0] < 3.4e-3

    def variance(value: float) -> Callable[[np.ndarray], np.ndarray]:
        return lambda a: np.full_like(a, value)

    assert _measured(case, "training", {"batch_variance": variance(7.724761962890625e-05)})["batch_variance"]
    assert _measured(case, "training", {"batch_variance": variance(float(bound[0]))})["batch_variance"]
    for wrong in (1e-2, -1e-3, np.nan):
        assert not _measured(case, "training", {"batch_variance": variance(wrong)})["batch_variance"]


def test_a_float16_moving_variance_below_the_subnormal_range_leaves_inference_after_training_undetermined():
    """cases/numerics/float16-inference-after-training-moving-variance-below-subnormal: moving
    variances 1.66e-8, 7.17e-8, 2.01e-7, 3.18e-8 stored in float16 (Delta = 3·s/2 = 8.9e-8):
    channels 0, 1 and 3 undetermined (Keras 3 on jax: inf, and 0.73 for 1), channel 2 held to
    atol + rho·max|y - beta|, rho = sqrt(v/(v - Delta)) - 1 = 0.34: a stored 1.8e-7 (x 1.06) passes,
    x 1.5 fails. (The update's rounding, `update_rounding`, is not counted below float16's smallest
    normal: flush-to-zero's domain.)"""
    from conformance import problem as problems

    case = _case("cases/numerics/float16-inference-after-training-moving-variance-below-subnormal.yaml")
    p = problems.build(case, "training")
    delta = problems.stored_resolution(p)
    assert delta == 3 * float(np.finfo(np.float16).smallest_subnormal) / 2
    lost, rho = problems.stored_variance(p)
    assert lost.tolist() == [True, True, False, True]
    v = 2.0122810440170724e-07
    assert math.isclose(rho[2], math.sqrt(v / (v - delta)) - 1) and rho[[0, 1, 3]].tolist() == [0, 0, 0]

    def rows(changes: dict[int, float]) -> Callable[[np.ndarray], np.ndarray]:
        def change(a: np.ndarray) -> np.ndarray:
            for row, value in changes.items():
                a[row] = a[row] * value
            return a
        return change

    assert _measured(case, "training", {"inference_output": rows({0: np.inf, 3: 0.73, 2: 1.06})})[
        "inference_output"]
    assert not _measured(case, "training", {"inference_output": rows({2: 1.5})})["inference_output"]
    assert not problems.stored_variance(dataclasses.replace(p, dtype="float32"))[0].any()


def test_momentum_0_after_a_large_moving_variance_holds_inference_after_training_to_the_update_rounding():
    """cases/momentum/momentum-0-tiny-variance-after-large: tf_keras's a - (a - b)·1 in float32
    stores 1.192092895508e-06 for the reference's 1.2856e-06 in channel 0 (a = 2.67): inference after
    training off by 0.086 passes, within gamma_4·(|a| + |b|) of the update; a variance 4 times too
    small (the output doubled) still fails."""
    from conformance import problem as problems

    case = _case("cases/momentum/momentum-0-tiny-variance-after-large.yaml")
    p = problems.build(case, "training")
    u = float(np.finfo(np.float32).eps) / 2
    a = float(np.float32(2.6697076675719855))  # the case holds it in float32
    b = 1.312989655104e-06  # the unbiased batch variance, with momentum 0 the new moving one too
    assert math.isclose(problems.update_rounding(p)[0], 4 * u / (1 - 4 * u) * (a + b + b), rel_tol=1e-8)
    lost, rho = problems.stored_variance(p)
    assert not lost.any() and 0.3 < rho[0] < 0.5  # sqrt(v/(v - Delta)) - 1, Delta = 6.4e-7, v = 1.29e-6

    def channel_0(factor: float) -> Callable[[np.ndarray], np.ndarray]:
        def change(a: np.ndarray) -> np.ndarray:
            a[:, 0] = p.beta[0] + (a[:, 0] - p.beta[0]) * factor
            return a
        return change

    tf_keras = math.sqrt(1.285635703956e-06 / 1.192092895508e-06)
    assert _measured(case, "training", {"inference_output": channel_0(tf_keras)})["inference_output"]
    assert not _measured(case, "training", {"inference_output": channel_0(2.0)})["inference_output"]


def test_a_rule_can_name_a_zero_variance_channel():
    """`when: {zero_variance: true}` holds where some check normalizes a 0/0 channel (the folded rules
    of cases/numerics/constant-channel-eps-0-mean-rounds), not for an empty batch or eps > 0."""
    from conformance.known import When

    assert When(zero_variance=True).holds(_case("cases/numerics/constant-channel-eps-0-mean-rounds.yaml"))
    other = _case("cases/numerics/float16-inference-after-training-moving-variance-below-subnormal.yaml")
    assert not When(zero_variance=True).holds(other) and When(zero_variance=False).holds(other)


def test_inference_after_training_divides_by_a_residue_where_the_moving_variance_is_exactly_0():
    """cases/numerics/constant-channel-eps-0-inference-after-training: channels 0 and 1 are copies of
    float32(10000.1), eps 0, momentum 0, so the reference's moving variance is exactly 0 and
    inference after training 0/0; a framework stores its rounded mean's residue d² instead (Keras
    3 on jax: 3.81e-6, and 0.25, -0.25 out of the fold). Those channels of inference after training
    accept anything (the training output only beta ± gamma, the fold's 0.25 being ruled); the varied
    channel 2 is still held to its value; with momentum 0.5 the moving variance keeps half of 0.001
    and nothing is left undetermined."""
    from conformance import problem as problems
    from conformance.variants import zero_variance

    case = _case("cases/numerics/constant-channel-eps-0-inference-after-training.yaml")
    p = problems.build(case, "training")
    assert problems.residue_moving_variance(p, zero_variance(p, "training")).tolist() == [True, True, False]
    after = problems.undetermined(case, "training", p)["inference_output"]
    assert after.anything and after.mask[..., :2].all() and not after.mask[..., 2].any()

    def channels(values: dict[int, float]) -> Callable[[np.ndarray], np.ndarray]:
        def change(a: np.ndarray) -> np.ndarray:
            for c, value in values.items():
                a[..., c] = value
            return a
        return change

    minus_gamma = channels({0: 0.21739848637078518, 1: -0.30254387893013357})  # beta - gamma, beta 0
    folded = channels({0: 0.25, 1: -0.25})  # accepted after training only: any value
    assert all(_measured(case, "training", {"output": minus_gamma, "inference_output": folded}).values())
    assert not _measured(case, "training", {"output": folded})["output"]  # the fold's rounding: rules
    assert not _measured(case, "training", {"inference_output": channels({2: 0.0})})["inference_output"]
    kept = dataclasses.replace(p, momentum=0.5)
    assert not problems.residue_moving_variance(kept, zero_variance(kept, "training")).any()


def test_renorm_on_a_constant_channel_with_eps_0_accepts_gamma_times_plus_minus_r_plus_d():
    """cases/numerics/constant-channel-eps-0-renorm: channel 0 is 3.2 throughout, eps 0, renorm
    rmin 0.7, dmax 0.5 (fuzz seed 11, keras and keras-jax). Rounded, xhat = ±1 and Keras composes
    y = gamma·(r·xhat + d) + beta with r = clip(|d_B|/sigma_r) = 0.7 and d = 0.5: 0.25 - 1.78·(±0.7
    + 0.5) passes, beta ± gamma (the plain set) fails; dL/dgamma accepts (±0.7 + 0.5)·Σ dy. Without
    rmin, r = |d_B|/sigma_r is a rounding residue: anything."""
    from conformance import problem as problems
    from conformance.variants import zero_variance

    case = _case("cases/numerics/constant-channel-eps-0-renorm.yaml")
    p = problems.build(case, "training")
    assert zero_variance(p, "training") is not None
    beta, gamma = 0.25, -1.78

    def channel_0(value: float) -> Callable[[np.ndarray], np.ndarray]:
        def change(a: np.ndarray) -> np.ndarray:
            a[:, 0] = value
            return a
        return change

    for right in (beta + gamma * (0.7 + 0.5), beta + gamma * (-0.7 + 0.5)):
        assert all(_measured(case, "training", {"output": channel_0(right)}).values())
    for wrong in (beta + gamma, beta - gamma, 0.0):
        assert not _measured(case, "training", {"output": channel_0(wrong)})["output"]
    sum_dy = float(problems.build(case, "gradients").upstream[:, 0].sum())

    assert _measured(case, "gradients", {"gamma": _first_channel(-0.2 * sum_dy)})["gamma"]
    assert _measured(case, "gradients", {"gamma": _first_channel(1.2 * sum_dy)})["gamma"]
    assert not _measured(case, "gradients", {"gamma": _first_channel(sum_dy)})["gamma"]
    unclipped = dataclasses.replace(p, renorm=dataclasses.replace(p.renorm, rmin=None))
    assert not problems.zero_variance_affine(unclipped, "training")[2].any()
    assert problems.zero_variance_affine(p, "training")[2].tolist() == [True, True]


def test_a_preceding_layers_constant_output_channel_is_a_zero_variance_channel():
    """cases/export/preceding-constant-channel-eps-0: every input channel is 3.2, so every channel
    of z = W·x + b is constant and BN sees 0/0 (Keras 3 on jax: -1 = beta - gamma in channel 2).
    The output accepts beta ± gamma there and a wrong value fails; dL/dx = Wᵀ·dL/dz mixes each
    channel's undetermined dL/dz into every input channel. A varied input leaves z varied."""
    from conformance import problem as problems
    from conformance.variants import zero_variance, zero_variance_inputs

    case = _case("cases/export/preceding-constant-channel-eps-0.yaml")
    p = problems.build(case, "training")
    zero = zero_variance(p, "training")
    assert zero is not None and zero.all()

    def channel_2(value: float) -> Callable[[np.ndarray], np.ndarray]:
        def change(a: np.ndarray) -> np.ndarray:
            a[:, 2] = value
            return a
        return change

    assert _measured(case, "training", {"output": channel_2(-1.0)})["output"]
    assert not _measured(case, "training", {"output": channel_2(0.0)})["output"]
    partly = zero.copy()
    partly[1:] = False
    assert zero_variance_inputs(p, partly).all()
    assert zero_variance_inputs(dataclasses.replace(p, preceding=None), partly)[:, 0].all()
    assert not zero_variance_inputs(dataclasses.replace(p, preceding=None), partly)[:, 1:].any()
    varied = p.batches[-1] + np.arange(p.batches[-1].size).reshape(p.batches[-1].shape)
    assert zero_variance(dataclasses.replace(p, batches=(varied,)), "training") is None


def test_a_constant_channels_moving_variance_keeps_the_residues_of_its_rounded_means():
    """cases/numerics/constant-channel-eps-0-moving-variance-residue: 96 float32 copies of 10000.1
    per channel, eps 0, momentum 0.738, 2 steps from 0.001. tf_keras's mean is 9 ulps off, so its
    moving variance is 5.80e-4 where the reference's is m²·0.001 = 5.44e-4: inside the band
    R = (1 - m²)·(1 + gamma_97)·96/95·(gamma_96·c)² (`problem.residue_bands`), and v + 1.01 R is
    not. Channel 0's v <= R leaves its inference after training undetermined, channel 1's not. With
    an adjustment the training output accepts ±a (a·xhat + b), not 0."""
    from conformance import problem as problems

    case = _case("cases/numerics/constant-channel-eps-0-moving-variance-residue.yaml")
    p = problems.build(case, "training")
    m, c, u = p.momentum, float(np.float32(10000.1)), float(np.finfo(np.float32).eps) / 2

    def gamma(n: int) -> float:
        return n * u / (1 - n * u)

    band = (1 - m * m) * (1 + gamma(97)) * 96 / 95 * (gamma(96) * c) ** 2
    _, r = problems.residue_bands(p)
    assert np.allclose(r, band, rtol=1e-12)
    assert problems.residue_moving_variance(p, None).tolist() == [True, False]

    def channel_0(value: float) -> Callable[[np.ndarray], np.ndarray]:
        def change(a: np.ndarray) -> np.ndarray:
            a[..., 0] = value
            return a
        return change

    v = 0.0005444557581490684
    minus_a = -float(np.float32(0.9718688911695909))
    measured = {"moving_variance": channel_0(0.0005796454497613013), "output": channel_0(minus_a),
                "inference_output": channel_0(226133.984375)}
    assert all(_measured(case, "training", measured).values())
    assert not _measured(case, "training", {"moving_variance": channel_0(v + 1.01 * band)})["moving_variance"]
    assert not _measured(case, "training", {"output": channel_0(0.0)})["output"]


def test_a_momentum_below_the_unit_roundoff_leaves_inference_after_training_undetermined():
    """cases/numerics/momentum-below-unit-roundoff-eps-0: momentum 2.1e-162, eps 0, one value per
    channel: the reference keeps m·1 = 2.1e-162, TF's v - (v - b)·(1 - m) stores 0 (1 - m is 1)
    and inference after training is 0/0 = NaN. The update rounds by up to
    gamma_4·((1 - m)·(|v| + |b|) + |new|) = gamma_4 = 4.4e-16 (v = 1, b = 0;
    `problem.update_rounding`), so that output is undetermined; with momentum 0.5 it is not."""
    from conformance import problem as problems

    case = _case("cases/numerics/momentum-below-unit-roundoff-eps-0.yaml")
    p = problems.build(case, "training")
    u4 = 4 * float(np.finfo(np.float64).eps) / 2
    assert np.allclose(problems.update_rounding(p), u4 / (1 - u4))
    assert problems.stored_variance(p)[0].all()
    nan = {"moving_variance": lambda a: a * 0, "inference_output": lambda a: a * np.nan}
    assert all(_measured(case, "training", nan).values())
    assert not problems.stored_variance(dataclasses.replace(p, momentum=0.5))[0].any()
