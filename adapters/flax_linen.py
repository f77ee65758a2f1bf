"""`flax.linen.BatchNorm`, used as the Flax docs describe: `init`/`apply` with a mutable
`batch_stats` collection.

- Momentum: linen updates `ra = momentum * ra + (1 - momentum) * batch`, the canonical decay form,
  so m is passed unchanged. m = null (cumulative average) has no linen equivalent: not expressible.
- Epsilon: `epsilon=` (added to the variance inside `rsqrt`, as canonical).
- Channel axes: `axis=` takes the raw case axis, an int or a tuple (several feature axes work).
  linen keeps scale/bias/mean/var shaped like the feature dims in ascending axis order; the
  case's per-channel arrays are transposed into that order and back.
- center/scale: `use_bias=` / `use_scale=`; a parameter switched off does not exist at all.
- Params and state are placed as a user loading a checkpoint would: `{'params': {'scale', 'bias'},
  'batch_stats': {'mean', 'var'}}` built from the Problem, no `init` (except for an out-of-range
  axis, where there is nothing to place and the layer initialises itself and must reject the axis).
- Modes: training is `apply(..., use_running_average=False, mutable=['batch_stats'])`, the new
  statistics read back from the returned collection after every step; inference is
  `use_running_average=True`.
- Dtypes: `dtype=` and `param_dtype=` are the case dtype (see mixed precision below). Statistics
  are computed in at least float32 (`force_float32_reductions=True`) and `init` creates
  `batch_stats` in float32, so the state is placed in float32 for float16/bfloat16/float32 cases
  and in float64 for float64 ones (init's float32 would round a float64 checkpoint).
- Mixed precision (`param_dtype`): `dtype=` (computation and output) is the case dtype and
  `param_dtype=` (scale, bias) the case's `param_dtype`, Flax's own spelling of it. batch_stats
  stay float32 (float64 for a float64 input), which holds float32 statistics exactly and
  float16/bfloat16 ones finer than the case states (listed in `translations`). float64
  parameters on a lower-precision input are not expressible: the statistics are then computed
  and kept in float32, so no float64 statistics exist.
- Variance: linen's default `use_fast_variance=True` computes E[x^2] - E[x]^2 clamped at 0; it is
  left at its default as users run it, so large-mean inputs lose digits (xfails in jax.yaml).
- Gradients: `jax.grad` of `sum(upstream * y)` in training mode with respect to input and params.
- x64 mode and JAX's persistent compilation cache are set by adapters/jax_setup.py.
"""

from __future__ import annotations

# x64 and the compile cache, before any other JAX use
from adapters.jax_setup import compiling_for, device_name, on_device, to_numpy

# isort: split
import functools
from collections.abc import Callable
from typing import Any, ClassVar

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

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

JAX_DTYPES = {
    "float16": jnp.float16,
    "bfloat16": jnp.bfloat16,
    "float32": jnp.float32,
    "float64": jnp.float64,
}


@functools.lru_cache(maxsize=256)
def compiled(axis: int | tuple[int, ...], momentum: float, epsilon: float, center: bool, scale: bool,
             dtype: str, param_dtype: str) -> dict[str, Callable[..., Any]]:
    """Jitted train step / inference / gradients for one layer configuration (jit caches shapes)."""
    # use_fast_variance stays True (the default): var = max(0, E[x^2] - E[x]^2), see
    # flax/linen/normalization.py L137-142 (v0.12.8). The axis goes in raw: _canonicalize_axes
    # (L45-49) adds the rank to a negative axis without a range check.
    bn = nn.BatchNorm(axis=axis, momentum=momentum, epsilon=epsilon, use_bias=center,
                      use_scale=scale, dtype=JAX_DTYPES[dtype], param_dtype=JAX_DTYPES[param_dtype])

    def step(variables: dict, x: jax.Array) -> tuple[jax.Array, dict]:
        y, updates = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
        return y, updates["batch_stats"]

    def infer(variables: dict, x: jax.Array) -> jax.Array:
        return bn.apply(variables, x, use_running_average=True)

    def loss(x: jax.Array, params: dict, batch_stats: dict, upstream: jax.Array) -> jax.Array:
        y, _ = bn.apply({"params": params, "batch_stats": batch_stats}, x,
                        use_running_average=False, mutable=["batch_stats"])
        return jnp.sum(upstream * y)

    return {"module": bn, "step": jax.jit(step), "infer": jax.jit(infer),
            "grad": jax.jit(jax.grad(loss, argnums=(0, 1)))}


