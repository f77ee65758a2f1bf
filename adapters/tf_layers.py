"""`tf.compat.v1.layers.batch_normalization` in a TF1 graph and session, as its documentation shows.

Each case runs in its own `tf.compat.v1.Graph` with its own `Session` (eager execution stays on for
the rest of the process). The graph is built once per input signature and parameter set and reused
by the case's three checks, with the case's state assigned into the variables before each run.
Inference also runs in a kept graph of the same parameters whose placeholder takes its batch (one
built with None for a batch size that changed during training), as one TF1 graph serves batches of
any size; training and gradients get the static shape of their own batches, since it decides what
TF folds into the graph (None for the batch size moves float64 gradients by an ulp, measured).

- The input is a placeholder (None on a dimension whose size changes from batch to batch); `training`
  is a boolean placeholder fed True or False. No initializer is run: the case's state is assigned
  into every variable before each check, as restoring a checkpoint does.
- Moving statistics: the layer puts its two assign ops in the UPDATE_OPS collection, and they run
  only when the train op depends on them. As the function's docstring prescribes, the collection is
  read after the layer is created and the train op is built under
  `tf.control_dependencies(update_ops)`. There is no optimizer here (a case keeps gamma and beta
  fixed across its steps), so the train op is the output itself: `tf.identity(y)` under the
  dependency. Gradients come from `tf.gradients(y, [x, gamma, beta], grad_ys=upstream)`.
- Momentum: Keras's decay form, `moving = momentum * moving + (1 - momentum) * batch`; canonical m
  is `momentum=m`. m = null (a cumulative average) has no equivalent.
- epsilon: `epsilon=`; center/scale: `center=` / `scale=`; channel axes: `axis=` (an int, or a
  list for several axes; out of range raises ValueError). With several axes the variables have
  the broadcast shape (channel sizes at the channel axes in ascending order, 1 elsewhere).
- Dtype: the placeholder has the case dtype and the layer takes it from its input; for
  float16/bfloat16 gamma, beta and the moving statistics are float32 (`_param_dtype`). That is
  mixed precision as `param_dtype: float32` states it, the only mix the layer has (it takes no dtype
  argument of its own), so those cases run unchanged; for a float16/bfloat16 case without
  `param_dtype` the float32 storage is listed in `translations`.
- Which kernel: the layer (tf_keras's V1 BatchNormalization) defaults to `fused=None`, which fuses
  4-D input with the channel axis 1 or 3 and 5-D input with axis 1 or 4 unless the dtype is
  float64 (`build` in tf_keras/src/layers/normalization/batch_normalization.py). In a graph the
  fused op returns the Bessel-corrected batch variance and the layer averages that into the moving
  variance (measured: unbiased); the unfused code averages the biased one. `conventions_for`
  declares the estimator of the kernel the layer picks for each problem.
- The V1 layer validates the axis before it decides on fusing (`build`: `validate_axis`, then
  `_fused_can_be_used` on the non-negative axes), so axis -4 on 4-D input is axis 0 and runs
  unfused; tf-keras (V2) decides in `__init__` on the raw -4 and then rejects it in `build`.
- renorm: `renorm=True`, `renorm_momentum=`, `renorm_clipping=` the clips the case gives (a missing
  key is not clipped); `renorm_mean`, `renorm_stddev` and `moving_stddev` are loaded with the
  moving mean, sqrt(moving variance) and sqrt(moving variance), as the layer's initializers
  derive them (tf_keras batch_normalization.py `build`).
- virtual_batch_size: `virtual_batch_size=`. With a tensor `training` (the placeholder) the layer
  reshapes the batch to [-1, 1, ...] because `constant_value(training)` is None (`call`: "[v, -1]
  if training_value else [-1, 1]"), which makes the whole batch one virtual batch: ghost batches
  silently off (measured). So a ghost case's graph calls the layer twice, `training=True` and
  `training=False` (Python bools, sharing the variables with `reuse=True`). With True it reshapes
  to [v, n/v, ...] and reduces over the first dim: virtual batch j is rows j, j + n/v, ...,
  declared as the variant ghost-interleaved.
- adjustment: `adjustment=lambda shape: (scale, bias)`, constants in the graph shaped to
  broadcast against the input. renorm, ghost batches and adjustment make `fused=None` unfused.
  No argument drops the moving statistics.
- Default layer (semantic probes): `tf.compat.v1.layers.batch_normalization(x)` with no other
  argument, whose `training` defaults to False; see `DefaultGraphLayer`.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import tensorflow as tf

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
GRAPHS_KEPT = 4  # graphs (and sessions) kept for reuse; a case's checks share one


def takes_fused_path(problem: Problem) -> bool:
    """Whether the layer's default `fused=None` picks the fused kernel for this input."""
    if len(problem.axes) != 1 or problem.dtype == "float64" or problem.rank not in FUSED_AXES:
        return False
    if problem.renorm is not None or problem.virtual_batch_size is not None or problem.adjustment is not None:
        return False
    return problem.axes[0] % problem.rank in FUSED_AXES[problem.rank]


