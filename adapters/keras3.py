"""Keras 3 `keras.layers.BatchNormalization` on the backend KERAS_BACKEND names.

Three adapters, one per backend, each in a process of its own backend (Keras fixes it at import):
`keras` (tensorflow unless the user chose another), `keras-jax` and `keras-torch`.

- Momentum: Keras's own decay form, `moving = momentum * moving + (1 - momentum) * batch`, so the
  canonical m is `momentum=m`. m = null (a cumulative average) has no Keras equivalent.
- epsilon: `epsilon=`; center/scale: `center=` / `scale=`.
- Channel axis: `axis=` takes one integer (`self.axis = int(axis)` in
  keras/src/layers/normalization/batch_normalization.py), so several channel axes are not
  expressible; a one-element list is passed as its integer. An out-of-range axis is left to
  `build`, which indexes the input shape with it and raises.
- gamma/beta/moving statistics: the layer is built for the input shape and its variables assigned,
  as when porting weights.
- Dtype: `dtype=<case dtype>`. The layer then keeps gamma, beta and the moving statistics in that
  dtype too, and computes in at least float32 (`backend.result_type(inputs.dtype, "float32")`).
  On JAX, adapters/jax_setup.py turns on x64 mode (float64 cases) and the compile cache.
- Mixed precision (`param_dtype`): Keras states it as a dtype policy, `dtype="mixed_float16"` or
  `"mixed_bfloat16"`: variables (gamma, beta, moving statistics) float32, computation and output in
  the lower dtype. Those two are the only mixed policies, so float32 parameters with float16 or
  bfloat16 input are expressible and nothing else is. The input tensor has the case dtype.
- Modes: `layer(x, training=True)` normalizes with the batch statistics and assigns the moving
  averages (biased variance from `ops.moments`, measured); `layer(x, training=False)` is inference.
- renorm: `renorm=True`, `renorm_momentum=` the canonical renorm momentum (same decay form),
  `renorm_clipping=` the clips the case gives (a missing key is not clipped). The extra variables
  are assigned as the layer's initializers derive them: `renorm_mean` = moving mean,
  `renorm_stddev` = `moving_stddev` = sqrt(moving variance) (batch_normalization.py `build`).
  Keras 3 has no `virtual_batch_size`, `adjustment` or way to drop the moving statistics.
- Gradients: each backend's own autodiff on the same eager call: `tf.GradientTape` on tensorflow,
  `jax.vjp` over `layer.stateless_call` on jax, `.backward()` on torch.
- Default layer (semantic probes): `BatchNormalization()` with no argument but `dtype` for float16
  and `trainable=False` when asked, called `bn(x)`, `bn(x, training=True)` or `bn(x, training=False)`.
"""

from __future__ import annotations

import os
from typing import ClassVar

from adapters.base import requested_device

# Keras picks its device at import: the torch backend takes a GPU whenever torch sees one
# (keras/src/backend/torch/core.py L31-40, unless KERAS_TORCH_DEVICE is set) and JAX its first
# platform. The run's `--device` decides instead, so `cpu` stays on the CPU on a GPU host too.
os.environ.setdefault("KERAS_TORCH_DEVICE", requested_device())
if os.environ.get("KERAS_BACKEND") == "jax":
    import adapters.jax_setup  # noqa: F401  (the platform, before Keras starts JAX)

import keras
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
    keras_renorm_arguments,
    keras_renorm_translations,
    no_such_argument,
)

BACKEND = keras.backend.backend()
if BACKEND == "jax":
    import jax

    from adapters.jax_setup import compiling_for, device_name  # x64, the compile cache, the platform


# On the jax backend each configuration holds ~30 MB of executables (jax_setup.compiling_for):
# over 1,000 generated cases, 16 kept the process's peak at 1.26 GB, 32 at 1.70 GB, 64 reached
# 2.48 GB. A drop costs: the programs shared by every configuration (per-channel ops) compile or
# load again; 32 took warm 73.8 s CPU where 16 took ~94.
KERAS_CONFIGURATIONS_KEPT = 32
MIXED_POLICIES = {("float16", "float32"): "mixed_float16", ("bfloat16", "float32"): "mixed_bfloat16"}


def layer_dtype(problem: Problem) -> str:
    """The layer's dtype policy: the case dtype, or a mixed policy for float32 parameters."""
    return MIXED_POLICIES.get((problem.dtype, problem.param_dtype), problem.dtype)


def to_numpy(t) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(t)).astype(np.float64)


