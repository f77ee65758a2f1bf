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
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from adapters.base import Adapter, Check, Conventions, Gradients, Problem, TrainingRun


def to_numpy(t: tf.Tensor) -> np.ndarray:
    return tf.cast(t, tf.float64).numpy()


class TfNn(Adapter):
    id = "tf-nn"
    family = "tf"
    conventions = Conventions(
        moving_variance_estimator="biased",
        batch_variance_estimator="biased",
        notes=["tf.nn.moments returns the biased variance; the moving update is the caller's"],
    )

    def versions(self) -> dict[str, str]:
        return {"tensorflow": tf.__version__}

    def not_expressible(self, problem: Problem, check: Check) -> str | None:
        return None  # broadcasting states every channel layout

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
        order = np.argsort([a % len(shape) for a in problem.axes])
        return np.transpose(values, order).reshape(shape)

    def unbroadcast(self, t: tf.Tensor, problem: Problem, channels: list[int]) -> np.ndarray:
        order = np.argsort([a % t.shape.rank for a in problem.axes])
        values = to_numpy(t).reshape([t.shape[d] for d in channels])
        return np.transpose(values, np.argsort(order))

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


def make(adapter_id: str) -> Adapter:
    return TfNn()
