"""Keras 2 (`tf_keras`) `layers.BatchNormalization`, called eagerly as its documentation shows.

Two adapters: `tf-keras` leaves `fused=None` (the layer picks the fused kernel where it can) and
`tf-keras-unfused` passes `fused=False`.

- Momentum: Keras's own decay form, `moving = momentum * moving + (1 - momentum) * batch`, so the
  canonical m is passed as `momentum=m`. m = null (a cumulative average) has no Keras equivalent.
- epsilon: `epsilon=`. center/scale: `center=` / `scale=`. Channel axes: `axis=` (an int, or a
  list for several axes; the layer validates it and raises ValueError when out of range).
- gamma/beta/moving statistics: the layer is built for the input shape and its variables assigned,
  as when porting weights. With several axes the variables have the broadcast shape (channel
  sizes at the channel axes in ascending order, 1 elsewhere). A layer is built once per
  configuration (everything but the state and the batches) and reused by the checks that share
  it, its variables assigned anew each time.
- Dtype: `dtype=<case dtype>`; for float16/bfloat16 the layer keeps its parameters and moving
  statistics in float32 (`_param_dtype`).
- Modes: `layer(x, training=True)` trains and updates the moving statistics at once (eager);
  `layer(x, training=False)` is inference.
- Which kernel: with `fused=None` the layer fuses 4-D input with the channel axis 1 or 3 and 5-D
  input with axis 1 or 4 when the dtype is not float64 (`_raise_if_fused_cannot_be_used` and
  `build`, tf_keras/src/layers/normalization/batch_normalization.py). The fused kernel updates the
  moving variance with the Bessel-corrected batch variance (measured; eager training passes
  `exponential_avg_factor = 1 - momentum` to `fused_batch_norm`), the unfused one with the biased
  variance. `tf-keras` declares, per problem (`conventions_for`), the estimator of the kernel the
  layer picks.
- renorm: `renorm=True`, `renorm_momentum=` the canonical renorm momentum (same decay form),
  `renorm_clipping=` the clips the case gives (a missing key is not clipped, as the case format
  says). The layer's extra variables are assigned as its initializers derive them from the moving
  statistics: `renorm_mean` = moving mean, `renorm_stddev` = `moving_stddev` = sqrt(moving
  variance) (batch_normalization.py `build`, `moving_stddev_initializer`).
- virtual_batch_size: `virtual_batch_size=`; the layer reshapes the batch to [v, n/v, ...] and
  reduces over the first dim (`call`), so a virtual batch is rows j, j + n/v, ... : declared as
  the variant ghost-interleaved. Its variables get an extra dim of 1 after the batch dim.
- adjustment: `adjustment=lambda shape: (scale, bias)` with constant tensors of the parameters'
  dtype shaped to broadcast against the input.
- renorm, virtual_batch_size and adjustment make `fused=None` take the unfused kernel
  (`_raise_if_fused_cannot_be_used`). No argument drops the moving statistics.
- Mixed precision (`param_dtype`): a dtype policy, `dtype="mixed_float16"` or `"mixed_bfloat16"`
  (`tf_keras.mixed_precision`): float32 variables, computation and output in the lower dtype. Those
  are the only mixed policies: float32 parameters with float16/bfloat16 input are expressible,
  nothing else. (A float16 layer already keeps float32 variables, `_param_dtype`; the policy is
  what a mixed-precision user writes.)
- Default layer (semantic probes): `BatchNormalization()` with no argument but `dtype` for
  float16, `trainable=False` when asked, and `fused=False` for `tf-keras-unfused` (that argument is
  what the adapter id means).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import tensorflow as tf
import tf_keras
from tf_keras.src.engine import base_layer_v1

from adapters.base import (
    Adapter,
    Capabilities,
    Check,
    Conventions,
    DefaultLayer,
    Gradients,
    Observed,
    Problem,
    TrainingRun,
    broadcast_to_input,
    configuration,
    keras_renorm_arguments,
    keras_renorm_translations,
    no_such_argument,
)

FUSED_AXES = {4: (1, 3), 5: (1, 4)}
LAYERS_KEPT = 4  # built layers kept for reuse; a case's checks share one


def to_numpy(t: tf.Tensor) -> np.ndarray:
    return tf.cast(t, tf.float64).numpy()


def takes_fused_path(problem: Problem) -> bool:
    """Whether `fused=None` picks the fused kernel for this input (see the module docstring)."""
    if len(problem.axes) != 1 or problem.dtype == "float64" or problem.rank not in FUSED_AXES:
        return False
    if problem.renorm is not None or problem.virtual_batch_size is not None or problem.adjustment is not None:
        return False
    return problem.axes[0] % problem.rank in FUSED_AXES[problem.rank]


MIXED_POLICIES = {("float16", "float32"): "mixed_float16", ("bfloat16", "float32"): "mixed_bfloat16"}


def layer_dtype(problem: Problem) -> str:
    """The layer's dtype policy: the case dtype, or a mixed policy for float32 parameters."""
    return MIXED_POLICIES.get((problem.dtype, problem.param_dtype), problem.dtype)


