"""`torch.nn.functional.batch_norm`, with the state kept by the caller.

- `F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)` updates the
  running tensors in place when `training=True`: `running = (1 - momentum) * running + momentum *
  batch`, so canonical m becomes `momentum = 1 - m`. It takes no `momentum=None`; the cumulative
  average is the caller's job, as `nn.BatchNorm` does it: step t uses `momentum = 1 / t`.
- Channel axis: dim 1; others are moved there with `movedim`. Any rank >= 2 works.
- center/scale off: `bias=None` / `weight=None`, which the function treats as 0 / 1.
- The running variance is updated with the unbiased batch variance (declared below).
- track_running_stats false: `running_mean=None, running_var=None` and `training=True` in every
  mode, exactly what `nn.BatchNorm(track_running_stats=False)` passes (torch/nn/modules/batchnorm.py
  `_BatchNorm.forward`: `bn_training = True` when both buffers are None); with `training=False`
  the function cannot run without running statistics.
- Mixed precision (`param_dtype`): weight, bias and the running statistics are `param_dtype`
  tensors and x is the case dtype; the CPU kernel mixes only float16/bfloat16 input with float32
  parameters (as for `nn.BatchNorm`), other mixes are not expressible.
- Threads: importing this module calls `torch.set_num_threads(1)`, as the ONNX Runtime adapter
  runs its sessions on one thread. With a pool, each tiny call pays an OpenMP fork/barrier that
  costs milliseconds instead of microseconds when the cores are shared, and channel-last inputs
  have their statistics reduced in per-thread parts, so the last bits depended on the core count
  (measured on 2 cores against 1: 18 of 78 checks per adapter differ in the last bits, at most
  1.4e-3 on the mean-1e4 case, within its tolerance). One thread gives the same bits everywhere.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from adapters.base import (
    Adapter,
    Capabilities,
    Check,
    Conventions,
    DefaultLayer,
    Gradients,
    NotExpressible,
    Observed,
    Problem,
    TrainingRun,
    no_such_argument,
)
from adapters.torch_setup import DEVICE, to_numpy

torch.set_num_threads(1)  # see the docstring: one thread for many tiny calls

TORCH_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


class TorchFunctional(Adapter):
    id = "torch-functional"
    names: ClassVar[dict[str, str]] = {
        "momentum": "momentum (= 1 - m)", "epsilon": "eps", "axis": "dim 1 (no argument)",
        "center": "bias=None", "scale": "weight=None", "gamma": "weight", "beta": "bias",
        "moving_mean": "running_mean", "moving_variance": "running_var", "mode": "training="
    }
    family = "torch"
    conventions = Conventions(variants=("moving-variance-unbiased",))

    def versions(self) -> dict[str, str]:
        return {"torch": torch.__version__}

    def device(self) -> str:
        return DEVICE.type

    capabilities = Capabilities(
        min_rank=2, features=frozenset({"momentum-null", "no-running-stats", "param-dtype"}),
        why={"multi-axis": "F.batch_norm normalizes over one channel dim (dim 1)",
             **no_such_argument("F.batch_norm", ("renorm", "ghost-batches", "adjustment")),
             "rank": "F.batch_norm needs at least 2-D input (batch, channels, ...)"},
    )

    def not_expressible(self, problem: Problem, check: Check) -> str | None:
        if problem.param_dtype is not None and not (
                problem.param_dtype == "float32" and problem.dtype in ("float16", "bfloat16")):
            return (f"{problem.dtype} input with {problem.param_dtype} parameters: the CPU kernel mixes only "
                    "float16/bfloat16 input with float32 parameters")
        if problem.epsilon <= 0 and (check != "inference" or not problem.track_running_stats):
            # torch/nn/functional.py (2.13) batch_norm: `if training and eps <= 0.0: raise ValueError(
            # "batch_norm eps must be positive during training")`; without running statistics
            # inference runs with training=True too
            return "torch rejects eps <= 0 in training (ValueError: eps must be positive during training)"
        return None

    def translations(self, problem: Problem) -> list[str]:
        out = []
        if not problem.track_running_stats:
            out.append("track_running_stats false -> running_mean=None, running_var=None, training=True "
                       "in inference too (as nn.BatchNorm(track_running_stats=False) calls it)")
        elif problem.momentum is None:
            out.append("momentum null -> momentum=1/t at step t (cumulative average by hand)")
        else:
            out.append(f"momentum {problem.momentum:g} -> momentum={1 - problem.momentum:g} (1 - m)")
        axis = problem.axes[0]
        if axis not in (1, 1 - problem.rank):
            out.append(f"channel axis {axis} -> movedim({axis}, 1) and back")
        if not problem.scale:
            out.append("scale off -> weight=None")
        if not problem.center:
            out.append("center off -> bias=None")
        if problem.param_dtype is not None:
            out.append(f"param_dtype {problem.param_dtype} -> weight, bias, running_mean/var as "
                       f"{problem.param_dtype} tensors, x {problem.dtype}")
        return out

    def default_layer(self, shape: tuple[int, ...], dtype: str = "float32",
                      trainable: bool = True) -> DefaultLayer:
        if not trainable:
            raise NotExpressible("F.batch_norm has no trainable flag")
        return DefaultCall(shape, dtype)

    def state(self, problem: Problem) -> dict[str, torch.Tensor | None]:
        dtype = TORCH_DTYPES[problem.params_dtype]
        tracked = problem.track_running_stats
        return {
            "weight": torch.tensor(problem.gamma, dtype=dtype) if problem.scale else None,
            "bias": torch.tensor(problem.beta, dtype=dtype) if problem.center else None,
            "running_mean": torch.tensor(problem.moving_mean, dtype=dtype) if tracked else None,
            "running_var": torch.tensor(problem.moving_variance, dtype=dtype) if tracked else None,
        }

    def tensor(self, x: np.ndarray, problem: Problem) -> torch.Tensor:
        return torch.tensor(x, dtype=TORCH_DTYPES[problem.dtype]).movedim(problem.axes[0], 1)

    def back(self, y: torch.Tensor, problem: Problem) -> np.ndarray:
        return to_numpy(y.movedim(1, problem.axes[0]))

    def train(self, problem: Problem) -> TrainingRun:
        s = self.state(problem)
        with torch.no_grad():
            for step, x in enumerate(problem.batches, start=1):
                momentum = 1.0 / step if problem.momentum is None else 1.0 - problem.momentum
                y = F.batch_norm(self.tensor(x, problem), s["running_mean"], s["running_var"],
                                 s["weight"], s["bias"], training=True, momentum=momentum,
                                 eps=problem.epsilon)
            tracked = problem.track_running_stats
            run = TrainingRun(output=self.back(y, problem),
                              moving_mean=to_numpy(s["running_mean"]) if tracked else None,
                              moving_variance=to_numpy(s["running_var"]) if tracked else None)
            if problem.infer_after_training:
                y = F.batch_norm(self.tensor(problem.batches[-1], problem), s["running_mean"],
                                 s["running_var"], s["weight"], s["bias"], training=not tracked,
                                 eps=problem.epsilon)
                run.inference_output = self.back(y, problem)
        return run

    def infer(self, problem: Problem) -> np.ndarray:
        s = self.state(problem)
        with torch.no_grad():
            y = F.batch_norm(self.tensor(problem.batches[-1], problem), s["running_mean"],
                             s["running_var"], s["weight"], s["bias"],
                             training=not problem.track_running_stats,
                             eps=problem.epsilon)
        return self.back(y, problem)

    def gradients(self, problem: Problem) -> Gradients:
        s = self.state(problem)
        for name in ("weight", "bias"):
            if s[name] is not None:
                s[name].requires_grad_(True)
        x = self.tensor(problem.batches[-1], problem).detach().requires_grad_(True)
        y = F.batch_norm(x, s["running_mean"], s["running_var"], s["weight"], s["bias"],
                         training=True, eps=problem.epsilon)
        y.backward(self.tensor(problem.upstream, problem))
        return Gradients(
            input=self.back(x.grad, problem),
            gamma=to_numpy(s["weight"].grad) if problem.scale else None,
            beta=to_numpy(s["bias"].grad) if problem.center else None,
        )


class DefaultCall(DefaultLayer):
    """`F.batch_norm(x, running_mean, running_var)` with fresh state and no other argument."""

    def __init__(self, shape: tuple[int, ...], dtype: str):
        self.dtype = TORCH_DTYPES[dtype]
        self.running_mean = torch.zeros(shape[1], dtype=self.dtype)
        self.running_var = torch.ones(shape[1], dtype=self.dtype)

    def call(self, x: np.ndarray, mode: Check | None) -> Observed:
        kwargs = {} if mode is None else {"training": mode == "training"}
        with torch.no_grad():
            y = F.batch_norm(torch.tensor(x, dtype=self.dtype), self.running_mean, self.running_var,
                             **kwargs)
        return Observed(to_numpy(y), str(y.dtype).removeprefix("torch."), to_numpy(self.running_mean),
                        to_numpy(self.running_var), str(self.running_var.dtype).removeprefix("torch."))


def make(adapter_id: str) -> Adapter:
    return TorchFunctional()
