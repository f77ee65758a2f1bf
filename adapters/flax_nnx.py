"""`flax.nnx.BatchNorm`, used as the Flax NNX docs describe: a stateful layer switched with
`train()` / `eval()`, its `BatchStat` variables read back after each step.

- Momentum: nnx updates `mean = momentum * mean + (1 - momentum) * batch`, the canonical decay
  form, so m is passed unchanged. m = null (cumulative average) has no nnx equivalent.
- Epsilon: `epsilon=` (added to the variance inside `rsqrt`, as canonical).
- Channel axis: `axis=` gets the raw case axis and `num_features=` the Problem's channel count.
  nnx keeps 1-D `(num_features,)` parameters and statistics, so several channel axes are not
  expressible. An out-of-range axis is passed as it is; the case then names no channel dim, so
  `num_features` is the Problem's count for it (1) and nnx must reject the axis itself.
- center/scale: `use_bias=` / `use_scale=`; a parameter switched off is None.
- Params and state are placed from the Problem with `Variable.set_value` (the whole array, with
  its dtype, as `nnx.update` from a checkpoint does); `layer[...] = v` would instead cast to the
  dtype the constructor chose.
- Modes: `layer.train()` then calls (each updates `layer.mean` / `layer.var`), `layer.eval()`
  for inference. Calls go through `nnx.jit`, as users run them.
- Dtypes: `dtype=` is the case dtype and `param_dtype=` the case's `param_dtype` (mixed precision,
  Flax's own spelling; the case dtype when not given); statistics are computed in at least
  float32 and the constructor makes the `BatchStat`s float32, so they are placed in float32, or in
  float64 for float64 cases. float64 parameters on a lower-precision input are not expressible
  (no float64 statistics exist then).
- Variance: `use_fast_variance=True` (default, kept): E[x^2] - E[x]^2 clamped at 0.
- Gradients: `nnx.grad` of `sum(upstream * y)` in training mode, with respect to the input
  (argnums) and the layer's `nnx.Param`s.
- x64 mode and JAX's persistent compilation cache are set by adapters/jax_setup.py.
"""

from __future__ import annotations

from typing import ClassVar

# x64 and the compile cache, before any other JAX use
from adapters.jax_setup import compiling_for, device_name, on_device, to_numpy

# isort: split
import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from flax import nnx

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


@nnx.jit
def forward(layer: nnx.BatchNorm, x: jax.Array) -> jax.Array:
    """One call in the layer's current mode; nnx.jit writes the updated BatchStats back."""
    return layer(x)


def loss(layer: nnx.BatchNorm, x: jax.Array, upstream: jax.Array) -> jax.Array:
    return jnp.sum(upstream * layer(x))


@nnx.jit
def gradients_of(layer: nnx.BatchNorm, x: jax.Array, upstream: jax.Array) -> tuple[nnx.State, jax.Array]:
    return nnx.grad(loss, argnums=(0, 1))(layer, x, upstream)