class TfKerasLayer(Adapter):
    family = "tf"
    fused: bool | None
    names: ClassVar[dict[str, str]] = {
        "momentum": "momentum", "epsilon": "epsilon", "axis": "axis", "center": "center",
        "scale": "scale", "gamma": "gamma", "beta": "beta", "moving_mean": "moving_mean",
        "moving_variance": "moving_variance", "mode": "training=True / False"
    }

    def __init__(self) -> None:
        self.layers: dict[tuple, tf_keras.layers.BatchNormalization] = {}  # by configuration

    def versions(self) -> dict[str, str]:
        return {"tensorflow": tf.__version__, "tf_keras": tf_keras.__version__}

    capabilities = Capabilities(
        features=frozenset({"multi-axis", "renorm", "ghost-batches", "adjustment", "param-dtype"}),
        why={"momentum-null": "Keras momentum is a fixed decay; it has no cumulative average",
             **no_such_argument("tf_keras BatchNormalization", ("no-running-stats",))},
    )

    def conventions_for(self, problem: Problem) -> Conventions:
        return with_ghost(self.conventions, problem)

    def not_expressible(self, problem: Problem, check: Check) -> str | None:
        if problem.param_dtype is not None and (problem.dtype, problem.param_dtype) not in MIXED_POLICIES:
            return (f"{problem.dtype} input with {problem.param_dtype} parameters: Keras's mixed policies "
                    "are mixed_float16 and mixed_bfloat16 (float32 variables) only")
        return None

    def default_layer(self, shape: tuple[int, ...], dtype: str = "float32",
                      trainable: bool = True) -> DefaultLayer:
        return DefaultKerasLayer(self.fused, dtype, trainable)

    def feature_layer(self, shape: tuple[int, ...], arguments: dict) -> DefaultLayer:
        return DefaultKerasLayer(self.fused, "float32", True, arguments)

    def translations(self, problem: Problem) -> list[str]:
        axis = problem.axes[0] if len(problem.axes) == 1 else list(problem.axes)
        out = [f"momentum {problem.momentum:g} -> momentum={problem.momentum:g} (same decay form)",
               f"epsilon {problem.epsilon:g} -> epsilon={problem.epsilon:g}",
               f"channel axis {axis} -> axis={axis}",
               f"dtype {problem.dtype} -> dtype={problem.dtype!r}" if problem.param_dtype is None else
               f"dtype {problem.dtype}, param_dtype {problem.param_dtype} -> dtype={layer_dtype(problem)!r} "
               f"(a mixed policy: float32 variables, {problem.dtype} compute)"]
        if not (problem.center and problem.scale):
            out.append(f"center={problem.center}, scale={problem.scale}")
        out += feature_translations(problem)
        if problem.param_dtype is None and problem.dtype in ("float16", "bfloat16"):
            out.append(f"gamma, beta and the moving statistics are kept in float32 (the layer's "
                       f"_param_dtype), not {problem.dtype}: finer than the case states")
        if self.fused is False:
            out.append("fused=False")
        elif problem.axes_in_range:
            kernel = "fused" if takes_fused_path(problem) else "unfused"
            out.append(f"fused=None -> the layer takes the {kernel} kernel for this input")
        return out

    # -- the layer, built and loaded with the case's state

    def layer(self, problem: Problem) -> tf_keras.layers.BatchNormalization:
        """The layer for the problem's configuration, loaded with its state. A layer is built once
        per configuration and kept for the checks (and cases) that share it: its variables are
        assigned before every check, as when porting weights."""
        key = configuration(problem)
        bn = self.layers.pop(key, None)
        if bn is None or isinstance(bn, base_layer_v1.Layer):
            # A TF1 layer made since (tf-layers, tf-slim: same process) swaps the class's base to
            # the V1 Layer (version_utils.py:115 rewrites `cls.__bases__`), and an eager layer
            # made before then raises "invalid state" when called (base_layer_v1.py:920, measured);
            # making a new layer swaps the base back.
            bn = self.build(problem)
        self.layers[key] = bn  # the most recently used last
        while len(self.layers) > LAYERS_KEPT:
            del self.layers[next(iter(self.layers))]
        for name, values in self.state(problem).items():
            variable = getattr(bn, name)
            variable.assign(self.ascending(values, problem).reshape(variable.shape))
        return bn

    def build(self, problem: Problem) -> tf_keras.layers.BatchNormalization:
        axis = problem.axes[0] if len(problem.axes) == 1 else list(problem.axes)
        bn = tf_keras.layers.BatchNormalization(
            axis=axis, momentum=problem.momentum, epsilon=problem.epsilon, center=problem.center,
            scale=problem.scale, fused=self.fused, dtype=layer_dtype(problem), **feature_arguments(problem))
        bn.build(problem.batches[0].shape)  # raises ValueError for an out-of-range axis
        return bn

    def state(self, problem: Problem) -> dict[str, np.ndarray]:
        out = {"moving_mean": problem.moving_mean, "moving_variance": problem.moving_variance}
        if problem.scale:
            out["gamma"] = problem.gamma
        if problem.center:
            out["beta"] = problem.beta
        if problem.renorm is not None:  # as the layer's initializers derive them
            out["renorm_mean"] = problem.moving_mean
            out["renorm_stddev"] = out["moving_stddev"] = np.sqrt(problem.moving_variance)
        return out

    def ascending(self, values: np.ndarray, problem: Problem) -> np.ndarray:
        """Per-channel values reordered from the case's axis order to ascending axes."""
        return problem.to_ascending(values)

    def per_channel(self, variable: tf.Variable, problem: Problem) -> np.ndarray:
        """A layer variable back in the case's shape (channel dims in the case's axis order)."""
        return problem.to_case_order(to_numpy(variable))

    def tensor(self, x: np.ndarray, problem: Problem) -> tf.Tensor:
        return tf.cast(tf.constant(x), tf.as_dtype(problem.dtype))

    def train(self, problem: Problem) -> TrainingRun:
        bn = self.layer(problem)
        for x in problem.batches:
            y = bn(self.tensor(x, problem), training=True)
        run = TrainingRun(output=to_numpy(y), moving_mean=self.per_channel(bn.moving_mean, problem),
                          moving_variance=self.per_channel(bn.moving_variance, problem))
        if problem.renorm is not None:
            run.renorm_mean = self.per_channel(bn.renorm_mean, problem)
            run.renorm_stddev = self.per_channel(bn.renorm_stddev, problem)
        if problem.infer_after_training:
            run.inference_output = to_numpy(bn(self.tensor(problem.batches[-1], problem), training=False))
        return run

    def infer(self, problem: Problem) -> np.ndarray:
        bn = self.layer(problem)
        return to_numpy(bn(self.tensor(problem.batches[-1], problem), training=False))

    def gradients(self, problem: Problem) -> Gradients:
        bn = self.layer(problem)
        x = self.tensor(problem.batches[-1], problem)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = bn(x, training=True)
        params = [v for v in (bn.gamma, bn.beta) if v is not None]
        grads = tape.gradient(y, [x, *params], output_gradients=self.tensor(problem.upstream, problem))
        dx, rest = grads[0], list(grads[1:])
        return Gradients(
            input=to_numpy(dx),
            gamma=self.per_channel(rest.pop(0), problem) if problem.scale else None,
            beta=self.per_channel(rest.pop(0), problem) if problem.center else None,
        )


