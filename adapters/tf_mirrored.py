"""`BatchNormalization(synchronized=...)` under `tf.distribute.MirroredStrategy`, the way the TF
distributed-training guide runs a layer on several replicas: built in `strategy.scope()`, called
through `strategy.run` on per-replica values. `keras-mirrored` drives Keras 3 (TensorFlow backend),
`tf-keras-mirrored` Keras 2 (`tf_keras`).

- Replicas: `count` logical CPU devices, configured before TensorFlow initializes (so each adapter
  has a process of its own). Replica r gets shard r of the batch (consecutive rows, the first
  N mod count shards one row larger), via `experimental_distribute_values_from_function`.
  Cross-device reduction is `ReductionToOneDevice`: MirroredStrategy's default collective
  all-reduce cannot host strategies of different sizes in one process (a second strategy's
  group 1 "has size 2" and the run aborts), while the sums the layer all-reduces are the same.
- synchronized -> `synchronized=` (both: mean and variance from all-reduced sums of x, x² and the
  count, E[x²] - E[x]² clamped at 0: keras/src/backend/tensorflow/nn.py `_compute_moments_sync`,
  tf_keras/src/layers/normalization/batch_normalization.py L1179-1208).
- Moving statistics are read back as a user reads them after training: the layer's variable
  (`np.asarray(layer.moving_mean)`) in cross-replica context. Keras 3 creates them as
  MirroredVariables with aggregation NONE, so each replica's update writes its own copy and the
  read gives replica 0's (measured); tf_keras creates them ON_READ with aggregation MEAN
  (batch_normalization.py L463-482), so the read is the mean over replicas.
- Train-then-infer: the trained layer called on the whole last batch outside `strategy.run`
  (cross-replica context), with `training=False`: the statistics just described.
- Inference check: `strategy.run` with `training=False`, each replica on its shard.
- momentum m -> `momentum=m` (same decay form); epsilon -> `epsilon=`; center/scale as such;
  axis -> `axis=` (an int); dtype -> `dtype=`; gamma/beta/moving statistics assigned to the built
  layer's variables in cross-replica context (every replica's copy).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import numpy as np
import tensorflow as tf

from adapters.base import (
    REPLICA_WHY,
    Adapter,
    Capabilities,
    Check,
    Conventions,
    Gradients,
    NotExpressible,
    Problem,
    TrainingRun,
)

MAX_REPLICAS = 4
# before TensorFlow initializes its runtime: a second call would raise "Virtual devices cannot be
# modified after being initialized"
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * MAX_REPLICAS)
DEVICES = [d.name for d in tf.config.list_logical_devices("CPU")]


@functools.cache
def strategy(count: int) -> tf.distribute.MirroredStrategy:
    return tf.distribute.MirroredStrategy(DEVICES[:count],
                                          cross_device_ops=tf.distribute.ReductionToOneDevice())


FUSED = Conventions(
    variants=("moving-variance-unbiased",),
    notes=("unsynchronized tf_keras with fused=None takes the fused kernel for this input (4-D/5-D, channel "
           "axis first or last, not float64): each replica's moving variance takes its shard's unbiased "
           "variance",))


class TFMirrored(Adapter):
    family = "tf"
    conventions = Conventions(notes=(
        "synchronized statistics: E[x^2] - E[x]^2 from all-reduced sums, clamped at 0",))
    capabilities = Capabilities(
        checks=frozenset({"training", "inference"}),
        min_rank=2,
        features=frozenset({"replicas"}),
        why={"multi-axis": "this adapter passes one int axis",
             "momentum-null": "BatchNormalization.momentum is a fixed decay rate",
             **REPLICA_WHY},
    )

    def __init__(self, adapter_id: str):
        self.id = adapter_id
        self.legacy = adapter_id == "tf-keras-mirrored"
        self.keras: Any = importlib.import_module("tf_keras" if self.legacy else "keras")
        self.family = "tf" if self.legacy else "keras"

    def conventions_for(self, problem: Problem) -> Conventions:
        """tf_keras unsynchronized keeps fused=None, which takes the fused kernel on 4-D/5-D input with
        the channel axis first or last, not float64 (each replica's moving variance then updated
        with its shard's unbiased variance); synchronized=True forces fused=False
        (tf_keras/src/layers/normalization/batch_normalization.py L205-211). Keras 3 has no fused
        kernel."""
        r = problem.replicas
        fused_axes = {4: (1, 3), 5: (1, 4)}.get(problem.rank, ())
        if (self.legacy and r is not None and not r.synchronized and problem.dtype != "float64"
                and len(problem.axes) == 1 and problem.axes[0] % problem.rank in fused_axes):
            return FUSED
        return self.conventions

    def versions(self) -> dict[str, str]:
        name = "tf_keras" if self.legacy else "keras"
        return {"tensorflow": tf.__version__, name: self.keras.__version__}

    def not_expressible(self, problem: Problem, check: Check) -> str | None:
        if problem.replicas is None:
            other = "tf-keras" if self.legacy else "keras"
            return (f"a replica adapter runs only cases with params.replicas; {other} runs the rest on "
                    "one device")
        if problem.replicas.count > MAX_REPLICAS:
            return f"{problem.replicas.count} replicas: this process has {MAX_REPLICAS} logical CPU devices"
        return None

    def translations(self, problem: Problem) -> list[str]:
        r = problem.replicas
        assert r is not None
        layer = "tf_keras.layers" if self.legacy else "keras.layers"
        return [f"replicas {r.count} -> MirroredStrategy over {r.count} logical CPU devices "
                "(ReductionToOneDevice); shard r fed to replica r",
                f"synchronized {r.synchronized} -> {layer}.BatchNormalization(synchronized={r.synchronized})",
                f"momentum {problem.momentum:g} -> momentum={problem.momentum:g}",
                f"epsilon {problem.epsilon:g} -> epsilon={problem.epsilon:g}",
                f"axis {problem.axes[0]} -> axis={problem.axes[0]}",
                "moving statistics read back: np.asarray(layer.moving_mean / moving_variance)"]

    def layer(self, problem: Problem) -> Any:
        if problem.replicas is None:  # the probes call train/infer directly
            raise NotExpressible(self.not_expressible(problem, "training"))
        assert problem.momentum is not None
        with strategy(problem.replicas.count).scope():
            bn = self.keras.layers.BatchNormalization(
                axis=problem.axes[0], momentum=problem.momentum, epsilon=problem.epsilon,
                center=problem.center, scale=problem.scale, synchronized=problem.replicas.synchronized,
                dtype=problem.dtype)
            bn.build((None, *problem.batches[0].shape[1:]))
            order = problem.to_ascending
            if problem.scale:
                bn.gamma.assign(order(problem.gamma))
            if problem.center:
                bn.beta.assign(order(problem.beta))
            bn.moving_mean.assign(order(problem.moving_mean))
            bn.moving_variance.assign(order(problem.moving_variance))
        return bn

    def calls(self, bn: Any, problem: Problem, training: bool) -> Any:
        """The layer called on every replica, each on its shard, the outputs concatenated: one
        tf.function per layer and mode, so the steps of a case reuse its trace."""
        assert problem.replicas is not None
        s = strategy(problem.replicas.count)

        @tf.function
        def step(v: Any) -> Any:
            return s.run(lambda a: bn(a, training=training), args=(v,))

        def call(x: np.ndarray) -> np.ndarray:
            shards = problem.replicas.shards(x)
            values = s.experimental_distribute_values_from_function(
                lambda ctx: tf.constant(shards[ctx.replica_id_in_sync_group], dtype=problem.dtype))
            outputs = s.experimental_local_results(step(values))
            return np.concatenate([np.asarray(y, np.float64) for y in outputs])

        return call

    def train(self, problem: Problem) -> TrainingRun:
        bn = self.layer(problem)
        call = self.calls(bn, problem, training=True)
        for x in problem.batches:
            y = call(x)

        def read(variable: Any) -> np.ndarray:
            return problem.to_case_order(np.asarray(variable, np.float64))

        run = TrainingRun(output=y, moving_mean=read(bn.moving_mean),
                          moving_variance=read(bn.moving_variance))
        if problem.infer_after_training:
            x = tf.constant(problem.batches[-1], dtype=problem.dtype)
            run.inference_output = np.asarray(bn(x, training=False), np.float64)
        return run

    def infer(self, problem: Problem) -> np.ndarray:
        return self.calls(self.layer(problem), problem, training=False)(problem.batches[-1])

    def gradients(self, problem: Problem) -> Gradients:
        raise NotExpressible(self.why_not_expressible(problem, "gradients"))


def make(adapter_id: str) -> Adapter:
    return TFMirrored(adapter_id)
