"""`tf.compat.v1.nn.fused_batch_norm`: one fused op that normalizes and updates the moving averages.

- Momentum: training passes `exponential_avg_factor = 1 - m` and the op returns
  `running = (1 - factor) * running + factor * batch`, so the canonical decay-form m becomes
  `1 - m`; m = null (cumulative average) is factor `1/t` at step t. With factor 1.0 the op returns
  the batch statistics themselves (the API docs: "If set to 1.0, the current batch average is
  returned"), so only then does this adapter report `batch_mean` / `batch_variance`.
- Variance estimator, measured: the variance the op returns (and folds into the running variance)
  carries Bessel's correction n/(n-1); the output is normalized with the biased one. The CPU kernel
  computes `batch_var = variance * rest_size_adjust` (tensorflow/core/kernels/fused_batch_norm_op.cc).
- Layout: no axis argument, a `data_format` instead: 4-D "NHWC" (channel axis 3/-1) or "NCHW"
  (1/-3), 5-D "NDHWC" (4/-1) or "NCDHW" (1/-4). Any other rank or axis is not expressible.
- epsilon: `epsilon=`. center/scale off: the op needs `offset` and `scale`, so they are passed as
  constant zeros / ones (nothing to train).
- Dtypes: x may be float16, bfloat16 or float32 (the op's `T`); scale, offset and the running
  statistics are always float32 (its `U`). float64 has no kernel, so it is not expressible.
- `train`/`infer`/`gradients` raise NotExpressible for what `not_expressible` rejects, so the
  semantic probes that call them directly (batch of one on [1, 3], say) report "does not apply"
  instead of the error of a call with no data_format.
- Default layer (semantic probes): see `DefaultFused`. What a default means for a function: the
  arguments it requires (x, scale, offset) and nothing else, so `is_training=True`, `epsilon=0.001`,
  `data_format="NHWC"` and `exponential_avg_factor=1.0`. With that factor the op returns the batch
  mean and (Bessel-corrected) variance as its "running" outputs, so a caller who keeps those outputs
  as the state has a decay-form momentum of 0: the op's own default averages nothing.
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
    no_such_argument,
)

DATA_FORMATS = {(4, 3): "NHWC", (4, 1): "NCHW", (5, 4): "NDHWC", (5, 1): "NCDHW"}


def to_numpy(t: tf.Tensor) -> np.ndarray:
    return tf.cast(t, tf.float64).numpy()


def data_format(problem: Problem) -> str | None:
    """The data_format that puts the case's channel axis where the op expects it, if any."""
    if len(problem.axes) != 1 or problem.rank not in (4, 5):
        return None
    axis = problem.axes[0]
    if not -problem.rank <= axis < problem.rank:
        return None
    return DATA_FORMATS.get((problem.rank, axis % problem.rank))


