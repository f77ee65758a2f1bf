"""The float64 reference against independent formulations and hand-derived values."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from adapters.base import Adjustment, Problem, Renorm, Replicas
from conformance import reference
from conformance.dtypes import round_to
from conformance.loader import load_folders
from conformance.outputs import outputs_of
from conformance.problem import build
from conformance.schema import Case

ROOT = Path(__file__).resolve().parent.parent


def problem(shape, axes, *, momentum=0.9, epsilon=1e-3, steps=1, seed=0, gamma=None, beta=None):
    rng = np.random.default_rng(seed)
    channel_shape = tuple(shape[a] for a in axes)
    return Problem(
        case_id="t", dtype="float64",
        batches=tuple(rng.normal(1.0, 2.0, shape) for _ in range(steps)),
        axes=tuple(axes), momentum=momentum, epsilon=epsilon, center=True, scale=True,
        gamma=rng.normal(size=channel_shape) if gamma is None else gamma,
        beta=rng.normal(size=channel_shape) if beta is None else beta,
        moving_mean=rng.normal(size=channel_shape), moving_variance=rng.uniform(0.5, 2, channel_shape),
        upstream=rng.normal(size=shape),
    )


LAYOUTS = [((6, 3), (1,)), ((3, 6), (0,)), ((2, 3, 4), (1,)), ((2, 4, 3), (-1,)),
           ((2, 3, 4, 5), (1,)), ((2, 3, 4, 5), (3,)), ((2, 3, 4, 5), (1, 2)), ((2, 3, 4, 5), (3, 1)),
           ((2, 3, 2, 2, 4), (-1,))]


def loop_training(p: Problem):
    """Per-channel loop, one channel index at a time: a second, independent formulation."""
    axes = p.channel_axes
    mm, mv, mvu = p.moving_mean.copy(), p.moving_variance.copy(), p.moving_variance.copy()
    for step, x in enumerate(p.batches, start=1):
        out = np.empty_like(x)
        m = (1 - 1 / step) if p.momentum is None else p.momentum
        for index in itertools.product(*(range(x.shape[a]) for a in axes)):
            selector = [slice(None)] * x.ndim
            for a, i in zip(axes, index, strict=True):
                selector[a] = i
            values = x[tuple(selector)].ravel()
            n = values.size
            mean = sum(values) / n
            var = sum((v - mean) ** 2 for v in values) / n
            out[tuple(selector)] = p.gamma[index] * (x[tuple(selector)] - mean) / np.sqrt(
                var + p.epsilon) + p.beta[index]
            mm[index] = m * mm[index] + (1 - m) * mean
            mv[index] = m * mv[index] + (1 - m) * var
            mvu[index] = m * mvu[index] + (1 - m) * var * n / (n - 1)
    return out, mm, mv, mvu


@pytest.mark.parametrize(("shape", "axes"), LAYOUTS)
@pytest.mark.parametrize("momentum", [0.0, 0.9, 1.0, None])
def test_training_matches_a_per_channel_loop(shape, axes, momentum):
    p = problem(shape, axes, momentum=momentum, steps=3)
    r = reference.train(p)
    out, mm, mv, mvu = loop_training(p)
    np.testing.assert_allclose(r.output, out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(r.moving_mean, mm, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(r.moving_variance, mv, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(r.moving_variance_unbiased, mvu, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("shape", "axes"), LAYOUTS)
def test_gradients_match_torch_autograd_in_float64(shape, axes):
    p = problem(shape, axes)
    g = reference.gradients(p)
    x = torch.tensor(p.batches[-1], requires_grad=True)
    gamma = torch.tensor(p.gamma, requires_grad=True)
    beta = torch.tensor(p.beta, requires_grad=True)
    red = tuple(d for d in range(x.ndim) if d not in p.channel_axes)
    mean = x.mean(dim=red, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=red, keepdim=True)

    def b(t):
        return torch.tensor(0.0, dtype=torch.float64) + t.permute(*np.argsort(p.channel_axes)).reshape(
            [x.shape[d] if d in p.channel_axes else 1 for d in range(x.ndim)])

    y = b(gamma) * (x - mean) / torch.sqrt(var + p.epsilon) + b(beta)
    (y * torch.tensor(p.upstream)).sum().backward()
    np.testing.assert_allclose(g["input"], x.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g["gamma"], gamma.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g["beta"], beta.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_inference_formula():
    p = problem((4, 3), (1,))
    y = reference.infer(p)
    expected = p.gamma * (p.batches[0] - p.moving_mean) / np.sqrt(p.moving_variance + p.epsilon) + p.beta
    np.testing.assert_allclose(y, expected, rtol=1e-15)


def test_unbiased_variance_of_a_single_element_is_nan():
    assert np.isnan(reference.unbiased(np.array([0.0]), 1)).all()


def hand_cases():
    cases, errors = load_folders([ROOT / "cases" / "hand"])
    assert not errors
    return cases


@pytest.mark.parametrize("loaded", hand_cases(), ids=lambda c: c.case.id)
def test_reference_reproduces_hand_derived_values(loaded):
    """Each cases/hand file shows its derivation in comments; the reference must agree to 1e-12."""
    case = loaded.case
    checked = 0
    if case.training is not None:
        r = vars(reference.train(build(case, "training")))
        for name in (o.name for o in outputs_of("training")):
            given = getattr(case.training.expected, name)
            if given is not None:
                np.testing.assert_allclose(r[name], np.array(given).reshape(r[name].shape), atol=1e-12)
                checked += 1
        if case.training.gradients is not None:
            g = reference.gradients(build(case, "gradients"))
            for name in (o.name for o in outputs_of("gradients")):
                given = getattr(case.training.gradients.expected, name)
                if given is not None:
                    np.testing.assert_allclose(g[name], np.array(given).reshape(g[name].shape), atol=1e-12)
                    checked += 1
    if case.inference is not None:
        y = reference.infer(build(case, "inference"))
        np.testing.assert_allclose(y, np.array(case.inference.expected.output).reshape(y.shape), atol=1e-12)
        checked += 1
    assert checked


def test_at_least_five_hand_derived_cases():
    assert len(hand_cases()) >= 5


# --- renorm, ghost batches, adjustment, no running statistics: a per-channel, per-sample loop -------


def with_features(p: Problem, *, renorm=None, ghost=None, adjust=False, track=True, seed=1) -> Problem:
    rng = np.random.default_rng(seed)
    shape = p.gamma.shape
    adjustment = None
    if adjust:
        adjustment = Adjustment(scale=rng.uniform(0.5, 1.5, shape), bias=rng.normal(size=shape))
    return dataclasses.replace(p, renorm=renorm, virtual_batch_size=ghost, adjustment=adjustment,
                               track_running_stats=track)


def loop_features(p: Problem):
    """The canonical definitions (reference.py's docstring) one channel and one virtual batch at a
    time, in plain Python arithmetic: output, moving mean and variance, inference output."""
    axes = p.channel_axes
    mm, mv = p.moving_mean.copy(), p.moving_variance.copy()
    rmean, rstd, mstd = p.moving_mean.copy(), np.sqrt(p.moving_variance), np.sqrt(p.moving_variance)
    for step, x in enumerate(p.batches, start=1):
        out = np.empty_like(x)
        m = (1 - 1 / step) if p.momentum is None else p.momentum
        n = x.shape[0]
        v = p.virtual_batch_size or n
        for index in itertools.product(*(range(x.shape[a]) for a in axes)):
            selector = [slice(None)] * x.ndim
            for a, i in zip(axes, index, strict=True):
                selector[a] = i
            means, variances = [], []
            for start in range(0, n, v):
                rows = [slice(start, start + v), *selector[1:]] if 0 not in axes else selector
                values = x[tuple(rows)].ravel()
                mean = sum(values) / values.size
                means.append(mean)
                variances.append(sum((e - mean) ** 2 for e in values) / values.size)
            mean, var = sum(means) / len(means), sum(variances) / len(variances)
            r, d = 1.0, 0.0
            if p.renorm is not None:
                s = max(rstd[index], np.sqrt(p.epsilon))
                r, d = np.sqrt(var + p.epsilon) / s, (mean - rmean[index]) / s
                c = p.renorm
                r = max(r, c.rmin) if c.rmin is not None else r
                r = min(r, c.rmax) if c.rmax is not None else r
                d = min(max(d, -c.dmax), c.dmax) if c.dmax is not None else d
            a, b = (p.adjustment.scale[index], p.adjustment.bias[index]) if p.adjustment else (1.0, 0.0)
            for j, start in enumerate(range(0, n, v)):
                rows = tuple([slice(start, start + v), *selector[1:]])
                xhat = (x[rows] - means[j]) / np.sqrt(variances[j] + p.epsilon)
                out[rows] = p.gamma[index] * (a * (r * xhat + d) + b) + p.beta[index]
            mm[index] = m * mm[index] + (1 - m) * mean
            if p.renorm is None:
                mv[index] = m * mv[index] + (1 - m) * var
            else:
                rho = p.renorm.momentum
                rmean[index] = rho * rmean[index] + (1 - rho) * mean
                rstd[index] = rho * rstd[index] + (1 - rho) * np.sqrt(var + p.epsilon)
                mstd[index] = m * mstd[index] + (1 - m) * np.sqrt(var + p.epsilon)
                mv[index] = max(mstd[index] ** 2 - p.epsilon, 0.0)
    return out, mm, mv


FEATURES = [
    {"renorm": Renorm(momentum=0.9)},
    {"renorm": Renorm(momentum=0.5, rmax=1.2, rmin=0.9, dmax=0.1)},
    {"ghost": 2},
    {"ghost": 3},
    {"adjust": True},
    {"renorm": Renorm(momentum=0.8, rmax=1.5, rmin=0.7, dmax=0.3), "ghost": 2, "adjust": True},
    {"track": False},
]


@pytest.mark.parametrize("features", FEATURES, ids=str)
@pytest.mark.parametrize(("shape", "axes"), [((6, 3), (1,)), ((6, 2, 3), (-1,)), ((6, 3, 2, 2), (1,))])
def test_features_match_a_per_channel_loop(features, shape, axes):
    p = with_features(problem(shape, axes, steps=3), **features)
    r = reference.train(p)
    out, mm, mv = loop_features(p)
    np.testing.assert_allclose(r.output, out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(r.moving_mean, mm, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(r.moving_variance, mv, rtol=1e-12, atol=1e-12)
    if p.track_running_stats:
        last = dataclasses.replace(p, batches=p.batches[-1:], moving_mean=mm, moving_variance=mv)
    else:  # inference normalizes with the batch's own statistics
        mean, var, _ = reference.moments(p.batches[-1], p.channel_axes)
        last = dataclasses.replace(p, batches=p.batches[-1:], track_running_stats=True, moving_mean=mean,
                                   moving_variance=var)
    np.testing.assert_allclose(r.inference_output, reference.infer(last), rtol=1e-12, atol=1e-12)
    if not p.track_running_stats:  # the inference check, too, uses the batch's statistics
        np.testing.assert_allclose(reference.infer(dataclasses.replace(p, batches=p.batches[-1:])),
                                   reference.infer(last), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("features", FEATURES, ids=str)
def test_feature_gradients_match_torch_autograd(features):
    """r and d are constants (stop_gradient), ghost batches each normalize with their own statistics."""
    p = with_features(problem((6, 3, 2), (1,)), **features)
    g = reference.gradients(p)
    x = torch.tensor(p.batches[-1], requires_grad=True)
    gamma = torch.tensor(p.gamma, requires_grad=True)
    beta = torch.tensor(p.beta, requires_grad=True)
    v = p.virtual_batch_size or 6
    xs = x.reshape(6 // v, v, 3, 2)
    mean = xs.mean(dim=(1, 3), keepdim=True)
    var = ((xs - mean) ** 2).mean(dim=(1, 3), keepdim=True)
    xhat = ((xs - mean) / torch.sqrt(var + p.epsilon)).reshape(6, 3, 2)
    if p.renorm is not None:
        with torch.no_grad():
            bm, bv = mean.mean(dim=0).reshape(3), var.mean(dim=0).reshape(3)
            s = torch.clamp(torch.sqrt(torch.tensor(p.moving_variance)), min=np.sqrt(p.epsilon))
            r = torch.sqrt(bv + p.epsilon) / s
            d = (bm - torch.tensor(p.moving_mean)) / s
            c = p.renorm
            r = r.clamp(min=c.rmin) if c.rmin is not None else r
            r = r.clamp(max=c.rmax) if c.rmax is not None else r
            d = d.clamp(-c.dmax, c.dmax) if c.dmax is not None else d
        xhat = xhat * r.reshape(1, 3, 1) + d.reshape(1, 3, 1)
    if p.adjustment is not None:
        xhat = xhat * torch.tensor(p.adjustment.scale).reshape(1, 3, 1) + torch.tensor(
            p.adjustment.bias).reshape(1, 3, 1)
    y = gamma.reshape(1, 3, 1) * xhat + beta.reshape(1, 3, 1)
    (y * torch.tensor(p.upstream)).sum().backward()
    np.testing.assert_allclose(g["input"], x.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(g["gamma"], gamma.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(g["beta"], beta.grad.numpy(), rtol=1e-10, atol=1e-12)
def mixed_case(param_dtype: str | None) -> Case:
    """float16 input; gamma, beta and moving statistics with digits float16 cannot hold."""
    params = {"axis": 1, "momentum": 0.5, "epsilon": 1e-3, "gamma": [1.0001, 0.5002],
              "beta": [0.2501, -0.0001], "moving_mean": [1000.25, 0.30001], "moving_variance": [1.0001, 2e-6]}
    if param_dtype is not None:
        params["param_dtype"] = param_dtype
    return Case.model_validate({"id": "mixed", "dtype": "float16", "params": params,
                                "batches": [{"shape": [6, 2], "random": {"seed": s}} for s in (1, 2)],
                                "training": {"expected": {}}})


def test_param_dtype_holds_the_parameters_in_their_own_dtype():
    """param_dtype rounds gamma, beta and the moving statistics to itself, not to the input dtype;
    the input stays float16. Equal to the input dtype, it is no feature at all."""
    mixed, plain = build(mixed_case("float32"), "training"), build(mixed_case(None), "training")
    assert mixed.param_dtype == "float32" and plain.param_dtype is None
    assert mixed.params_dtype == "float32" and plain.params_dtype == "float16"
    for name in ("gamma", "beta", "moving_mean", "moving_variance"):
        given = np.array(getattr(mixed_case(None).params, name))
        np.testing.assert_array_equal(getattr(mixed, name), round_to(given, "float32"))
        np.testing.assert_array_equal(getattr(plain, name), round_to(given, "float16"))
    assert mixed.moving_mean[0] == 1000.25 and plain.moving_mean[0] == 1000.0  # float16 spacing 0.5
    np.testing.assert_array_equal(mixed.batches[0], plain.batches[0])
    assert "param-dtype" in mixed.features() and "param-dtype" not in plain.features()
    assert build(mixed_case("float16"), "training").param_dtype is None


def test_param_dtype_reference_matches_the_per_channel_loop():
    """The second formulation on a mixed problem: the loop over channels with the parameters as
    held in float32 gives the reference's values."""
    p = build(mixed_case("float32"), "training")
    r = reference.train(p)
    out, mm, mv, mvu = loop_training(p)
    np.testing.assert_allclose(r.output, out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(r.moving_mean, mm, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(r.moving_variance, mv, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(r.moving_variance_unbiased, mvu, rtol=1e-12, atol=1e-12)
@pytest.mark.parametrize(("n", "count"), [(8, 2), (8, 4), (7, 3), (5, 4)])
def test_replicas(n, count):
    """Synchronized replicas are one device's BN on the whole batch. Unsynchronized ones are each
    shard's own BN (consecutive shards, the first n mod count one larger), with the moving
    statistics averaged over replicas."""
    p = problem((n, 3, 2), (1,), steps=2)
    sync = reference.train(dataclasses.replace(p, replicas=Replicas(count, True)))
    for name, value in vars(reference.train(p)).items():
        np.testing.assert_array_equal(getattr(sync, name), value)
    got = reference.train(dataclasses.replace(p, replicas=Replicas(count, False)))
    sizes = [len(a) for a in np.array_split(np.arange(n), count)]
    starts = np.cumsum([0, *sizes])
    alone = [reference.train(dataclasses.replace(p, batches=tuple(x[a:b] for x in p.batches)))
             for a, b in itertools.pairwise(starts)]
    np.testing.assert_array_equal(got.output, np.concatenate([r.output for r in alone]))
    for name in ("moving_mean", "moving_variance", "moving_variance_unbiased", "batch_mean"):
        np.testing.assert_allclose(getattr(got, name), np.mean([getattr(r, name) for r in alone], axis=0),
                                   rtol=1e-14)
    np.testing.assert_allclose(got.inference_output, reference.normalize(
        p.batches[-1], p, got.moving_mean, got.moving_variance), rtol=1e-14)


def test_a_constant_channel_has_its_value_as_mean_and_no_variance():
    """Exact arithmetic: the float64 mean of 54 copies of 10000.1 is not 10000.1 (it rounds), so a
    plain mean would leave the reference a residue d: its 0/0 a ±1, its moving variance after
    momentum 0 a d² (fuzz, stop 23: tf-keras gave NaN where the reference expected -1.0)."""
    from conformance.reference import moments

    x = np.full((54, 2), 10000.1)
    x[:, 1] = np.linspace(0.0, 1.0, 54)
    assert np.full(54, 10000.1).mean() != 10000.1  # what a plain mean gives
    mean, var, count = moments(x, (1,))
    assert mean[0] == 10000.1 and var[0] == 0.0 and count == 54
    assert mean[1] == pytest.approx(0.5, rel=1e-15) and var[1] > 0
