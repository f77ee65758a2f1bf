"""Batch Normalization called straight through each framework's API, as a user script would.

The baseline of benchmarks/overhead.py: one plain function per adapter id, taking a Problem (only
its arrays and parameters are read) and a check ("training" runs every step, then inference on the
last batch when the case asks for it; "inference" runs the layer on its given state), returning
NumPy arrays. No YAML, no validation, no comparison. Each function does the framework work its
adapter's docstring describes (the same layer, the same API calls, the same state placement), and
keeps what a sensible user keeps: a TF1 graph and session per input signature (per run: `reset()`
starts a new run), jitted JAX functions and ONNX Runtime sessions per configuration (per process).
Frameworks are imported inside the functions, since each family runs in a process of its own.
The adapter modules are deliberately not imported.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from adapters.base import Problem

Out = np.ndarray | tuple[np.ndarray, ...]
_TF1_GRAPHS: dict[tuple, Any] = {}  # one graph + session per signature, for one run


def reset() -> None:
    """A new run (a new user script): TF1 sessions are closed and graphs rebuilt on demand."""
    for graph in _TF1_GRAPHS.values():
        graph[0].close()
    _TF1_GRAPHS.clear()


def _axis(p: Problem) -> int | list[int]:
    return p.axes[0] if len(p.axes) == 1 else list(p.axes)


def _ascending(values: np.ndarray, p: Problem) -> np.ndarray:
    """Per-channel values from the case's axis order to ascending axes (several channel axes)."""
    return np.transpose(values, np.argsort([a % p.rank for a in p.axes]))


# ---------------------------------------------------------------- TensorFlow 1 (graph + session)


def tf_layers(p: Problem, check: str, slim: bool = False) -> Out:
    import tensorflow as tf

    # None on a dimension whose size changes from batch to batch, as TF1 users declare it
    shape = tuple(d[0] if len(set(d)) == 1 else None for d in zip(*{b.shape for b in p.batches}, strict=True))
    key = (slim, shape, p.dtype, p.axes, p.momentum, p.epsilon, p.center, p.scale)
    if check == "inference" and key not in _TF1_GRAPHS:  # a graph whose placeholder takes the batch
        key = next((k for k in _TF1_GRAPHS if k[0] == slim and k[2:] == key[2:] and len(k[1]) == len(shape)
                    and all(a is None or a == b for a, b in zip(k[1], shape, strict=True))), key)
    if key not in _TF1_GRAPHS:
        graph = tf.compat.v1.Graph()
        with graph.as_default():
            x = tf.compat.v1.placeholder(p.dtype, shape)
            training = tf.compat.v1.placeholder(tf.bool, ())
            if slim:  # adapters/tf_slim.py: its shim, and Slim's own cond outputting intermediates
                import tf_slim

                import adapters.tf_slim  # noqa: F401

                tf.compat.v1.experimental.output_all_intermediates(True)
                fmt = "NHWC" if p.axes[0] % p.rank == p.rank - 1 else "NCHW"
                extra = {"fused": False} if p.rank == 2 and p.dtype == "float64" else {}
                y = tf_slim.batch_norm(x, decay=p.momentum, epsilon=p.epsilon, center=p.center,
                                       scale=p.scale, is_training=training, data_format=fmt, **extra)
                tf.compat.v1.experimental.output_all_intermediates(None)
            else:
                y = tf.compat.v1.layers.batch_normalization(
                    x, axis=_axis(p), momentum=p.momentum, epsilon=p.epsilon, center=p.center,
                    scale=p.scale, training=training)
            with tf.control_dependencies(tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS)):
                train_op = tf.identity(y)
            variables = {v.op.name.split("/")[-1]: v for v in tf.compat.v1.global_variables()}
            values = {n: tf.compat.v1.placeholder(v.dtype.base_dtype, v.shape) for n, v in variables.items()}
            restore = tf.group([v.assign(values[n]) for n, v in variables.items()])
        session = tf.compat.v1.Session(graph=graph)  # no initializer: `restore` assigns every variable
        _TF1_GRAPHS[key] = (session, x, training, y, train_op, variables, values, restore)
    session, x, training, y, train_op, variables, values, restore = _TF1_GRAPHS[key]
    state = {"gamma": p.gamma, "beta": p.beta, "moving_mean": p.moving_mean,
             "moving_variance": p.moving_variance}
    session.run(restore, {values[n]: _ascending(state[n], p).reshape(v.shape) for n, v in variables.items()})
    dtype = tf.as_dtype(p.dtype).as_numpy_dtype
    if check == "inference":
        return session.run(y, {x: p.batches[-1].astype(dtype), training: False})
    for batch in p.batches:
        out = session.run(train_op, {x: batch.astype(dtype), training: True})
    stats = session.run([variables["moving_mean"], variables["moving_variance"]])
    if p.infer_after_training:
        out = session.run(y, {x: p.batches[-1].astype(dtype), training: False})
    return (out, *stats)