class Keras3(Adapter):
    """`keras`: the backend the user chose (tensorflow when unset)."""

    id = "keras"
    names: ClassVar[dict[str, str]] = {
        "momentum": "momentum", "epsilon": "epsilon", "axis": "axis", "center": "center",
        "scale": "scale", "gamma": "gamma", "beta": "beta", "moving_mean": "moving_mean",
        "moving_variance": "moving_variance", "mode": "training=True / False"
    }
    family = "keras"
    conventions = Conventions(
        notes=("moving variance updated with the biased batch variance of ops.moments",
               "gamma, beta and the moving statistics are kept in the layer dtype (float16 too)"),
    )

    def device(self) -> str:
        if BACKEND == "jax":
            return device_name()
        if BACKEND == "torch":
            return os.environ["KERAS_TORCH_DEVICE"].split(":")[0]
        return "cpu"  # the tensorflow backend, as the tf family: TF places ops itself

    def versions(self) -> dict[str, str]:
        out = {"keras": keras.__version__, "backend": BACKEND}
        if BACKEND == "tensorflow":
            import tensorflow as tf

            out["tensorflow"] = tf.__version__
        elif BACKEND == "jax":
            out["jax"] = jax.__version__
        elif BACKEND == "torch":
            import torch

            out["torch"] = torch.__version__
        return out

    capabilities = Capabilities(
        features=frozenset({"renorm", "param-dtype"}),
        why={"momentum-null": "Keras momentum is a fixed decay; it has no cumulative average",
             "multi-axis": "Keras 3 BatchNormalization takes one integer axis (self.axis = int(axis))",
             **no_such_argument("Keras 3 BatchNormalization", ("ghost-batches", "adjustment",
                                                               "no-running-stats"))},
    )

    def not_expressible(self, problem: Problem, check: Check) -> str | None:
        if problem.param_dtype is not None and (problem.dtype, problem.param_dtype) not in MIXED_POLICIES:
            return (f"{problem.dtype} input with {problem.param_dtype} parameters: Keras's mixed policies "
                    "are mixed_float16 and mixed_bfloat16 (float32 variables) only")
        return None

    def default_layer(self, shape: tuple[int, ...], dtype: str = "float32",
                      trainable: bool = True) -> DefaultLayer:
        return DefaultKerasLayer(dtype, trainable)

    def feature_layer(self, shape: tuple[int, ...], arguments: dict) -> DefaultLayer:
        if set(arguments) - {"renorm"}:
            raise NotExpressible(f"Keras 3 BatchNormalization has no argument {', '.join(arguments)}")
        return DefaultKerasLayer("float32", True, arguments)

    def translations(self, problem: Problem) -> list[str]:
        out = [f"momentum {problem.momentum:g} -> momentum={problem.momentum:g} (same decay form)",
               f"epsilon {problem.epsilon:g} -> epsilon={problem.epsilon:g}",
               f"channel axis {problem.axes[0]} -> axis={problem.axes[0]}",
               f"dtype {problem.dtype} -> dtype={problem.dtype!r} (parameters and statistics too)"
               if problem.param_dtype is None else f"dtype {problem.dtype}, param_dtype "
               f"{problem.param_dtype} -> dtype={layer_dtype(problem)!r} (a mixed policy: float32 variables, "
               f"{problem.dtype} compute)",
               f"backend {BACKEND}"]
        if not (problem.center and problem.scale):
            out.append(f"center={problem.center}, scale={problem.scale}")
        out += keras_renorm_translations(problem)
        return out

    # -- the layer

    def layer(self, problem: Problem) -> keras.layers.BatchNormalization:
        if BACKEND == "jax":  # eager ops compile per shape and dtype: keep JAX's caches bounded
            compiling_for(("keras", problem.dtype, problem.params_dtype, problem.axes,
                           problem.batches[0].shape), kept=KERAS_CONFIGURATIONS_KEPT)
        bn = keras.layers.BatchNormalization(
            axis=problem.axes[0], momentum=problem.momentum, epsilon=problem.epsilon,
            center=problem.center, scale=problem.scale, dtype=layer_dtype(problem),
            **keras_renorm_arguments(problem))
        bn.build(problem.batches[0].shape)  # an out-of-range axis raises here
        if problem.renorm is not None:  # as the layer's initializers derive them from the moving ones
            bn.renorm_mean.assign(self.host_cast(problem.moving_mean, problem.params_dtype))
            bn.renorm_stddev.assign(self.host_cast(np.sqrt(problem.moving_variance), problem.params_dtype))
            bn.moving_stddev.assign(self.host_cast(np.sqrt(problem.moving_variance), problem.params_dtype))
        bn.moving_mean.assign(self.host_cast(problem.moving_mean, problem.params_dtype))
        bn.moving_variance.assign(self.host_cast(problem.moving_variance, problem.params_dtype))
        if problem.scale:
            bn.gamma.assign(self.host_cast(problem.gamma, problem.params_dtype))
        if problem.center:
            bn.beta.assign(self.host_cast(problem.beta, problem.params_dtype))
        return bn

    @staticmethod
    def host_cast(x: np.ndarray, dtype: str) -> np.ndarray:
        """On the jax backend, a NumPy array of `dtype` (exact: the values are representable in it):
        a cast on the device would compile a program for every shape. Other backends get x as is."""
        if BACKEND != "jax":
            return x
        return np.asarray(x).astype(jax.numpy.dtype(dtype))

    def tensor(self, x: np.ndarray, problem: Problem):
        return keras.ops.convert_to_tensor(self.host_cast(x, problem.dtype), dtype=problem.dtype)

    def train(self, problem: Problem) -> TrainingRun:
        bn = self.layer(problem)
        for x in problem.batches:
            y = bn(self.tensor(x, problem), training=True)
        run = TrainingRun(output=to_numpy(y), moving_mean=to_numpy(bn.moving_mean),
                          moving_variance=to_numpy(bn.moving_variance))
        if problem.renorm is not None:
            run.renorm_mean, run.renorm_stddev = to_numpy(bn.renorm_mean), to_numpy(bn.renorm_stddev)
        if problem.infer_after_training:
            run.inference_output = to_numpy(bn(self.tensor(problem.batches[-1], problem), training=False))
        return run

    def infer(self, problem: Problem) -> np.ndarray:
        bn = self.layer(problem)
        return to_numpy(bn(self.tensor(problem.batches[-1], problem), training=False))

    def gradients(self, problem: Problem) -> Gradients:
        bn = self.layer(problem)
        x = self.tensor(problem.batches[-1], problem)
        upstream = self.tensor(problem.upstream, problem)
        params = [v for v in (bn.gamma, bn.beta) if v is not None]
        dx, *dparams = {"tensorflow": tf_vjp, "jax": jax_vjp, "torch": torch_vjp}[BACKEND](
            bn, x, params, upstream)
        return Gradients(
            input=to_numpy(dx),
            gamma=to_numpy(dparams.pop(0)) if problem.scale else None,
            beta=to_numpy(dparams.pop(0)) if problem.center else None,
        )


