"""Flax BatchNorm on several JAX devices with `axis_name`, the two ways the Flax docs show:
`flax-linen-pmap` runs `linen.BatchNorm` under `jax.pmap`, `flax-nnx-shard` runs `nnx.BatchNorm`
under `jax.shard_map` over a one-axis `Mesh`.

- Replicas: `count` of JAX's devices for the platform `--device` picked. On the CPU these are host
  devices (`XLA_FLAGS=--xla_force_host_platform_device_count=4`, set by the registry before JAX
  starts). Replica r gets shard r of the batch; both engines map over equal shards only, so
  uneven shards are not expressible: pmap maps over a leading axis of size count (a batch of 7
  rows cannot be stacked as 3 slices), and shard_map refuses a dimension the mesh axis does not
  divide (its own message, captured, is the reason).
- synchronized -> `axis_name="batch"` (the layer `pmean`s its statistics over the replicas:
  flax/linen/normalization.py `_compute_stats`, L118-135; nnx reuses it); unsynchronized ->
  `axis_name=None`, each replica its shard's statistics.
- Moving statistics read back, each engine the way its examples do:
  - linen-pmap: `flax.jax_utils.unreplicate(batch_stats)`, as a pmap loop saves its checkpoint
    (flax/jax_utils.py L57: "a single instance of a replicated array", replica 0's).
  - nnx-shard: the layer's state returned from `shard_map` with `out_specs=P()` (one copy). JAX
    refuses per-replica statistics there ("out_specs ... requires replication which can't be
    statically inferred"), so unsynchronized training `jax.lax.pmean`s the BatchStats first, as
    the Flax ImageNet example's `sync_batch_stats` does: the mean over replicas.
- Train-then-infer: the statistics read back, on one device, `use_running_average=True` /
  `eval()` on the whole last batch. The inference check runs on the replicas, each on its shard.
- momentum m -> `momentum=m` (same decay form); epsilon, center/scale (`use_bias`/`use_scale`),
  axis and dtypes as in adapters/flax_linen.py and adapters/flax_nnx.py (statistics placed in
  float32, float64 for float64 cases; `use_fast_variance` left True).
"""

from __future__ import annotations

# x64, the compile cache and the platform, before other JAX imports
from adapters.jax_setup import compiling_for, device_name, on_device, to_numpy

# isort: split
import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.jax_utils import replicate, unreplicate
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

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

AXIS = "batch"


@functools.cache
def shard_map_refusal(rows: int, count: int) -> str:
    """shard_map's own message for `rows` rows split over `count` devices (its first sentence and
    the line that names the sizes)."""
    mesh = Mesh(np.array(jax.devices()[:count]), (AXIS,))
    try:
        jax.shard_map(lambda a: a, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS))(jnp.zeros((rows, 1)))
    except ValueError as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        return " ".join([lines[0], *(line for line in lines if "does not evenly divide" in line)])
    return "(shard_map accepted it)"