def tf_slim(p: Problem, check: str) -> Out:
    return tf_layers(p, check, slim=True)


# ---------------------------------------------------------------- TensorFlow 2 / Keras (eager)


def _keras_layer(layers: Any, p: Problem, **extra: Any) -> Any:
    """A BatchNormalization layer built for the input and loaded with the case's weights."""
    mixed = {("float16", "float32"): "mixed_float16", ("bfloat16", "float32"): "mixed_bfloat16"}
    bn = layers.BatchNormalization(axis=_axis(p), momentum=p.momentum, epsilon=p.epsilon, center=p.center,
                                   scale=p.scale, dtype=mixed.get((p.dtype, p.param_dtype), p.dtype), **extra)
    bn.build(p.batches[0].shape)
    weights = {"moving_mean": p.moving_mean, "moving_variance": p.moving_variance}
    if p.scale:
        weights["gamma"] = p.gamma
    if p.center:
        weights["beta"] = p.beta
    for name, values in weights.items():
        variable = getattr(bn, name)
        variable.assign(_ascending(values, p).reshape(variable.shape))
    return bn


def _run_layer(bn: Any, p: Problem, check: str, tensor: Callable[[np.ndarray], Any],
               numpy: Callable[[Any], np.ndarray]) -> Out:
    if check == "inference":
        return numpy(bn(tensor(p.batches[-1]), training=False))
    for batch in p.batches:
        y = bn(tensor(batch), training=True)
    out = (numpy(y), numpy(bn.moving_mean), numpy(bn.moving_variance))
    if p.infer_after_training:
        out = (numpy(bn(tensor(p.batches[-1]), training=False)), *out[1:])
    return out


def _tf_keras(p: Problem, check: str, fused: bool | None) -> Out:
    import tensorflow as tf
    import tf_keras

    bn = _keras_layer(tf_keras.layers, p, fused=fused)
    return _run_layer(bn, p, check, lambda x: tf.cast(tf.constant(x), p.dtype),
                      lambda t: tf.cast(t, tf.float64).numpy())


def tf_keras(p: Problem, check: str) -> Out:
    return _tf_keras(p, check, fused=None)


def tf_keras_unfused(p: Problem, check: str) -> Out:
    return _tf_keras(p, check, fused=False)


def tf_nn(p: Problem, check: str) -> Out:
    import tensorflow as tf

    rank = p.rank
    channels = {a % rank for a in p.axes}
    reduce = [d for d in range(rank) if d not in channels]
    shape = [p.batches[0].shape[d] if d in channels else 1 for d in range(rank)]

    def variable(values: np.ndarray, trainable: bool = True) -> tf.Variable:
        return tf.Variable(tf.cast(_ascending(values, p).reshape(shape), p.dtype), trainable=trainable)

    gamma = variable(p.gamma) if p.scale else None
    beta = variable(p.beta) if p.center else None
    moving_mean, moving_variance = variable(p.moving_mean, False), variable(p.moving_variance, False)
    if check == "inference":
        x = tf.cast(tf.constant(p.batches[-1]), p.dtype)
        y = tf.nn.batch_normalization(x, moving_mean, moving_variance, beta, gamma, p.epsilon)
        return tf.cast(y, tf.float64).numpy()
    for step, batch in enumerate(p.batches, start=1):
        x = tf.cast(tf.constant(batch), p.dtype)
        mean, variance = tf.nn.moments(x, axes=reduce, keepdims=True)
        y = tf.nn.batch_normalization(x, mean, variance, beta, gamma, p.epsilon)
        decay = 1.0 - 1.0 / step if p.momentum is None else p.momentum
        moving_mean.assign(moving_mean * decay + mean * (1.0 - decay))
        moving_variance.assign(moving_variance * decay + variance * (1.0 - decay))
    if p.infer_after_training:
        y = tf.nn.batch_normalization(x, moving_mean, moving_variance, beta, gamma, p.epsilon)
    return tuple(tf.cast(t, tf.float64).numpy() for t in (y, moving_mean, moving_variance, mean, variance))


