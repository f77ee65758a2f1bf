"""TFLite's converter stores an infinite folded BatchNormalization constant as ±float32 max, found by
cases/numerics/denormal-moving-variance-inference-eps-0 (keras-tflite, tf-keras-tflite and
tf-layers-tflite, inference after training: TF's training flushes the subnormal moving variance to 0).
Reduced to a Keras 3 layer (tensorflow backend) with moving variance 0 and epsilon 0, converted with
`tf.lite.TFLiteConverter.from_keras_model` and run by LiteRT with and without its default XNNPACK
delegate. Prints the flatbuffer's ops and constant tensors and both outputs.

    python docs/repro/tflite_inf_constants.py

The converter folds BN into MUL(x, s) and ADD(·, shift), s = gamma·rsqrt(var + eps) = inf and
shift = beta - mean·s = ∓inf, then its CanonicalizeBoundaryValuePass replaces every constant ±inf by
±float32 max (tensorflow/compiler/mlir/lite/transforms/canonicalize_boundary_value_pass.cc,
ClampInfToMinMaxFloat). XNNPACK computes x·3.4e38 unclamped (±inf past |x| = 1) + ∓3.4e38; TFLite's
builtin MUL clamps its output to the activation range [lowest, max] (no fused activation:
tensorflow/lite/kernels/kernel_util.h, CalculateActivationRange), so there x·s + shift is 0
wherever |x| >= 1. Exact arithmetic gives (x - mean)/0 = ±inf, the plain fold NaN (x and the mean
share each channel's sign). The constant lines below are wrapped.
Output with tensorflow 2.21, keras 3.15, ai-edge-litert 2.3.0 (CPU):

    ops: MUL(serving_default_keras_tensor:0, Rsqrt) -> ADD(mul_1, sub)
    constant functional_1/batch_normalization_1/batchnorm/Rsqrt
        [3.4028235e+38 3.4028235e+38 3.4028235e+38 3.4028235e+38]
    constant functional_1/batch_normalization_1/batchnorm/sub
        [-3.4028235e+38  3.4028235e+38 -3.4028235e+38 -3.4028235e+38]
    x - mean                  [ 0.125 -0.375  1.5    1.   ]
    XNNPACK (default)         [-1.7014117e+38           -inf            inf            inf]
    builtin kernels           [-1.7014117e+38  0.0000000e+00  0.0000000e+00  0.0000000e+00]
    folded, inf kept (NumPy)  [nan nan nan nan]

Two more things the fuzzer found (`fuzz --budget 600 --seed 11`), printed after the above:

- With a dense layer or 1x1 convolution before BN (a case's `preceding`), the converter folds BN into
  it for 2-D to 4-D models: W' = W·s and b' = b·s + shift, then saturates. A weight or bias of 0
  meeting s = inf is NaN (0·inf), and XNNPACK accumulates acc = b'; acc = fma(x_i, W'_i, acc) in
  input-channel order. A whole-zero bias is dropped before the fold for 2-D and 3-D models (b' =
  shift) but folded for 4-D ones (b' = NaN); a 5-D model keeps MUL and ADD after CONV_3D.
  `variants._folded_into_layer` models this; checked against 160 random tf_keras draws (ranks 2-4, 1-33
  channels, zero weights and biases) with no mismatch.
- The converter computes s with TF's kernels, whose Rsqrt runs Eigen's 8-float AVX packets
  (`_mm256_rsqrt_ps` reads a subnormal as 0, so rsqrt is inf: Eigen/src/Core/arch/AVX/
  MathFunctions.h L57-64 in TF 2.21's headers) and the last C mod 8 channels through the exact
  scalar path: a moving variance of 1e-40 with eps 0 folds to ±3.4e38 in channels 0-7 of 9 and to
  1e20 in channel 8 (`variants._packet_rsqrt_input`).

    Conv1D + BN, W[0][3] = 0, b[0] = 0, x = [-0.999, -1.001, -0.999, -1.0008]
    folded weights  [[3.4028235e+38 3.4028235e+38 -3.4028235e+38 nan] ...]
    folded bias     [nan -3.4028235e+38 3.4028235e+38 nan]
    XNNPACK         [nan -inf nan nan]
    9 channels of 1e-40: folded s  [3.4028235e+38 x 8, 1.0000027e+20]
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter, OpResolverType

X = np.array([[0.5, -1.25, 2.0, 3.5]], np.float32)
MEAN = np.array([0.375, -0.875, 0.5, 2.5], np.float32)  # the case's moving mean after training


def converted() -> bytes:
    inputs = keras.Input(shape=(4,), batch_size=1)
    bn = keras.layers.BatchNormalization(epsilon=0.0)
    model = keras.Model(inputs, bn(inputs))
    bn.set_weights([np.ones(4, np.float32), np.zeros(4, np.float32), MEAN, np.zeros(4, np.float32)])
    return tf.lite.TFLiteConverter.from_keras_model(model).convert()


def converted_with_conv() -> bytes:
    """Conv1D (1x1) + BN, moving variance 0, eps 0: the fold reaches the convolution's weights."""
    inputs = keras.Input(shape=(1, 4), batch_size=1)
    conv, bn = keras.layers.Conv1D(4, 1), keras.layers.BatchNormalization(epsilon=0.0)
    model = keras.Model(inputs, bn(conv(inputs)))
    weight = np.array([[1.0, 1.75, -1.5, 0.0], [-0.25, 0.3125, -0.625, -1.25], [0.75, 0.0, -1.5, 1.75],
                       [-1.125, 2.0, -0.1875, 1.3125]], np.float32)  # (out, in)
    conv.set_weights([weight.T[None], np.array([0.0, -0.6875, 0.75, -1.75], np.float32)])
    bn.set_weights([np.ones(4, np.float32), np.zeros(4, np.float32),
                    np.array([-0.0625, 0.4375, -0.1875, -1.40625], np.float32), np.zeros(4, np.float32)])
    return tf.lite.TFLiteConverter.from_keras_model(model).convert()