FUSED = Conventions(
    variants=("moving-variance-unbiased",),
    notes=("fused=None picks the fused kernel for this input (4-D/5-D, channel axis first or last, not "
           "float64): the moving variance is updated with the unbiased batch variance",),
)
UNFUSED = Conventions(
    notes=("fused=None picks the unfused kernel for this input (not 4-D/5-D with the channel axis first "
           "or last, or float64): tf.nn.moments statistics, biased moving variance",),
)


class TfKeras(TfKerasLayer):
    id = "tf-keras"
    fused = None
    conventions = FUSED  # the kernel of the layer's typical (4-D) input; see conventions_for

    def conventions_for(self, problem: Problem) -> Conventions:
        """fused=None: the fused kernel (unbiased moving variance) where the layer fuses, else the
        unfused one (biased)."""
        return with_ghost(FUSED if takes_fused_path(problem) else UNFUSED, problem)

    def not_expressible(self, problem: Problem, check: Check) -> str | None:
        if problem.rank == 4 and problem.axes == (-4,):
            # `_raise_if_fused_cannot_be_used` accepts -4 (meant for 5-D input), so fused=None stays
            # fused; `build` then finds axis 0 on 4-D input and raises "Unsupported axis" (measured).
            return ("fused=None rejects axis=-4 on 4-D input (ValueError: Unsupported axis), though "
                    "axis=0 is accepted: tf_keras batch_normalization.py _raise_if_fused_cannot_be_used"
                    " lets -4 through for 5-D and build() then refuses axis 0 for the fused kernel")
        return super().not_expressible(problem, check)


