"""`tf_slim.layers.batch_norm` (TF-Slim, the maintained successor of `tf.contrib.layers.batch_norm`)
in a TF1 graph and session, as its docstring shows: the update ops go to UPDATE_OPS and the train
op depends on them.

Everything but the call itself is `adapters.tf_layers` (graph per signature, state loaded into the
variables, UPDATE_OPS under `tf.control_dependencies`, `tf.gradients`); see that docstring.

Compatibility shim (TF 2.21, tf_keras 2.21, tf_slim 1.1.0). `import tf_slim` works, but the first
`batch_norm` call raises `ModuleNotFoundError: No module named 'tf_keras.legacy_tf_layers'`:
tf_slim/layers/layers.py:663 builds `tensorflow.python.layers.normalization.BatchNormalization`,
which tensorflow/python/layers/normalization.py:21-23 lazily loads from
`tf_keras.legacy_tf_layers.normalization`, a module tf_keras 2.21 ships as
`tf_keras.src.legacy_tf_layers.normalization`. The shim registers the `src` modules under the
names TF asks for (two `sys.modules` entries). Then 2-D input, which Slim runs through its own
`_fused_batch_norm`, raises `AttributeError: module 'tensorflow.python.framework.ops' has no
attribute 'Tensor'` (tf_slim/layers/utils.py:163 `isinstance(value, (ops.Tensor, ...))`; TF
moved the class to `tensorflow.python.framework.tensor.Tensor`): the shim sets `ops.Tensor` to
that class where it is missing. The same path then raises `AttributeError: module
'tensorflow.python.ops.control_flow_ops' has no attribute 'cond'` (tf_slim/layers/utils.py:220
`smart_cond`; TF moved it to `tensorflow.python.ops.cond.cond`): the shim sets that too. Both are
attributes TF 2.21 no longer has, so no TF or tf_keras code reads them (checked with grep); nothing
else is changed. Gradients of that 2-D path then fail with "Connecting to invalid output 3 of source
node BatchNorm/cond": TF 2's functional `cond` outputs its intermediates (which the gradient
needs) only while a Keras layer is being built (tensorflow/python/ops/control_flow_util_v2.py:266
`output_all_intermediates`), and Slim's own cond is not a Keras layer. So the graph is built under
`tf.compat.v1.experimental.output_all_intermediates(True)`, as the error message advises, and the
setting is restored afterwards. It needs tf_keras, i.e.
`TF_USE_LEGACY_KERAS=1`, like `tf-layers`, so this adapter shares the `tf` family's process.

How each canonical parameter maps:

- Momentum: `decay=m` (the same decay form; Slim's default is 0.999). m = null has no equivalent.
- epsilon: `epsilon=` (default 0.001). center/scale: `center=`, `scale=` (Slim's default is
  `scale=False`, so it is always passed).
- Channel axis: no `axis` argument. `data_format="NHWC"` normalizes over the last dimension,
  `"NCHW"` over dim 1; any other axis, and several axes, are not expressible. Rank 2 takes the
  channel last (dims 1 and -1 are the same dimension).
- Kernel: `fused=None` (the default) means True. Rank 2 runs Slim's own `_fused_batch_norm` (the
  input is reshaped to 4-D, `nn.fused_batch_norm`, moving averages with
  `moving_averages.assign_moving_average`); other ranks build the tf_keras V1 layer with
  `fused=True`, which fuses only 4-D/5-D input that is not float64 (see `fused`). 2-D float64
  input is run with `fused=False`: the default path raises `TypeError` there, as
  `nn.fused_batch_norm` takes float16/bfloat16/float32 only (a translation, listed). The fused
  kernel averages the Bessel-corrected batch variance into the moving variance (declared, per
  problem).
- Dtype: the placeholder has the case dtype; float16/bfloat16 variables are float32, as in the
  tf_keras layer (and in `_fused_batch_norm`: SL:299 `variable_dtype = dtypes.float32`), so
  `param_dtype: float32` with float16/bfloat16 input runs unchanged; other mixes are not
  expressible (as for tf-layers).
- Modes: `is_training=` a boolean placeholder fed True or False.
"""

from __future__ import annotations

import sys
import warnings
from importlib import metadata

import tensorflow as tf
import tf_keras
import tf_keras.src.legacy_tf_layers.normalization as _legacy_normalization
import tf_slim
from tensorflow.python.framework import ops, tensor
from tensorflow.python.ops import cond, control_flow_ops, control_flow_util_v2

from adapters.base import Adapter, Capabilities, Check, Conventions, DefaultLayer, NotExpressible, Problem
from adapters.tf_layers import (
    FUSED,
    UNFUSED,
    BatchNormGraph,
    DefaultGraphLayer,
    TfLayers,
    mixed_not_expressible,
    storage_translations,
    takes_fused_path,
)

# the shim: see the docstring
sys.modules.setdefault("tf_keras.legacy_tf_layers", sys.modules["tf_keras.src.legacy_tf_layers"])
sys.modules.setdefault("tf_keras.legacy_tf_layers.normalization", _legacy_normalization)
if not hasattr(ops, "Tensor"):
    ops.Tensor = tensor.Tensor
if not hasattr(control_flow_ops, "cond"):
    control_flow_ops.cond = cond.cond


def data_format(problem: Problem) -> str:
    """"NHWC" for a channel-last input (rank 2 included), "NCHW" for channel dim 1."""
    return "NHWC" if problem.axes[0] % problem.rank == problem.rank - 1 else "NCHW"


def float64_2d(problem: Problem) -> bool:
    """2-D float64 input, which Slim's default fused path cannot run (nn.fused_batch_norm has no
    float64 kernel): it is run with fused=False."""
    return problem.rank == 2 and problem.dtype == "float64"


