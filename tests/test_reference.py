"""The float64 reference against independent formulations and hand-derived values."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from adapters.base import Problem, Replicas
from conformance import reference
from conformance.loader import load_folders
from conformance.outputs import outputs_of
from conformance.problem import build

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
