"""OpenVINO folds BatchNormalization into the preceding Dense / 1x1 convolution, so an infinite folded
scale s (moving variance 0, eps 0) multiplies the preceding layer's weights: a weight of 0 gives
0·inf = NaN for its whole output channel, and so do an input of 0 and a zero bias the exporter kept.
Found by the fuzzer (issue 16: keras-onnx-openvino and tf-keras-tf2onnx-openvino on float32 cases with
eps 0 and a subnormal moving variance, which TF's training, or tf2onnx's constant folding, flushes
to 0). Reduced here to the two exporters the adapters use (`keras.Model.export(format="onnx")` on
tensorflow, i.e. tf2onnx under Keras 3; `tf2onnx.convert.from_keras` on a tf_keras model), ranks 2-5
(Dense, Conv1D/2D/3D kernel 1), a zero and two non-zero preceding biases, moving variance 0 and
eps 0, run by OpenVINO's CPU plugin (f32, one thread, as adapters/exports.py run_openvino) and by
ONNX Runtime (optimizations off). Each output is compared bit for bit with four float32 formulas
(W: the preceding weight (out, in), b its bias, s = gamma·rsqrt(var + eps), shift = beta - mean·s):

    U   (W x + b)·s + shift                      the exported graph as written (Mul, Add after it)
    F1  sum_i x_i·(W_i·s) + b'                   s multiplied into the weights; b' = b·s + shift,
                                                 or shift where the exporter dropped an all-zero bias
    F2  sum_i x_i·(W_i·s') + (b - mean)·s' + beta  the same from an ONNX BatchNormalization node,
                                                 s' = gamma / sqrt(var + eps) (OpenVINO's)
    R1  (W x)·s + b'                             only the bias moved past the Mul (b' as F1)

    python docs/repro/openvino_inf_constants.py

What the graphs are and why OpenVINO computes what it does (source read at the commits named):
- tf2onnx leaves BN as Mul(s), Add(shift) after a MatMul / Gemm / Conv whose constants TF folded
  (TF's kernels run with denormals-are-zero, so a subnormal moving variance is 0 there); Keras 3 on
  rank 4/5 with a zero bias comes out with s already in the Conv's weights (an initializer named
  .../convolution/merged_input, NaN where a weight is 0, so ONNX Runtime gives F1 too); tf2onnx on
  tf_keras rank 4/5 writes an ONNX
  BatchNormalization node (or, rank 4 with spatial size > 1, fuses it into the Conv itself the same
  way, F2), with the stored moving variance as it is.
- OpenVINO decomposes BatchNormalization as (x + (-mean))·(gamma / sqrt(var + eps)) + beta
  (src/common/transformations/src/transformations/op_conversions/batch_norm_decomposition.cpp,
  BatchNormDecomposition, at 094c82ee7357), then LinOpSequenceFusion rewrites Add(c)->Multiply(s)
  as Multiply(s)->Add(c·s) and merges consecutive Adds (common_optimizations/
  lin_op_sequence_fusion.cpp, AddMultiplyFusion and AddAddFusion, at 094c82ee7357), and
  ConvolutionMultiplyFusion / MatMulMultiplyFusion multiply the Multiply's constant into a
  Convolution's or MatMul's weights (common_optimizations/conv_mul_fusion.cpp at 0e60b6dc34dd,
  `weights_multiply = Multiply(m_weights, final_const)`; matmul_multiply_fusion.cpp at 00de71d709e1,
  fuse_const_to_weights); the CPU plugin takes the remaining Add as the layer's bias (the runtime
  model's Convolution lists the BN's Add among its originalLayersNames). A Conv1D is exported as
  Unsqueeze, Conv2D, Squeeze: the Squeeze between Conv and Multiply stops ConvolutionMultiplyFusion
  (its pattern is Convolution -> Multiply), so rank 3 keeps the Multiply after the conv (R1).
- Not flushed: OpenVINO computes the BatchNormalization node's s from a stored moving variance of
  1e-40 as 1e20 (finite: F2 with var 1e-40 bit for bit, below), and multiplies a
  subnormal weight (1e-40) by an infinite s to inf, not NaN. Flushed: a fused weight or bias that is
  itself subnormal (1e-20·1e-20 folded into a MatMul weight, a bias of 1e-40) acts as 0.
- A float64 model (torch-onnx-openvino's float64 cases) is compiled to float32 by ConvertPrecision,
  whose constant conversion clamps to the float32 range (src/common/transformations/src/
  transformations/convert_precision.cpp, convert_value: val > max gives max, val < lowest gives
  lowest): a constant 1e200, and also an inf, becomes ±3.4028235e38, and so does a float64 input
  of 1e200; 1e-200 becomes 0. That is where the ±3.4e38 of a float64 case comes from (last lines).

Output with openvino 2026.4.1 (2026.4.1-22982-e213a147257), tensorflow 2.21, tf_keras 2.21, keras
3.15, tf2onnx 1.17.0, onnxruntime 1.32, on an x86-64 CPU (AVX512); inputs channels-last, gamma
[1, -1, 1], moving mean [-0.5, 1, 0.25], beta 0, W [[0, 0.7, 0.2], [1.9, -0.9, 0], [0.5, 0.25, 1]],
rows x = [1, 2, 3], [-1, 2, -3], [2, -1, 0.5], [0, 1, 1], [-2, -1, -0.5] (the same at every spatial
position); "OpenVINO =" lists the formulas its output equals bit for bit (NaN equal to NaN), the
graph leaves out Reshape, Transpose and Unsqueeze:

    spatial size 1
      keras-3  2 [0.0, 0.0, 0.0]   MatMul;Mul;Add                 OpenVINO = F1 F2  ORT = U R1
      keras-3  2 [0.5, -0.25, 0.0] MatMul;Add;Mul;Add             OpenVINO = F1     ORT = U
        OpenVINO [[nan, nan, nan], [nan, nan, nan], [nan, nan, nan], [nan, nan, nan], [nan, nan, nan]]
        U        [[inf, inf, nan], [inf, inf, -inf], [nan, nan, nan], [inf, inf, nan], [nan, inf, -inf]]
      keras-3  2 [0.5, -0.25, 1.0] MatMul;Add;Mul;Add             OpenVINO = F1     ORT = U
      keras-3  3 [0.0, 0.0, 0.0]   Conv;Squeeze;Mul;Add           OpenVINO = U R1   ORT = U R1
      keras-3  3 [0.5, -0.25, 0.0] Conv;Squeeze;Add;Mul;Add       OpenVINO = R1     ORT = U
      keras-3  3 [0.5, -0.25, 1.0] Conv;Squeeze;Add;Mul;Add       OpenVINO = R1     ORT = U
      keras-3  4 [0.0, 0.0, 0.0]   Conv                           OpenVINO = F1 F2  ORT = F1 F2
      keras-3  4 [0.5, -0.25, 0.0] Conv;Mul;Add                   OpenVINO = F1     ORT = U
      keras-3  4 [0.5, -0.25, 1.0] Conv;Mul;Add                   OpenVINO = F1     ORT = U
      keras-3  5 [0.0, 0.0, 0.0]   Conv                           OpenVINO = F1 F2  ORT = F1 F2
      keras-3  5 [0.5, -0.25, 0.0] Conv;Mul;Add                   OpenVINO = F1     ORT = U
      keras-3  5 [0.5, -0.25, 1.0] Conv;Mul;Add                   OpenVINO = F1     ORT = U
      tf_keras 2 [0.0, 0.0, 0.0]   MatMul;Mul;Add                 OpenVINO = F1 F2  ORT = U R1
      tf_keras 2 [0.5, -0.25, 0.0] Gemm;Mul;Add                   OpenVINO = F1     ORT = U
      tf_keras 2 [0.5, -0.25, 1.0] Gemm;Mul;Add                   OpenVINO = F1     ORT = U
      tf_keras 3 [0.0, 0.0, 0.0]   Conv;Squeeze;Mul;Add           OpenVINO = U R1   ORT = U R1
      tf_keras 3 [0.5, -0.25, 0.0] Conv;Squeeze;Add;Mul;Add       OpenVINO = R1     ORT = U
      tf_keras 3 [0.5, -0.25, 1.0] Conv;Squeeze;Add;Mul;Add       OpenVINO = R1     ORT = U
      tf_keras 4 [0.0, 0.0, 0.0]   Conv;BatchNormalization        OpenVINO = F1 F2  ORT = U R1
      tf_keras 4 [0.5, -0.25, 0.0] Conv;BatchNormalization        OpenVINO = F2     ORT = U
      tf_keras 4 [0.5, -0.25, 1.0] Conv;BatchNormalization        OpenVINO = F2     ORT = U
      tf_keras 5 [0.0, 0.0, 0.0]   Conv;BatchNormalization        OpenVINO = F1 F2  ORT = U R1
      tf_keras 5 [0.5, -0.25, 0.0] Conv;BatchNormalization        OpenVINO = F2     ORT = U
      tf_keras 5 [0.5, -0.25, 1.0] Conv;BatchNormalization        OpenVINO = F2     ORT = U
    spatial size 3
      keras-3  2 [0.0, 0.0, 0.0]   MatMul;Mul;Add                 OpenVINO = F1 F2  ORT = U R1
      keras-3  2 [0.5, -0.25, 0.0] MatMul;Add;Mul;Add             OpenVINO = F1     ORT = U
      keras-3  2 [0.5, -0.25, 1.0] MatMul;Add;Mul;Add             OpenVINO = F1     ORT = U
      keras-3  3 [0.0, 0.0, 0.0]   Conv;Squeeze;Mul;Add           OpenVINO = U R1   ORT = U R1
      keras-3  3 [0.5, -0.25, 0.0] Conv;Squeeze;Add;Mul;Add       OpenVINO = R1     ORT = U
      keras-3  3 [0.5, -0.25, 1.0] Conv;Squeeze;Add;Mul;Add       OpenVINO = R1     ORT = U
      keras-3  4 [0.0, 0.0, 0.0]   Conv                           OpenVINO = F1 F2  ORT = F1 F2
      keras-3  4 [0.5, -0.25, 0.0] Conv;Mul;Add                   OpenVINO = F1     ORT = U
      keras-3  4 [0.5, -0.25, 1.0] Conv;Mul;Add                   OpenVINO = F1     ORT = U
      keras-3  5 [0.0, 0.0, 0.0]   Conv                           OpenVINO = F1 F2  ORT = F1 F2
      keras-3  5 [0.5, -0.25, 0.0] Conv;Mul;Add                   OpenVINO = F1     ORT = U
      keras-3  5 [0.5, -0.25, 1.0] Conv;Mul;Add                   OpenVINO = F1     ORT = U
      tf_keras 2 [0.0, 0.0, 0.0]   MatMul;Mul;Add                 OpenVINO = F1 F2  ORT = U R1
      tf_keras 2 [0.5, -0.25, 0.0] Gemm;Mul;Add                   OpenVINO = F1     ORT = U
      tf_keras 2 [0.5, -0.25, 1.0] Gemm;Mul;Add                   OpenVINO = F1     ORT = U
      tf_keras 3 [0.0, 0.0, 0.0]   Conv;Squeeze;Mul;Add           OpenVINO = U R1   ORT = U R1
      tf_keras 3 [0.5, -0.25, 0.0] Conv;Squeeze;Add;Mul;Add       OpenVINO = R1     ORT = U
      tf_keras 3 [0.5, -0.25, 1.0] Conv;Squeeze;Add;Mul;Add       OpenVINO = R1     ORT = U
      tf_keras 4 [0.0, 0.0, 0.0]   Conv                           OpenVINO = F1 F2  ORT = F1 F2
      tf_keras 4 [0.5, -0.25, 0.0] Conv                           OpenVINO = F2     ORT = F2
      tf_keras 4 [0.5, -0.25, 1.0] Conv                           OpenVINO = F2     ORT = F2
      tf_keras 5 [0.0, 0.0, 0.0]   Conv;BatchNormalization        OpenVINO = F1 F2  ORT = U R1
      tf_keras 5 [0.5, -0.25, 0.0] Conv;BatchNormalization        OpenVINO = F2     ORT = U
      tf_keras 5 [0.5, -0.25, 1.0] Conv;BatchNormalization        OpenVINO = F2     ORT = U
    tf_keras rank 4, moving variance 1e-40 (a BatchNormalization node),
        row 0: [3.00000815e+20 1.15000296e+20 3.75000984e+20]
        F2: [3.000008e+20 1.150003e+20 3.750010e+20] largest relative difference: 0.0
    weight 1e-40 times s = inf  [inf]
    weight 1e-20 times s = 1e-20 [0.]
    bias 1e-40 on x = 0         [0.]
    float64 model, x + c, x = 0, c = [1e200, -1e200, inf]  [ 3.40282347e+38 -3.40282347e+38  3.40282347e+38]
    float64 model, x·1, x = [1e200, -1e200, 1e-200]        [ 3.40282347e+38 -3.40282347e+38  0.00000000e+00]
"""