@dataclass
class BatchNormGraph:
    """One graph with its session and the tensors the adapter feeds and fetches."""

    session: tf.compat.v1.Session
    x: tf.Tensor
    training: tf.Tensor
    upstream: tf.Tensor
    output: tf.Tensor
    train_op: tf.Tensor  # the output, computed only after UPDATE_OPS ran
    variables: dict[str, tf.Variable]  # gamma, beta, moving_mean, moving_variance (those present)
    values: dict[str, tf.Tensor]  # placeholder per variable, to load the case's state
    load_op: tf.Operation
    graph: tf.compat.v1.Graph
    grads: dict[str, tf.Tensor] | None = None  # input, gamma, beta: built when first asked for
    # ghost batches: the layer called a second time with training=False (a Python bool), sharing
    # the variables; `output` is then the training=True call. None: `output` serves both modes.
    inference_output: tf.Tensor | None = None

    def output_in(self, training: bool) -> tf.Tensor:
        return self.output if training or self.inference_output is None else self.inference_output

    def gradient_ops(self) -> dict[str, tf.Tensor]:
        """tf.gradients ops, added to the graph on first use (they double its build time, and
        most checks never fetch them); a Session runs ops added after it was created."""
        if self.grads is None:
            with self.graph.as_default():
                wrt = {"input": self.x, **{n: self.variables[n] for n in ("gamma", "beta")
                                           if n in self.variables}}
                self.grads = dict(zip(wrt, tf.gradients(self.output, list(wrt.values()),
                                                        grad_ys=self.upstream), strict=True))
        return self.grads


UPDATE_OPS_NOTE = "moving statistics update only through the UPDATE_OPS collection the train op depends on"
FUSED = Conventions(
    variants=("moving-variance-unbiased",),
    notes=("fused=None picks the fused kernel for this input (4-D/5-D, channel axis first or last, not "
           "float64): the moving variance is updated with the unbiased batch variance", UPDATE_OPS_NOTE),
)
UNFUSED = Conventions(
    notes=("fused=None picks the unfused kernel for this input (not 4-D/5-D with the channel axis first "
           "or last, or float64): tf.nn.moments statistics, biased moving variance", UPDATE_OPS_NOTE),
)


GHOST_NOTE = ("virtual_batch_size with training=True: the layer reshapes to [v, n/v, ...] and reduces over "
              "the first dim, so virtual batch j is rows j, j + n/v, ... (tf_keras batch_normalization.py "
              "call)")
