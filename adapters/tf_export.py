"""A TensorFlow BatchNorm taken to deployment: converted to TFLite and run by LiteRT
(`ai-edge-litert`), or converted to ONNX with tf2onnx and run by ONNX Runtime.

- `tf-keras-tflite`: a tf_keras functional model `Input -> preceding -> BatchNormalization`,
  converted with `tf.lite.TFLiteConverter.from_keras_model`, run by the LiteRT `Interpreter`.
- `tf-keras-tf2onnx`: the same model through `tf2onnx.convert.from_keras`, run by ONNX Runtime
  with graph optimizations off; `tf-keras-tf2onnx-openvino`: that ONNX model run by OpenVINO (CPU,
  `INFERENCE_PRECISION_HINT=f32`).
- `tf-layers-tflite`: `tf.compat.v1.layers` in a graph, trained with `training=True` and the
  UPDATE_OPS dependency, the inference graph (`training=False`, shared variables) converted with
  `tf.compat.v1.lite.TFLiteConverter.from_session`, run by LiteRT.
- `tf-layers-tflite-training-default`: the same, trained as the seed article's author did, with
  `training` left at its default False.
- `tf-layers-tflite-no-update-ops`: the same with `training=True` but a train op that does not
  depend on UPDATE_OPS.

The last two are the seed article's story (a model trained with the wrong `training` value kept
moving mean 0 and variance 1, and the quantizer's BN folding then failed): they run the API the
wrong way on purpose, so that the suite names what the deployed model then does (`stats-frozen`,
and for the default `training=False`, `training-uses-moving-stats`).

- Parameters: `preceding` is a 1x1 `Conv1D/2D/3D(C, 1)` (rank 3-5) or `Dense(C)` (rank 2) on
  channels-last input (`tf.compat.v1.layers.conv{1,2,3}d` / `dense` for tf-layers), kernel = the
  case's weight transposed (Keras holds (in, out)). BN: `axis=-1`, `momentum=m` (Keras's decay
  form), `epsilon=`, `center=`, `scale=`, variables assigned the case's values.
- Channel axis: moved last in NumPy before the model and back after (TFLite and Keras
  convolutions are channels-last).
- Batch dimension: fixed to the case's batch size (`Input(batch_size=N)`, a fully defined
  placeholder), so the converted model has static shapes.
- Checks. inference: the case's state, converted, run on the batch. training: the source trains
  for the case's steps (eager `model(x, training=True)` for tf_keras, a session with the update ops
  for tf.layers), then the trained state is converted and the artefact runs the last batch,
  compared as `inference_output`; the source's moving statistics (what the conversion carries)
  and its last training output are compared too. A case without `inference_output` is not
  expressible. gradients: an artefact is run, not differentiated.
- Dtypes: float32; the TFLite ids also float16, through TFLite's post-training float16
  quantization (`adapters/exports.py` `tflite_options`): the source model is float32 with the
  case's float16 values, and the converted model keeps the weights, BN's folded kernel and bias
  too, in float16. bfloat16: the converter has no such model; float64 is not a TFLite kernel type;
  the tf2onnx ids follow float32 source models.
- Converters otherwise run with their defaults (TFLite: builtin ops, no optimizations); the LiteRT
  interpreter and ONNX Runtime use one thread.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Any

import numpy as np
import onnxruntime as ort
import tensorflow as tf
import tf_keras

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

# id -> (source, how it is trained, the converter)
PATHS: dict[str, tuple[str, str, str]] = {
    "tf-keras-tflite": ("tf_keras", "documented", "tflite"),
    "tf-keras-tf2onnx": ("tf_keras", "documented", "tf2onnx"),
    "tf-keras-tf2onnx-openvino": ("tf_keras", "documented", "tf2onnx"),
    "tf-layers-tflite": ("layers", "documented", "tflite"),
    "tf-layers-tflite-training-default": ("layers", "training-default", "tflite"),
    "tf-layers-tflite-no-update-ops": ("layers", "no-update-ops", "tflite"),
}
KERAS_CONVS = {3: tf_keras.layers.Conv1D, 4: tf_keras.layers.Conv2D, 5: tf_keras.layers.Conv3D}
V1_CONVS = {3: tf.compat.v1.layers.conv1d, 4: tf.compat.v1.layers.conv2d, 5: tf.compat.v1.layers.conv3d}


class TfExport(ChannelsLastArtefact, Adapter):
    artefact = "converted model"
    family = "tf-export"
    conventions = Conventions(notes=("the source layer's moving-variance estimator: unbiased where the fused "
                                     "kernel runs (4-D/5-D), biased otherwise",))

    def __init__(self, adapter_id: str):
        self.id = adapter_id
        self.source, self.training, self.converter = PATHS[adapter_id]
        self.runtime = "openvino" if adapter_id.endswith("-openvino") else "default"
        if self.converter == "tflite":
            self.capabilities = replace(TfExport.capabilities, dtypes=TFLITE_DTYPES,
                                        why={**TfExport.capabilities.why, **TFLITE_WHY})
        if self.training != "documented":  # the misuse concerns training; inference is tf-layers-tflite's
            self.capabilities = replace(self.capabilities, checks=frozenset({"training"}), why={
                **self.capabilities.why, "inference": "this id differs from tf-layers-tflite only in "
                "how it trains; its inference is tf-layers-tflite's"})

    capabilities = Capabilities(
        dtypes=frozenset({"float32"}), checks=frozenset({"training", "inference"}), min_rank=2, max_rank=5,
        features=frozenset({"preceding"}),
        why={"gradients": "a converted artefact is run, not differentiated",
             "float16": "the converted models here are float32 (TFLite's builtin kernels)",
             "bfloat16": "the converted models here are float32 (TFLite's builtin kernels)",
             "float64": "float64 is not a TFLite kernel type",
             "momentum-null": "Keras momentum is a fixed decay; it has no cumulative average",
             "multi-axis": "the exported layer normalizes the last axis of a channels-last model",
             "rank": "a channels-last model with a batch dim: rank 2 (Dense) to 5 (Conv3D)"},
    )

    def conventions_for(self, problem: Problem) -> Conventions:
        # The fused kernel (4-D/5-D, last axis, float32: always here for those ranks) averages the
        # Bessel-corrected variance into the moving one, as adapters/tf_keras_layer.py measures.
        fused = problem.rank in (4, 5)
        return Conventions(variants=("moving-variance-unbiased",) if fused else (),
                           notes=self.conventions.notes)

    def versions(self) -> dict[str, str]:
        import ai_edge_litert

        out = {"tensorflow": tf.__version__}
        if self.source == "tf_keras":
            out["tf_keras"] = tf_keras.__version__
        if self.converter == "tflite":
            out["ai-edge-litert"] = getattr(ai_edge_litert, "__version__", "unknown")
        else:
            import tf2onnx

            out |= {"tf2onnx": tf2onnx.__version__, "onnxruntime": ort.__version__}
        if self.runtime == "openvino":
            import openvino

            out["openvino"] = openvino.__version__
        return out

    def translations(self, problem: Problem) -> list[str]:
        out = self.layout_translations(problem)
        out.append({"tflite": "TFLiteConverter defaults; LiteRT Interpreter",
                    "tf2onnx": "tf2onnx.convert.from_keras (default opset); ONNX Runtime ORT_DISABLE_ALL"
                    }[self.converter] if self.runtime == "default" else
                   "tf2onnx.convert.from_keras (default opset); OpenVINO CPU, INFERENCE_PRECISION_HINT=f32")
        if self.converter == "tflite" and problem.dtype == "float16":
            out.append(TFLITE_FLOAT16)
        if self.training == "training-default":
            out.append("training steps call the layer without `training` (default False), as the seed "
                       "article's author did")
        elif self.training == "no-update-ops":
            out.append("training steps run training=True without the UPDATE_OPS dependency")
        return out

    def kernel(self, problem: Problem) -> np.ndarray:
        """The preceding layer's weight as a Keras kernel: (1, ..., 1, in, out)."""
        assert problem.preceding is not None
        weight_t = problem.preceding.weight.T
        return weight_t.reshape((1,) * (problem.rank - 2) + weight_t.shape)

    # -- tf_keras

    def keras_model(self, problem: Problem) -> tf_keras.Model:
        shape = self.last(problem.batches[-1], problem).shape
        channels = shape[-1]
        inputs = tf_keras.Input(shape=shape[1:], batch_size=shape[0], dtype="float32")
        z = inputs
        if problem.preceding is not None:
            pre = (tf_keras.layers.Dense(channels) if problem.rank == 2
                   else KERAS_CONVS[problem.rank](channels, 1))
            z = pre(z)
            pre.set_weights([self.kernel(problem), problem.preceding.bias])
        bn = tf_keras.layers.BatchNormalization(axis=-1, momentum=problem.momentum, epsilon=problem.epsilon,
                                                center=problem.center, scale=problem.scale)
        model = tf_keras.Model(inputs, bn(z))
        values = ([problem.gamma] if problem.scale else []) + ([problem.beta] if problem.center else [])
        bn.set_weights([*values, problem.moving_mean, problem.moving_variance])
        return model

    def convert_keras(self, model: tf_keras.Model, problem: Problem) -> Any:
        if self.converter == "tflite":
            return tflite_options(tf.lite.TFLiteConverter.from_keras_model(model), problem.dtype).convert()
        import tf2onnx

        spec = (tf.TensorSpec(model.inputs[0].shape, tf.float32, name="x"),)
        onnx_model, _ = tf2onnx.convert.from_keras(model, input_signature=spec)
        return onnx_model.SerializeToString()

    def run_artefact(self, artefact: Any, x: np.ndarray) -> np.ndarray:
        if self.converter == "tflite":
            return run_tflite(artefact, x)
        if self.runtime == "openvino":
            return run_openvino(artefact, x)
        return run_session(onnxruntime_session(artefact), x)

    # -- tf.compat.v1.layers

    def layers_run(self, problem: Problem, train: bool) -> tuple[bytes, dict[str, np.ndarray]]:
        """Build the TF1 graph, run the training steps the way this id does, convert the inference
        graph; (the TFLite model, the session's training output and moving statistics)."""
        shape = self.last(problem.batches[-1], problem).shape
        graph = tf.Graph()
        with graph.as_default(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tf.compat.v1.layers deprecation notices
            # training batches may change size; the converted inference graph has the last one's shape
            x_train = tf.compat.v1.placeholder(tf.float32, [None] * (len(shape) - 1) + [shape[-1]],
                                               name="x_train")
            x_infer = tf.compat.v1.placeholder(tf.float32, shape, name="x")
            init = tf.compat.v1.constant_initializer

            def model(x: tf.Tensor, training: bool | None) -> tf.Tensor:
                z = x
                if problem.preceding is not None:
                    kwargs = {"kernel_initializer": init(self.kernel(problem) if problem.rank > 2
                                                         else problem.preceding.weight.T),
                              "bias_initializer": init(problem.preceding.bias), "name": "pre",
                              "reuse": tf.compat.v1.AUTO_REUSE}
                    z = (tf.compat.v1.layers.dense(z, shape[-1], **kwargs) if problem.rank == 2
                         else V1_CONVS[problem.rank](z, shape[-1], 1, **kwargs))
                bn_kwargs = {} if training is None else {"training": training}
                return tf.compat.v1.layers.batch_normalization(
                    z, axis=-1, momentum=problem.momentum, epsilon=problem.epsilon, center=problem.center,
                    scale=problem.scale, gamma_initializer=init(problem.gamma),
                    beta_initializer=init(problem.beta),
                    moving_mean_initializer=init(problem.moving_mean),
                    moving_variance_initializer=init(problem.moving_variance), name="bn",
                    reuse=tf.compat.v1.AUTO_REUSE, **bn_kwargs)

            y_train = model(x_train, None if self.training == "training-default" else True)
            update_ops = tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS)
            if self.training == "documented":
                with tf.control_dependencies(update_ops):
                    y_train = tf.identity(y_train)
            y_infer = tf.identity(model(x_infer, False), name="y")
            moving = [v for v in tf.compat.v1.global_variables() if "moving_" in v.name]
            session = tf.compat.v1.Session(graph=graph)
            session.run(tf.compat.v1.global_variables_initializer())
            out: dict[str, np.ndarray] = {}
            if train:
                for x in problem.batches:
                    out["output"] = session.run(y_train, {x_train: self.last(x, problem)})
            for v, value in zip(moving, session.run(moving), strict=True):
                out["moving_mean" if "moving_mean" in v.name else "moving_variance"] = value
            converter = tflite_options(
                tf.compat.v1.lite.TFLiteConverter.from_session(session, [x_infer], [y_infer]), problem.dtype)
            model_bytes = converter.convert()
            session.close()
        return model_bytes, out

    # -- the checks

    def train(self, problem: Problem) -> TrainingRun:
        if self.source == "layers":
            artefact, state = self.layers_run(problem, train=True)
            output, mean, var = state["output"], state["moving_mean"], state["moving_variance"]
        else:
            model = self.keras_model(problem)
            for x in problem.batches:
                output = model(self.last(x, problem), training=True).numpy()
            bn = model.layers[-1]
            mean, var = bn.moving_mean.numpy(), bn.moving_variance.numpy()
            artefact = self.convert_keras(model, problem)
        y = self.run_artefact(artefact, self.last(problem.batches[-1], problem))
        return TrainingRun(output=self.back(output, problem), moving_mean=np.asarray(mean, np.float64),
                           moving_variance=np.asarray(var, np.float64),
                           inference_output=self.back(y, problem))

    def infer(self, problem: Problem) -> np.ndarray:
        if self.source == "layers":
            artefact, _ = self.layers_run(problem, train=False)
        else:
            artefact = self.convert_keras(self.keras_model(problem), problem)
        return self.back(self.run_artefact(artefact, self.last(problem.batches[-1], problem)), problem)

    def gradients(self, problem: Problem) -> Gradients:
        raise NotExpressible(self.why_not_expressible(problem, "gradients"))


def make(adapter_id: str) -> Adapter:
    return TfExport(adapter_id)
