"""Process-wide JAX settings shared by every adapter that runs on JAX (Flax linen and nnx, Keras 3
on the jax backend). Import it before anything else from JAX is used.

- float64 cases need x64 mode. Every array the adapters make has an explicit dtype, so float32 and
  lower cases run exactly as they would without it.
- XLA compiles each layer configuration and shape (about 0.2 s each, most of a JAX family's run
  time). Unless JAX_COMPILATION_CACHE_DIR names a cache, JAX's persistent compilation cache goes
  to results/.jax-cache and keeps every compilation (JAX's default keeps only those over 1 s, none
  of ours). A later run loads the same executables; the cache key is the program and its compile
  options, so results do not change.
- `--device` (adapters.base.requested_device) picks JAX's platform before any backend starts:
  `cpu` (the default, also on a GPU host) or `cuda`.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from adapters.base import PROCESS_COSTS, requested_device

jax.config.update("jax_platforms", requested_device())
jax.config.update("jax_enable_x64", True)
if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir",
                      str(Path(__file__).resolve().parent.parent / "results" / ".jax-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


# JAX's own monitoring events (jax/_src/dispatch.py, compiler.py), summed for the results file:
# the XLA backend's time (compiling, or loading from the persistent cache), and how often each.
COSTS = {"/jax/core/compile/backend_compile_duration": "xla_backend_s",
         "/jax/core/compile/jaxpr_trace_duration": "jax_trace_s",
         "/jax/core/compile/jaxpr_to_mlir_module_duration": "jax_lower_s",
         "/jax/compilation_cache/cache_retrieval_time_sec": "xla_cache_load_s"}
COUNTS = {"/jax/core/compile/backend_compile_duration": "xla_programs",
          "/jax/compilation_cache/cache_hits": "xla_cache_hits"}


def _add_duration(event: str, seconds: float, **_: object) -> None:
    if event in COSTS:
        PROCESS_COSTS[COSTS[event]] = PROCESS_COSTS.get(COSTS[event], 0.0) + seconds
    _add_event(event)


def _add_event(event: str, **_: object) -> None:
    if event in COUNTS:
        PROCESS_COSTS[COUNTS[event]] = PROCESS_COSTS.get(COUNTS[event], 0) + 1


jax.monitoring.register_event_duration_secs_listener(_add_duration)
jax.monitoring.register_event_listener(_add_event)


def device_name() -> str:
    """Where JAX computes, named as `--device` names it: JAX calls its CUDA platform "gpu"."""
    platform = jax.devices()[0].platform
    return "cuda" if platform == "gpu" else platform


def on_device(x: np.ndarray, dtype: str) -> jax.Array:
    """A Problem array as a JAX array of `dtype`. The cast happens in NumPy (the values are already
    representable in `dtype`, so it is exact): `jnp.asarray(x, dtype)` would run a convert on the
    device, compiled anew for every shape."""
    return jax.device_put(np.asarray(x).astype(jnp.dtype(dtype)))


def to_numpy(a: jax.Array) -> np.ndarray:
    """A JAX result as float64 NumPy, converted on the host (exact widening, no device compile)."""
    return np.asarray(a).astype(np.float64)


CONFIGURATIONS_KEPT = 64
_seen: set = set()


def compiling_for(configuration: tuple, kept: int = CONFIGURATIONS_KEPT) -> None:
    """Note a layer configuration about to run. JAX keeps every executable it compiled (per
    function, configuration and shape) for the life of the process; over a thousand generated
    cases that is gigabytes. Past `kept` distinct configurations the in-memory caches are dropped
    (`jax.clear_caches`); the persistent cache on disk still has every executable, so a
    configuration seen again is loaded, not recompiled. What a configuration holds differs:
    measured on CPU over generated cases, Flax's jitted steps are 2 to 3 executables of about
    2.7 MB, Keras's eager operations about 21 of 1.4 MB (30 MB), so Keras keeps fewer."""
    if configuration in _seen:
        return
    if len(_seen) >= kept:
        jax.clear_caches()
        _seen.clear()
    _seen.add(configuration)
