"""What the export adapters share. The Keras-family ones (`keras_export.py`, `tf_export.py`): the
artefact is a channels-last model with a fixed batch dimension, converted after the source layer
trained, and run in inference form. All of them: the runtimes an artefact runs in. No framework is
imported at module level here (each runtime inside its function)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from adapters.base import Check, Problem


class ChannelsLastArtefact:
    """Mixed into an Adapter whose artefact normalizes the last axis of a fixed-size batch."""

    artefact = "exported model"  # what the adapter calls what it runs, in its reasons

    def not_expressible(self, problem: Problem, check: Check) -> str | None:
        if check == "training" and not problem.infer_after_training:
            return (f"the {self.artefact} is inference-only: the training check compares what it outputs "
                    "after the source trained (training.expected.inference_output), which this case "
                    "does not give")
        if any(x.size == 0 for x in problem.batches):
            return f"a {self.artefact} has a fixed, non-empty batch dimension"
        return None

    @staticmethod
    def layout_translations(problem: Problem) -> list[str]:
        """Momentum, epsilon, the channels-last layout, the preceding layer and the fixed batch."""
        out = [f"momentum {problem.momentum:g} -> momentum={problem.momentum:g} (same decay form)",
               f"epsilon {problem.epsilon:g} -> epsilon={problem.epsilon:g}"]
        axis = problem.axes[0]
        if axis not in (-1, problem.rank - 1):
            out.append(f"channel axis {axis} -> np.moveaxis({axis}, -1) before the model and back after")
        if problem.preceding is not None:
            kind = "Dense" if problem.rank == 2 else f"Conv{problem.rank - 2}D kernel 1"
            out.append(f"preceding -> {kind} with kernel = weight transposed, bias")
        out.append(f"batch dimension fixed to {problem.batches[-1].shape[0]}")
        return out

    @staticmethod
    def last(x: np.ndarray, problem: Problem) -> np.ndarray:
        """The case's input, channels last, as the float32 array the artefact takes."""
        return np.ascontiguousarray(np.moveaxis(x, problem.axes[0], -1), dtype=np.float32)

    @staticmethod
    def back(y: np.ndarray, problem: Problem) -> np.ndarray:
        return np.moveaxis(np.asarray(y, np.float64), -1, problem.axes[0])


# -- TFLite's converter options for a case dtype


TFLITE_DTYPES = frozenset({"float32", "float16"})
TFLITE_WHY = {
    "bfloat16": "TFLiteConverter has no bfloat16 model: Optimize.DEFAULT with supported_types=[tf.bfloat16] "
                "leaves every tensor float32 (measured with tensorflow 2.21)",
    "float64": "float64 is not a TFLite kernel type",
}
TFLITE_FLOAT16 = ("float16 case: the source model in float32 (the case's float16 values exactly), converted "
                  "with post-training float16 quantization (optimizations=[Optimize.DEFAULT], "
                  "supported_types=[float16]): the weights, BN's folded ones too, stored in float16 and "
                  "dequantized to float32; float32 input and output")


def tflite_options(converter: Any, dtype: str) -> Any:
    """The converter as TFLite's documentation says for the case dtype: for float16, post-training
    float16 quantization (tensorflow/lite/python/lite.py L384-389 and L453-460: float32 inference
    type, weights quantized to float16). Measured on a Conv2D + BatchNormalization model: the
    converter folds BN into the convolution, and the folded kernel and bias are the float16
    tensors, dequantized at load. Other dtypes: the defaults (a float32 model)."""
    if dtype == "float16":
        import tensorflow as tf

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    return converter


# -- the runtimes an exported artefact runs in, single-threaded, as each one's documentation shows


def run_tflite(model: bytes, x: np.ndarray) -> np.ndarray:
    """A TFLite flatbuffer run by LiteRT's Interpreter on one float32 input."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model, num_threads=1)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x.astype(np.float32))
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).astype(np.float64)


def onnxruntime_session(model: bytes, optimized: bool = False) -> Any:
    """An ONNX Runtime CPU session, graph optimizations off (the model as exported) or all on."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    levels = ort.GraphOptimizationLevel
    options.graph_optimization_level = levels.ORT_ENABLE_ALL if optimized else levels.ORT_DISABLE_ALL
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def run_session(session: Any, x: np.ndarray) -> np.ndarray:
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0], np.float64)


def run_openvino(model: bytes, x: np.ndarray) -> np.ndarray:
    """An ONNX model run by OpenVINO on CPU, asked for f32: its default precision hint is the CPU's
    best, bfloat16 on AVX512_BF16/AMX machines (adapters/torch_export.py records it)."""
    import openvino

    core = openvino.Core()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        path.write_bytes(model)
        compiled = core.compile_model(core.read_model(path), "CPU",
                                      {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32"})
    return np.asarray(compiled([x])[compiled.output(0)], np.float64)