class FlaxReplicas(Adapter):
    family = "jax"
    conventions = Conventions(notes=("variance as E[x^2] - E[x]^2 clamped at 0 (use_fast_variance=True); "
                                     "synchronized: both moments pmean'd over the replicas",))
    capabilities = Capabilities(
        checks=frozenset({"training", "inference"}),
        min_rank=2,
        features=frozenset({"replicas"}),
        why={"multi-axis": "this adapter passes one feature axis",
             "momentum-null": "Flax's BatchNorm.momentum is a fixed decay rate",
             **REPLICA_WHY},
    )

    def __init__(self, adapter_id: str):
        self.id = adapter_id
        self.pmap = adapter_id == "flax-linen-pmap"

    def versions(self) -> dict[str, str]:
        return {"jax": jax.__version__, "flax": flax.__version__}

    def device(self) -> str:
        return device_name()

    def not_expressible(self, problem: Problem, check: Check) -> str | None:
        r = problem.replicas
        if r is None:
            return ("a replica adapter runs only cases with params.replicas; "
                    f"{'flax-linen' if self.pmap else 'flax-nnx'} runs the rest on one device")
        if r.count > jax.device_count():
            return f"{r.count} replicas: JAX sees {jax.device_count()} {self.device()} device(s)"
        uneven = [x.shape[0] for x in problem.batches if x.shape[0] % r.count]
        if uneven and self.pmap:
            return (f"{uneven[0]} rows on {r.count} replicas: jax.pmap maps over a leading axis, one "
                    "equal slice per device")
        if uneven:
            return f"{uneven[0]} rows on {r.count} replicas: {shard_map_refusal(uneven[0], r.count)}"
        return None

    def translations(self, problem: Problem) -> list[str]:
        r = problem.replicas
        assert r is not None
        engine = (f"jax.pmap(axis_name={AXIS!r}) over {r.count} devices, input reshaped to "
                  f"({r.count}, N/{r.count}, ...)" if self.pmap else
                  f"jax.shard_map over Mesh({r.count} devices, ({AXIS!r},)), in_specs P({AXIS!r})")
        read = ("flax.jax_utils.unreplicate(batch_stats)" if self.pmap else
                "the state out of shard_map with out_specs=P()" + ("" if r.synchronized else
                                                                   ", after jax.lax.pmean"))
        return [f"replicas {r.count} -> {engine}",
                f"synchronized {r.synchronized} -> axis_name={AXIS if r.synchronized else None!r}",
                f"momentum {problem.momentum:g} -> momentum={problem.momentum:g}",
                f"epsilon {problem.epsilon:g} -> epsilon={problem.epsilon:g}",
                f"axis {problem.axes[0]} -> axis={problem.axes[0]}",
                f"moving statistics read back: {read}"]

    # -- shared

    @staticmethod
    def dtypes(problem: Problem) -> tuple[jnp.dtype, jnp.dtype]:
        """(compute and parameter dtype, statistics dtype) as adapters/flax_linen.py explains."""
        return jnp.dtype(problem.dtype), jnp.dtype("float64" if problem.dtype == "float64" else "float32")

    def devices(self, problem: Problem) -> list[jax.Device]:
        assert problem.replicas is not None
        # every check comes here first: keep JAX's in-memory caches bounded, as the other Flax adapters do
        compiling_for((self.id, problem.axes, problem.momentum, problem.epsilon, problem.center,
                       problem.scale, problem.dtype, problem.replicas, problem.batches[0].shape))
        return jax.devices()[:problem.replicas.count]

    def train(self, problem: Problem) -> TrainingRun:
        if problem.replicas is None:  # the probes call train/infer directly
            raise NotExpressible(self.not_expressible(problem, "training"))
        return self.train_linen(problem) if self.pmap else self.train_nnx(problem)

    def infer(self, problem: Problem) -> np.ndarray:
        if problem.replicas is None:
            raise NotExpressible(self.not_expressible(problem, "inference"))
        return self.infer_linen(problem) if self.pmap else self.infer_nnx(problem)

    def gradients(self, problem: Problem) -> Gradients:
        raise NotExpressible(self.why_not_expressible(problem, "gradients"))

    # -- linen under pmap

    def linen(self, problem: Problem) -> tuple[nn.BatchNorm, dict]:
        assert problem.replicas is not None
        dtype, stats = self.dtypes(problem)
        bn = nn.BatchNorm(axis=problem.axes[0], momentum=problem.momentum, epsilon=problem.epsilon,
                          use_bias=problem.center, use_scale=problem.scale, dtype=dtype, param_dtype=dtype,
                          axis_name=AXIS if problem.replicas.synchronized else None)
        params = {}
        if problem.scale:
            params["scale"] = on_device(problem.gamma, dtype)
        if problem.center:
            params["bias"] = on_device(problem.beta, dtype)
        variables = {"params": params, "batch_stats": {"mean": on_device(problem.moving_mean, stats),
                                                       "var": on_device(problem.moving_variance, stats)}}
        return bn, variables

    def sharded(self, problem: Problem, x: np.ndarray) -> jax.Array:
        """(count, N / count, ...): replica r's rows at index r, as pmap maps them."""
        assert problem.replicas is not None
        count = problem.replicas.count  # rows per replica spelt out: -1 is ambiguous for an empty input
        return on_device(x.reshape(count, x.shape[0] // count, *x.shape[1:]), problem.dtype)

    def train_linen(self, problem: Problem) -> TrainingRun:
        bn, variables = self.linen(problem)
        devices = self.devices(problem)

        def step(v: dict, x: jax.Array) -> tuple[jax.Array, dict]:
            y, updates = bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
            return y, updates["batch_stats"]

        run_step = jax.pmap(step, axis_name=AXIS, devices=devices)
        replicated = replicate(variables, devices)
        for x in problem.batches:
            y, stats = run_step(replicated, self.sharded(problem, x))
            replicated = {**replicated, "batch_stats": stats}
        read = unreplicate(replicated["batch_stats"])
        run = TrainingRun(output=to_numpy(y).reshape(problem.batches[-1].shape),
                          moving_mean=to_numpy(read["mean"]), moving_variance=to_numpy(read["var"]))
        if problem.infer_after_training:
            trained = {**variables, "batch_stats": read}
            run.inference_output = to_numpy(bn.apply(trained, on_device(problem.batches[-1], problem.dtype),
                                                     use_running_average=True))
        return run

    def infer_linen(self, problem: Problem) -> np.ndarray:
        bn, variables = self.linen(problem)
        devices = self.devices(problem)
        y = jax.pmap(lambda v, x: bn.apply(v, x, use_running_average=True), axis_name=AXIS, devices=devices)(
            replicate(variables, devices), self.sharded(problem, problem.batches[-1]))
        return to_numpy(y).reshape(problem.batches[-1].shape)

    # -- nnx under shard_map

    def nnx_layer(self, problem: Problem) -> nnx.BatchNorm:
        assert problem.replicas is not None
        dtype, stats = self.dtypes(problem)
        bn = nnx.BatchNorm(num_features=int(problem.gamma.size), axis=problem.axes[0],
                           momentum=problem.momentum, epsilon=problem.epsilon, dtype=dtype, param_dtype=dtype,
                           use_bias=problem.center, use_scale=problem.scale,
                           axis_name=AXIS if problem.replicas.synchronized else None, rngs=nnx.Rngs(0))
        if problem.scale:
            bn.scale.set_value(on_device(problem.gamma, dtype))
        if problem.center:
            bn.bias.set_value(on_device(problem.beta, dtype))
        bn.mean.set_value(on_device(problem.moving_mean, stats))
        bn.var.set_value(on_device(problem.moving_variance, stats))
        return bn

    def on_mesh(self, problem: Problem, bn: nnx.BatchNorm, pmean_stats: bool):
        """The layer's call under shard_map: the batch split on axis 0, the state one copy."""
        graphdef, _ = nnx.split(bn)
        mesh = Mesh(np.array(self.devices(problem)), (AXIS,))

        def call(state: nnx.State, x: jax.Array) -> tuple[jax.Array, nnx.State]:
            layer = nnx.merge(graphdef, state)
            y = layer(x)
            new = nnx.state(layer)
            if pmean_stats:
                new = jax.tree.map(lambda v: jax.lax.pmean(v, AXIS), new)
            return y, new

        return jax.jit(jax.shard_map(call, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(AXIS), P())))

    def train_nnx(self, problem: Problem) -> TrainingRun:
        assert problem.replicas is not None
        bn = self.nnx_layer(problem)
        bn.train()
        step = self.on_mesh(problem, bn, pmean_stats=not problem.replicas.synchronized)
        for x in problem.batches:
            y, state = step(nnx.state(bn), on_device(x, problem.dtype))
            nnx.update(bn, state)
        run = TrainingRun(output=to_numpy(y), moving_mean=to_numpy(bn.mean[...]),
                          moving_variance=to_numpy(bn.var[...]))
        if problem.infer_after_training:
            bn.eval()
            run.inference_output = to_numpy(bn(on_device(problem.batches[-1], problem.dtype)))
        return run

    def infer_nnx(self, problem: Problem) -> np.ndarray:
        bn = self.nnx_layer(problem)
        bn.eval()
        y, _ = self.on_mesh(problem, bn, pmean_stats=False)(nnx.state(bn), on_device(problem.batches[-1],
                                                                                     problem.dtype))
        return to_numpy(y)


def make(adapter_id: str) -> Adapter:
    return FlaxReplicas(adapter_id)
