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

from adapters.base import requested_device

jax.config.update("jax_platforms", requested_device())
jax.config.update("jax_enable_x64", True)
if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir",
                      str(Path(__file__).resolve().parent.parent / "results" / ".jax-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