def fused(problem: Problem) -> bool:
    """Whether the fused kernel runs: Slim's fused=None is True, which takes Slim's own
    `_fused_batch_norm` for 2-D input; otherwise the tf_keras V1 layer built with fused=True
    fuses only where it can (`build`: `self.fused = rank in (4, 5) and self._fused_can_be_used()`,
    tf_keras/src/layers/normalization/batch_normalization.py:366, so not float64 nor 3-D)."""
    return (problem.rank == 2 and not float64_2d(problem)) or takes_fused_path(problem)


class TfSlim(TfLayers):
    id = "tf-slim"
    family = "tf"
    conventions = FUSED

    capabilities = Capabilities(
        min_rank=2, features=frozenset({"param-dtype"}),
        why={"momentum-null": "decay is a fixed moving-average decay; there is no cumulative average",
             "multi-axis": "batch_norm normalizes over one channel dim, picked by data_format",
             "rank": "batch_norm takes inputs with 2 or more dimensions"},
    )

    def versions(self) -> dict[str, str]:
        return {"tensorflow": tf.__version__, "tf_keras": tf_keras.__version__,
                "tf_slim": metadata.version("tf_slim")}  # the module has no __version__

    def not_expressible(self, problem: Problem, check: Check) -> str | None:
        """batch_norm takes no axis: data_format puts the channel last or at dim 1, so no other
        axis, out-of-range ones included, can be stated (there is nothing for Slim to reject)."""
        axis = problem.axes[0]
        if mixed := mixed_not_expressible(problem):
            return mixed
        if not problem.axes_in_range or axis % problem.rank not in (1, problem.rank - 1):
            return (f"channel axis {axis} of a rank-{problem.rank} input: batch_norm has no axis argument; "
                    "data_format takes the channel last (NHWC) or at dim 1 (NCHW) only")
        return None

    def conventions_for(self, problem: Problem) -> Conventions:
        return FUSED if fused(problem) else UNFUSED

    def translations(self, problem: Problem) -> list[str]:
        out = [f"momentum {problem.momentum:g} -> decay={problem.momentum:g} (same decay form)",
               f"epsilon {problem.epsilon:g} -> epsilon={problem.epsilon:g}",
               f"channel axis {problem.axes[0]} -> data_format={data_format(problem)!r}",
               f"center={problem.center}, scale={problem.scale} (always passed; Slim: scale=False)",
               f"input placeholder of dtype {problem.dtype}; is_training fed to a tf.bool placeholder",
               "moving statistics updated by UPDATE_OPS under tf.control_dependencies of the train op"]
        if float64_2d(problem):
            out.append("fused=False: Slim's default fused path for 2-D input raises TypeError on float64 "
                       "(nn.fused_batch_norm takes float16/bfloat16/float32)")
        else:
            kernel = ("Slim's own _fused_batch_norm for 2-D input" if problem.rank == 2 else
                      "the layer's fused kernel" if fused(problem) else
                      "the layer's unfused kernel for this input")
            out.append(f"fused=None (True): {kernel}")
        return [*out, *storage_translations(problem)]

    def default_layer(self, shape: tuple[int, ...], dtype: str = "float32",
                      trainable: bool = True) -> DefaultLayer:
        return DefaultSlimLayer(shape, dtype, trainable)

    def feature_layer(self, shape: tuple[int, ...], arguments: dict) -> DefaultLayer:
        # not TfLayers': that would measure tf.compat.v1.layers under tf-slim's name. Slim's
        # batch_norm has renorm arguments of its own, which this adapter does not state yet.
        raise NotExpressible(f"{self.id} states no optional feature ({', '.join(arguments)})")

    def graph(self, problem: Problem, any_batch: bool = False) -> BatchNormGraph:
        """The graph, for a problem Slim can state (callers that skip `why_not_expressible`, the
        probes, get NotExpressible rather than an IndexError of the adapter's own)."""
        reason = self.not_expressible(problem, "training")
        if reason:
            raise NotExpressible(reason)
        return super().graph(problem, any_batch)

    def batch_norm(self, x: tf.Tensor, training: tf.Tensor, problem: Problem) -> tf.Tensor:
        """Slim's call; its own `smart_cond` (2-D input) is built outputting every intermediate,
        so that `tf.gradients` can differentiate it (see the module docstring)."""
        kwargs = {"fused": False} if float64_2d(problem) else {}
        before = control_flow_util_v2._EXPERIMENTAL_OUTPUT_ALL_INTERMEDIATES_OVERRIDE
        tf.compat.v1.experimental.output_all_intermediates(True)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*is deprecated")
                return tf_slim.batch_norm(
                    x, decay=problem.momentum, epsilon=problem.epsilon, center=problem.center,
                    scale=problem.scale, is_training=training, data_format=data_format(problem),
                    **kwargs)
        finally:
            tf.compat.v1.experimental.output_all_intermediates(before)


class DefaultSlimLayer(DefaultGraphLayer):
    """`tf_slim.batch_norm(x)` and nothing else: `is_training` defaults to True, decay to 0.999,
    epsilon to 0.001, `scale` to False, `data_format` to "NHWC" (`trainable=False` when asked)."""

    def layer(self, x: tf.Tensor, mode: Check | None) -> tf.Tensor:
        kwargs: dict = {} if mode is None else {"is_training": mode == "training"}
        if not self.trainable:
            kwargs["trainable"] = False
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is deprecated")
            return tf_slim.batch_norm(x, **kwargs)


def make(adapter_id: str) -> Adapter:
    return TfSlim()
