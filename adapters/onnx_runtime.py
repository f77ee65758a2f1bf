"""One ONNX `BatchNormalization` node, built with `onnx.helper` and run by ONNX Runtime's
CPUExecutionProvider, as an exported model would run it.

- Opset 21 (BatchNormalization-15, the op's current version, and Transpose-21).
- Momentum: the attribute is decay form (`running_mean = input_mean * momentum + current_mean *
  (1 - momentum)`), so m is passed unchanged. m = null (cumulative average) is the caller's job, as
  it is for any stateless op: step t runs a model whose momentum is 1 - 1/t.
- Epsilon: `epsilon=`. Both attributes are 32-bit floats in the ONNX protobuf (AttributeProto.f),
  so a double model runs with float32(momentum) and float32(epsilon).
- Channel axis: the op normalizes over dim 1 of an N x C x D1... input (rank >= 2, one channel
  dim). Another channel axis is moved to dim 1 by a Transpose node inside the model and back by a
  second one; the perm is built from the case axis (plus the rank when negative, never wrapped
  further), so ONNX Runtime itself rejects an out-of-range axis.
- center/scale: `scale` and `B` are required inputs; an unused one is fed as ones / zeros.
- Modes: training is `training_mode=1` with the three outputs (Y, running_mean, running_var); the
  running outputs are fed back as `input_mean`/`input_var` for the next step. Inference is
  `training_mode=0` with Y only. Params and state are fed as graph inputs each run.
- Mixed precision (`param_dtype`): BatchNormalization-15 types X/Y as T, scale/B as T1 and the
  statistics as T2, so X is the case dtype and the other four inputs and two running outputs are
  `param_dtype`; a mix ONNX Runtime has no kernel for is its NOT_IMPLEMENTED error, not expressible.
- Dtypes: every tensor in the case dtype (an exported float16 model is float16 throughout). Where
  ONNX Runtime has no kernel (bfloat16 on CPU) the session's NOT_IMPLEMENTED error is raised as
  NotExpressible with ONNX Runtime's text.
- Sessions run with `intra_op_num_threads=1` (deterministic, and the suite shares its cores).
- Gradients: an InferenceSession has no autodiff (onnxruntime-training is a separate package):
  not expressible.
- The running variance is updated with the biased (population) batch variance (declared below,
  measured); the batch variance is computed two-pass (a mean-1e4 float32 case matches two-pass).
"""

from __future__ import annotations

import functools
from typing import ClassVar

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

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
    channels_first_permutation,
    no_such_argument,
)

OPSET = 21
ELEMENT_TYPES = {
    "float16": TensorProto.FLOAT16,
    "bfloat16": TensorProto.BFLOAT16,
    "float32": TensorProto.FLOAT,
    "float64": TensorProto.DOUBLE,
}
NUMPY_DTYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64}
STAT_INPUTS = ("scale", "B", "input_mean", "input_var")


