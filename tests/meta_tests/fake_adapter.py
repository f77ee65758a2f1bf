"""A NumPy-only "framework" whose defects can be switched on, in the spirit of array-api-tests'
meta_tests: the suite must catch each defect, with the right figures, and name it.

The adapter id picks the defect: `fake` is a correct two-pass BN; `fake-<defect>` has one.
It is selected by the meta-tests only (in-process, or through its entry point).
"""

from __future__ import annotations

import numpy as np

from adapters.base import Adapter, Capabilities, Conventions, Gradients, Problem, TrainingRun

DEFECTS = {
    "sum-of-squares": "batch variance as E[x^2] - E[x]^2 in float32",
    "momentum-complement": "moving = (1 - m) moving + m batch",
    "wrong-estimator-declared": "declares the unbiased moving variance, updates with the biased one",
    "stats-never-updated": "training leaves the moving statistics as they were",
    "outside-catalogue": "the output is scaled by 1.01",
    "raises-on-training": "the 'framework' raises in training",
}


class FakeBatchNorm(Adapter):
    family = "fake"
    capabilities = Capabilities(features=frozenset({"multi-axis", "momentum-null"}))

    def __init__(self, adapter_id: str):
        self.id = adapter_id
        self.defect = adapter_id.removeprefix("fake").removeprefix("-") or None
        if self.defect is not None and self.defect not in DEFECTS:
            raise ValueError(f"unknown defect {self.defect!r}")
        declared = ("moving-variance-unbiased",) if self.defect == "wrong-estimator-declared" else ()
        self.conventions = Conventions(variants=declared)

    def versions(self) -> dict[str, str]:
        return {"numpy": np.__version__}

    def _shape(self, p: Problem, x: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
        axes = p.channel_axes
        reduce = tuple(d for d in range(x.ndim) if d not in axes)
        return reduce, tuple(x.shape[d] if d in axes else 1 for d in range(x.ndim))

    def _b(self, p: Problem, values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return p.to_ascending(values).reshape(shape)

    def _moments(self, p: Problem, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        reduce, _ = self._shape(p, x)
        mean = x.mean(axis=reduce, keepdims=True)
        if self.defect == "sum-of-squares":
            x32 = x.astype(np.float32)
            var = np.maximum((x32 * x32).mean(axis=reduce, keepdims=True, dtype=np.float32)
                             - np.float32(mean) ** 2, 0).astype(np.float64)
        else:
            var = ((x - mean) ** 2).mean(axis=reduce, keepdims=True)
        return mean, var

    def _normalize(self, p: Problem, x: np.ndarray, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
        _, shape = self._shape(p, x)
        y = self._b(p, p.gamma, shape) * (x - mean) / np.sqrt(var + p.epsilon) + self._b(p, p.beta, shape)
        return y * 1.01 if self.defect == "outside-catalogue" else y

    def train(self, problem: Problem) -> TrainingRun:
        if self.defect == "raises-on-training":
            raise RuntimeError("fake framework: training is not implemented")
        p = problem
        moving_mean, moving_var = p.moving_mean.copy(), p.moving_variance.copy()
        for step, x in enumerate(p.batches, start=1):
            mean, var = self._moments(p, x)
            y = self._normalize(p, x, mean, var)
            if self.defect == "stats-never-updated":
                continue
            m = 1 - 1 / step if p.momentum is None else p.momentum
            weight_old = 1 - m if self.defect == "momentum-complement" else m
            batch_mean, batch_var = p.to_case_order(mean), p.to_case_order(var)
            moving_mean = weight_old * moving_mean + (1 - weight_old) * batch_mean
            moving_var = weight_old * moving_var + (1 - weight_old) * batch_var
        run = TrainingRun(output=y, moving_mean=moving_mean, moving_variance=moving_var,
                          batch_mean=p.to_case_order(mean), batch_variance=p.to_case_order(var))
        if p.infer_after_training:
            _, shape = self._shape(p, p.batches[-1])
            run.inference_output = self._normalize(p, p.batches[-1], self._b(p, moving_mean, shape),
                                                   self._b(p, moving_var, shape))
        return run

    def infer(self, problem: Problem) -> np.ndarray:
        x = problem.batches[-1]
        _, shape = self._shape(problem, x)
        return self._normalize(problem, x, self._b(problem, problem.moving_mean, shape),
                               self._b(problem, problem.moving_variance, shape))

    def gradients(self, problem: Problem) -> Gradients:
        p, x, dy = problem, problem.batches[-1], problem.upstream
        reduce, shape = self._shape(p, x)
        mean, var = self._moments(p, x)
        inv = 1 / np.sqrt(var + p.epsilon)
        xhat = (x - mean) * inv
        dx = self._b(p, p.gamma, shape) * inv * (dy - dy.mean(axis=reduce, keepdims=True)
                                                 - xhat * (dy * xhat).mean(axis=reduce, keepdims=True))
        return Gradients(input=dx, gamma=p.to_case_order((dy * xhat).sum(axis=reduce)) if p.scale else None,
                         beta=p.to_case_order(dy.sum(axis=reduce)) if p.center else None)


def make(adapter_id: str) -> Adapter:
    return FakeBatchNorm(adapter_id)
