"""`tf.nn.moments` + `tf.nn.batch_normalization`, the state kept and updated by the caller.

This is BN as the TF API reference composes it from primitives:

- Batch statistics: `mean, variance = tf.nn.moments(x, axes=<every axis but the channel axes>,
  keepdims=True)`; `tf.nn.moments` returns the biased (population) variance, and for float16 input
  it computes in float32 and casts back (`tensorflow/python/ops/nn_impl.py`, `moments`).
- Normalization: `tf.nn.batch_normalization(x, mean, variance, offset=beta, scale=gamma,
  variance_epsilon=epsilon)`, i.e. `(x - mean) * gamma / sqrt(variance + epsilon) + beta`.
- Momentum: the moving averages are `tf.Variable`s updated by hand in decay form,
  `moving = m * moving + (1 - m) * batch`, so the canonical m is used as is; m = null (a cumulative
  average) is decay `1 - 1/t` at step t. The update uses the biased variance `tf.nn.moments` gives.
- Channel axes: any number; gamma/beta/moving statistics are reshaped to broadcast against x
  (size at the channel axes, 1 elsewhere). The channel size is read as `x.shape[axis]`, so an
  out-of-range axis is rejected by TensorFlow's `TensorShape`.
- center/scale off: `offset=None` / `scale=None`, which the function treats as 0 / 1.
- Dtype: x, gamma, beta and the moving variables all in the case dtype.
- Default layer (semantic probes): the recipe has almost no defaults to measure: `tf.nn.moments`
  requires `axes`, `tf.nn.batch_normalization` requires `variance_epsilon`, there is no mode
  argument, and the moving averages and their decay are the caller's. See `DefaultRecipe` for
  which probes it answers and why the others do not apply.
"""

from __future__ import annotations

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
    NotExpressible,
    Observed,
    Problem,
    TrainingRun,
)


def to_numpy(t: tf.Tensor) -> np.ndarray:
    return tf.cast(t, tf.float64).numpy()


class TfNn(Adapter):
    id = "tf-nn"
    names: ClassVar[dict[str, str]] = {
        "momentum": "decay (your own moving-average update)", "epsilon": "variance_epsilon",
        "axis": "axes= of tf.nn.moments (every other axis)", "center": "offset=None",
        "scale": "scale=None", "gamma": "scale", "beta": "offset", "moving_mean": "your variable",
        "moving_variance": "your variable", "mode": "which statistics you pass"
    }
    family = "tf"
    conventions = Conventions(
        notes=("tf.nn.moments returns the biased variance; the moving update is the caller's",),
    )

    def versions(self) -> dict[str, str]:
        return {"tensorflow": tf.__version__}

    capabilities = Capabilities(  # several axes by broadcasting
        features=frozenset({"multi-axis", "momentum-null"}),
        why={**{f: "tf.nn.moments + tf.nn.batch_normalization have no argument for it: it would be the "
                   "caller's own code, not the API's" for f in ("renorm", "ghost-batches", "adjustment",
                                                                 "no-running-stats")},
             "param-dtype": "tf.nn.moments and tf.nn.batch_normalization take x and every parameter in "
                            "one dtype (TF math ops do not promote)"},
    )

    def default_layer(self, shape: tuple[int, ...], dtype: str = "float32",
                      trainable: bool = True) -> DefaultLayer:
        if not trainable:
            raise NotExpressible("tf.nn.moments and tf.nn.batch_normalization are functions: they have no "
                                 "trainable flag")
        return DefaultRecipe(shape, dtype)

    def translations(self, problem: Problem) -> list[str]:
        if problem.momentum is None:
            out = ["momentum null -> decay 1 - 1/t at step t (cumulative average by hand)"]
        else:
            out = [f"momentum {problem.momentum:g} -> decay {problem.momentum:g} in the hand-written update"]
        out.append(f"channel axes {list(problem.axes)} -> tf.nn.moments over every other axis, "
                   "keepdims=True; parameters reshaped to broadcast")
        out.append(f"epsilon {problem.epsilon:g} -> variance_epsilon={problem.epsilon:g}")
        if not problem.scale:
            out.append("scale off -> scale=None")
        if not problem.center:
            out.append("center off -> offset=None")
        return out

    # -- layout: parameters come shaped like the channel dims in the order the case lists the axes

    def layout(self, x: tf.Tensor, problem: Problem) -> tuple[list[int], list[int], list[int]]:
        """(channel axes ascending, reduction axes, broadcast shape). `x.shape[axis]` raises
        IndexError for an out-of-range axis, as TensorFlow's TensorShape does."""
        rank = x.shape.rank
        sizes = {a % rank: x.shape[a] for a in problem.axes}
        channels = sorted(sizes)
        reduce = [d for d in range(rank) if d not in sizes]
        return channels, reduce, [sizes.get(d, 1) for d in range(rank)]

    def broadcast(self, values: np.ndarray, problem: Problem, shape: list[int]) -> np.ndarray:
        return problem.to_ascending(values).reshape(shape)

    def unbroadcast(self, t: tf.Tensor, problem: Problem, channels: list[int]) -> np.ndarray:
        return problem.to_case_order(to_numpy(t))

    def setup(self, problem: Problem, x: tf.Tensor) -> dict:
        dtype = tf.as_dtype(problem.dtype)
        channels, reduce, shape = self.layout(x, problem)

        def param(values: np.ndarray) -> tf.Tensor:
            return tf.cast(self.broadcast(values, problem, shape), dtype)

        return {
            "channels": channels,
            "reduce": reduce,
            "gamma": tf.Variable(param(problem.gamma)) if problem.scale else None,
            "beta": tf.Variable(param(problem.beta)) if problem.center else None,
            "moving_mean": tf.Variable(param(problem.moving_mean), trainable=False),
            "moving_variance": tf.Variable(param(problem.moving_variance), trainable=False),
        }

    def tensor(self, x: np.ndarray, problem: Problem) -> tf.Tensor:
        return tf.cast(tf.constant(x), tf.as_dtype(problem.dtype))

    def normalize(self, x: tf.Tensor, s: dict, mean: tf.Tensor, variance: tf.Tensor,
                  problem: Problem) -> tf.Tensor:
        return tf.nn.batch_normalization(x, mean, variance, offset=s["beta"], scale=s["gamma"],
                                         variance_epsilon=problem.epsilon)

    def train(self, problem: Problem) -> TrainingRun:
        s: dict = {}
        for step, batch in enumerate(problem.batches, start=1):
            x = self.tensor(batch, problem)
            s = s or self.setup(problem, x)
            mean, variance = tf.nn.moments(x, axes=s["reduce"], keepdims=True)
            y = self.normalize(x, s, mean, variance, problem)
            decay = 1.0 - 1.0 / step if problem.momentum is None else problem.momentum
            for name, batch_stat in (("moving_mean", mean), ("moving_variance", variance)):
                moving = s[name]
                moving.assign(moving * decay + batch_stat * (1.0 - decay))
        run = TrainingRun(
            output=to_numpy(y),
            moving_mean=self.unbroadcast(s["moving_mean"], problem, s["channels"]),
            moving_variance=self.unbroadcast(s["moving_variance"], problem, s["channels"]),
            batch_mean=self.unbroadcast(mean, problem, s["channels"]),
            batch_variance=self.unbroadcast(variance, problem, s["channels"]),
        )
        if problem.infer_after_training:
            run.inference_output = to_numpy(
                self.normalize(x, s, s["moving_mean"], s["moving_variance"], problem))
        return run

    def infer(self, problem: Problem) -> np.ndarray:
        x = self.tensor(problem.batches[-1], problem)
        s = self.setup(problem, x)
        return to_numpy(self.normalize(x, s, s["moving_mean"], s["moving_variance"], problem))

    def gradients(self, problem: Problem) -> Gradients:
        x = self.tensor(problem.batches[-1], problem)
        s = self.setup(problem, x)
        params = [s[name] for name in ("gamma", "beta") if s[name] is not None]
        with tf.GradientTape() as tape:
            tape.watch(x)
            mean, variance = tf.nn.moments(x, axes=s["reduce"], keepdims=True)
            y = self.normalize(x, s, mean, variance, problem)
        grads = tape.gradient(y, [x, *params], output_gradients=self.tensor(problem.upstream, problem))
        found = dict(zip(["input", *[n for n in ("gamma", "beta") if s[n] is not None]], grads,
                         strict=True))
        return Gradients(
            input=to_numpy(found["input"]),
            gamma=self.unbroadcast(found["gamma"], problem, s["channels"]) if problem.scale else None,
            beta=self.unbroadcast(found["beta"], problem, s["channels"]) if problem.center else None,
        )