class DefaultKerasLayer(DefaultLayer):
    """`keras.layers.BatchNormalization()` called eagerly; a training call assigns the moving
    statistics at once (`call`: `self.moving_mean.assign(...)`)."""

    def __init__(self, dtype: str, trainable: bool, arguments: dict | None = None):
        kwargs: dict = dict(arguments or {})
        if dtype != "float32":
            kwargs["dtype"] = dtype
        if not trainable:
            kwargs["trainable"] = False
        self.bn = keras.layers.BatchNormalization(**kwargs)
        self.dtype = dtype

    def call(self, x: np.ndarray, mode: Check | None) -> Observed:
        kwargs = {} if mode is None else {"training": mode == "training"}
        y = self.bn(keras.ops.convert_to_tensor(x, dtype=self.dtype), **kwargs)
        return Observed(to_numpy(y), keras.backend.standardize_dtype(y.dtype), to_numpy(self.bn.moving_mean),
                        to_numpy(self.bn.moving_variance), self.bn.moving_variance.dtype)


class Keras3Jax(Keras3):
    id = "keras-jax"


class Keras3Torch(Keras3):
    id = "keras-torch"


# -- one backward pass per backend: dL/dx and dL/dparams for the given dL/dy


def tf_vjp(bn: keras.layers.Layer, x, params: list, upstream) -> list:
    import tensorflow as tf

    with tf.GradientTape() as tape:
        tape.watch(x)
        y = bn(x, training=True)
    return tape.gradient(y, [x, *params], output_gradients=upstream)


def jax_vjp(bn: keras.layers.Layer, x, params: list, upstream) -> list:
    trainable = [v.value for v in bn.trainable_variables]
    non_trainable = [v.value for v in bn.non_trainable_variables]

    def forward(trainable: list, x):
        y, _ = bn.stateless_call(trainable, non_trainable, x, training=True)
        return y

    _, vjp = jax.vjp(forward, trainable, x)
    d_trainable, dx = vjp(upstream)
    by_variable = {id(v): d for v, d in zip(bn.trainable_variables, d_trainable, strict=True)}
    return [dx, *(by_variable[id(p)] for p in params)]


def torch_vjp(bn: keras.layers.Layer, x, params: list, upstream) -> list:
    x = x.detach().requires_grad_(True)
    y = bn(x, training=True)
    y.backward(upstream)
    return [x.grad, *(p.value.grad for p in params)]


def make(adapter_id: str) -> Adapter:
    return {"keras": Keras3, "keras-jax": Keras3Jax, "keras-torch": Keras3Torch}[adapter_id]()
