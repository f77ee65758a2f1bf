"""`torch.compile` of `torch.nn.BatchNorm1d/2d/3d` (TorchInductor, the default backend, on CPU), as
the PyTorch docs show: `torch.compile(module)` and call the result like the module.

Everything else is the `torch` adapter (`adapters.torch_module`: momentum `1 - m`, channel axis by
`movedim`, center/scale by `affine` and frozen parameters, unbiased running variance), so a
difference between the two columns is what compiling changes.

- The compiled module is an `OptimizedModule` wrapping the eager one: `.train()`/`.eval()`,
  `weight`, `running_mean` and `running_var` are the eager module's, and TorchDynamo traces
  `forward` into an FX graph that Inductor decomposes (`aten._native_batch_norm_legit` into
  var_mean, rsqrt and the running-stat updates) and compiles to C++ with the system compiler
  (g++ here). The first call of a new configuration compiles (seconds); later ones hit
  Dynamo's cache, and Inductor's on-disk cache (/tmp/torchinductor_<user>) across processes.
- `dynamic=True`: sizes are symbolic from the first compile, so a new batch size or channel count
  reuses the graph instead of compiling once static and once dynamic. Dtype, rank, layout
  (strides after `movedim`), affine, momentum, eps and the mode are guarded on, so each new
  combination compiles once. Dynamo's default recompile limit (8 per code object, then it runs
  the frame eagerly without saying so in the result) would silently turn later configurations
  into eager runs; it is raised, and `fail_on_recompile_limit_hit` makes a hit an error.
- `momentum: null` (`momentum=None`): `forward` computes `1.0 / float(self.num_batches_tracked)`,
  a graph break (`Tensor.item()`): Dynamo runs that line eagerly and compiles the rest (measured;
  with `fullgraph=True` it raises, pytorch/pytorch#194504). Users' default is fullgraph=False.
- Measured against eager (float32/float64/float16/bfloat16, training and eval): the outputs and
  running statistics differ in the last bits only (float32 up to 4.8e-7 on y of order 1; bfloat16
  modules one bfloat16 ulp on y and the running statistics, as Inductor computes in float32 and
  rounds once), within every case's tolerance.
- Mixed precision (a float32 module fed float16/bfloat16 input, as for `torch`): the forward and
  the running statistics match eager, but the decomposition saves the batch mean and invstd in
  the input dtype on CPU (torch/_decomp/decompositions.py:2150-2152), so dL/dweight carries
  float16 rounding where eager's is float32-accurate: a known rule (adapters/known/torch-compile.yaml).
- Family `torch-compile`, its own process: compiling costs seconds per configuration (measured
  over cases/: 273 s with an empty Inductor cache, 42 s with a warm one, on 2 shared cores), which
  would slow the 5-second `torch` family.
"""

from __future__ import annotations

import torch
import torch._dynamo

from adapters.base import Adapter, DefaultLayer, NotExpressible, Problem
from adapters.torch_module import DefaultModule, TorchModule
from adapters.torch_setup import DEVICE

# one compiled graph per configuration: far more than the default 8 per code object
torch._dynamo.config.recompile_limit = 4096
torch._dynamo.config.accumulated_recompile_limit = 16384
torch._dynamo.config.fail_on_recompile_limit_hit = True  # never an eager run passed off as compiled


def compiled(module: torch.nn.Module) -> torch.nn.Module:
    return torch.compile(module, dynamic=True)


class TorchCompile(TorchModule):
    id = "torch-compile"
    family = "torch-compile"

    def translations(self, problem: Problem) -> list[str]:
        out = [*super().translations(problem),
               f"torch.compile(module, dynamic=True), inductor backend on {DEVICE.type} "
               f"({'Triton kernels' if DEVICE.type == 'cuda' else 'C++'})"]
        if problem.momentum is None:
            out.append("momentum=None: float(num_batches_tracked) is a graph break, run eagerly by Dynamo")
        return out

    def versions(self) -> dict[str, str]:
        import torch._inductor.cpp_builder as builder

        compiler = builder.get_cpp_compiler()
        info = builder.get_compiler_version_info(compiler)  # `-v` output, lines joined by "_"
        last = info.rstrip("_ ").rsplit("_", 1)[-1]  # "gcc version 12.2.0 (Debian ...)"
        out = {"torch": torch.__version__, "c++ compiler": f"{compiler}: {last}"}
        if DEVICE.type == "cuda":
            import triton

            out["triton"] = triton.__version__
        return out

    def module(self, problem: Problem) -> torch.nn.Module:
        return compiled(super().module(problem))

    def default_layer(self, shape: tuple[int, ...], dtype: str = "float32",
                      trainable: bool = True) -> DefaultLayer:
        if not trainable:
            raise NotExpressible("torch modules have no trainable flag (requires_grad_ does not "
                                 "change the mode)")
        return DefaultCompiled(shape, dtype)


class DefaultCompiled(DefaultModule):
    """`torch.compile(nn.BatchNorm{1,2,3}d(num_features))`; `.half()` first for float16."""

    def __init__(self, shape: tuple[int, ...], dtype: str):
        super().__init__(shape, dtype)
        self.bn = compiled(self.bn)


def make(adapter_id: str) -> Adapter:
    return TorchCompile()