from __future__ import annotations

import os
import tempfile
import warnings
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np
import onnx
import tensorflow as tf
import tf2onnx
import tf_keras
from onnx import TensorProto, helper, numpy_helper

from adapters.exports import onnxruntime_session, run_openvino, run_session

C = 3
W = np.array([[0.0, 0.7, 0.2], [1.9, -0.9, 0.0], [0.5, 0.25, 1.0]], np.float32)  # (out, in)
GAMMA = np.array([1.0, -1.0, 1.0], np.float32)
MEAN = np.array([-0.5, 1.0, 0.25], np.float32)
BETA = np.zeros(C, np.float32)
ROWS = np.array([[1, 2, 3], [-1, 2, -3], [2, -1, 0.5], [0, 1, 1], [-2, -1, -0.5]], np.float32)
BIASES = ([0.0, 0.0, 0.0], [0.5, -0.25, 0.0], [0.5, -0.25, 1.0])


def exported(lib: Any, rank: int, bias: list[float], variance: float, side: int) -> tuple[bytes, np.ndarray]:
    """Dense / ConvND(kernel 1) -> BatchNormalization(eps 0) as the adapters build it, exported to
    ONNX (Keras 3: model.export; tf_keras: tf2onnx.convert.from_keras), and its channels-last input."""
    layers = lib.layers
    shape = (len(ROWS),) + (side,) * (rank - 2) + (C,)
    inputs = lib.Input(shape=shape[1:], batch_size=shape[0])
    pre = layers.Dense(C) if rank == 2 else {3: layers.Conv1D, 4: layers.Conv2D, 5: layers.Conv3D}[rank](C, 1)
    bn = layers.BatchNormalization(epsilon=0.0)
    model = lib.Model(inputs, bn(pre(inputs)))
    pre.set_weights([W.T.reshape((1,) * (rank - 2) + (C, C)), np.array(bias, np.float32)])
    bn.set_weights([GAMMA, BETA, MEAN, np.full(C, variance, np.float32)])
    x = np.broadcast_to(ROWS.reshape((len(ROWS),) + (1,) * (rank - 2) + (C,)), shape).copy()
    if lib is tf_keras:
        spec = (tf.TensorSpec(shape, tf.float32, name="x"),)
        return tf2onnx.convert.from_keras(model, input_signature=spec)[0].SerializeToString(), x
    model(x)
    with tempfile.TemporaryDirectory() as folder:
        model.export(f"{folder}/m.onnx", format="onnx", verbose=False)
        with open(f"{folder}/m.onnx", "rb") as f:
            return f.read(), x