def mixed_not_expressible(problem: Problem) -> str | None:
    """The V1 layer's only mix: float16/bfloat16 input with float32 variables (`_param_dtype`)."""
    if problem.param_dtype is not None and not (
            problem.param_dtype == "float32" and problem.dtype in ("float16", "bfloat16")):
        return (f"{problem.dtype} input with {problem.param_dtype} parameters: the layer takes its dtype "
                "from the input and holds float16/bfloat16 layers' variables in float32, no other mix")
    return None


def storage_translations(problem: Problem) -> list[str]:
    """Where the variables' dtype is not the case's: float32 for float16/bfloat16 input."""
    if problem.dtype not in ("float16", "bfloat16"):
        return []
    if problem.param_dtype == "float32":
        return [f"param_dtype float32 -> {problem.dtype} input; the layer keeps float32 variables itself "
                "(_param_dtype)"]
    return [f"gamma, beta and the moving statistics are kept in float32 (the layer's _param_dtype), not "
            f"{problem.dtype}: finer than the case states"]


class TfLayers(Adapter):
    id = "tf-layers"
    names: ClassVar[dict[str, str]] = {
        "momentum": "momentum", "epsilon": "epsilon", "axis": "axis", "center": "center",
        "scale": "scale", "gamma": "gamma", "beta": "beta", "moving_mean": "moving_mean",
        "moving_variance": "moving_variance", "mode": "training= (and run UPDATE_OPS)"
    }
    family = "tf"
    conventions = FUSED  # the kernel of the layer's typical (4-D) input; see conventions_for

    def __init__(self) -> None:
        self.graphs: OrderedDict[tuple, BatchNormGraph] = OrderedDict()

    def versions(self) -> dict[str, str]:
        import tf_keras  # the legacy layer lives in tf_keras under TF_USE_LEGACY_KERAS=1

        return {"tensorflow": tf.__version__, "tf_keras": tf_keras.__version__}

    def conventions_for(self, problem: Problem) -> Conventions:
        """fused=None: the fused kernel (unbiased moving variance) where the layer fuses, else the
        unfused one (biased)."""
        chosen = FUSED if takes_fused_path(problem) else UNFUSED
        if problem.virtual_batch_size is None:
            return chosen
        return Conventions(variants=(*chosen.variants, "ghost-interleaved"),
                           notes=(*chosen.notes, GHOST_NOTE))

    capabilities = Capabilities(
        features=frozenset({"multi-axis", "renorm", "ghost-batches", "adjustment", "param-dtype"}),
        why={"momentum-null": "Keras momentum is a fixed decay; it has no cumulative average",
             **no_such_argument("tf.compat.v1.layers.batch_normalization", ("no-running-stats",))},
    )
    # an out-of-range axis is the layer's to reject

    def not_expressible(self, problem: Problem, check: Check) -> str | None:
        return mixed_not_expressible(problem)

    def default_layer(self, shape: tuple[int, ...], dtype: str = "float32",
                      trainable: bool = True) -> DefaultLayer:
        return DefaultGraphLayer(shape, dtype, trainable)

    def feature_layer(self, shape: tuple[int, ...], arguments: dict) -> DefaultLayer:
        return DefaultGraphLayer(shape, "float32", True, arguments)

    def translations(self, problem: Problem) -> list[str]:
        axis = problem.axes[0] if len(problem.axes) == 1 else list(problem.axes)
        out = [f"momentum {problem.momentum:g} -> momentum={problem.momentum:g} (same decay form)",
               f"epsilon {problem.epsilon:g} -> epsilon={problem.epsilon:g}",
               f"channel axis {axis} -> axis={axis}",
               f"input placeholder of dtype {problem.dtype}; training fed to a tf.bool placeholder",
               "moving statistics updated by UPDATE_OPS under tf.control_dependencies of the train op"]
        if not (problem.center and problem.scale):
            out.append(f"center={problem.center}, scale={problem.scale}")
        if problem.axes_in_range:
            out.append(f"fused=None -> the {'fused' if takes_fused_path(problem) else 'unfused'} kernel "
                       "for this input")
        out += keras_renorm_translations(problem, "loaded with")
        if problem.virtual_batch_size is not None:
            out.append(f"virtual_batch_size {problem.virtual_batch_size} -> virtual_batch_size="
                       f"{problem.virtual_batch_size}, the layer called with training=True and, sharing its "
                       "variables, training=False (a tensor `training` turns ghost batches off); interleaved "
                       "rows: ghost-interleaved")
        if problem.adjustment is not None:
            out.append("adjustment -> adjustment=lambda shape: (scale, bias), constants in the graph shaped "
                       "to broadcast against the input")
        out.extend(storage_translations(problem))
        return out

    # -- the graph

    @staticmethod
    def input_shape(problem: Problem) -> tuple[int | None, ...]:
        """The placeholder's shape: None where the batches differ (a batch size that changes from
        step to step), as TF1 users declare a variable batch dimension; not None throughout (see
        the module docstring: measured on dtype-float64-nchw's input gradient)."""
        shapes = {b.shape for b in problem.batches}
        return tuple(dims[0] if len(set(dims)) == 1 else None for dims in zip(*shapes, strict=True))

    def batch_norm(self, x: tf.Tensor, training: tf.Tensor | bool, problem: Problem,
                   reuse: bool = False) -> tf.Tensor:
        """The layer's output, called in the graph being built (the one place the API is called)."""
        axis = problem.axes[0] if len(problem.axes) == 1 else list(problem.axes)
        with warnings.catch_warnings():  # its deprecation notice, once per graph, says nothing new
            warnings.filterwarnings("ignore", message=".*batch_normalization` is deprecated")
            return tf.compat.v1.layers.batch_normalization(
                x, axis=axis, momentum=problem.momentum, epsilon=problem.epsilon,
                center=problem.center, scale=problem.scale, training=training, name="bn", reuse=reuse,
                **feature_arguments(problem))

    def graph(self, problem: Problem, any_batch: bool = False) -> BatchNormGraph:
        """The graph for the problem's configuration and batch shapes, built or kept. `any_batch`
        (inference): also a kept graph of the configuration whose placeholder takes the batch."""
        shape = self.input_shape(problem)
        config = configuration(problem)
        key = (shape, config)
        if key not in self.graphs and any_batch:
            key = next((k for k in reversed(self.graphs) if k[1] == config and takes(k[0], shape)), key)
        if key in self.graphs:
            self.graphs.move_to_end(key)
            return self.graphs[key]
        dtype = tf.as_dtype(problem.dtype)
        graph = tf.compat.v1.Graph()
        with graph.as_default():
            x = tf.compat.v1.placeholder(dtype, shape, name="x")
            training = tf.compat.v1.placeholder(tf.bool, (), name="training")
            ghost = problem.virtual_batch_size is not None
            # virtual batches: a tensor `training` makes the layer reshape to [-1, 1, ...], one
            # virtual batch of everything (measured; see the module docstring), so the ghost
            # graph calls it with Python bools, as its documentation also allows
            y = self.batch_norm(x, True if ghost else training, problem)
            y_inference = self.batch_norm(x, False, problem, reuse=True) if ghost else None
            update_ops = tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS)
            with tf.control_dependencies(update_ops):
                train_op = tf.identity(y, name="train_op")
            variables = {v.op.name.split("/")[-1]: v for v in tf.compat.v1.global_variables()}
            values = {name: tf.compat.v1.placeholder(v.dtype.base_dtype, v.shape)
                      for name, v in variables.items()}
            load_op = tf.group([tf.compat.v1.assign(v, values[name]) for name, v in variables.items()])
            upstream = tf.compat.v1.placeholder(dtype, shape, name="upstream")
        # no global_variables_initializer run: `load` assigns every variable before each check,
        # as restoring a checkpoint does
        session = tf.compat.v1.Session(graph=graph)
        built = BatchNormGraph(session, x, training, upstream, y, train_op, variables, values, load_op,
                               graph, inference_output=y_inference)
        self.graphs[key] = built
        while len(self.graphs) > GRAPHS_KEPT:
            self.graphs.popitem(last=False)[1].session.close()
        return built

    def load(self, g: BatchNormGraph, problem: Problem) -> None:
        """Assign the case's gamma, beta and moving statistics, as when restoring weights."""
        state = {"gamma": problem.gamma, "beta": problem.beta, "moving_mean": problem.moving_mean,
                 "moving_variance": problem.moving_variance,
                 # renorm's variables, as the layer's initializers derive them from the moving ones
                 "renorm_mean": problem.moving_mean, "renorm_stddev": np.sqrt(problem.moving_variance),
                 "moving_stddev": np.sqrt(problem.moving_variance)}
        feed = {g.values[name]: problem.to_ascending(state[name]).reshape(g.variables[name].shape)
                for name in g.variables}
        g.session.run(g.load_op, feed)

    def per_channel(self, values: np.ndarray, problem: Problem) -> np.ndarray:
        """A variable's value back in the case's shape (channel dims in the case's axis order)."""
        return problem.to_case_order(np.asarray(values, np.float64))

    def feed(self, g: BatchNormGraph, x: np.ndarray, training: bool, problem: Problem) -> dict:
        return {g.x: x.astype(tf.as_dtype(problem.dtype).as_numpy_dtype), g.training: training}

    def train(self, problem: Problem) -> TrainingRun:
        g = self.graph(problem)
        self.load(g, problem)
        for x in problem.batches:
            y = g.session.run(g.train_op, self.feed(g, x, True, problem))
        read = ["moving_mean", "moving_variance"]
        if problem.renorm is not None:
            read += ["renorm_mean", "renorm_stddev"]
        state = g.session.run({name: g.variables[name] for name in read})  # one run reads them all
        run = TrainingRun(output=y.astype(np.float64),
                          **{name: self.per_channel(value, problem) for name, value in state.items()})
        if problem.infer_after_training:
            run.inference_output = g.session.run(
                g.output_in(False), self.feed(g, problem.batches[-1], False, problem)).astype(np.float64)
        return run

    def infer(self, problem: Problem) -> np.ndarray:
        g = self.graph(problem, any_batch=True)
        self.load(g, problem)
        return g.session.run(g.output_in(False), self.feed(g, problem.batches[-1], False, problem)
                             ).astype(np.float64)

    def gradients(self, problem: Problem) -> Gradients:
        g = self.graph(problem)
        self.load(g, problem)
        feed = self.feed(g, problem.batches[-1], True, problem)
        feed[g.upstream] = problem.upstream.astype(tf.as_dtype(problem.dtype).as_numpy_dtype)
        got = g.session.run(g.gradient_ops(), feed)
        return Gradients(
            input=got["input"].astype(np.float64),
            gamma=self.per_channel(got["gamma"], problem) if "gamma" in got else None,
            beta=self.per_channel(got["beta"], problem) if "beta" in got else None,
        )


