"""A Keras 3 BatchNormalization taken to deployment: `model.export(format="onnx")` run by ONNX
Runtime, or `tf.lite.TFLiteConverter.from_keras_model` run by LiteRT (`ai-edge-litert`).

- `keras-tflite` (tensorflow backend): `tf.lite.TFLiteConverter.from_keras_model(model).convert()`,
  run by the LiteRT `Interpreter`.
- `keras-onnx` (tensorflow backend): `model.export(path, format="onnx")` (tf2onnx underneath), run
  by ONNX Runtime with graph optimizations off.
- `keras-onnx-openvino` (tensorflow backend): that ONNX model run by OpenVINO (CPU,
  `INFERENCE_PRECISION_HINT=f32`; its default on AVX512_BF16/AMX CPUs is bfloat16).
- `keras-torch-onnx` (torch backend): `model.export(path, format="onnx")` (torch.onnx.export
  underneath), ONNX Runtime, optimizations off.
- `keras-jax-onnx` (jax backend): `model.export(path, format="onnx")`, which on jax traces
  `model(x, training=False)` with `jax2onnx.to_onnx` (keras/src/export/onnx.py L282-335; the
  `keras-jax-onnx` extra installs jax2onnx), ONNX Runtime, optimizations off. jax2onnx writes BN as
  the arithmetic Keras traced (Add, Sqrt, Div, Mul, ...), not a BatchNormalization node. The jax
  backend runs with adapters/jax_setup.py (x64 mode; the input signature stays float32).

- Source model: `keras.Model(Input(shape, batch_size=N), BatchNormalization(preceding(x)))`,
  channels-last; `preceding` is a 1x1 `Conv1D/2D/3D(C, 1)` (rank 3-5) or `Dense(C)` (rank 2) with
  kernel = the case's weight transposed. BN: `axis=-1`, `momentum=m` (Keras's decay form),
  `epsilon=`, `center=`, `scale=`, weights set to the case's values.
- Channel axis: moved last in NumPy before the model and back after it.
- Checks. inference: the case's state exported and run on the batch. training: the source trains
  eagerly (`model(x, training=True)` per step; Keras 3 assigns the moving averages, biased
  variance, as `adapters/keras3.py` measures), the trained model is exported, and the artefact runs
  the last batch, compared as `inference_output`; the source's moving statistics and last training
  output are compared too. A case without `inference_output` is not expressible; gradients: an
  artefact is run, not differentiated.
- Dtypes: float32; `keras-tflite` also float16, through TFLite's post-training float16
  quantization (`adapters/exports.py` `tflite_options`: a float32 source model with the case's
  float16 values; the converted model keeps the weights, BN's folded ones too, in float16).
  `model.export(format="onnx")` requires a float32 dtype policy (keras/src/export/onnx.py, its
  docstring), so the ONNX ids are float32 only.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any

if os.environ.get("KERAS_BACKEND") == "jax":
    import adapters.jax_setup  # noqa: F401  (x64 and JAX's platform, before Keras starts JAX)

import keras
import numpy as np
import onnxruntime as ort

from adapters.base import (
    Adapter,
    Capabilities,
    Conventions,
    Gradients,
    NotExpressible,
    Problem,
    TrainingRun,
)
from adapters.exports import (
    TFLITE_DTYPES,
    TFLITE_FLOAT16,
    TFLITE_WHY,
    ChannelsLastArtefact,
    onnxruntime_session,
    run_openvino,
    run_session,
    run_tflite,
    tflite_options,
)

BACKEND = keras.backend.backend()
# jax2onnx imports every plugin it ships at the first export and logs a traceback for each that
# this JAX cannot import (its dm_pix plugins read jax.interpreters.batching.not_mapped, gone in JAX
# 0.10: jax2onnx/plugins/plugin_system.py L1400); none of them is on a BN model's path
logging.getLogger("jax2onnx.plugins.plugin_system").setLevel(logging.ERROR)
EXPORTER = {"tensorflow": "tf2onnx", "jax": "jax2onnx", "torch": "torch.onnx.export"}  # under export()
CONVS = {3: keras.layers.Conv1D, 4: keras.layers.Conv2D, 5: keras.layers.Conv3D}


def to_numpy(t: Any) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(t), dtype=np.float64)


class KerasExport(ChannelsLastArtefact, Adapter):
    family = "keras-export"
    conventions = Conventions(notes=("the source layer's moving variance: biased (Keras 3 ops.moments)",))
    capabilities = Capabilities(
        dtypes=frozenset({"float32"}), checks=frozenset({"training", "inference"}), min_rank=2, max_rank=5,
        features=frozenset({"preceding"}),
        why={"gradients": "an exported artefact is run, not differentiated",
             **dict.fromkeys(("float16", "bfloat16", "float64"), "model.export(format='onnx') requires the "
                             "float32 dtype policy (keras/src/export/onnx.py L49)"),
             "momentum-null": "Keras momentum is a fixed decay; it has no cumulative average",
             "multi-axis": "the exported layer normalizes the last axis of a channels-last model",
             "rank": "a channels-last model with a batch dim: rank 2 (Dense) to 5 (Conv3D)"},
    )

    def __init__(self, adapter_id: str):
        self.id = adapter_id
        self.converter = "tflite" if adapter_id == "keras-tflite" else "onnx"
        self.runtime = "openvino" if adapter_id.endswith("-openvino") else "default"
        if self.converter == "tflite":
            self.capabilities = replace(KerasExport.capabilities, dtypes=TFLITE_DTYPES,
                                        why={**KerasExport.capabilities.why, **TFLITE_WHY})

    def versions(self) -> dict[str, str]:
        out = {"keras": keras.__version__, "backend": BACKEND}
        if self.converter == "tflite":
            import ai_edge_litert
            import tensorflow as tf

            out |= {"tensorflow": tf.__version__,
                    "ai-edge-litert": getattr(ai_edge_litert, "__version__", "")}
        else:
            out["onnxruntime"] = ort.__version__
            if self.runtime == "openvino":
                import openvino

                out["openvino"] = openvino.__version__
            if BACKEND == "tensorflow":
                import tf2onnx

                out["tf2onnx"] = tf2onnx.__version__
            elif BACKEND == "jax":
                import jax

                out |= {"jax": jax.__version__, "jax2onnx": metadata.version("jax2onnx")}
            else:
                import torch

                out["torch"] = torch.__version__
        return out

    def translations(self, problem: Problem) -> list[str]:
        out = self.layout_translations(problem)
        runtime = ("OpenVINO CPU, INFERENCE_PRECISION_HINT=f32" if self.runtime == "openvino"
                   else "ONNX Runtime ORT_DISABLE_ALL")
        out.append("TFLiteConverter.from_keras_model; LiteRT Interpreter" if self.converter == "tflite"
                   else f"model.export(format='onnx') on {BACKEND} ({EXPORTER[BACKEND]}); {runtime}")
        if self.converter == "tflite" and problem.dtype == "float16":
            out.append(TFLITE_FLOAT16)
        return out

    def model(self, problem: Problem) -> keras.Model:
        shape = self.last(problem.batches[-1], problem).shape
        channels = shape[-1]
        inputs = keras.Input(shape=shape[1:], batch_size=shape[0], dtype="float32")
        z = inputs
        if problem.preceding is not None:
            pre = keras.layers.Dense(channels) if problem.rank == 2 else CONVS[problem.rank](channels, 1)
            z = pre(z)
            weight_t = problem.preceding.weight.T
            kernel = weight_t.reshape((1,) * (problem.rank - 2) + weight_t.shape)
            pre.set_weights([kernel, problem.preceding.bias])
        bn = keras.layers.BatchNormalization(axis=-1, momentum=problem.momentum, epsilon=problem.epsilon,
                                             center=problem.center, scale=problem.scale)
        model = keras.Model(inputs, bn(z))
        values = ([problem.gamma] if problem.scale else []) + ([problem.beta] if problem.center else [])
        bn.set_weights([*values, problem.moving_mean, problem.moving_variance])
        return model

    def exported(self, model: keras.Model, x: np.ndarray, dtype: str) -> np.ndarray:
        """The model through this id's path (for the case dtype), run on x (channels-last float32)."""
        with warnings.catch_warnings(), tempfile.TemporaryDirectory() as folder:
            warnings.simplefilter("ignore")
            if self.converter == "tflite":
                import tensorflow as tf

                converter = tflite_options(tf.lite.TFLiteConverter.from_keras_model(model), dtype)
                return run_tflite(converter.convert(), x)
            path = Path(folder) / "model.onnx"
            # export_onnx refuses a model never called, even a functional one whose input signature
            # it has just computed (keras/src/export/onnx.py L77-79): call it once, in inference mode
            model(x, training=False)
            model.export(str(path), format="onnx", verbose=False)
            if self.runtime == "openvino":
                return run_openvino(path.read_bytes(), x)
            return run_session(onnxruntime_session(path.read_bytes()), x)

    def train(self, problem: Problem) -> TrainingRun:
        model = self.model(problem)
        for x in problem.batches:
            output = to_numpy(model(self.last(x, problem), training=True))
        bn = model.layers[-1]
        y = self.exported(model, self.last(problem.batches[-1], problem), problem.dtype)
        return TrainingRun(output=self.back(output, problem), moving_mean=to_numpy(bn.moving_mean),
                           moving_variance=to_numpy(bn.moving_variance),
                           inference_output=self.back(y, problem))

    def infer(self, problem: Problem) -> np.ndarray:
        x = self.last(problem.batches[-1], problem)
        return self.back(self.exported(self.model(problem), x, problem.dtype), problem)

    def gradients(self, problem: Problem) -> Gradients:
        raise NotExpressible(self.why_not_expressible(problem, "gradients"))


def make(adapter_id: str) -> Adapter:
    return KerasExport(adapter_id)