class TfNnFused(Adapter):
    id = "tf-nn-fused"
    names: ClassVar[dict[str, str]] = {
        "momentum": "exponential_avg_factor (= 1 - m)", "epsilon": "epsilon",
        "axis": "data_format (NHWC / NCHW)", "center": "offset (zeros)", "scale": "scale (ones)",
        "gamma": "scale", "beta": "offset", "moving_mean": "mean", "moving_variance": "variance",
        "mode": "is_training="
    }
    family = "tf"
    conventions = Conventions(
        variants=("moving-variance-unbiased", "batch-variance-unbiased"),
        notes=("the fused op returns, and averages in, the Bessel-corrected batch variance; "
               "the output uses the biased one",
               "batch statistics are returned only when exponential_avg_factor is 1.0"),
    )

    def versions(self) -> dict[str, str]:
        return {"tensorflow": tf.__version__}

    capabilities = Capabilities(
        dtypes=frozenset({"float16", "bfloat16", "float32"}), min_rank=4, max_rank=5,
        features=frozenset({"momentum-null", "param-dtype"}),
        why={**no_such_argument("fused_batch_norm"),
             "float64": "FusedBatchNormV3 has kernels for float16, bfloat16 and float32 input only",
             "rank": "fused_batch_norm takes NHWC/NCHW/NDHWC/NCDHW input",
             "multi-axis": "fused_batch_norm takes one channel axis, first or last (data_format)"},
    )

    def not_expressible(self, problem: Problem, check: Check) -> str | None:
        if problem.param_dtype not in (None, "float32"):
            return (f"{problem.param_dtype} parameters: FusedBatchNormV3 takes scale, offset, mean and "
                    "variance in float32 (its type U) whatever the input's type T")
        if data_format(problem) is None:
            return (f"fused_batch_norm takes 4-D/5-D input with the channel axis first or last "
                    f"(NHWC/NCHW/NDHWC/NCDHW); not axis {list(problem.axes)} on {problem.rank}-D")
        return None

    def default_layer(self, shape: tuple[int, ...], dtype: str = "float32",
                      trainable: bool = True) -> DefaultLayer:
        if not trainable:
            raise NotExpressible("fused_batch_norm is a function: it has no trainable flag")
        return DefaultFused(shape, dtype)

    def expressible(self, problem: Problem, check: Check) -> None:
        reason = self.why_not_expressible(problem, check)
        if reason:
            raise NotExpressible(reason)

    def translations(self, problem: Problem) -> list[str]:
        if problem.momentum is None:
            out = ["momentum null -> exponential_avg_factor=1/t at step t (cumulative average)"]
        else:
            out = [f"momentum {problem.momentum:g} -> exponential_avg_factor={1 - problem.momentum:g} "
                   "(1 - m)"]
        out.append(f"channel axis {problem.axes[0]} -> data_format={data_format(problem)!r}")
        out.append(f"epsilon {problem.epsilon:g} -> epsilon={problem.epsilon:g}")
        if not problem.scale:
            out.append("scale off -> scale=ones (a constant)")
        if not problem.center:
            out.append("center off -> offset=zeros (a constant)")
        if problem.param_dtype == "float32":
            out.append(f"param_dtype float32 -> x in {problem.dtype}; scale, offset and running statistics "
                       "in float32 (the op's type U)")
        elif problem.dtype in ("float16", "bfloat16"):
            out.append(f"x in {problem.dtype}; scale, offset and running statistics in float32 (the op's "
                       f"type U), not {problem.dtype}: finer than the case states")
        return out

    def params(self, problem: Problem) -> dict:
        f32 = tf.float32
        return {
            "scale": tf.Variable(problem.gamma, dtype=f32) if problem.scale else tf.ones_like(
                problem.gamma, dtype=f32),
            "offset": tf.Variable(problem.beta, dtype=f32) if problem.center else tf.zeros_like(
                problem.beta, dtype=f32),
            "mean": tf.constant(problem.moving_mean, dtype=f32),
            "variance": tf.constant(problem.moving_variance, dtype=f32),
        }

    def tensor(self, x: np.ndarray, problem: Problem) -> tf.Tensor:
        return tf.cast(tf.constant(x), tf.as_dtype(problem.dtype))

    def fused(self, x: tf.Tensor, p: dict, problem: Problem, training: bool,
              factor: float = 1.0) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        return tf.compat.v1.nn.fused_batch_norm(
            x, p["scale"], p["offset"], mean=p["mean"], variance=p["variance"],
            epsilon=problem.epsilon, data_format=data_format(problem), is_training=training,
            exponential_avg_factor=factor)

    def train(self, problem: Problem) -> TrainingRun:
        self.expressible(problem, "training")
        p = self.params(problem)
        for step, batch in enumerate(problem.batches, start=1):
            factor = 1.0 / step if problem.momentum is None else 1.0 - problem.momentum
            y, p["mean"], p["variance"] = self.fused(self.tensor(batch, problem), p, problem, True, factor)
        run = TrainingRun(output=to_numpy(y), moving_mean=to_numpy(p["mean"]),
                          moving_variance=to_numpy(p["variance"]))
        if factor == 1.0:  # the op returned the batch statistics themselves
            run.batch_mean, run.batch_variance = run.moving_mean, run.moving_variance
        if problem.infer_after_training:
            run.inference_output = self.infer_with(p, problem)
        return run

    def infer_with(self, p: dict, problem: Problem) -> np.ndarray:
        y, _, _ = self.fused(self.tensor(problem.batches[-1], problem), p, problem, False)
        return to_numpy(y)

    def infer(self, problem: Problem) -> np.ndarray:
        self.expressible(problem, "inference")
        return self.infer_with(self.params(problem), problem)

    def gradients(self, problem: Problem) -> Gradients:
        self.expressible(problem, "gradients")
        p = self.params(problem)
        x = self.tensor(problem.batches[-1], problem)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y, _, _ = self.fused(x, p, problem, True)
        dx, dscale, doffset = tape.gradient(y, [x, p["scale"], p["offset"]],
                                            output_gradients=self.tensor(problem.upstream, problem))
        return Gradients(
            input=to_numpy(dx),
            gamma=to_numpy(dscale) if problem.scale else None,
            beta=to_numpy(doffset) if problem.center else None,
        )


class DefaultFused(DefaultLayer):
    """`fused_batch_norm(x, scale, offset)` with only its required arguments: scale ones and offset
    zeros (float32, the op's `U`) for the last axis, the default data_format "NHWC". The caller keeps
    the state, fresh mean 0 / variance 1: a training call (no argument, or `is_training=True`, with
    the default `exponential_avg_factor=1.0`, which requires mean and variance to be None) replaces
    it with the op's running outputs, i.e. the batch statistics; an inference call
    (`is_training=False`, which requires mean and variance) reads it."""

    def __init__(self, shape: tuple[int, ...], dtype: str):
        channels = shape[-1]  # data_format="NHWC"
        self.dtype = tf.as_dtype(dtype)
        self.scale, self.offset = tf.ones(channels, tf.float32), tf.zeros(channels, tf.float32)
        self.mean, self.variance = tf.zeros(channels, tf.float32), tf.ones(channels, tf.float32)

    def call(self, x: np.ndarray, mode: Check | None) -> Observed:
        x = tf.constant(x, dtype=self.dtype)
        if mode == "inference":
            y, _, _ = tf.compat.v1.nn.fused_batch_norm(x, self.scale, self.offset, mean=self.mean,
                                                       variance=self.variance, is_training=False)
        else:
            kwargs = {} if mode is None else {"is_training": True}
            y, self.mean, self.variance = tf.compat.v1.nn.fused_batch_norm(x, self.scale, self.offset,
                                                                           **kwargs)
        return Observed(to_numpy(y), y.dtype.name, to_numpy(self.mean), to_numpy(self.variance),
                        self.variance.dtype.name)


def make(adapter_id: str) -> Adapter:
    return TfNnFused()
