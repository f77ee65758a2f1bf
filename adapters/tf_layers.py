"""`tf.compat.v1.layers.batch_normalization` in a TF1 graph and session, as its documentation shows.

Each case runs in its own `tf.compat.v1.Graph` with its own `Session` (eager execution stays on for
the rest of the process). The graph is built once per input signature and parameter set and reused
by the case's three checks, with the case's state assigned into the variables before each run.

- The input is a placeholder; `training` is a boolean placeholder fed True or False.
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
  float16/bfloat16 gamma, beta and the moving statistics are float32 (`_param_dtype`).
- Which kernel: the layer (tf_keras's V1 BatchNormalization) defaults to `fused=None`, which fuses
  4-D input with the channel axis 1 or 3 and 5-D input with axis 1 or 4 unless the dtype is
  float64 (`build` in tf_keras/src/layers/normalization/batch_normalization.py). In a graph the
  fused op returns the Bessel-corrected batch variance and the layer averages that into the moving
  variance (measured: unbiased); the unfused code averages the biased one. One declaration per
  adapter: this one declares the fused path, and training on inputs it does not fuse is reported
  as not expressible (the unfused code is the one `tf-keras-unfused` checks).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from adapters.base import Adapter, Check, Conventions, Gradients, Problem, TrainingRun

FUSED_AXES = {4: (1, 3), 5: (1, 4)}
GRAPHS_KEPT = 4  # graphs (and sessions) kept for reuse; a case's checks share one


def in_range(problem: Problem) -> bool:
    return all(-problem.rank <= a < problem.rank for a in problem.axes)


def takes_fused_path(problem: Problem) -> bool:
    """Whether the layer's default `fused=None` picks the fused kernel for this input."""
    if len(problem.axes) != 1 or problem.dtype == "float64" or problem.rank not in FUSED_AXES:
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
    grads: dict[str, tf.Tensor]  # input, gamma, beta (those present)