def tf_nn_fused(p: Problem, check: str) -> Out:
    import tensorflow as tf

    data_format = {(4, 3): "NHWC", (4, 1): "NCHW", (5, 4): "NDHWC", (5, 1): "NCDHW"}[
        (p.rank, p.axes[0] % p.rank)]
    scale = tf.Variable(p.gamma, dtype=tf.float32) if p.scale else tf.ones_like(p.gamma, tf.float32)
    offset = tf.Variable(p.beta, dtype=tf.float32) if p.center else tf.zeros_like(p.beta, tf.float32)
    mean, variance = tf.constant(p.moving_mean, tf.float32), tf.constant(p.moving_variance, tf.float32)
    if check == "inference":
        x = tf.cast(tf.constant(p.batches[-1]), p.dtype)
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(x, scale, offset, mean, variance, p.epsilon,
                                                   data_format=data_format, is_training=False)
        return tf.cast(y, tf.float64).numpy()
    for step, batch in enumerate(p.batches, start=1):
        factor = 1.0 / step if p.momentum is None else 1.0 - p.momentum
        x = tf.cast(tf.constant(batch), p.dtype)
        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            x, scale, offset, mean, variance, p.epsilon, data_format=data_format, is_training=True,
            exponential_avg_factor=factor)
    if p.infer_after_training:
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(x, scale, offset, mean, variance, p.epsilon,
                                                   data_format=data_format, is_training=False)
    return tuple(tf.cast(t, tf.float64).numpy() for t in (y, mean, variance))


# ---------------------------------------------------------------- Keras 3 (backend fixed per process)


def keras(p: Problem, check: str) -> Out:
    import keras as k

    bn = _keras_layer(k.layers, p)
    return _run_layer(bn, p, check, lambda x: k.ops.convert_to_tensor(x, dtype=p.dtype),
                      lambda t: np.asarray(k.ops.convert_to_numpy(t)).astype(np.float64))


keras_jax = keras_torch = keras  # the same code; KERAS_BACKEND picks the backend


# ---------------------------------------------------------------- PyTorch


def torch(p: Problem, check: str, compiled: bool = False) -> Out:
    import torch as th

    dtype = getattr(th, p.dtype)
    axis = p.axes[0]
    module = {2: th.nn.BatchNorm1d, 3: th.nn.BatchNorm1d, 4: th.nn.BatchNorm2d, 5: th.nn.BatchNorm3d}[p.rank]
    bn = module(p.gamma.size, eps=p.epsilon, momentum=None if p.momentum is None else 1.0 - p.momentum,
                affine=p.center or p.scale, dtype=getattr(th, p.params_dtype))
    if compiled:
        import adapters.torch_compile  # noqa: F401  (its recompile limits)

        bn = th.compile(bn, dynamic=True)
    with th.no_grad():
        if bn.affine:
            bn.weight.copy_(th.from_numpy(p.gamma))
            bn.bias.copy_(th.from_numpy(p.beta))
            bn.weight.requires_grad_(p.scale)
            bn.bias.requires_grad_(p.center)
        bn.running_mean.copy_(th.from_numpy(p.moving_mean))
        bn.running_var.copy_(th.from_numpy(p.moving_variance))
        if check == "inference":
            bn.eval()
            y = bn(th.from_numpy(p.batches[-1]).to(dtype).movedim(axis, 1))
            return y.movedim(1, axis).double().numpy()
        bn.train()
        for batch in p.batches:
            y = bn(th.from_numpy(batch).to(dtype).movedim(axis, 1))
        if p.infer_after_training:
            bn.eval()
            y = bn(th.from_numpy(p.batches[-1]).to(dtype).movedim(axis, 1))
        return (y.movedim(1, axis).double().numpy(), bn.running_mean.double().numpy(),
                bn.running_var.double().numpy())


def torch_compile(p: Problem, check: str) -> Out:
    return torch(p, check, compiled=True)


