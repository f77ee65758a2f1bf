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


def run(flat: bytes, resolver: OpResolverType) -> np.ndarray:
    interpreter = Interpreter(model_content=flat, num_threads=1, experimental_op_resolver_type=resolver)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], X)
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