class FlaxNNX(Adapter):
    id = "flax-nnx"
    names: ClassVar[dict[str, str]] = {
        "momentum": "momentum", "epsilon": "epsilon", "axis": "axis", "center": "use_bias",
        "scale": "use_scale", "gamma": "scale", "beta": "bias", "moving_mean": "mean",
        "moving_variance": "var", "mode": ".train() / .eval() (use_running_average)"
    }
    family = "jax"
    conventions = Conventions(
        notes=("BatchStat var is updated with the biased batch variance (measured)",
               "variance as E[x^2] - E[x]^2 clamped at 0 (use_fast_variance=True, the default)"),
    )

    def versions(self) -> dict[str, str]:
        return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__}

    def default_layer(self, shape: tuple[int, ...], dtype: str = "float32",
                      trainable: bool = True) -> DefaultLayer:
        if not trainable:
            raise NotExpressible("nnx modules have no trainable flag (nnx.Param filters choose what trains)")
        return DefaultNNX(shape, dtype)

    def device(self) -> str:
        return device_name()

    capabilities = Capabilities(
        features=frozenset({"param-dtype"}),
        why={"momentum-null": "nnx's BatchNorm.momentum is a fixed decay rate",
             **no_such_argument("nnx.BatchNorm"),
             "multi-axis": "nnx.BatchNorm takes one feature axis: num_features is an int and its "
                           "parameters and statistics are 1-D"},
    )

    def not_expressible(self, problem: Problem, check: Check) -> str | None:
        """nnx takes any param_dtype, but keeps and computes statistics in float32 for a
        lower-precision input: float64 parameters there have no float64 statistics."""
        if problem.param_dtype == "float64" and problem.dtype != "float64":
            return (f"float64 parameters with {problem.dtype} input: nnx computes the statistics in float32 "
                    "for it and keeps mean/var in float32, so the float64 moving statistics the case "
                    "states do not exist")
        return None

    def translations(self, problem: Problem) -> list[str]:
        out = [f"momentum {problem.momentum:g} -> momentum={problem.momentum:g} (same decay form)",
               f"epsilon {problem.epsilon:g} -> epsilon={problem.epsilon:g}",
               f"axis {problem.axes[0]} -> axis={problem.axes[0]}, num_features={problem.gamma.size}",
               f"dtype {problem.dtype} -> dtype=jnp.{problem.dtype}, param_dtype=jnp.{problem.params_dtype}; "
               f"BatchStats in {self.stats_dtype(problem)}"]
        if not problem.center:
            out.append("center off -> use_bias=False")
        if not problem.scale:
            out.append("scale off -> use_scale=False")
        out.append("training: layer.train(); inference: layer.eval(); calls under nnx.jit")
        return out

    @staticmethod
    def stats_dtype(problem: Problem) -> str:
        # the constructor makes mean/var float32 (flax/nnx/nn/normalization.py L312-313, v0.12.8)
        # and `var[...] = new` casts to the stored dtype (nnx/variablelib.py set_value,
        # L1693-1729), so a float64 model left to itself keeps float32 statistics; a
        # checkpoint's float64 arrays (nnx.update, or set_value here) replace them
        return "float64" if problem.dtype == "float64" else "float32"

    def layer(self, problem: Problem) -> nnx.BatchNorm:
        compiling_for(("nnx", problem.axes, problem.momentum, problem.epsilon, problem.center, problem.scale,
                       problem.dtype, problem.params_dtype, problem.batches[0].shape))
        dtype = JAX_DTYPES[problem.params_dtype]  # scale and bias
        bn = nnx.BatchNorm(
            num_features=int(problem.gamma.size), axis=problem.axes[0], momentum=problem.momentum,
            epsilon=problem.epsilon, dtype=JAX_DTYPES[problem.dtype], param_dtype=dtype,
            use_bias=problem.center,
            use_scale=problem.scale, rngs=nnx.Rngs(0),
        )
        if problem.axes_in_range:  # else there is nothing per-channel to place: the layer keeps its own
            stats = self.stats_dtype(problem)
            if problem.scale:
                bn.scale.set_value(on_device(problem.gamma, problem.params_dtype))
            if problem.center:
                bn.bias.set_value(on_device(problem.beta, problem.params_dtype))
            bn.mean.set_value(on_device(problem.moving_mean, stats))
            bn.var.set_value(on_device(problem.moving_variance, stats))
        return bn

    def tensor(self, x: np.ndarray, problem: Problem) -> jax.Array:
        return on_device(x, problem.dtype)

    def train(self, problem: Problem) -> TrainingRun:
        bn = self.layer(problem)
        bn.train()
        for x in problem.batches:
            y = forward(bn, self.tensor(x, problem))
            stats = nnx.state(bn, nnx.BatchStat)  # read back after each step
        run = TrainingRun(output=to_numpy(y), moving_mean=to_numpy(stats["mean"][...]),
                          moving_variance=to_numpy(stats["var"][...]))
        if problem.infer_after_training:
            bn.eval()
            run.inference_output = to_numpy(forward(bn, self.tensor(problem.batches[-1], problem)))
        return run

    def infer(self, problem: Problem) -> np.ndarray:
        bn = self.layer(problem)
        bn.eval()
        return to_numpy(forward(bn, self.tensor(problem.batches[-1], problem)))

    def gradients(self, problem: Problem) -> Gradients:
        assert problem.upstream is not None
        bn = self.layer(problem)
        bn.train()
        grads, dx = gradients_of(bn, self.tensor(problem.batches[-1], problem),
                                 self.tensor(problem.upstream, problem))
        return Gradients(
            input=to_numpy(dx),
            gamma=to_numpy(grads["scale"][...]) if problem.scale else None,
            beta=to_numpy(grads["bias"][...]) if problem.center else None,
        )


class DefaultNNX(DefaultLayer):
    """`nnx.BatchNorm(num_features, rngs=...)` (num_features is required; `dtype` for float16)."""

    def __init__(self, shape: tuple[int, ...], dtype: str):
        extra = {} if dtype == "float32" else {"dtype": JAX_DTYPES[dtype]}
        self.bn = nnx.BatchNorm(shape[-1], rngs=nnx.Rngs(0), **extra)
        self.dtype = JAX_DTYPES[dtype]

    def call(self, x: np.ndarray, mode: Check | None) -> Observed:
        if mode == "training":
            self.bn.train()
        elif mode == "inference":
            self.bn.eval()
        y = self.bn(jnp.asarray(x, self.dtype))
        mean, var = self.bn.mean[...], self.bn.var[...]
        return Observed(to_numpy(y), str(y.dtype), to_numpy(mean), to_numpy(var), str(var.dtype))


def make(adapter_id: str) -> Adapter:
    return FlaxNNX()