def torch_functional(p: Problem, check: str) -> Out:
    import torch as th
    import torch.nn.functional as F

    dtype = getattr(th, p.dtype)
    axis = p.axes[0]
    held = getattr(th, p.params_dtype)
    weight = th.from_numpy(p.gamma).to(held) if p.scale else None
    bias = th.from_numpy(p.beta).to(held) if p.center else None
    running_mean = th.from_numpy(p.moving_mean).to(held)
    running_var = th.from_numpy(p.moving_variance).to(held)
    with th.no_grad():
        if check == "inference":
            y = F.batch_norm(th.from_numpy(p.batches[-1]).to(dtype).movedim(axis, 1), running_mean,
                             running_var, weight, bias, training=False, eps=p.epsilon)
            return y.movedim(1, axis).double().numpy()
        for step, batch in enumerate(p.batches, start=1):
            momentum = 1.0 / step if p.momentum is None else 1.0 - p.momentum
            y = F.batch_norm(th.from_numpy(batch).to(dtype).movedim(axis, 1), running_mean, running_var,
                             weight, bias, training=True, momentum=momentum, eps=p.epsilon)
        if p.infer_after_training:
            y = F.batch_norm(th.from_numpy(p.batches[-1]).to(dtype).movedim(axis, 1), running_mean,
                             running_var, weight, bias, training=False, eps=p.epsilon)
        return (y.movedim(1, axis).double().numpy(), running_mean.double().numpy(),
                running_var.double().numpy())


# ---------------------------------------------------------------- JAX / Flax


@functools.cache
def _jax() -> Any:
    """JAX with x64 on (float64 cases), and the jitted linen steps, made once per process."""
    import jax

    jax.config.update("jax_enable_x64", True)

    @functools.partial(jax.jit, static_argnums=0)
    def linen_train_step(bn: Any, variables: dict, x: Any) -> tuple[Any, dict]:
        y, updates = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
        return y, updates["batch_stats"]

    @functools.partial(jax.jit, static_argnums=0)
    def linen_infer(bn: Any, variables: dict, x: Any) -> Any:
        return bn.apply(variables, x, use_running_average=True)

    from flax import nnx

    @nnx.jit
    def nnx_forward(bn: Any, x: Any) -> Any:
        return bn(x)

    return linen_train_step, linen_infer, nnx_forward


def flax_linen(p: Problem, check: str) -> Out:
    import flax.linen as nn
    import jax.numpy as jnp

    train_step, infer, _ = _jax()
    dtype = getattr(jnp, p.dtype)
    stats = jnp.float64 if p.dtype == "float64" else jnp.float32
    bn = nn.BatchNorm(axis=p.axes[0] if len(p.axes) == 1 else tuple(p.axes), momentum=p.momentum,
                      epsilon=p.epsilon, use_bias=p.center, use_scale=p.scale, dtype=dtype,
                      param_dtype=getattr(jnp, p.params_dtype))
    params = {}
    if p.scale:
        params["scale"] = jnp.asarray(_ascending(p.gamma, p), p.params_dtype)
    if p.center:
        params["bias"] = jnp.asarray(_ascending(p.beta, p), p.params_dtype)
    batch_stats = {"mean": jnp.asarray(_ascending(p.moving_mean, p), stats),
                   "var": jnp.asarray(_ascending(p.moving_variance, p), stats)}
    variables = {"params": params, "batch_stats": batch_stats}
    if check == "inference":
        return np.asarray(infer(bn, variables, jnp.asarray(p.batches[-1], dtype)), np.float64)
    for batch in p.batches:
        y, batch_stats = train_step(bn, variables, jnp.asarray(batch, dtype))
        variables = {**variables, "batch_stats": batch_stats}
    if p.infer_after_training:
        y = infer(bn, variables, jnp.asarray(p.batches[-1], dtype))
    return tuple(np.asarray(a, np.float64) for a in (y, batch_stats["mean"], batch_stats["var"]))


def flax_nnx(p: Problem, check: str) -> Out:
    import jax.numpy as jnp
    from flax import nnx

    forward = _jax()[2]
    dtype = getattr(jnp, p.dtype)
    stats = jnp.float64 if p.dtype == "float64" else jnp.float32
    bn = nnx.BatchNorm(p.gamma.size, axis=p.axes[0], momentum=p.momentum, epsilon=p.epsilon, dtype=dtype,
                       param_dtype=getattr(jnp, p.params_dtype), use_bias=p.center, use_scale=p.scale,
                       rngs=nnx.Rngs(0))
    if p.scale:
        bn.scale.set_value(jnp.asarray(p.gamma, p.params_dtype))
    if p.center:
        bn.bias.set_value(jnp.asarray(p.beta, p.params_dtype))
    bn.mean.set_value(jnp.asarray(p.moving_mean, stats))
    bn.var.set_value(jnp.asarray(p.moving_variance, stats))
    if check == "inference":
        bn.eval()
        return np.asarray(forward(bn, jnp.asarray(p.batches[-1], dtype)), np.float64)
    bn.train()
    for batch in p.batches:
        y = forward(bn, jnp.asarray(batch, dtype))
    out = (y, bn.mean[...], bn.var[...])
    if p.infer_after_training:
        bn.eval()
        out = (forward(bn, jnp.asarray(p.batches[-1], dtype)), *out[1:])
    return tuple(np.asarray(a, np.float64) for a in out)