class TfKerasUnfused(TfKerasLayer):
    id = "tf-keras-unfused"
    fused = False
    conventions = Conventions(
        notes=("fused=False: tf.nn.moments statistics, biased moving variance",),
    )


GHOST_NOTE = ("virtual_batch_size: the layer reshapes to [v, n/v, ...] and reduces over the first dim, so "
              "virtual batch j is rows j, j + n/v, ... (tf_keras batch_normalization.py call)")


def with_ghost(conventions: Conventions, problem: Problem) -> Conventions:
    """The kernel's conventions, plus ghost-interleaved where the case has ghost batches."""
    if problem.virtual_batch_size is None:
        return conventions
    return Conventions(variants=(*conventions.variants, "ghost-interleaved"),
                       notes=(*conventions.notes, GHOST_NOTE))


def feature_arguments(problem: Problem) -> dict:
    """renorm, virtual_batch_size and adjustment as the layer's arguments."""
    kwargs: dict = keras_renorm_arguments(problem)
    if problem.virtual_batch_size is not None:
        kwargs["virtual_batch_size"] = problem.virtual_batch_size
    if problem.adjustment is not None:
        dtype = "float64" if problem.dtype == "float64" else "float32"  # the parameters' dtype
        scale, bias = (tf.constant(broadcast_to_input(a, problem), dtype)
                       for a in (problem.adjustment.scale, problem.adjustment.bias))
        kwargs["adjustment"] = lambda shape: (scale, bias)
    return kwargs


def feature_translations(problem: Problem) -> list[str]:
    out = keras_renorm_translations(problem)
    if problem.virtual_batch_size is not None:
        out.append(f"virtual_batch_size {problem.virtual_batch_size} -> virtual_batch_size="
                   f"{problem.virtual_batch_size} (interleaved rows: ghost-interleaved)")
    if problem.adjustment is not None:
        out.append("adjustment -> adjustment=lambda shape: (scale, bias), constants shaped to broadcast "
                   "against the input")
    return out


class DefaultKerasLayer(DefaultLayer):
    """`tf_keras.layers.BatchNormalization()` called eagerly: `bn(x)`, `bn(x, training=True)` or
    `bn(x, training=False)`. An eager training call updates the moving statistics at once."""

    def __init__(self, fused: bool | None, dtype: str, trainable: bool, arguments: dict | None = None):
        kwargs: dict = dict(arguments or {})
        if fused is False:
            kwargs["fused"] = False
        if dtype != "float32":
            kwargs["dtype"] = dtype
        if not trainable:
            kwargs["trainable"] = False
        self.bn = tf_keras.layers.BatchNormalization(**kwargs)
        self.dtype = dtype

    def call(self, x: np.ndarray, mode: Check | None) -> Observed:
        kwargs = {} if mode is None else {"training": mode == "training"}
        y = self.bn(tf.constant(x, dtype=self.dtype), **kwargs)
        return Observed(to_numpy(y), y.dtype.name, to_numpy(self.bn.moving_mean),
                        to_numpy(self.bn.moving_variance), self.bn.moving_variance.dtype.name)


def make(adapter_id: str) -> Adapter:
    return {"tf-keras": TfKeras, "tf-keras-unfused": TfKerasUnfused}[adapter_id]()
