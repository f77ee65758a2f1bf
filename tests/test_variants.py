"""Variants: the canonical knobs reproduce the reference, and each variant does what its name says."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest

from adapters.base import Adjustment, Preceding, Problem, Renorm, Replicas
from conformance import problem as problems
from conformance import reference
from conformance.compare import DEFAULT_TOLERANCE
from conformance.dtypes import round_to
from conformance.variants import (
    CANONICAL,
    CATALOGUE,
    RESERVED,
    Knobs,
    apply,
    simulate,
    simulate_named,
    tolerance_for,
)

NAMES = {
    "momentum-complement", "momentum-float32", "compute-float32", "compute-input-dtype",
    "moving-variance-unbiased", "moving-variance-biased", "variance-sum-of-squares", "stats-frozen",
    "inference-uses-batch-stats", "training-uses-moving-stats", "epsilon-outside-sqrt", "epsilon-1e-3",
    "epsilon-1e-5", "rejects", "accepts", "batch-variance-unbiased", "normalize-folded", "epsilon-float32",
    "empty-gamma-gradient-nan", "bessel-one-value", "variance-sum-of-squares-unclamped", "reduce-all-axes",
    "ghost-interleaved",
    "replica-0-stats", "replica-mean-stats", "denormals-flushed", "renorm-floor-epsilon-float32",
    "folded-float16-weights", "folded-inf-saturated", "folded-into-layer", "float32-saturated",
}
CHECKS = ("training", "inference", "gradients")
LAYOUTS = [((6, 3), (1,)), ((3, 6), (0,)), ((2, 4, 3), (-1,)), ((2, 3, 4, 5), (1, 2)),
           ((2, 3, 4, 5), (3, 1))]


def problem(shape=(6, 3), axes=(1,), *, dtype="float64", momentum=0.9, epsilon=1e-3, steps=1, seed=0,
            loc=1.0, std=2.0, infer_after=True) -> Problem:
    """Small random arrays, every value representable in `dtype`, as the harness hands them over."""
    rng = np.random.default_rng(seed)
    channels = tuple(shape[a] for a in axes)

    def rd(a: np.ndarray) -> np.ndarray:
        return round_to(a, dtype)

    return Problem(
        case_id="t", dtype=dtype, batches=tuple(rd(rng.normal(loc, std, shape)) for _ in range(steps)),
        axes=tuple(axes), momentum=momentum, epsilon=epsilon, center=True, scale=True,
        gamma=rd(rng.normal(size=channels)), beta=rd(rng.normal(size=channels)),
        moving_mean=rd(rng.normal(size=channels)), moving_variance=rd(rng.uniform(0.5, 2, channels)),
        upstream=rd(rng.normal(size=shape)), infer_after_training=infer_after,
    )


def hand(momentum=0.9, epsilon=1e-3, dtype="float64") -> Problem:
    """One channel, x = [1, 3]: mean 2, variance 1 (2 unbiased); moving 0 and 1; gamma 1, beta 0."""
    return Problem(
        case_id="hand", dtype=dtype, batches=(np.array([[1.0], [3.0]]),), axes=(1,), momentum=momentum,
        epsilon=epsilon, center=True, scale=True, gamma=np.ones(1), beta=np.zeros(1),
        moving_mean=np.zeros(1), moving_variance=np.ones(1), upstream=np.array([[1.0], [-2.0]]),
        infer_after_training=True,
    )


def knobs(name: str, p: Problem, check: str = "training", form: int = 0) -> Knobs:
    return Knobs(**CATALOGUE[name].forms(p, check)[form])


def close(a, b, rtol=1e-12):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=0)


# --- the canonical knobs are the reference -------------------------------------------------------


@pytest.mark.parametrize(("shape", "axes"), LAYOUTS)
@pytest.mark.parametrize("momentum", [0.9, None, 1.0, 0.0])
def test_canonical_knobs_are_the_reference(shape, axes, momentum):
    """Bit for bit: the harness tells outputs a declared variant changes by exact comparison."""
    p = problem(shape, axes, momentum=momentum, steps=3)
    expected = vars(reference.train(p))
    for name, got in simulate(p, "training", CANONICAL).items():
        np.testing.assert_array_equal(got, expected[name])
    np.testing.assert_array_equal(simulate(p, "inference")["output"], reference.infer(p))
    for name, got in simulate(p, "gradients").items():
        np.testing.assert_array_equal(got, reference.gradients(p)[name])


def test_simulate_is_computed_once_per_problem_object_check_and_knobs():
    """Every adapter's diagnosis of one problem asks for largely the same simulations: they are
    kept, read-only, for the problem object (an equal problem built anew is simulated anew)."""
    p = problem(steps=2)
    first, again = simulate(p, "training"), simulate(p, "training")
    assert first is not again and all(again[name] is value for name, value in first.items())
    assert not first["output"].flags.writeable
    assert simulate(p, "training", Knobs(stats_frozen=True))["moving_mean"] is not first["moving_mean"]
    fresh = simulate(dataclasses.replace(p), "training")
    assert fresh["output"] is not first["output"]
    np.testing.assert_array_equal(fresh["output"], first["output"])


def test_declared_variants_change_only_their_outputs():
    p = problem((2, 3, 4, 5), (3, 1), steps=3)
    ref = reference.train(p)
    got = simulate_named(p, "training", ("moving-variance-unbiased",))
    np.testing.assert_array_equal(got["moving_variance"], ref.moving_variance_unbiased)
    np.testing.assert_array_equal(got["inference_output"], ref.inference_output_unbiased)
    for name in ("output", "batch_mean", "batch_variance", "moving_mean"):
        np.testing.assert_array_equal(got[name], getattr(ref, name))
    fused = simulate_named(p, "training", ("moving-variance-unbiased", "batch-variance-unbiased"))
    np.testing.assert_array_equal(fused["batch_variance"], ref.batch_variance_unbiased)
    np.testing.assert_array_equal(simulate_named(p, "inference", ("moving-variance-unbiased",))["output"],
                                  reference.infer(dataclasses.replace(p, batches=p.batches[-1:])))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_canonical_low_precision_is_computed_in_float64(dtype):
    p = problem((4, 2, 3), (1,), dtype=dtype, steps=2)
    close(simulate(p, "training")["output"], reference.train(p).output)


# --- each variant does what its definition says -----------------------------------------------------


def test_momentum_complement_swaps_the_weights():
    p = hand()
    out = simulate(p, "training", knobs("momentum-complement", p))
    close(out["moving_mean"], [1.8])  # 0.1 * 0 + 0.9 * 2
    close(simulate(p, "training")["moving_mean"], [0.2])


def test_momentum_float32_has_an_onnx_form_and_a_tf_keras_form():
    p = hand()
    forms = CATALOGUE["momentum-float32"].forms(p, "training")
    assert forms == [{"momentum_float32": "momentum"}, {"momentum_float32": "complement"}]
    onnx, keras = (simulate(p, "training", Knobs(**f))["moving_mean"][0] for f in forms)
    assert onnx == (1.0 - float(np.float32(0.9))) * 2.0 == pytest.approx(0.2000000476837158, abs=1e-16)
    assert keras == float(np.float32(0.1)) * 2.0 == pytest.approx(0.20000000298023224, abs=1e-16)
    assert abs(onnx - keras) / 0.2 > DEFAULT_TOLERANCE["float64"]  # float64 tolerance tells them apart


def test_momentum_float32_covers_the_cumulative_average_onnx_runs_by_hand():
    p = problem(momentum=None, steps=3)  # step 3 runs momentum 2/3, not a float32 value
    assert CATALOGUE["momentum-float32"].applies(p, "training")
    assert not CATALOGUE["momentum-float32"].applies(problem(momentum=None, steps=2), "training")


def test_stats_frozen_keeps_the_initial_moving_statistics():
    p = problem(steps=3)
    out = simulate(p, "training", knobs("stats-frozen", p))
    np.testing.assert_array_equal(out["moving_mean"], p.moving_mean)
    np.testing.assert_array_equal(out["moving_variance"], p.moving_variance)
    close(out["inference_output"], reference.infer(dataclasses.replace(p, batches=p.batches[-1:])))
    close(out["output"], reference.train(p).output)


def test_estimators():
    p = problem((5, 3), (1,), steps=2)
    ref = reference.train(p)
    unbiased = simulate(p, "training", knobs("moving-variance-unbiased", p))
    close(unbiased["moving_variance"], ref.moving_variance_unbiased)
    close(unbiased["inference_output"], ref.inference_output_unbiased)
    batch = simulate(p, "training", knobs("batch-variance-unbiased", p))
    close(batch["batch_variance"], ref.batch_variance_unbiased)
    close(batch["output"], ref.output)  # y still uses the biased variance
    close(batch["moving_variance"], ref.moving_variance)


def test_epsilon_outside_sqrt():
    p = hand(epsilon=0.5)
    out = simulate(p, "training", knobs("epsilon-outside-sqrt", p))
    close(out["output"], [[-1 / 1.5], [1 / 1.5]])  # (x - 2) / (sqrt(1) + 0.5)
    inf = simulate(p, "inference", knobs("epsilon-outside-sqrt", p))["output"]
    close(inf, [[1 / 1.5], [3 / 1.5]])  # moving mean 0, variance 1


@pytest.mark.parametrize("name", ["epsilon-1e-3", "epsilon-1e-5"])
def test_default_epsilons(name):
    p = problem(epsilon=0.25)
    q = dataclasses.replace(p, epsilon=CATALOGUE[name].forms(p, "training")[0]["epsilon"])
    close(simulate(p, "training", knobs(name, p))["output"], reference.train(q).output)
    close(simulate(p, "gradients", knobs(name, p, "gradients"))["input"], reference.gradients(q)["input"])


def test_batch_and_moving_statistics_swapped():
    p = hand(epsilon=0.0)
    close(simulate(p, "inference", knobs("inference-uses-batch-stats", p, "inference"))["output"],
          [[-1.0], [1.0]])
    out = simulate(p, "training", knobs("training-uses-moving-stats", p))
    close(out["output"], [[1.0], [3.0]])  # moving mean 0, variance 1 before the step
    close(out["moving_mean"], [0.2])  # the update still happens


def test_sum_of_squares_cancels_in_float32():
    p = problem((64, 2), (1,), dtype="float32", loc=1e4, std=1.0)
    two_pass = simulate(p, "training")["batch_variance"]
    fast = simulate(p, "training", knobs("variance-sum-of-squares", p))["batch_variance"]
    assert np.all(np.abs(fast - two_pass) / two_pass > 0.5)  # O(1): E[x²] and E[x]² are 8 ulps apart
    assert np.all(fast % 8 == 0)  # a difference of two float32 values near 1e8
    well_conditioned = problem((64, 2), (1,), dtype="float32")
    close(simulate(well_conditioned, "training", knobs("variance-sum-of-squares", p))["batch_variance"],
          simulate(well_conditioned, "training")["batch_variance"], rtol=1e-5)


@pytest.mark.parametrize(("name", "dtype"), [("compute-float32", "float64"),
                                             ("compute-input-dtype", "float16"),
                                             ("compute-input-dtype", "bfloat16")])
def test_lower_compute_dtype_rounds_every_output(name, dtype):
    p = problem((8, 3), (1,), dtype=dtype, steps=2)
    compute = CATALOGUE[name].forms(p, "training")[0]["compute_dtype"]
    for check in CHECKS:
        got, ref = simulate(p, check, knobs(name, p, check)), simulate(p, check)
        for key, values in got.items():
            np.testing.assert_array_equal(values, round_to(values, "float32" if key.startswith("moving")
                                                           else compute))
            tol = 8 * DEFAULT_TOLERANCE[compute] * (1 + np.abs(ref[key]).max())
            np.testing.assert_allclose(values, ref[key], rtol=0, atol=tol)
        if compute == "float32":
            assert any(not np.array_equal(got[k], ref[k]) for k in got)


# --- gradients under the knobs that change them, against finite differences --------------------------


@pytest.mark.parametrize("changes", [{"epsilon_outside_sqrt": True}, {"training_uses_moving_stats": True},
                                     {"epsilon_outside_sqrt": True, "epsilon": 0.3}])
def test_gradients_match_finite_differences(changes):
    p = problem((5, 2), (1,), epsilon=0.1)
    k = Knobs(**changes)
    got = simulate(p, "gradients", k)

    def loss(**replaced) -> float:
        q = dataclasses.replace(p, **replaced)
        return float((p.upstream * simulate(q, "training", k)["output"]).sum())

    def numeric(name: str, base: np.ndarray) -> np.ndarray:
        grad, h = np.zeros_like(base), 1e-6
        for i in np.ndindex(base.shape):
            up, down = base.copy(), base.copy()
            up[i] += h
            down[i] -= h
            plus = loss(**{name: (up,) if name == "batches" else up})
            minus = loss(**{name: (down,) if name == "batches" else down})
            grad[i] = (plus - minus) / (2 * h)
        return grad

    np.testing.assert_allclose(got["input"], numeric("batches", p.batches[-1]), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["gamma"], numeric("gamma", p.gamma), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["beta"], numeric("beta", p.beta), rtol=1e-6, atol=1e-7)


# --- the catalogue ------------------------------------------------------------------------------------


def test_catalogue_names_are_the_contract():
    assert set(CATALOGUE) == NAMES
    assert set(RESERVED) == set()
    assert not set(RESERVED) & set(CATALOGUE)
    assert all(v.summary and "\n" not in v.summary for v in CATALOGUE.values())


NO_OP_PROBLEMS = [
    problem(momentum=0.5, epsilon=1e-3, steps=2),
    problem((2, 3, 4), (1,), momentum=1.0, epsilon=1e-5, infer_after=False),
    problem(momentum=0.75, epsilon=0.0),
    problem(dtype="float32", momentum=None, steps=2),
    problem(dtype="float16", momentum=0.9, steps=2),
    problem(dtype="bfloat16", momentum=0.25),
]


@pytest.mark.parametrize("p", NO_OP_PROBLEMS, ids=lambda p: f"{p.dtype}-{p.momentum}-{p.epsilon}")
@pytest.mark.parametrize("check", CHECKS)
def test_a_variant_that_does_not_apply_changes_nothing(p, check):
    """Where `applies` is False every form leaves every output the check reports within the case's
    tolerance (bit for bit where the simulation stays in float64)."""
    base = simulate(p, check)
    tol = DEFAULT_TOLERANCE[p.dtype]
    for variant in CATALOGUE.values():
        if variant.applies(p, check):
            continue
        for form in variant.forms(p, check):
            got = simulate(p, check, Knobs(**form))
            for key in got.keys() - ({"inference_output"} if not p.infer_after_training else set()):
                np.testing.assert_allclose(got[key], base[key], rtol=tol, atol=tol,
                                           err_msg=f"{variant.name} {form} {key}")


def test_where_variants_apply():
    def applies(name: str, p: Problem, check: str = "training") -> bool:
        return CATALOGUE[name].applies(p, check)

    assert not applies("epsilon-1e-3", hand(epsilon=1e-3)) and applies("epsilon-1e-5", hand(epsilon=1e-3))
    assert not applies("compute-float32", hand(dtype="float32"))
    assert not applies("compute-input-dtype", hand(dtype="float32"))
    assert applies("compute-input-dtype", hand(dtype="bfloat16"), "inference")
    assert not applies("momentum-complement", hand(momentum=None))
    assert not applies("momentum-complement", hand(momentum=0.5))
    assert not applies("momentum-complement", hand(), "inference")
    assert not applies("momentum-float32", hand(momentum=0.75))  # 0.75 and 0.25 are float32 values
    assert not applies("momentum-float32", hand(dtype="float32"))
    assert not applies("stats-frozen", hand(momentum=1.0)) and applies("stats-frozen", hand(momentum=None))
    assert not applies("moving-variance-unbiased", hand(), "gradients")
    assert not applies("inference-uses-batch-stats", hand(), "gradients")
    assert not applies("inference-uses-batch-stats", dataclasses.replace(hand(), infer_after_training=False))
    assert not applies("variance-sum-of-squares", hand(), "inference")
    assert not applies("epsilon-outside-sqrt", hand(epsilon=0.0))
    assert applies("rejects", hand(), "gradients") and CATALOGUE["rejects"].forms(hand(), "training") == []


# --- stacking and tolerance -------------------------------------------------------------------------


def test_apply_stacks_declared_variants_with_one_more():
    p = hand()
    assert apply([], None, p, "training") == [CANONICAL]
    assert apply(["moving-variance-unbiased"], "moving-variance-biased", p, "training") == [CANONICAL]
    frozen = apply(["momentum-float32"], "stats-frozen", p, "training")
    assert frozen == [Knobs(momentum_float32="momentum", stats_frozen=True),
                      Knobs(momentum_float32="complement", stats_frozen=True)]
    # a declared variant that cannot change this check is skipped; an extra one gives nothing to try
    assert apply(["moving-variance-unbiased"], None, p, "inference") == [CANONICAL]
    assert apply(["moving-variance-unbiased"], "stats-frozen", p, "inference") == []
    assert apply([], "rejects", p, "training") == []
    with pytest.raises(ValueError, match="unknown"):
        apply([], "no-such-variant", p, "training")
    with pytest.raises(ValueError, match="momentum_form"):
        Knobs(momentum_form="torch")


def test_tolerance_rule():
    p64, p32, p16 = hand(), hand(dtype="float32"), hand(dtype="float16")
    c = 3.0
    assert tolerance_for(CANONICAL, p64, "training", 4e-10, 4e-10, c) == (4e-10, 4e-10)
    assert tolerance_for(knobs("epsilon-1e-5", p64), p64, "training", 1e-9, 2e-9, c) == (1e-9, 2e-9)
    assert tolerance_for(knobs("compute-float32", p64), p64, "training", 4e-10, 4e-10, c) == (4e-5, 4e-5)
    sos = knobs("variance-sum-of-squares", p32)
    assert tolerance_for(sos, p32, "training", 4e-5, 4e-5, c) == (1e-4, 1e-4)  # float32 default x (1 + c²)
    # float16's own is wider
    assert tolerance_for(sos, p16, "training", 1.6e-2, 1.6e-2, c) == (1.6e-2, 1.6e-2)
    stacked = apply(["compute-float32"], "variance-sum-of-squares", p64, "training")
    assert tolerance_for(stacked[0], p64, "training", 4e-10, 4e-10, c) == (1e-4, 1e-4)
    assert tolerance_for(sos, p64, "training", 4e-10, 4e-10, c) == (1e-9, 1e-9)  # float64 default x (1 + c²)


FEATURE_PROBLEMS = [
    {"renorm": Renorm(momentum=0.9, rmax=1.2, rmin=0.8, dmax=0.2)},
    {"virtual_batch_size": 2},
    {"adjustment": Adjustment(scale=np.array([0.5, 2.0, 1.5]), bias=np.array([0.1, -0.2, 0.3]))},
    {"track_running_stats": False},
    {"renorm": Renorm(momentum=0.5), "virtual_batch_size": 3,
     "adjustment": Adjustment(scale=np.array([0.5, 2.0, 1.5]), bias=np.array([0.1, -0.2, 0.3]))},
]


@pytest.mark.parametrize("features", FEATURE_PROBLEMS, ids=lambda f: "-".join(f))
def test_canonical_knobs_are_the_reference_with_features(features):
    p = dataclasses.replace(problem((6, 3), (1,), steps=3), **features)
    expected = vars(reference.train(p))
    for name, got in simulate(p, "training", CANONICAL).items():
        np.testing.assert_array_equal(got, expected[name])
    np.testing.assert_array_equal(simulate(p, "inference")["output"], reference.infer(p))
    for name, got in simulate(p, "gradients").items():
        np.testing.assert_array_equal(got, reference.gradients(p)[name])


def test_ghost_interleaved_takes_every_third_row():
    """Six rows in virtual batches of 2: canonical [0, 1], [2, 3], [4, 5]; interleaved [0, 3], [1, 4],
    [2, 5] (tf_keras's reshape to [2, 3, ...])."""
    x = np.array([[0.0], [2.0], [10.0], [4.0], [6.0], [20.0]])
    p = dataclasses.replace(hand(), batches=(x,), gamma=np.ones(1), virtual_batch_size=2, epsilon=0.0,
                            upstream=np.ones_like(x))
    canonical = simulate(p, "training")
    interleaved = simulate(p, "training", knobs("ghost-interleaved", p))
    close(canonical["output"].ravel(), [-1, 1, 1, -1, -1, 1])
    close(interleaved["output"].ravel(), [-1, -1, -1, 1, 1, 1])
    close(canonical["batch_variance"], [(1 + 9 + 49) / 3])  # ((2-0)/2)², ((10-4)/2)², ((20-6)/2)²
    close(interleaved["batch_variance"], [(4 + 4 + 25) / 3])  # ((4-0)/2)², ((6-2)/2)², ((20-10)/2)²
    assert CATALOGUE["ghost-interleaved"].applies(p, "training")
    one_batch = dataclasses.replace(p, virtual_batch_size=6)
    assert not CATALOGUE["ghost-interleaved"].applies(one_batch, "training")
# --- replicas ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "count"), [((8, 3), 2), ((8, 3), 4), ((7, 2, 3), 3)])
@pytest.mark.parametrize("synchronized", [True, False])
def test_canonical_knobs_are_the_reference_with_replicas(shape, count, synchronized):
    p = dataclasses.replace(problem(shape, (1,), steps=3), replicas=Replicas(count, synchronized))
    expected = vars(reference.train(p))
    for name, got in simulate(p, "training", CANONICAL).items():
        np.testing.assert_allclose(got, expected[name], rtol=1e-15, atol=1e-15)


def test_replica_variants():
    """replica-0-stats reads replica 0's moving statistics (its shard alone, as one device would);
    replica-mean-stats on a synchronized case is the unsynchronized canonical result."""
    unsync = dataclasses.replace(problem((7, 3), (1,), steps=2), replicas=Replicas(3, False))
    first = dataclasses.replace(unsync, replicas=None, batches=tuple(x[:3] for x in unsync.batches))
    got = simulate(unsync, "training", knobs("replica-0-stats", unsync))
    for name in ("moving_mean", "moving_variance", "batch_mean"):
        np.testing.assert_allclose(got[name], vars(reference.train(first))[name], rtol=1e-15)
    np.testing.assert_array_equal(got["output"], reference.train(unsync).output)
    sync = dataclasses.replace(unsync, replicas=Replicas(3, True))
    mean = simulate(sync, "training", knobs("replica-mean-stats", sync))
    for name, value in vars(reference.train(unsync)).items():
        if name in mean:
            np.testing.assert_allclose(mean[name], value, rtol=1e-15)
    assert not CATALOGUE["replica-0-stats"].applies(unsync, "inference")
    assert not CATALOGUE["replica-0-stats"].applies(dataclasses.replace(unsync, replicas=None), "training")


KERAS_TORCH_1D = ("compute-float32", "variance-sum-of-squares-unclamped", "reduce-all-axes")


def diagnosis_of(case_file: str, check: str, outputs: tuple[str, ...] | None = None,
                 measured: dict[str, list[float]] | None = None) -> Callable:
    """diagnose(..., ruled=) on a case of cases/ whose framework result is simulated as Keras 3 on
    torch computes a 1-D input (KERAS_TORCH_1D), or `measured`; `outputs`: the compared ones (all
    if None)."""
    from conformance import ROOT
    from conformance.diagnose import diagnose
    from conformance.evaluate import tolerances
    from conformance.loader import load_file

    [loaded], _ = load_file(ROOT / case_file)
    case = loaded.case
    p = problems.build(case, check)
    conditioning = problems.conditioning(case, check, p)
    tol, per_output = tolerances(p, check, conditioning, case)
    got = ({k: np.array(v) for k, v in measured.items()} if measured is not None else
           simulate_named(p, check, KERAS_TORCH_1D))
    got = {k: v for k, v in got.items() if outputs is None or k in outputs}
    expected = simulate(p, check)
    args = (p, check, (), got, {k: expected[k] for k in got}, tol, conditioning, {}, per_output)
    return lambda ruled=(): diagnose(*args, ruled=ruled).explained_by


def test_three_ruled_variants_together_explain_what_no_pair_does():
    """Keras 3 on torch with a 1-D input (cases/numerics/vector-large-mean-eps-0-float64, found by
    fuzzing): float32, sums of squares and every axis at once. The diagnosis finds the triple only
    among the variants that rules name."""
    explained = diagnosis_of("cases/numerics/vector-large-mean-eps-0-float64.yaml", "training")
    assert explained() == []
    assert explained((*KERAS_TORCH_1D, "rejects")) == ["+".join(KERAS_TORCH_1D)]


def test_a_variant_that_simulates_an_unaccepted_zero_variance_element_explains_it():
    """cases/export/preceding-constant-channel-training-default: every BN channel is 0/0 and
    momentum 1 leaves the moving statistics where they start, so training-uses-moving-stats differs
    from the reference only in the 0/0 elements: a determined 157.4 where the undetermined set
    accepts NaN or beta ± gamma. It moves the result there (tf-layers-tflite-training-default's
    measurement), and explains it, as the adapter's rule says."""
    from conformance import ROOT
    from conformance.diagnose import diagnose
    from conformance.evaluate import tolerances
    from conformance.loader import load_file

    [loaded], _ = load_file(ROOT / "cases/export/preceding-constant-channel-training-default.yaml")
    case = loaded.case
    p = problems.build(case, "training")
    conditioning = problems.conditioning(case, "training", p)
    tol, per_output = tolerances(p, "training", conditioning, case)
    got = {k: v for k, v in simulate_named(p, "training", ("training-uses-moving-stats",)).items()
           if k in ("output", "moving_mean", "moving_variance")}
    assert np.isfinite(got["output"]).all()
    expected = simulate(p, "training")
    explained = diagnose(p, "training", (), got, {k: expected[k] for k in got}, tol, conditioning, {},
                         per_output, ruled=("training-uses-moving-stats",),
                         settled=problems.undetermined(case, "training", p)).explained_by
    assert "training-uses-moving-stats" in explained


@pytest.mark.parametrize(("shape", "axes"), LAYOUTS)
def test_folded_gradients_are_the_reference_gradients_in_float64(shape, axes):
    """The fold changes rounding only: in float64 its backward pass is the reference's."""
    p = problem(shape, axes)
    folded = simulate(p, "gradients", Knobs(normalize_folded=True))
    for name, value in simulate(p, "gradients").items():
        np.testing.assert_allclose(folded[name], value, rtol=1e-9, atol=1e-12)


def test_folded_gradients_with_renorm_are_the_reference_gradients_in_float64():
    """Renorm's r and d are constants of the fold (Keras 3 composes gamma·r and gamma·d + beta):
    in float64 its backward pass is the reference's, clipped or not."""
    for renorm in (Renorm(momentum=0.99, rmax=1.2, rmin=0.9, dmax=0.1), Renorm(momentum=0.99)):
        p = dataclasses.replace(problem((8, 3), (1,)), renorm=renorm)
        folded = simulate(p, "gradients", Knobs(normalize_folded=True))
        for name, value in simulate(p, "gradients").items():
            np.testing.assert_allclose(folded[name], value, rtol=1e-9, atol=1e-12)


def test_folded_gradient_of_gamma_cancels_in_float16():
    """A float16 channel that rounds to a constant 100: dL/dgamma is 0, but Σ dy·x and mean·Σ dy
    are about 100·Σ|dy| and round apart; the band derived for it holds the difference."""
    from conformance.variants import folded_gradient_atol

    p = dataclasses.replace(problem((64, 1), (1,), dtype="float16", epsilon=0.5, loc=100.0, std=1e-3),
                            gamma=np.ones(1))
    k = Knobs(normalize_folded=True, compute_dtype="float16")
    assert simulate(p, "gradients")["gamma"][0] == 0.0
    got = simulate(p, "gradients", k)["gamma"][0]
    band = folded_gradient_atol(k, p, "gradients")["gamma"]
    assert 0.0 < abs(got) <= band
    assert folded_gradient_atol(k, p, "training") == {}


def test_denormals_flushed_zeroes_a_subnormal_momentum_and_moving_statistic():
    """m = 1e-45 is a float32 subnormal: flushed, the moving variance of a batch of one value per
    channel is 0 (0/0 after training with eps 0), where the reference keeps m·1 = 1e-45."""
    p = dataclasses.replace(hand(momentum=1e-45, epsilon=0.0, dtype="float32"),
                            batches=(np.array([[2.0]]),), upstream=np.array([[1.0]]))
    canonical = simulate(p, "training")
    flushed = simulate(p, "training", knobs("denormals-flushed", p))
    assert canonical["moving_variance"][0] == 1e-45 and flushed["moving_variance"][0] == 0.0
    assert canonical["inference_output"][0, 0] == 0.0 and np.isnan(flushed["inference_output"][0, 0])
    assert simulate(hand(), "training", knobs("denormals-flushed", hand()))["moving_variance"] == \
        simulate(hand(), "training")["moving_variance"]  # nothing subnormal: nothing changes


def test_sum_of_squares_explains_a_constant_channel_alone():
    """A constant bfloat16 channel of 100 with eps 0 (the 10-minute fuzz run's Flax groups): E[x²] -
    E[x]² in float32 leaves a variance of noise (Flax: 7.5e-5) where the true one is 0. The output
    (0/0 canonically) is undetermined there, and the moving variance is off by (1 - m)·noise, within
    the absolute band default(float32)·mean² (`sum_of_squares_atol`); no conditioning scales a
    relative band for a channel with var + eps = 0. Before, only pairs with a loose dtype or a swapped
    statistic matched."""
    from conformance.compare import tolerance
    from conformance.diagnose import diagnose
    from conformance.variants import sum_of_squares_atol

    p = dataclasses.replace(hand(momentum=0.5, epsilon=0.0, dtype="bfloat16"),
                            batches=(np.full((4, 1), 100.0),),
                            upstream=np.array([[1.0], [-2.0], [0.5], [3.0]]))
    k = Knobs(variance="sum-of-squares")
    band = sum_of_squares_atol(k, p, "training")["moving_variance"]
    assert band == DEFAULT_TOLERANCE["float32"] * 100.0**2
    assert sum_of_squares_atol(k, p, "gradients") == {}
    assert sum_of_squares_atol(CANONICAL, p, "training") == {}
    tol = tolerance("bfloat16", 0.0, None)
    expected = simulate(p, "training")
    noise = 7.45e-5  # Flax's float32 E[x²] - E[x]² of this channel (measured on 54 values of 100)
    got = {"output": np.zeros((4, 1)), "moving_mean": expected["moving_mean"],
           "moving_variance": expected["moving_variance"] + 0.5 * noise}
    found = diagnose(p, "training", (), got, {n: expected[n] for n in got}, tol, 0.0)
    assert "variance-sum-of-squares" in found.explained_by
    held = simulate(p, "gradients")
    assert np.isnan(held["input"]).all()
    got = {"input": np.array([[37.5], [92.5], [36.0], [-133.0]])}  # finite: x - mean over a noise root
    found = diagnose(p, "gradients", (), got, {"input": held["input"]}, tol, 0.0, {"input": 1.0})
    assert "variance-sum-of-squares" in found.explained_by


def test_sum_of_squares_leaves_inference_after_training_undetermined_where_noise_swamps_it():
    """A constant float16 channel of 1e4, eps 0, three steps with momentum 0.5: the moving variance
    should decay to 0.125, but a float32 sum of squares leaves noise of order u·1e8 in each batch
    variance (Flax: about 3), so inference after training is not predictable there."""
    from conformance.variants import undetermined

    p = dataclasses.replace(hand(momentum=0.5, epsilon=0.0, dtype="float16"),
                            batches=(np.full((3, 1), 1e4),) * 3, upstream=None)
    mask = undetermined(p, "training", Knobs(variance="sum-of-squares"))
    assert mask["inference_output"].all() and not mask["moving_variance"].any()
    one = dataclasses.replace(p, batches=(np.full((1, 1), 1e4),) * 3)  # one value: no cancellation at all
    assert not undetermined(one, "training", Knobs(variance="sum-of-squares"))["inference_output"].any()


def test_folded_gradient_overflow_is_undetermined():
    """tf-nn on float16 constant channels of 1e4 with 384 values (found by the fuzzer's steered draws):
    Σ dy·x is about 1e4·Σ dy, near float16's 65504, and whether a partial sum overflows (dL/ds =
    inf - inf = NaN) depends on the summation order; the simulation sums in float64 and rounds once.
    Those channels' dL/dx and dL/dgamma are undetermined; a channel of small values is not."""
    from conformance.variants import undetermined

    rng = np.random.default_rng(1)
    x = np.ones((384, 2)) * np.array([1e4, 1.0])
    p = dataclasses.replace(hand(epsilon=1e-3, dtype="float16"), batches=(x,), gamma=np.ones(2),
                            beta=np.zeros(2), moving_mean=np.zeros(2), moving_variance=np.ones(2),
                            upstream=round_to(rng.normal(size=x.shape), "float16"))
    mask = undetermined(p, "gradients", Knobs(normalize_folded=True, compute_dtype="float16"))
    assert mask["gamma"].tolist() == [True, False]
    assert mask["input"][:, 0].all() and not mask["input"][:, 1].any()
    assert undetermined(p, "gradients", Knobs(normalize_folded=True, compute_dtype="float32")) == {}


def test_renorm_floor_epsilon_float32_moves_d_only_where_the_floor_is_taken():
    """Keras 3 on tensorflow floors the renorm std at sqrt(float32(eps)): d = (mean - renorm_mean)/s
    moves by the floor's relative change (2.4e-8 for eps 1e-3), the renorm std's update does not."""
    p = dataclasses.replace(hand(), batches=(np.array([[-1.0]]),), moving_mean=np.array([-1.5]),
                            moving_variance=np.array([1e-3]), renorm=Renorm(momentum=0.99))
    canonical = simulate(p, "training")
    floored = simulate(p, "training", knobs("renorm-floor-epsilon-float32", p))
    s32 = np.sqrt(np.float64(np.float32(1e-3)))
    assert floored["output"][0] == pytest.approx(0.5 / s32, rel=1e-15)
    assert canonical["output"][0] == pytest.approx(0.5 / np.sqrt(1e-3), rel=1e-15)
    assert floored["renorm_stddev"][0] == canonical["renorm_stddev"][0]


def test_a_1d_sum_of_squares_is_noise_in_any_summation_order():
    """What Keras 3 on torch measured on an H200 (torch 2.11 CUDA) on
    cases/numerics/vector-large-mean-eps-0-float64: the float32 E[x²] - E[x]² over every axis of
    four values near 1e4 is noise of a few units either way (the CPU's order gives 0, so ±inf;
    CUDA's a variance whose moving average is 4.12, so finite outputs). The undetermined outputs
    and the variance's absolute band are taken over the axes the variants reduce (all of them),
    not per channel of one value, where nothing cancels."""
    cuda = {"output": [0.038669899106025696, -0.02658555470407009, -0.010358008556067944,
                       -0.0006905338959768414],
            "moving_mean": [4456.26171875] * 4, "moving_variance": [4.1193718910217285] * 4,
            "inference_output": [2731.484130859375, 2731.393310546875, 2731.415771484375,
                                 2731.42919921875]}
    explained = diagnosis_of("cases/numerics/vector-large-mean-eps-0-float64.yaml", "training",
                             measured=cuda)
    assert "+".join(KERAS_TORCH_1D) in explained(KERAS_TORCH_1D)
    wrong = {**cuda, "moving_mean": [4466.26171875] * 4}  # the mean is not noise: 10 off still fails
    assert diagnosis_of("cases/numerics/vector-large-mean-eps-0-float64.yaml", "training",
                        measured=wrong)(KERAS_TORCH_1D) == []


def test_ruled_variants_together_are_tried_where_only_an_unruled_one_matches():
    """cases/numerics/vector-large-mean-float64-gradients (found by fuzzing): epsilon-outside-sqrt,
    which no rule names, matches Keras-on-torch's NaN dL/dx in its wide band; the three ruled variants
    together are tried as well and listed after it, so the rules can know the failure."""
    explained = diagnosis_of("cases/numerics/vector-large-mean-float64-gradients.yaml", "gradients",
                             ("input",))  # scale and center are off
    alone = explained()
    assert alone and "+".join(KERAS_TORCH_1D) not in alone  # an unruled variant matches alone
    assert explained(KERAS_TORCH_1D)[-1] == "+".join(KERAS_TORCH_1D)


def test_denormals_flushed_in_inference_reads_stored_statistics_and_gamma_as_0():
    """Inference with a float32 subnormal moving variance (1e-40) and eps 0: flushed, (x - mean)/0
    is ±inf where the reference's (x - mean)·1e20 is finite; folded and flushed, x·inf - mean·inf is
    NaN where x and the mean share a sign. A subnormal gamma over a zero variance: TF's 1e-40·inf
    is NaN (gamma read as 0), the reference's inf (fuzz seed 5)."""
    p = dataclasses.replace(hand(epsilon=0.0, dtype="float32"), moving_mean=np.array([1.5]),
                            moving_variance=np.array([1e-40]))
    flushed = knobs("denormals-flushed", p, "inference")
    assert np.isfinite(simulate(p, "inference")["output"]).all()
    assert (simulate(p, "inference", flushed)["output"][:, 0] == [-np.inf, np.inf]).all()
    folded = simulate(p, "inference", dataclasses.replace(flushed, normalize_folded=True))["output"][:, 0]
    assert np.isnan(folded).all()  # x = 1 and 3 share the mean's sign
    g = dataclasses.replace(p, gamma=np.array([1e-40]), moving_variance=np.array([0.0]))
    assert (simulate(g, "inference")["output"][:, 0] == [-np.inf, np.inf]).all()
    assert np.isnan(simulate(g, "inference", flushed)["output"]).all()


def test_denormals_flush_in_float32_where_a_float64_case_computes_in_float32():
    """A float64 layer that computes in float32 (Keras 3 on jax) keeps float32 statistics, so a
    momentum subnormal in float32 (1.4e-45) is flushed to 0, not only one subnormal in float64."""
    p = dataclasses.replace(hand(momentum=1.401298464324817e-45), batches=(np.array([[2.0], [2.0]]),))
    flushed = simulate(p, "training", Knobs(flush_denormals="float64", compute_dtype="float32"))
    assert flushed["moving_variance"][0] == 0.0  # m·1 + (1 - m)·0 with m flushed
    assert simulate(p, "training", Knobs(flush_denormals="float64"))["moving_variance"][0] > 0.0


def test_denormals_flush_the_square_of_renorms_moving_std():
    """Renorm keeps the moving std, and Keras 3 stores relu(std·std - eps) as the moving variance:
    sqrt(1e-310)/2 squared is 2.5e-311, a float64 subnormal that TF's kernels flush to 0 (fuzz seed
    5, cases/numerics/denormal-moving-variance-renorm-eps-0), while the moving std itself is normal."""
    p = dataclasses.replace(hand(momentum=0.5, epsilon=0.0), batches=(np.array([[2.0]]),),
                            upstream=np.array([[1.0]]), moving_mean=np.array([1.0]),
                            moving_variance=np.array([1e-310]), renorm=Renorm(momentum=0.9))
    assert simulate(p, "training")["moving_variance"][0] == 0.25e-310
    flushed = simulate(p, "training", Knobs(flush_denormals="float64"))
    assert flushed["moving_variance"][0] == 0.0 and np.isinf(flushed["inference_output"][0, 0])


def test_residue_bands_of_momentum_1_are_0_where_the_residue_has_no_bound():
    """256 equal bfloat16 values: n·u reaches 1, so the mean's residue has no bound (inf), but
    momentum 1 gives the batch weight 0: the moving statistics' band is 0, not 0·inf = NaN (which
    failed exactly equal moving statistics: cases/numerics/constant-channel-momentum-1-bfloat16)."""
    p = dataclasses.replace(hand(momentum=1.0, epsilon=0.0, dtype="bfloat16"),
                            batches=(np.full((256, 1), 9984.0),), upstream=None)
    assert np.isinf(problems.mean_residue(p)[0]).all()
    mean_band, band = problems.residue_bands(p)
    assert mean_band.tolist() == [0.0] and band.tolist() == [0.0]


def test_folded_float16_weights_saturate_the_shift_at_float16_max():
    """TFLite's float16 weights: a folded shift of -1e5 is stored as -65504, so x·s + shift is off
    by 34496 where the float32 fold is exact."""
    p = dataclasses.replace(hand(epsilon=0.0, dtype="float16"), batches=(np.array([[1e4], [1e4]]),),
                            moving_mean=np.array([1e4]), moving_variance=np.array([0.01]))
    y = simulate(p, "inference", knobs("folded-float16-weights", p))["output"]
    assert y[0, 0] == pytest.approx(1e4 * 10 - 65504, rel=1e-6)
    assert simulate(p, "inference")["output"][0, 0] == 0.0


def test_folded_inf_saturated_stores_the_infinite_scale_and_shift_as_float32_max():
    """TFLite's converter stores a folded s = inf and shift = -inf (moving variance 0, eps 0) as
    ±3.4e38: x = 0.5 over a mean of 0.375 gives 0.5·max - max = -max/2, x = 2 gives inf - max = inf,
    where the plain fold gives inf - inf = NaN (measured: TFLite's -1.7014117e38 and inf)."""
    p = dataclasses.replace(hand(epsilon=0.0, dtype="float32"), batches=(np.array([[0.5], [2.0]]),),
                            moving_mean=np.array([0.375]), moving_variance=np.array([0.0]),
                            gamma=np.array([1.0]), beta=np.array([0.0]))
    y = simulate(p, "inference", knobs("folded-inf-saturated", p))["output"]
    assert y[:, 0].tolist() == [-float(np.finfo(np.float32).max) / 2, np.inf]
    assert np.isnan(simulate(p, "inference", knobs("normalize-folded", p))["output"][:, 0]).all()


def _conv_bn(bias: list[float], x: list[float], weight: list[list[float]]) -> Problem:
    """One position of a 1x1 Conv2D (NHWC) + BN, moving variance 0 and eps 0: s = inf."""
    c = len(bias)
    return dataclasses.replace(
        hand(epsilon=0.0, dtype="float32"), batches=(np.array(x).reshape(1, 1, 1, c),), axes=(-1,),
        moving_mean=np.array([0.25, -0.75, 1.5][:c]), moving_variance=np.zeros(c), gamma=np.ones(c),
        beta=np.zeros(c), preceding=Preceding(np.array(weight), np.array(bias)))


def test_folded_into_layer_sums_infinite_weights_where_the_unfused_fold_does_not():
    """BN folded into the Conv (torch's fuse_conv_bn_weights): W' = W·inf, b' = (b - mean)·inf, and
    the Conv's sum of ±inf terms is NaN where signs meet: measured [nan, inf, nan] on torch-fuse and
    the ONNX exports (cases/export/preceding-zero-bias-folded-inf-rank-4), where x·s + shift on the
    Conv's output gives [-inf, inf, nan]."""
    p = _conv_bn([0.0, 0.0, 0.0], [0.5, -1.5, 0.75], [[1.0, 2.0, 0.5], [0.5, -1.0, 0.25], [-0.5, 0.25, 1.0]])
    y = simulate(p, "inference", knobs("folded-into-layer", p))["output"].ravel()
    assert np.isnan(y[[0, 2]]).all() and y[1] == np.inf
    assert simulate(p, "inference", knobs("normalize-folded", p))["output"].ravel()[:2].tolist() == [
        -np.inf, np.inf]


def test_tflite_folds_a_zero_bias_of_a_4d_model_into_nan_and_drops_it_for_a_2d_one():
    """TFLite's converter (folded-inf-saturated): a 4-D model's zero bias is folded, 0·inf = NaN in
    every channel; a 2-D model's is dropped first, b' = shift saturated at ±float32 max, so the
    fma sum over saturated weights gives a finite value where ±3.4e38 terms cancel (measured
    -8.5e37 in cases/export/preceding-zero-bias-folded-inf-rank-2)."""
    weight = [[1.0, 2.0, 0.5], [0.5, -1.0, 0.25], [-0.5, 0.25, 1.0]]
    four = _conv_bn([0.0, 0.0, 0.0], [0.5, -1.5, 0.75], weight)
    assert np.isnan(simulate(four, "inference", knobs("folded-inf-saturated", four))["output"]).all()
    two = dataclasses.replace(four, batches=(np.array([[0.25, 1.0, -0.5]]),), axes=(1,))
    y = simulate(two, "inference", knobs("folded-inf-saturated", two))["output"].ravel()
    top = float(np.finfo(np.float32).max)
    # channel 0: acc = -max (shift), fma(0.25, max) = -0.75·max, fma(1.0, max) = 0.25·max, fma(-0.5, max)
    assert y[0] == pytest.approx(-0.25 * top, rel=1e-6)


def test_tflite_float16_weights_fold_into_the_layer_saturated_at_float16_max():
    """TFLite's float16 quantization folds BN into the layer before it too, and stores W·inf as
    ±65504 (NaN where a weight is 0): a row of non-zero weights sums to a finite value
    (cases/export/float16-preceding-folded-weights-saturated: ±4e5 where the reference gives ±inf)."""
    p = dataclasses.replace(_conv_bn([0.0, 0.0, 0.0], [0.5, -1.5, 0.75], [[1.0, 2.0, 0.5], [0.5, 0.0, 0.25],
                                                                       [-0.5, 0.25, 1.0]]), dtype="float16")
    two = dataclasses.replace(p, batches=(np.array([[0.5, -1.5, 0.75]]),), axes=(1,))
    y = simulate(two, "inference", knobs("folded-float16-weights", two))["output"].ravel()
    # channel 0: b' = -65504 (shift, the zero bias dropped), then 0.5·65504 - 1.5·65504 + 0.75·65504
    assert y[0] == pytest.approx(-1.25 * 65504, rel=1e-6) and np.isnan(y[1])


def test_a_folded_inference_is_banded_by_the_moving_variance_it_normalizes_with():
    """folded_error in inference takes s from the moving variance: one value per channel has a batch
    variance of 0 (eps 0: s = inf, no finite band), yet inference folds with s = 1/sqrt(0.001) = 31.6,
    so x·s = 22 rounds by 2u·22 (tf-nn's float16 fold, one ulp off: fuzz seed 14)."""
    from conformance.variants import folded_error

    p = dataclasses.replace(hand(epsilon=0.0, dtype="float16"), batches=(np.array([[-0.7]]),),
                            moving_mean=np.array([-0.65]), moving_variance=np.array([0.001]))
    from conformance.dtypes import eps as unit_roundoff_eps

    k = Knobs(normalize_folded=True, compute_dtype="float16")
    expected = 2 * unit_roundoff_eps("float16") * 0.7 / np.sqrt(0.001)
    assert folded_error(k, p, "inference") == pytest.approx(expected, rel=1e-3)


def test_the_converters_rsqrt_flushes_subnormals_in_whole_avx_packets_only():
    """TF's Rsqrt (Eigen's Packet8f, _mm256_rsqrt_ps) reads a subnormal as 0 in whole 8-channel
    packets; the last C mod 8 channels take the exact scalar path: 9 channels of 1e-40 give
    inf x 8 and 1e20 (measured on TFLite's folded constants)."""
    from conformance.variants import _packet_rsqrt_input

    assert _packet_rsqrt_input(np.full(9, 1e-40)).tolist() == [0.0] * 8 + [1e-40]
    assert _packet_rsqrt_input(np.full(4, 1e-40)).tolist() == [1e-40] * 4
    assert _packet_rsqrt_input(np.full((1, 16, 1), 1e-40)).shape == (1, 16, 1)


def test_kept_results_are_keyed_by_contents_layout_and_exact_values():
    """The simulation's memo (`variants._kept`) gives a computation's own result: equal contents
    give the kept (read-only) arrays, a strided view or -0.0 in place of 0.0 a result of their own."""
    from conformance.variants import _kept

    calls = []

    def total(x: np.ndarray, eps: float) -> np.ndarray:
        calls.append(eps)
        return x.sum(axis=0) + eps

    x = np.arange(12.0).reshape(4, 3)
    first = _kept(total, x, 0.0)
    assert _kept(total, x.copy(), 0.0) is first and not first.flags.writeable
    _kept(total, x, -0.0)
    wide = np.empty((4, 6))
    wide[:, ::2] = x
    _kept(total, wide[:, ::2], 0.0)  # x's contents in another layout: another order of summation
    assert calls == [0.0, -0.0, 0.0]


def test_a_gradient_that_cancels_to_0_is_the_sum_of_squares_noise_alone():
    """Keras 3 on torch (2.13, CPU; found on an H200 by fuzz --framework keras-torch --seed 37) on
    cases/numerics/vector-two-values-float64-gradients-cancel: two values normalized together are
    xhat = ±1, so dL/dx cancels to 0 exactly and what comes out, -0.0161 and 0.0159, is the noise of
    the float32 E[x²] - E[x]² (delta 1.6e-3). It is judged in the band that noise leaves in a
    gradient, derived from the variance's own band (2.2 here, against max|dy|/sigma = 34.5). Only an
    unruled variant (normalize-folded) matched before. What leaves that band still fails: the
    gradient with the statistics' backward left out (dy/sigma), or a residue larger than the band."""
    case = "cases/numerics/vector-two-values-float64-gradients-cancel.yaml"
    measured = {"input": [-0.01611328125, 0.015869140625]}
    triple = "+".join(KERAS_TORCH_1D)
    assert triple not in diagnosis_of(case, "gradients", measured=measured)()
    assert triple in diagnosis_of(case, "gradients", measured=measured)(KERAS_TORCH_1D)
    sigma = (3.082161814350116 - 3.0345584192064785) / 2  # of two values, biased
    dy = np.array([0.345584192064786, 0.8216181435011584])
    for wrong in ((dy / sigma).tolist(), [-3.0, 3.0]):
        assert triple not in diagnosis_of(case, "gradients", measured={"input": wrong})(KERAS_TORCH_1D)


def test_sum_of_squares_gradient_band_does_not_hide_a_wrong_gradient_where_nothing_cancels():
    """Channels of mean 20, std 1 (c = 37, float32): the sum of squares moves the result (its band
    is wider than the case's), yet the band it leaves in dL/dx, 0.021, is under 1% of the gradient
    (2.8), so a sign-flipped gradient is not explained by it, while the simulated one is. dL/dbeta
    does not read the variance and gets no band of its own."""
    from conformance.compare import tolerance
    from conformance.diagnose import diagnose
    from conformance.variants import sum_of_squares_atol

    p = problem(dtype="float32", loc=20.0, std=1.0)
    k = Knobs(variance="sum-of-squares")
    band = sum_of_squares_atol(k, p, "gradients")
    sim = simulate(p, "gradients", k)
    assert set(band) == {"input", "gamma"} and band["input"] < 0.01 * np.abs(sim["input"]).max()
    held = simulate(p, "gradients")
    c = max(abs(m) / np.sqrt(v + p.epsilon) for m, v in zip(*reference.moments(p.batches[0], p.axes)[:2],
                                                               strict=True))
    tol, scales = tolerance("float32", c, None), problems.gradient_scales(p)
    for got, explained in ((sim["input"], True), (-sim["input"], False)):
        found = diagnose(p, "gradients", (), {"input": got}, {"input": held["input"]}, tol, c, scales,
                         ruled=("variance-sum-of-squares",))
        assert ("variance-sum-of-squares" in found.explained_by) == explained


def test_an_output_past_the_dtype_range_is_inf_under_every_variant():
    """The fuzz run's tf-keras/tf-layers/tf-slim/tf-nn-fused float16 group (seed 11): one value per
    channel, so the fused kernel's Bessel factor is 1 (bessel-one-value, ruled) and the moving
    variance decays to m²·0.01; inference after training is then 1.5·(1e4 - 975)/0.095 = 1.4e5, which
    a float16 y holds as inf. `compare` holds the expected output so; where the framework gave inf the
    diagnosis must hold every variant's simulation so too, or only a float16 compute dtype
    (compute-input-dtype) explains the inf. A finite measurement (a float32 output) is compared as is."""
    from conformance.compare import tolerance
    from conformance.diagnose import diagnose

    p = dataclasses.replace(hand(momentum=0.95, epsilon=1e-5, dtype="float16"),
                            batches=(np.array([[1e4]]),) * 2, gamma=np.array([1.5]),
                            moving_variance=np.array([0.01]), upstream=None)
    declared = ("moving-variance-unbiased",)
    tf = simulate(p, "training", Knobs(moving_variance_estimator="unbiased", bessel_one_value=True))
    assert tf["inference_output"][0, 0] == pytest.approx(1.5 * (1e4 - 975.0) / 0.0950, rel=1e-3)
    got = {"output": tf["output"], "moving_mean": tf["moving_mean"], "moving_variance": tf["moving_variance"],
           "inference_output": np.array([[np.inf]])}  # what float16 holds for 1.4e5
    held = simulate_named(p, "training", declared)
    assert np.isnan(held["moving_variance"]).all()  # n/(n-1) of one value: undefined
    tol, ruled = tolerance("float16", 0.0, None), ("bessel-one-value",)
    found = diagnose(p, "training", declared, got, {n: held[n] for n in got}, tol, 0.0, ruled=ruled)
    assert "bessel-one-value" in found.explained_by
    got["inference_output"] = tf["inference_output"]  # a float32 output (TFLite's) stays finite
    found = diagnose(p, "training", declared, got, {n: held[n] for n in got}, tol, 0.0, ruled=ruled)
    assert "bessel-one-value" in found.explained_by
    got["inference_output"] = np.array([[65504.0]])  # a finite float16 output is still wrong
    found = diagnose(p, "training", declared, got, {n: held[n] for n in got}, tol, 0.0, ruled=ruled)
    assert "bessel-one-value" not in found.explained_by


def test_a_settled_element_outside_its_accepted_set_is_judged_by_every_variant():
    """cases/numerics/constant-channel-eps-0-inference-after-training as a float64 layer, which
    Keras 3 on jax computes in float32 (fuzz --seed 11 found it so): channels 0 and 1 are 0/0, where
    the harness accepts NaN or beta ± gamma (±0.217, ±0.303). Measured: moving mean 10000.1015625
    (float32's, 2 ulps up), moving variance 3.81e-6 = d², output 0.25 and -0.25. compute-float32
    explains the statistics but not 0.25, which lies outside the accepted set: the fold's rounding
    (normalize-folded) or a sum of squares' residue variance does. Ignoring every settled element
    whatever its value let compute-float32 alone explain it."""
    from conformance import ROOT
    from conformance.diagnose import diagnose
    from conformance.evaluate import tolerance
    from conformance.loader import load_file

    [loaded], _ = load_file(ROOT / "cases/numerics/constant-channel-eps-0-inference-after-training.yaml")
    case = loaded.case
    p = dataclasses.replace(problems.build(case, "training"), dtype="float64")
    tol = tolerance("float64", 0.0, None)
    held = simulate(p, "training")
    unsure = problems.undetermined(case, "training", p)
    got = {name: np.array(held[name]) for name in ("output", "moving_mean", "moving_variance")}
    got["moving_mean"][:2], got["moving_variance"][:2] = 10000.1015625, 3.814697265625e-06
    got["output"] = np.array(simulate_named(p, "training", ("compute-float32",))["output"])

    def explained(first: float, second: float) -> list[str]:
        got["output"][..., 0], got["output"][..., 1] = first, second
        return diagnose(p, "training", (), got, {k: held[k] for k in got}, tol, 0.0, {}, {},
                        ("compute-float32", "normalize-folded"), unsure).explained_by

    folded = explained(0.25, -0.25)
    assert "compute-float32" not in folded and "compute-float32+normalize-folded" in folded
    assert all("normalize-folded" in e or "sum-of-squares" in e for e in folded)
    assert "compute-float32" in explained(-p.gamma[0], -p.gamma[1])  # beta - gamma (beta 0): settled


def test_a_lower_compute_dtype_band_grows_with_the_moving_conditioning_of_inference_after_training():
    """Keras 3 on torch, a float64 layer (computed in float32), one value per channel, eps 0,
    momentum 0.14, three steps (found by `fuzz --seed 11`): the moving mean ends within 0.011 of
    the input, over sqrt(moving variance) = 1.65e-3, and Keras's update leaves it one float32 ulp
    from the simulated one (measured: 2.5759725570678711 against 2.5759727954864502), which
    inference after training scales by |moving mean| / sqrt(moving variance) = 1560. The output's
    own float64 tolerance is widened by that conditioning; compute-float32's band must be too."""
    from conformance.compare import tolerance
    from conformance.diagnose import diagnose
    from conformance.problem import moving_conditioning

    x = 2.5869364566081066
    p = dataclasses.replace(hand(momentum=0.13971296293595506, epsilon=0.0), batches=(np.array([[x]]),) * 3,
                            moving_mean=np.array([-1.4332508532293575]), moving_variance=np.array([1e-3]))
    k = knobs("compute-float32", p)
    f32 = simulate(p, "training", k)
    mm = np.nextafter(np.float32(f32["moving_mean"][0]), np.float32(0))  # one ulp off
    mv = np.float32(f32["moving_variance"][0])
    got = dict(f32, moving_mean=np.array([mm], np.float64),
               inference_output=np.array([[(np.float32(x) - mm) / np.sqrt(mv)]], np.float64))
    c = moving_conditioning(p)
    assert c > 1000
    assert tolerance_for(k, p, "training", 1e-10 * (1 + c), 1e-10 * (1 + c), 0.0, c) == (
        1e-5 * (1 + c),) * 2
    sos = Knobs(variance="sum-of-squares")
    assert tolerance_for(sos, p, "training", 1e-10, 1e-10, 0.0, c) == (1e-10, 1e-10)
    expected = simulate(p, "training")
    per_output = {"inference_output": tolerance("float64", c, None)}
    found = diagnose(p, "training", (), got, {n: expected[n] for n in got}, tolerance("float64", 0.0, None),
                     0.0, per_output=per_output)
    assert found.explained_by[:1] == ["compute-float32"], found


def test_a_wrong_expectation_is_not_explained_by_any_variant():
    """A measurement the adapter's own conventions give, against an expectation that is off (a
    hand-written expected value): every variant "moves" away from the expectation and matches the
    measurement, so without this a rule naming any of them would make the wrong expectation known."""
    from conformance.compare import tolerance
    from conformance.diagnose import diagnose

    p = problem(dtype="float64", loc=0.0, std=1.0)
    right = simulate(p, "training")["output"]
    wrong = right.copy()
    wrong.flat[0] += 0.5
    tol = tolerance("float64", 1.0, None)
    found = diagnose(p, "training", (), {"output": right}, {"output": wrong}, tol, 1.0,
                     ruled=("normalize-folded", "compute-float32"))
    assert found.explained_by == []