def mixed_not_expressible(problem: Problem) -> str | None:
    """Flax takes any param_dtype, but keeps and computes statistics in float32 for a
    lower-precision input, so float64 parameters there have no float64 statistics."""
    if problem.param_dtype == "float64" and problem.dtype != "float64":
        return (f"float64 parameters with {problem.dtype} input: Flax computes the statistics in float32 "
                "for it (force_float32_reductions) and keeps batch_stats in float32, so the float64 "
                "moving statistics the case states do not exist")
    return None


class FlaxLinen(Adapter):
    id = "flax-linen"
    names: ClassVar[dict[str, str]] = {
        "momentum": "momentum", "epsilon": "epsilon", "axis": "axis", "center": "use_bias",
        "scale": "use_scale", "gamma": "params/scale", "beta": "params/bias",
        "moving_mean": "batch_stats/mean", "moving_variance": "batch_stats/var",
        "mode": "use_running_average= (and mutable=['batch_stats'])"
    }
    family = "jax"
    conventions = Conventions(
        notes=("batch_stats['var'] is updated with the biased batch variance (measured)",
               "variance as E[x^2] - E[x]^2 clamped at 0 (use_fast_variance=True, the default)",
               "statistics kept in float32 for float16/bfloat16 inputs (force_float32_reductions)"),
    )

    def versions(self) -> dict[str, str]:
        return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__}

    def default_layer(self, shape: tuple[int, ...], dtype: str = "float32",
                      trainable: bool = True) -> DefaultLayer:
        if not trainable:
            raise NotExpressible("linen modules have no trainable flag (frozen params are the optimizer's "
                                 "business)")
        return DefaultLinen(shape, dtype)

    def device(self) -> str:
        return device_name()

    capabilities = Capabilities(
        features=frozenset({"multi-axis", "param-dtype"}),
        why={"momentum-null": "linen's BatchNorm.momentum is a fixed decay rate",
             **no_such_argument("linen.BatchNorm")},
    )

    def not_expressible(self, problem: Problem, check: Check) -> str | None:
        return mixed_not_expressible(problem)

    def translations(self, problem: Problem) -> list[str]:
        axis = problem.axes[0] if len(problem.axes) == 1 else problem.axes
        out = [f"momentum {problem.momentum:g} -> momentum={problem.momentum:g} (same decay form)",
               f"epsilon {problem.epsilon:g} -> epsilon={problem.epsilon:g}",
               f"axis {list(problem.axes)} -> axis={axis}",
               f"dtype {problem.dtype} -> dtype=jnp.{problem.dtype}, param_dtype=jnp.{problem.params_dtype}; "
               f"batch_stats in {self.stats_dtype(problem)}"]
        if len(problem.axes) > 1 and problem.axes_in_range and list(problem.channel_axes) != sorted(
                problem.channel_axes):
            out.append("per-channel arrays transposed to linen's ascending feature-axis order and back")
        if not problem.center:
            out.append("center off -> use_bias=False")
        if not problem.scale:
            out.append("scale off -> use_scale=False")
        out.append("training: apply(use_running_average=False, mutable=['batch_stats']); "
                   "inference: use_running_average=True")
        return out

    # -- the layer and its variables

    @staticmethod
    def stats_dtype(problem: Problem) -> str:
        # init makes batch_stats float32 whatever param_dtype is (normalization.py L358-375);
        # _compute_stats returns at least float32, float64 for float64 input (L107-116)
        return "float64" if problem.dtype == "float64" else "float32"

    def fns(self, problem: Problem) -> dict[str, Callable[..., Any]]:
        axis = problem.axes[0] if len(problem.axes) == 1 else tuple(problem.axes)
        assert problem.momentum is not None
        configuration = (axis, float(problem.momentum), float(problem.epsilon), problem.center,
                         problem.scale, problem.dtype, problem.params_dtype)
        compiling_for(("linen", *configuration, problem.batches[0].shape))
        return compiled(*configuration)

    def tensor(self, x: np.ndarray, problem: Problem) -> jax.Array:
        return on_device(x, problem.dtype)

    def variables(self, problem: Problem) -> dict:
        """The Problem's params and state, placed like a loaded checkpoint."""
        fns = self.fns(problem)
        if not problem.axes_in_range:
            # nothing per-channel to place: let linen create its own and judge the axis itself
            return fns["module"].init(jax.random.key(0), self.tensor(problem.batches[0], problem),
                                      use_running_average=False)
        pdt, sdt = problem.params_dtype, self.stats_dtype(problem)
        params = {}
        if problem.scale:
            params["scale"] = on_device(problem.to_ascending(problem.gamma), pdt)
        if problem.center:
            params["bias"] = on_device(problem.to_ascending(problem.beta), pdt)
        stats = {"mean": on_device(problem.to_ascending(problem.moving_mean), sdt),
                 "var": on_device(problem.to_ascending(problem.moving_variance), sdt)}
        return {"params": params, "batch_stats": stats}

    def stat(self, a: jax.Array, problem: Problem) -> np.ndarray:
        """A per-channel result in case axis order (as linen gave it when the axis is out of range,
        which linen sometimes accepts: that is for the suite to judge, not for this adapter)."""
        return problem.to_case_order(to_numpy(a)) if problem.axes_in_range else to_numpy(a)

    # -- the checks

    def train(self, problem: Problem) -> TrainingRun:
        fns = self.fns(problem)
        variables = self.variables(problem)
        for x in problem.batches:
            y, stats = fns["step"](variables, self.tensor(x, problem))
            variables = {**variables, "batch_stats": stats}
        run = TrainingRun(output=to_numpy(y), moving_mean=self.stat(stats["mean"], problem),
                          moving_variance=self.stat(stats["var"], problem))
        if problem.infer_after_training:
            run.inference_output = to_numpy(fns["infer"](variables,
                                                         self.tensor(problem.batches[-1], problem)))
        return run

    def infer(self, problem: Problem) -> np.ndarray:
        fns = self.fns(problem)
        return to_numpy(fns["infer"](self.variables(problem), self.tensor(problem.batches[-1], problem)))

    def gradients(self, problem: Problem) -> Gradients:
        assert problem.upstream is not None
        fns = self.fns(problem)
        variables = self.variables(problem)
        dx, dparams = fns["grad"](self.tensor(problem.batches[-1], problem), variables["params"],
                                  variables["batch_stats"], self.tensor(problem.upstream, problem))
        return Gradients(
            input=to_numpy(dx),
            gamma=self.stat(dparams["scale"], problem) if problem.scale else None,
            beta=self.stat(dparams["bias"], problem) if problem.center else None,
        )


class DefaultLinen(DefaultLayer):
    """`nn.BatchNorm()` with no argument but `dtype` for float16, initialised by `init`."""

    def __init__(self, shape: tuple[int, ...], dtype: str):
        self.bn = nn.BatchNorm(dtype=JAX_DTYPES[dtype]) if dtype != "float32" else nn.BatchNorm()
        # init runs __call__, which needs use_running_average from the call or the constructor
        self.variables = self.bn.init(jax.random.key(0), jnp.zeros(shape, JAX_DTYPES[dtype]),
                                      use_running_average=True)

    def call(self, x: np.ndarray, mode: Check | None) -> Observed:
        kwargs = {} if mode is None else {"use_running_average": mode == "inference"}
        x = jnp.asarray(x, self.bn.dtype or jnp.float32)
        y, updates = self.bn.apply(self.variables, x, mutable=["batch_stats"], **kwargs)
        self.variables = {**self.variables, **updates}
        stats = self.variables["batch_stats"]
        return Observed(to_numpy(y), str(y.dtype), to_numpy(stats["mean"]), to_numpy(stats["var"]),
                        str(stats["var"].dtype))


def make(adapter_id: str) -> Adapter:
    return FlaxLinen()
