"""`torch.nn.BatchNorm1d/2d/3d`, used as the PyTorch docs describe.

- Momentum: torch updates `running = (1 - momentum) * running + momentum * batch`, so the canonical
  decay-form m becomes `momentum = 1 - m`; m = null becomes `momentum=None`, torch's cumulative
  average over `num_batches_tracked`.
- Channel axis: torch normalizes over dim 1; any other channel axis is moved there with
  `movedim` and back afterwards. BatchNorm1d takes 2-D/3-D input, 2d 4-D, 3d 5-D.
- center/scale: both on is `affine=True`; both off is `affine=False` (no parameters at all); one
  off is `affine=True` with that parameter set to its identity value (weight 1 or bias 0) and
  frozen with `requires_grad_(False)`, which is how torch users switch off one of the two.
- The moving (running) variance is updated with the unbiased batch variance (declared below).
- Modes: `.train()` for training, `.eval()` for inference.
- track_running_stats false: `track_running_stats=False`; the module then has no running
  statistics (`running_mean is None`) and normalizes with the batch's statistics in eval mode too
  (torch/nn/modules/batchnorm.py `_BatchNorm.forward`: `bn_training = True` when both running
  buffers are None).
- Mixed precision (`param_dtype`): the module is built in `param_dtype` (float32) and fed input of
  the case dtype (float16/bfloat16), as in a float32 model fed reduced-precision activations; the
  CPU kernel accepts exactly that mix (a float32 module and float16/bfloat16 input; any other mix
  raises "expected scalar type", so it is not expressible) and keeps weight, bias and the running
  statistics in float32 (measured). `torch.autocast("cpu", dtype=float16 or bfloat16)` changes
  nothing for BatchNorm (measured: output, running statistics and the input and weight gradients
  are the same bits with and without it, and a float32 input stays float32 under it: batch_norm is
  not among the ops CPU autocast lowers), so autocast needs no translation of its own.
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
MODULES = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
           5: torch.nn.BatchNorm3d}


class TorchModule(Adapter):
    id = "torch"
    names: ClassVar[dict[str, str]] = {
        "momentum": "momentum (= 1 - m)", "epsilon": "eps", "axis": "dim 1 (no argument)",
        "center": "affine", "scale": "affine", "gamma": "weight", "beta": "bias",
        "moving_mean": "running_mean", "moving_variance": "running_var", "mode": ".train() / .eval()"
    }
    family = "torch"
    conventions = Conventions(
        variants=("moving-variance-unbiased",),
        notes=("running_var is updated with the unbiased (n-1) batch variance; "
               "the output uses the biased one",),
    )

    def versions(self) -> dict[str, str]:
        return {"torch": torch.__version__}

    def device(self) -> str:
        return DEVICE.type

    capabilities = Capabilities(
        min_rank=2, max_rank=5, features=frozenset({"momentum-null", "no-running-stats", "param-dtype"}),
        why={"multi-axis": "torch BatchNorm normalizes over one channel dim (dim 1)",
             **no_such_argument("torch.nn.BatchNorm", ("renorm", "ghost-batches", "adjustment")),
             "rank": "BatchNorm1d takes 2-D/3-D input, BatchNorm2d 4-D, BatchNorm3d 5-D"},
    )

    def not_expressible(self, problem: Problem, check: Check) -> str | None:
        if problem.param_dtype is not None and not (
                problem.param_dtype == "float32" and problem.dtype in ("float16", "bfloat16")):
            return (f"{problem.dtype} input with {problem.param_dtype} parameters: the CPU kernel mixes only "
                    "float16/bfloat16 input with a float32 module")
        if problem.epsilon <= 0 and (check != "inference" or not problem.track_running_stats):
            # torch/nn/functional.py (2.13) batch_norm: `if training and eps <= 0.0: raise ValueError(
            # "batch_norm eps must be positive during training")`; without running statistics
            # inference runs with training=True too
            return "torch rejects eps <= 0 in training (ValueError: eps must be positive during training)"
        return None

    def translations(self, problem: Problem) -> list[str]:
        out = []
        if not problem.track_running_stats:
            out.append("track_running_stats false -> track_running_stats=False")
        elif problem.momentum is None:
            out.append("momentum null -> momentum=None (cumulative average)")
        else:
            out.append(f"momentum {problem.momentum:g} -> momentum={1 - problem.momentum:g} (1 - m)")
        axis = problem.axes[0]
        if axis not in (1, 1 - problem.rank):
            out.append(f"channel axis {axis} -> movedim({axis}, 1) and back")
        out.append(f"{MODULES.get(problem.rank, torch.nn.BatchNorm2d).__name__} for rank {problem.rank}")
        if problem.center != problem.scale:
            frozen = "weight=1" if not problem.scale else "bias=0"
            out.append(f"affine=True with {frozen} frozen (requires_grad=False)")
        elif not problem.center:
            out.append("affine=False")
        if problem.param_dtype is not None:
            out.append(f"param_dtype {problem.param_dtype} -> module dtype={problem.param_dtype}, fed "
                       f"{problem.dtype} input (a mixed-precision call)")
        return out

    # -- building the module, the way a user who ports weights would

    def module(self, problem: Problem) -> torch.nn.modules.batchnorm._BatchNorm:
        channels = self.tensor(problem.batches[0], problem).shape[1]  # torch judges the axis
        bn = MODULES[problem.rank](
            channels,
            eps=problem.epsilon,
            momentum=None if problem.momentum is None else 1.0 - problem.momentum,
            affine=problem.center or problem.scale,
            track_running_stats=problem.track_running_stats,
            dtype=TORCH_DTYPES[problem.params_dtype],
        )
        with torch.no_grad():
            if bn.affine:
                bn.weight.copy_(torch.tensor(problem.gamma))
                bn.bias.copy_(torch.tensor(problem.beta))
                bn.weight.requires_grad_(problem.scale)
                bn.bias.requires_grad_(problem.center)
            if problem.track_running_stats:
                bn.running_mean.copy_(torch.tensor(problem.moving_mean))
                bn.running_var.copy_(torch.tensor(problem.moving_variance))
        return bn

    def default_layer(self, shape: tuple[int, ...], dtype: str = "float32",
                      trainable: bool = True) -> DefaultLayer:
        if not trainable:
            raise NotExpressible("torch modules have no trainable flag (requires_grad_ does not "
                                 "change the mode)")
        return DefaultModule(shape, dtype)

    def tensor(self, x: np.ndarray, problem: Problem) -> torch.Tensor:
        """Input in the case dtype with the channel axis at dim 1 (torch raises if out of range)."""
        return torch.tensor(x, dtype=TORCH_DTYPES[problem.dtype]).movedim(problem.axes[0], 1)

    def back(self, y: torch.Tensor, problem: Problem) -> np.ndarray:
        return to_numpy(y.movedim(1, problem.axes[0]))

    def train(self, problem: Problem) -> TrainingRun:
        bn = self.module(problem)
        bn.train()
        with torch.no_grad():
            for x in problem.batches:
                y = bn(self.tensor(x, problem))
            tracked = bn.running_mean is not None
            run = TrainingRun(
                output=self.back(y, problem),
                moving_mean=to_numpy(bn.running_mean) if tracked else None,
                moving_variance=to_numpy(bn.running_var) if tracked else None,
            )
            if problem.infer_after_training:
                bn.eval()
                run.inference_output = self.back(bn(self.tensor(problem.batches[-1], problem)), problem)
        return run

    def infer(self, problem: Problem) -> np.ndarray:
        bn = self.module(problem)
        bn.eval()
        with torch.no_grad():
            return self.back(bn(self.tensor(problem.batches[-1], problem)), problem)

    def gradients(self, problem: Problem) -> Gradients:
        bn = self.module(problem)
        bn.train()
        x = self.tensor(problem.batches[-1], problem).detach().requires_grad_(True)
        y = bn(x)
        y.backward(self.tensor(problem.upstream, problem))
        grads = Gradients(input=self.back(x.grad, problem))
        if problem.scale:
            grads.gamma = to_numpy(bn.weight.grad)
        if problem.center:
            grads.beta = to_numpy(bn.bias.grad)
        return grads


class DefaultModule(DefaultLayer):
    """`nn.BatchNorm{1,2,3}d(num_features)` and nothing else; `.half()` for float16, as users do."""

    def __init__(self, shape: tuple[int, ...], dtype: str):
        self.bn = MODULES[len(shape)](shape[1]).to(TORCH_DTYPES[dtype])
        self.dtype = TORCH_DTYPES[dtype]

    def call(self, x: np.ndarray, mode: Check | None) -> Observed:
        if mode == "training":
            self.bn.train()
        elif mode == "inference":
            self.bn.eval()
        with torch.no_grad():
            y = self.bn(torch.tensor(x, dtype=self.dtype))
        return Observed(to_numpy(y), str(y.dtype).removeprefix("torch."), to_numpy(self.bn.running_mean),
                        to_numpy(self.bn.running_var), str(self.bn.running_var.dtype).removeprefix("torch."))


def make(adapter_id: str) -> Adapter:
    return TorchModule()