def folded_scale_of_nine_subnormal_channels() -> np.ndarray:
    """BN alone, nine channels of moving variance 1e-40, eps 0: the stored MUL constant."""
    inputs = keras.Input(shape=(9,), batch_size=1)
    bn = keras.layers.BatchNormalization(epsilon=0.0)
    model = keras.Model(inputs, bn(inputs))
    bn.set_weights([np.ones(9, np.float32), np.zeros(9, np.float32), np.zeros(9, np.float32),
                    np.full(9, 1e-40, np.float32)])
    interpreter = Interpreter(model_content=tf.lite.TFLiteConverter.from_keras_model(model).convert())
    interpreter.allocate_tensors()
    mul = next(op for op in interpreter._get_ops_details() if op["op_name"] == "MUL")
    x_index = interpreter.get_input_details()[0]["index"]
    return next(interpreter.get_tensor(i) for i in mul["inputs"] if i != x_index)


def run(flat: bytes, resolver: OpResolverType, x: np.ndarray = X) -> np.ndarray:
    interpreter = Interpreter(model_content=flat, num_threads=1, experimental_op_resolver_type=resolver)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0]


if __name__ == "__main__":
    flat = converted()
    plain = Interpreter(model_content=flat, experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    plain.allocate_tensors()
    names = {d["index"]: d["name"].split("/")[-1] for d in plain.get_tensor_details()}
    ops = [f"{op['op_name']}({', '.join(names[i] for i in op['inputs'])})" for op in plain._get_ops_details()]
    print("ops:", " -> ".join(ops))
    constant = {op_input for op in plain._get_ops_details() for op_input in op["inputs"]} - {
        plain.get_input_details()[0]["index"]} - {o for op in plain._get_ops_details() for o in op["outputs"]}
    for index in sorted(constant):
        print("constant", plain.get_tensor_details()[index]["name"], plain.get_tensor(index))
    print("x - mean                 ", X[0] - MEAN)
    print("XNNPACK (default)        ", run(flat, OpResolverType.AUTO))
    print("builtin kernels          ", run(flat, OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES))
    with np.errstate(invalid="ignore", divide="ignore"):
        s = np.float32(1.0) / np.sqrt(np.zeros(4, np.float32))
        print("folded, inf kept (NumPy) ", X[0] * s + (np.float32(0) - MEAN * s))
    conv = converted_with_conv()
    plain = Interpreter(model_content=conv)
    plain.allocate_tensors()
    conv_op = next(op for op in plain._get_ops_details() if op["op_name"] == "CONV_2D")
    print("Conv1D + BN: folded weights", plain.get_tensor(conv_op["inputs"][1]).reshape(4, 4))
    print("             folded bias   ", plain.get_tensor(conv_op["inputs"][2]))
    x = np.array([[[-0.999, -1.001, -0.999, -1.0008]]], np.float32)
    print("             XNNPACK       ", run(conv, OpResolverType.AUTO, x).ravel())
    print("9 channels of 1e-40: folded s", folded_scale_of_nine_subnormal_channels())