def takes(placeholder: tuple[int | None, ...], shape: tuple[int | None, ...]) -> bool:
    """Whether a placeholder of this shape can be fed a batch of that shape."""
    return len(placeholder) == len(shape) and all(
        p is None or p == s for p, s in zip(placeholder, shape, strict=True))


def feature_arguments(problem: Problem) -> dict:
    """renorm, virtual_batch_size and adjustment as the function's arguments (called in the graph)."""
    kwargs: dict = keras_renorm_arguments(problem)
    if problem.virtual_batch_size is not None:
        kwargs["virtual_batch_size"] = problem.virtual_batch_size
    if problem.adjustment is not None:
        dtype = tf.float64 if problem.dtype == "float64" else tf.float32  # the parameters' dtype
        scale, bias = (broadcast_to_input(a, problem) for a in (problem.adjustment.scale,
                                                                 problem.adjustment.bias))
        kwargs["adjustment"] = lambda shape: (tf.constant(scale, dtype), tf.constant(bias, dtype))
    return kwargs


@dataclass
class ModeGraph:
    """The default layer's graph for one way of calling it."""

    session: tf.compat.v1.Session
    x: tf.Tensor
    output: tf.Tensor
    train_op: tf.Tensor  # the output, after UPDATE_OPS ran
    variables: dict[str, tf.Variable]
    values: dict[str, tf.Tensor]
    load_op: tf.Operation