class TfLayers(Adapter):
    id = "tf-layers"
    family = "tf"
    conventions = Conventions(
        moving_variance_estimator="unbiased",
        notes=["the default fused kernel (4-D/5-D input, channel axis first or last) updates the "
               "moving variance with the unbiased batch variance; other inputs run the unfused "
               "code (biased)",
               "moving statistics update only through the UPDATE_OPS collection the train op "
               "depends on"],
    )

    def __init__(self) -> None:
        self.graphs: OrderedDict[tuple, BatchNormGraph] = OrderedDict()

    def versions(self) -> dict[str, str]:
        import tf_keras  # the legacy layer lives in tf_keras under TF_USE_LEGACY_KERAS=1

        return {"tensorflow": tf.__version__, "tf_keras": tf_keras.__version__}

    def not_expressible(self, problem: Problem, check: Check) -> str | None:
        if problem.momentum is None:
            return "Keras momentum is a fixed decay; it has no cumulative average (momentum null)"
        if not in_range(problem):
            return None  # the layer itself must reject it
        if problem.rank == 4 and problem.axes == (-4,):
            # `_raise_if_fused_cannot_be_used` accepts -4 (meant for 5-D input), so fused=None stays
            # fused; `build` then finds axis 0 on 4-D input and raises "Unsupported axis" (measured).
            return ("fused=None rejects axis=-4 on 4-D input (ValueError: Unsupported axis), though "
                    "axis=0 is accepted: tf_keras batch_normalization.py _raise_if_fused_cannot_be_used"
                    " lets -4 through for 5-D and build() then refuses axis 0 for the fused kernel")
        if check == "training" and not takes_fused_path(problem):
            return ("fused=None runs the unfused kernel for this input (not 4-D/5-D with the channel "
                    "axis first or last, or float64), whose moving variance is biased, not the fused "
                    "path's declared unbiased one; tf-keras-unfused checks the same code")
        return None

    def translations(self, problem: Problem) -> list[str]:
        axis = problem.axes[0] if len(problem.axes) == 1 else list(problem.axes)
        out = [f"momentum {problem.momentum:g} -> momentum={problem.momentum:g} (same decay form)",
               f"epsilon {problem.epsilon:g} -> epsilon={problem.epsilon:g}",
               f"channel axis {axis} -> axis={axis}",
               f"input placeholder of dtype {problem.dtype}; training fed to a tf.bool placeholder",
               "moving statistics updated by UPDATE_OPS under tf.control_dependencies of the train op"]
        if not (problem.center and problem.scale):
            out.append(f"center={problem.center}, scale={problem.scale}")
        if in_range(problem):
            out.append(f"fused=None -> the {'fused' if takes_fused_path(problem) else 'unfused'} kernel "
                       "for this input")
        return out

    # -- the graph

    def graph(self, problem: Problem) -> BatchNormGraph:
        axis = problem.axes[0] if len(problem.axes) == 1 else list(problem.axes)
        key = (problem.batches[0].shape, problem.dtype, problem.axes, problem.momentum, problem.epsilon,
               problem.center, problem.scale)
        if key in self.graphs:
            self.graphs.move_to_end(key)
            return self.graphs[key]
        dtype = tf.as_dtype(problem.dtype)
        graph = tf.compat.v1.Graph()
        with graph.as_default():
            x = tf.compat.v1.placeholder(dtype, problem.batches[0].shape, name="x")
            training = tf.compat.v1.placeholder(tf.bool, (), name="training")
            with warnings.catch_warnings():  # its deprecation notice, once per graph, says nothing new
                warnings.filterwarnings("ignore", message=".*batch_normalization` is deprecated")
                y = tf.compat.v1.layers.batch_normalization(
                    x, axis=axis, momentum=problem.momentum, epsilon=problem.epsilon,
                    center=problem.center, scale=problem.scale, training=training, name="bn")
            update_ops = tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS)
            with tf.control_dependencies(update_ops):
                train_op = tf.identity(y, name="train_op")
            variables = {v.op.name.split("/")[-1]: v for v in tf.compat.v1.global_variables()}
            values = {name: tf.compat.v1.placeholder(v.dtype.base_dtype, v.shape)
                      for name, v in variables.items()}
            load_op = tf.group([tf.compat.v1.assign(v, values[name]) for name, v in variables.items()])
            upstream = tf.compat.v1.placeholder(dtype, problem.batches[0].shape, name="upstream")
            wrt = {"input": x, **{n: variables[n] for n in ("gamma", "beta") if n in variables}}
            grads = dict(zip(wrt, tf.gradients(y, list(wrt.values()), grad_ys=upstream), strict=True))
            init = tf.compat.v1.global_variables_initializer()
        session = tf.compat.v1.Session(graph=graph)
        session.run(init)
        built = BatchNormGraph(session, x, training, upstream, y, train_op, variables, values, load_op,
                               grads)
        self.graphs[key] = built
        while len(self.graphs) > GRAPHS_KEPT:
            self.graphs.popitem(last=False)[1].session.close()
        return built

    def load(self, g: BatchNormGraph, problem: Problem) -> None:
        """Assign the case's gamma, beta and moving statistics, as when restoring weights."""
        state = {"gamma": problem.gamma, "beta": problem.beta, "moving_mean": problem.moving_mean,
                 "moving_variance": problem.moving_variance}
        order = np.argsort([a % problem.rank for a in problem.axes])  # case order -> ascending axes
        feed = {g.values[name]: np.transpose(state[name], order).reshape(g.variables[name].shape)
                for name in g.variables}
        g.session.run(g.load_op, feed)

    def per_channel(self, values: np.ndarray, problem: Problem) -> np.ndarray:
        """A variable's value back in the case's shape (channel dims in the case's axis order)."""
        order = np.argsort([a % problem.rank for a in problem.axes])
        sizes = [problem.batches[0].shape[a] for a in sorted(a % problem.rank for a in problem.axes)]
        return np.transpose(np.asarray(values, np.float64).reshape(sizes), np.argsort(order))

    def feed(self, g: BatchNormGraph, x: np.ndarray, training: bool, problem: Problem) -> dict:
        return {g.x: x.astype(tf.as_dtype(problem.dtype).as_numpy_dtype), g.training: training}

    def train(self, problem: Problem) -> TrainingRun:
        g = self.graph(problem)
        self.load(g, problem)
        for x in problem.batches:
            y = g.session.run(g.train_op, self.feed(g, x, True, problem))
        moving_mean, moving_variance = g.session.run(
            [g.variables["moving_mean"], g.variables["moving_variance"]])
        run = TrainingRun(output=y.astype(np.float64),
                          moving_mean=self.per_channel(moving_mean, problem),
                          moving_variance=self.per_channel(moving_variance, problem))
        if problem.infer_after_training:
            run.inference_output = g.session.run(
                g.output, self.feed(g, problem.batches[-1], False, problem)).astype(np.float64)
        return run

    def infer(self, problem: Problem) -> np.ndarray:
        g = self.graph(problem)
        self.load(g, problem)
        return g.session.run(g.output, self.feed(g, problem.batches[-1], False, problem)).astype(np.float64)

    def gradients(self, problem: Problem) -> Gradients:
        g = self.graph(problem)
        self.load(g, problem)
        feed = self.feed(g, problem.batches[-1], True, problem)
        feed[g.upstream] = problem.upstream.astype(tf.as_dtype(problem.dtype).as_numpy_dtype)
        got = g.session.run(g.grads, feed)
        return Gradients(
            input=got["input"].astype(np.float64),
            gamma=self.per_channel(got["gamma"], problem) if "gamma" in got else None,
            beta=self.per_channel(got["beta"], problem) if "beta" in got else None,
        )


def make(adapter_id: str) -> Adapter:
    return TfLayers()