class DefaultRecipe(DefaultLayer):
    """The documented recipe with nothing but what it requires, and no value made up for a probe to
    read back as a "default":

    - axes: required by `tf.nn.moments`; the layer reduces over every axis but the last, as the
      docstring's examples do (axes=[0] for [batch, depth], [0, 1, 2] for [batch, height, width,
      depth]); gamma/beta are left out (`offset=None, scale=None`).
    - moving statistics: the caller's variables, fresh mean 0 / variance 1, of the last axis.
    - training call: `tf.nn.moments` of the batch, then `tf.nn.batch_normalization`; nothing
      touches the caller's variables. `variance_epsilon` is required and has no default, so it is
      passed as 0 (nothing added); no probe reads the training output's epsilon.
    - inference call (the caller's moving averages): its output is all that `default_epsilon`
      reads, and it would read back whatever epsilon the caller chose: not expressible.
    - no mode argument: the recipe has none (mode None): not expressible.
    - train_step: the docstring says only "running averages thereof"; the update and its decay are
      the caller's, with no default, so default momentum, the moving-variance estimator (measured
      by the numeric cases instead), the default axis and the float16 dtypes do not apply."""

    def __init__(self, shape: tuple[int, ...], dtype: str):
        self.dtype = tf.as_dtype(dtype)
        self.moving_mean = tf.Variable(tf.zeros(shape[-1], self.dtype), trainable=False)
        self.moving_variance = tf.Variable(tf.ones(shape[-1], self.dtype), trainable=False)

    def call(self, x: np.ndarray, mode: Check | None) -> Observed:
        if mode is None:
            raise NotExpressible("tf.nn.batch_normalization has no mode argument: the caller passes "
                                 "batch moments (training) or its own moving averages (inference)")
        if mode != "training":
            raise NotExpressible("tf.nn.batch_normalization requires variance_epsilon (no default), and "
                                 "inference normalizes with the caller's own moving averages")
        x = tf.constant(x, dtype=self.dtype)
        mean, variance = tf.nn.moments(x, axes=list(range(x.shape.rank - 1)))
        y = tf.nn.batch_normalization(x, mean, variance, offset=None, scale=None, variance_epsilon=0.0)
        return Observed(to_numpy(y), y.dtype.name, to_numpy(self.moving_mean),
                        to_numpy(self.moving_variance), self.moving_variance.dtype.name)

    def train_step(self, x: np.ndarray) -> Observed:
        raise NotExpressible("the TF docs prescribe no moving-average update for tf.nn.moments + "
                             "tf.nn.batch_normalization ('running averages thereof'): the update, its "
                             "decay and the variables are the caller's, with no default")


def make(adapter_id: str) -> Adapter:
    return TfNn()