@functools.lru_cache(maxsize=256)
def session(shape: tuple[int, ...], axis: int, dtype: str, training: bool, momentum: float,
            epsilon: float, param_dtype: str | None = None) -> ort.InferenceSession:
    """Transpose -> BatchNormalization -> Transpose, compiled once per shape and attribute set.
    `param_dtype`: scale/B (the op's T1) and the statistics (T2) in another dtype than X (T)."""
    elem = ELEMENT_TYPES[dtype]
    param_elem = ELEMENT_TYPES[param_dtype or dtype]
    perm = channels_first_permutation(len(shape), axis)
    moved = perm != list(range(len(shape)))
    nodes = []
    bn_in = "X"
    if moved:
        nodes.append(helper.make_node("Transpose", ["X"], ["X_nc"], perm=perm))
        bn_in = "X_nc"
    outputs = ["Y_nc" if moved else "Y"]
    if training:
        outputs += ["running_mean", "running_var"]
    # momentum/epsilon are AttributeProto floats, 32-bit (onnx/onnx.in.proto L183, onnx 1.23.2)
    nodes.append(helper.make_node("BatchNormalization", [bn_in, *STAT_INPUTS], outputs,
                                  epsilon=epsilon, momentum=momentum, training_mode=int(training)))
    if moved:
        nodes.append(helper.make_node("Transpose", ["Y_nc"], ["Y"], perm=np.argsort(perm).tolist()))
    inputs = [helper.make_tensor_value_info("X", elem, list(shape))]
    inputs += [helper.make_tensor_value_info(name, param_elem, ["C"]) for name in STAT_INPUTS]
    outs = [helper.make_tensor_value_info("Y", elem, None)]
    outs += [helper.make_tensor_value_info(name, param_elem, ["C"]) for name in outputs[1:]]
    graph = helper.make_graph(nodes, "batch_norm", inputs, outs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the suite shares its cores; one thread is also deterministic
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except ort.capi.onnxruntime_pybind11_state.NotImplemented as exc:
        raise NotExpressible(f"ONNX Runtime CPU cannot run it: {exc}") from exc


class DefaultNode(DefaultLayer):
    """A `BatchNormalization` node with no attributes at all (training_mode, momentum and epsilon at
    their defaults), fed ones/zeros for scale/B and the fresh state input_mean 0, input_var 1; the
    running outputs of a training run are the new state."""

    def __init__(self, shape: tuple[int, ...], dtype: str):
        self.shape, self.dtype = shape, dtype
        self.elem, self.np_dtype = ELEMENT_TYPES[dtype], NUMPY_DTYPES[dtype]
        channels = shape[1]
        self.state = {"scale": np.ones(channels, self.np_dtype), "B": np.zeros(channels, self.np_dtype),
                      "input_mean": np.zeros(channels, self.np_dtype),
                      "input_var": np.ones(channels, self.np_dtype)}

    def session(self, mode: Check | None) -> ort.InferenceSession:
        attributes = {} if mode is None else {"training_mode": int(mode == "training")}
        outputs = ["Y", "running_mean", "running_var"] if mode == "training" else ["Y"]
        node = helper.make_node("BatchNormalization", ["X", *STAT_INPUTS], outputs, **attributes)
        inputs = [helper.make_tensor_value_info("X", self.elem, list(self.shape))]
        inputs += [helper.make_tensor_value_info(n, self.elem, ["C"]) for n in STAT_INPUTS]
        outs = [helper.make_tensor_value_info(n, self.elem, None) for n in outputs]
        model = helper.make_model(helper.make_graph([node], "default", inputs, outs),
                                  opset_imports=[helper.make_opsetid("", OPSET)])
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    def call(self, x: np.ndarray, mode: Check | None) -> Observed:
        results = self.session(mode).run(None, {"X": x.astype(self.np_dtype), **self.state})
        if mode == "training":
            self.state["input_mean"], self.state["input_var"] = results[1], results[2]
        y = results[0]
        var = self.state["input_var"]
        return Observed(y.astype(np.float64), str(y.dtype), self.state["input_mean"].astype(np.float64),
                        var.astype(np.float64), str(var.dtype))


class OnnxRuntime(Adapter):
    id = "onnxruntime"
    names: ClassVar[dict[str, str]] = {
        "momentum": "momentum", "epsilon": "epsilon", "axis": "dim 1 (no attribute)",
        "center": "B (zeros)", "scale": "scale (ones)", "gamma": "scale", "beta": "B",
        "moving_mean": "input_mean / running_mean", "moving_variance": "input_var / running_var",
        "mode": "training_mode="
    }
    family = "onnx"
    conventions = Conventions(
        notes=("running_var is updated with the biased (population) batch variance (measured)",
               "momentum and epsilon are float32 attributes, also in double models"),
    )

    def versions(self) -> dict[str, str]:
        return {"onnx": onnx.__version__, "onnxruntime": ort.__version__}

    def device(self) -> str:
        return "cpu (CPUExecutionProvider)"

    def default_layer(self, shape: tuple[int, ...], dtype: str = "float32",
                      trainable: bool = True) -> DefaultLayer:
        if not trainable:
            raise NotExpressible("an ONNX node has no trainable flag")
        return DefaultNode(shape, dtype)

    capabilities = Capabilities(
        checks=frozenset({"training", "inference"}), min_rank=2,
        features=frozenset({"momentum-null", "param-dtype"}),
        why={**no_such_argument("ONNX BatchNormalization"),
             "gradients": "an ONNX Runtime InferenceSession has no autodiff (training needs the "
                          "separate onnxruntime-training package)",
             "multi-axis": "BatchNormalization normalizes over one channel dim (dim 1)",
             "rank": "BatchNormalization takes N x C x D1... input"},
    )

    def translations(self, problem: Problem) -> list[str]:
        out = [f"opset {OPSET}: BatchNormalization-15"]
        if problem.momentum is None:
            out.append("momentum null -> momentum=1-1/t at step t (cumulative average by hand)")
        else:
            out.append(f"momentum {problem.momentum:g} -> momentum={problem.momentum:g} (same decay "
                       "form; a float32 attribute)")
        out.append(f"epsilon {problem.epsilon:g} -> epsilon={problem.epsilon:g} (a float32 attribute)")
        perm = channels_first_permutation(problem.rank, problem.axes[0])
        if perm != list(range(problem.rank)):
            out.append(f"channel axis {problem.axes[0]} -> Transpose(perm={perm}) before the node and "
                       f"Transpose(perm={np.argsort(perm).tolist()}) after it")
        if not problem.scale:
            out.append("scale off -> scale fed as ones")
        if not problem.center:
            out.append("center off -> B fed as zeros")
        out.append("training: training_mode=1 with outputs Y, running_mean, running_var; "
                   "inference: training_mode=0")
        if problem.param_dtype is not None:
            out.append(f"param_dtype {problem.param_dtype} -> X and Y (type T) {problem.dtype}; scale, B "
                       f"(T1), mean, var and the running outputs (T2) {problem.param_dtype}")
        return out

    # -- running the model

    def cast(self, a: np.ndarray, dtype: str) -> np.ndarray:
        if dtype not in NUMPY_DTYPES:  # bfloat16: the session raises NotExpressible first
            raise NotExpressible(f"no NumPy dtype fed to ONNX Runtime for {dtype}")
        return np.ascontiguousarray(a, dtype=NUMPY_DTYPES[dtype])

    def run(self, problem: Problem, x: np.ndarray, training: bool, momentum: float,
            mean: np.ndarray, var: np.ndarray) -> list[np.ndarray]:
        sess = session(tuple(x.shape), problem.axes[0], problem.dtype, training, float(momentum),
                       float(problem.epsilon), problem.param_dtype)
        held = problem.params_dtype
        feed = {"X": self.cast(x, problem.dtype), "scale": self.cast(problem.gamma, held),
                "B": self.cast(problem.beta, held), "input_mean": self.cast(mean, held),
                "input_var": self.cast(var, held)}
        return sess.run(None, feed)

    def train(self, problem: Problem) -> TrainingRun:
        mean, var = problem.moving_mean, problem.moving_variance
        for step, x in enumerate(problem.batches, start=1):
            momentum = 1.0 - 1.0 / step if problem.momentum is None else problem.momentum
            y, mean, var = self.run(problem, x, True, momentum, mean, var)
        run = TrainingRun(output=np.asarray(y, np.float64), moving_mean=np.asarray(mean, np.float64),
                          moving_variance=np.asarray(var, np.float64))
        if problem.infer_after_training:
            (y,) = self.run(problem, problem.batches[-1], False, 0.9, mean, var)
            run.inference_output = np.asarray(y, np.float64)
        return run

    def infer(self, problem: Problem) -> np.ndarray:
        # momentum does nothing with training_mode=0; 0.9 is the attribute's default
        (y,) = self.run(problem, problem.batches[-1], False, 0.9, problem.moving_mean,
                        problem.moving_variance)
        return np.asarray(y, np.float64)

    def gradients(self, problem: Problem) -> Gradients:
        raise NotExpressible(self.why_not_expressible(problem, "gradients"))


def make(adapter_id: str) -> Adapter:
    return OnnxRuntime()