class DefaultGraphLayer(DefaultLayer):
    """`tf.compat.v1.layers.batch_normalization(x)` and nothing else (`trainable=False` when asked).

    The call form is fixed when the graph is built, so each mode gets a graph of its own: no
    `training` argument (the function's default, False), `training=True` or `training=False`. The
    variables' values are carried from graph to graph, as a checkpoint restore would. `call` runs
    the output alone, as a TF1 user who forgot UPDATE_OPS does; `train_step` runs it under
    `tf.control_dependencies(UPDATE_OPS)`, as the function's docstring prescribes."""

    def __init__(self, shape: tuple[int, ...], dtype: str, trainable: bool, arguments: dict | None = None):
        self.shape, self.dtype, self.trainable = shape, dtype, trainable
        self.arguments = dict(arguments or {})  # the feature probes' extra arguments
        self.graphs: dict[Check | None, ModeGraph] = {}
        self.state: dict[str, np.ndarray] = {}  # variable values after the last run; {} = fresh

    def graph(self, mode: Check | None) -> ModeGraph:
        if mode in self.graphs:
            return self.graphs[mode]
        graph = tf.compat.v1.Graph()
        with graph.as_default():
            x = tf.compat.v1.placeholder(tf.as_dtype(self.dtype), self.shape, name="x")
            y = self.layer(x, mode)
            with tf.control_dependencies(tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS)):
                train_op = tf.identity(y)
            variables = {v.op.name.split("/")[-1]: v for v in tf.compat.v1.global_variables()}
            values = {n: tf.compat.v1.placeholder(v.dtype.base_dtype, v.shape) for n, v in variables.items()}
            load_op = tf.group([tf.compat.v1.assign(v, values[n]) for n, v in variables.items()])
            init = tf.compat.v1.global_variables_initializer()
        session = tf.compat.v1.Session(graph=graph)
        session.run(init)
        self.graphs[mode] = ModeGraph(session, x, y, train_op, variables, values, load_op)
        return self.graphs[mode]

    def layer(self, x: tf.Tensor, mode: Check | None) -> tf.Tensor:
        """The default call: no `training` argument for mode None, else training=True/False (and the
        feature probes' extra arguments)."""
        kwargs: dict = {**self.arguments, **({} if mode is None else {"training": mode == "training"})}
        if not self.trainable:
            kwargs["trainable"] = False
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*batch_normalization` is deprecated")
            return tf.compat.v1.layers.batch_normalization(x, **kwargs)

    def run(self, x: np.ndarray, mode: Check | None, fetch: str) -> Observed:
        g = self.graph(mode)
        if self.state:
            g.session.run(g.load_op, {g.values[n]: v for n, v in self.state.items()})
        y = g.session.run(getattr(g, fetch), {g.x: x.astype(tf.as_dtype(self.dtype).as_numpy_dtype)})
        self.state = g.session.run(g.variables)
        mean, var = self.state["moving_mean"], self.state["moving_variance"]
        return Observed(y.astype(np.float64), y.dtype.name, mean.astype(np.float64), var.astype(np.float64),
                        var.dtype.name)

    def call(self, x: np.ndarray, mode: Check | None) -> Observed:
        return self.run(x, mode, "output")

    def train_step(self, x: np.ndarray) -> Observed:
        return self.run(x, "training", "train_op")


def make(adapter_id: str) -> Adapter:
    return TfLayers()