# ---------------------------------------------------------------- ONNX Runtime


@functools.lru_cache(maxsize=256)
def _onnx_session(shape: tuple[int, ...], axis: int, dtype: str, training: bool, momentum: float,
                  epsilon: float, params_dtype: str) -> Any:
    """Transpose -> BatchNormalization -> Transpose (opset 21), one session per model."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    types = {"float16": TensorProto.FLOAT16, "float32": TensorProto.FLOAT, "float64": TensorProto.DOUBLE}
    elem, held = types[dtype], types[params_dtype]  # X/Y (T); scale, B and statistics (T1, T2)
    axis %= len(shape)
    perm = [d for d in range(len(shape)) if d != axis]
    perm = [perm[0], axis, *perm[1:]]
    outputs = ["Y_nc", "running_mean", "running_var"] if training else ["Y_nc"]
    nodes = [helper.make_node("Transpose", ["X"], ["X_nc"], perm=perm),
             helper.make_node("BatchNormalization", ["X_nc", "scale", "B", "input_mean", "input_var"],
                              outputs, epsilon=epsilon, momentum=momentum, training_mode=int(training)),
             helper.make_node("Transpose", ["Y_nc"], ["Y"], perm=np.argsort(perm).tolist())]
    if perm == list(range(len(shape))):  # channel axis already at dim 1: the node alone
        nodes = [helper.make_node("BatchNormalization", ["X", "scale", "B", "input_mean", "input_var"],
                                  ["Y", *outputs[1:]], epsilon=epsilon, momentum=momentum,
                                  training_mode=int(training))]
    inputs = [helper.make_tensor_value_info("X", elem, list(shape))]
    inputs += [helper.make_tensor_value_info(n, held, ["C"])
               for n in ("scale", "B", "input_mean", "input_var")]
    outs = [helper.make_tensor_value_info(n, elem if n == "Y" else held, None) for n in ["Y", *outputs[1:]]]
    model = helper.make_model(helper.make_graph(nodes, "bn", inputs, outs),
                              opset_imports=[helper.make_opsetid("", 21)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def onnxruntime(p: Problem, check: str) -> Out:
    dtype, held = getattr(np, p.dtype), getattr(np, p.params_dtype)
    feed = {"scale": p.gamma.astype(held), "B": p.beta.astype(held),
            "input_mean": p.moving_mean.astype(held), "input_var": p.moving_variance.astype(held)}

    def run(x: np.ndarray, training: bool, momentum: float) -> list[np.ndarray]:
        session = _onnx_session(x.shape, p.axes[0], p.dtype, training, momentum, p.epsilon, p.params_dtype)
        return session.run(None, {"X": x.astype(dtype), **feed})

    if check == "inference":
        return run(p.batches[-1], False, 0.9)[0]
    for step, batch in enumerate(p.batches, start=1):
        y, feed["input_mean"], feed["input_var"] = run(batch, True, 1.0 - 1.0 / step if p.momentum is None
                                                       else p.momentum)
    out = (y, feed["input_mean"], feed["input_var"])
    if p.infer_after_training:
        out = (run(p.batches[-1], False, 0.9)[0], *out[1:])
    return out


BARE: dict[str, Callable[[Problem, str], Out]] = {
    "tf-layers": tf_layers,
    "tf-slim": tf_slim,
    "tf-keras": tf_keras,
    "tf-keras-unfused": tf_keras_unfused,
    "tf-nn": tf_nn,
    "tf-nn-fused": tf_nn_fused,
    "keras": keras,
    "keras-jax": keras_jax,
    "keras-torch": keras_torch,
    "torch": torch,
    "torch-functional": torch_functional,
    "torch-compile": torch_compile,
    "flax-linen": flax_linen,
    "flax-nnx": flax_nnx,
    "onnxruntime": onnxruntime,
}