def formulas(bias: list[float], variance: float) -> dict[str, np.ndarray]:
    """U, F1, F2, R1 of the docstring, in float32, per row of ROWS."""
    b = np.array(bias, np.float32)
    with np.errstate(all="ignore"):
        s = np.float32(1) / np.sqrt(np.float32(variance)) * GAMMA
        shift = BETA - MEAN * s
        wx = np.stack([sum(ROWS[:, i] * W[c, i] for i in range(C)) for c in range(C)], axis=1)
        fused = np.stack([sum(ROWS[:, i] * (W[c, i] * s[c]) for i in range(C)) for c in range(C)], axis=1)
        kept = shift if not b.any() else b * s + shift  # an all-zero bias is dropped by the exporters
        bn_node = (b - MEAN) * (GAMMA / np.sqrt(np.float32(variance))) + BETA
        return {"U": (wx + b) * s + shift, "F1": fused + kept, "F2": fused + bn_node, "R1": wx * s + kept}


def matmul_mul_add(w: np.ndarray, s: np.ndarray, shift: np.ndarray, x: np.ndarray) -> np.ndarray:
    """OpenVINO on a hand-written MatMul(x, w) -> Mul(s) -> Add(shift) graph."""
    value = helper.make_tensor_value_info
    nodes = [helper.make_node("MatMul", ["x", "w"], ["z"]), helper.make_node("Mul", ["z", "s"], ["zs"]),
             helper.make_node("Add", ["zs", "shift"], ["y"])]
    constants = [numpy_helper.from_array(a, n) for a, n in ((w, "w"), (s, "s"), (shift, "shift"))]
    graph = helper.make_graph(nodes, "g", [value("x", TensorProto.FLOAT, list(x.shape))],
                              [value("y", TensorProto.FLOAT, [x.shape[0], w.shape[1]])], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    return run_openvino(model.SerializeToString(), x)


def float64_model(op: str, c: list[float], x: list[float]) -> np.ndarray:
    """OpenVINO on a hand-written float64 graph op(x, c)."""
    value = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node(op, ["x", "c"], ["y"])], "g",
                              [value("x", TensorProto.DOUBLE, [3])], [value("y", TensorProto.DOUBLE, [3])],
                              [numpy_helper.from_array(np.array(c), "c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    return run_openvino(model.SerializeToString(), np.array(x))


def main() -> None:
    warnings.simplefilter("ignore")
    np.set_printoptions(linewidth=120)
    for side in (1, 3):
        print(f"spatial size {side}")
        for name, lib in (("keras-3", keras), ("tf_keras", tf_keras)):
            for rank in (2, 3, 4, 5):
                for bias in BIASES:
                    blob, x = exported(lib, rank, bias, 0.0, side)
                    ov = run_openvino(blob, x).reshape(len(ROWS), -1, C)[:, 0]
                    ort = run_session(onnxruntime_session(blob), x).reshape(len(ROWS), -1, C)[:, 0]
                    graph = ";".join(n.op_type for n in onnx.load_from_string(blob).graph.node
                                     if n.op_type not in ("Reshape", "Transpose", "Unsqueeze"))
                    same = {label: " ".join(k for k, v in formulas(bias, 0.0).items()
                                            if np.array_equal(got, v, equal_nan=True))
                            for label, got in (("OpenVINO", ov), ("ORT", ort))}
                    print(f"  {name:8} {rank} {bias!s:17} {graph:30} "
                          f"OpenVINO = {same['OpenVINO']:6} ORT = {same['ORT']}")
                    if side == 1 and name == "keras-3" and rank == 2 and bias == BIASES[1]:
                        print("    OpenVINO", ov.tolist())
                        print("    U       ", formulas(bias, 0.0)["U"].tolist())
    blob, x = exported(tf_keras, 4, BIASES[1], 1e-40, 1)
    got, f2 = run_openvino(blob, x).reshape(len(ROWS), C), formulas(BIASES[1], 1e-40)["F2"]
    print("tf_keras rank 4, moving variance 1e-40 (a BatchNormalization node), row 0:", got[0], "F2:", f2[0],
          "largest relative difference:", np.max(np.abs(got - f2) / np.abs(f2)))
    f32 = np.float32
    zero, one = np.zeros(2, f32), np.ones((1, 2), f32)
    print("weight 1e-40 times s = inf ", matmul_mul_add(np.array([[1e-40, 1], [1, 1]], f32),
                                                        np.array([np.inf, 1], f32), zero, one)[:, 0])
    print("weight 1e-20 times s = 1e-20", matmul_mul_add(np.array([[1e-20, 0], [0, 1]], f32),
                                                         np.array([1e-20, 1], f32), zero, one)[:, 0])
    print("bias 1e-40 on x = 0        ", matmul_mul_add(np.eye(2, dtype=f32), np.ones(2, f32),
                                                        np.array([1e-40, 0], f32), 0 * one)[:, 0])
    print("float64 model, x + c, x = 0, c = [1e200, -1e200, inf] ",
          float64_model("Add", [1e200, -1e200, np.inf], [0.0, 0.0, 0.0]))
    print("float64 model, x·1, x = [1e200, -1e200, 1e-200]       ",
          float64_model("Mul", [1.0, 1.0, 1.0], [1e200, -1e200, 1e-200]))


if __name__ == "__main__":
    main()
