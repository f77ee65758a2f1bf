"""A PyTorch BatchNorm taken to deployment: folded into its preceding layer, or exported to ONNX and
run by ONNX Runtime or OpenVINO. The source model is `nn.Sequential(preceding, BatchNorm)` built and
trained as the `torch` adapter does (`torch.nn.BatchNorm1d/2d/3d`, `momentum = 1 - m`, running
variance updated with the unbiased batch variance), then handed to the tool as its documentation
says. Each adapter id is one path:

- `torch-fuse`: `torch.nn.utils.fusion.fuse_conv_bn_eval` (rank 3-5, a 1x1 Conv1d/2d/3d) or
  `fuse_linear_bn_eval` (rank 2, Linear), the fused layer run eagerly.
- `torch-onnx`, `torch-onnx-ortopt`: `torch.onnx.export(dynamo=False)` (the TorchScript exporter),
  run by ONNX Runtime with graph optimizations off / all on.
- `torch-onnx-dynamo`, `torch-onnx-dynamo-ortopt`: `torch.onnx.export(dynamo=True)` (torch.export
  and onnxscript), ONNX Runtime off / all on.
- `torch-onnx-openvino`: the TorchScript export read and compiled by OpenVINO on CPU with
  `INFERENCE_PRECISION_HINT=f32`.
- `torch-onnx-training`: `torch.onnx.export(dynamo=False, training=TrainingMode.TRAINING)`, ONNX
  Runtime off.
- `torch-onnx-dynamo-training`: the module left in training mode and exported with
  `torch.onnx.export(dynamo=True, training=TrainingMode.TRAINING)` (the dynamo exporter documents
  `training` as deprecated: "set the training mode of the model before exporting"), ONNX Runtime
  off. It only warns ("Exporting a model while it is in training mode",
  torch/onnx/_internal/exporter/_compat.py L75-83); what the graph then computes is measured.

- Parameters: `preceding` is a 1x1 `Conv{1,2,3}d(C, C, 1)` (rank 3-5) or `Linear(C, C)` (rank 2)
  whose weight and bias are the case's; without `preceding` the model is the BN alone (not
  expressible for `torch-fuse`, which fuses a BN into the layer before it). gamma, beta, moving
  statistics, momentum, epsilon, center/scale as in `adapters/torch_module.py`.
- Channel axis: the exported model takes N x C x ...; another channel axis is moved to dim 1 in
  NumPy before the model and back after it, as a deployment pipeline's pre/post-processing does.
- Checks. inference: the untrained model (the case's state) is exported and run on the batch.
  training: torch trains the source model for the case's steps, then the trained state is exported
  and the artefact runs the last batch, compared as `inference_output` (what the deployed model
  outputs after training); its training-mode output and moving statistics are the `torch`
  adapter's and are not compared again. A case without `inference_output` is not expressible here.
  `torch-onnx-training` is the exception: exported in training mode (the ONNX graph holds
  `BatchNormalization(training_mode=1)`), its output on the last batch is compared as the training
  `output`; the graph's outputs are Y only (the exporter drops running_mean / running_var), so the
  moving statistics are not exposed. gradients: an exported artefact has no autodiff here.
- OpenVINO: its CPU plugin's default `INFERENCE_PRECISION_HINT` is the best the CPU has; on one with
  AVX512_BF16/AMX it is bfloat16, and a float32 model then runs in bfloat16 (measured on this suite's
  machine: `conv-bn-nchw-trained` inference off by 0.0236, outputs all bfloat16 values such as
  0.59765625). That depends on the machine, so the adapter asks for `f32`, as OpenVINO's precision
  documentation says to for full precision, and `versions()` records the machine's default.
  A float64 model has no f64 kernels there: it runs in float32 between Converts that saturate at
  ±float32 max, inf included (variant `float32-saturated`, docs/repro/openvino_float64_saturated.py).
- Where ONNX Runtime's CPU provider has no kernel for the exported graph (a double Conv), the
  session's NOT_IMPLEMENTED error is reported as not expressible with its text, as
  `adapters/onnx_runtime.py` does.
- Exports are cached per exporter, dtype, input shape, mode and state (bytes), so the ONNX Runtime
  off / on and OpenVINO ids reuse one export. Runtimes use one thread.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from adapters.base import (
    Adapter,
    Capabilities,
    Check,
    Conventions,
    Gradients,
    NotExpressible,
    Problem,
    TrainingRun,
)
from adapters.exports import onnxruntime_session, run_openvino, run_session

torch.set_num_threads(1)  # as adapters/torch_module.py: tiny calls, shared cores, same bits everywhere

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                "float64": torch.float64}
NUMPY_DTYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64}
BATCH_NORMS = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
               5: torch.nn.BatchNorm3d}
CONVS = {3: torch.nn.Conv1d, 4: torch.nn.Conv2d, 5: torch.nn.Conv3d}

# id -> (how the model leaves torch, what runs it)
PATHS: dict[str, tuple[str, str]] = {
    "torch-fuse": ("fuse", "torch"),
    "torch-onnx": ("torchscript", "ort-off"),
    "torch-onnx-ortopt": ("torchscript", "ort-all"),
    "torch-onnx-dynamo": ("dynamo", "ort-off"),
    "torch-onnx-dynamo-ortopt": ("dynamo", "ort-all"),
    "torch-onnx-openvino": ("torchscript", "openvino"),
    "torch-onnx-training": ("torchscript-training", "ort-off"),
    "torch-onnx-dynamo-training": ("dynamo-training", "ort-off"),
}
TRAINING_EXPORTS = ("torchscript-training", "dynamo-training")

_EXPORTS: dict[str, bytes] = {}


def _quiet() -> None:
    """The dynamo exporter logs each phase at WARNING (and warns about torchvision): not ours to show."""
    for name in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


class TorchExport(Adapter):
    family = "torch-export"
    conventions = Conventions(
        variants=("moving-variance-unbiased",),
        notes=("the source model is torch's: running_var updated with the unbiased batch variance",),
    )

    def __init__(self, adapter_id: str):
        self.id = adapter_id
        self.exporter, self.runtime = PATHS[adapter_id]
        checks = {"training"} if self.exporter in TRAINING_EXPORTS else {"training", "inference"}
        why = {"gradients": "an exported or folded artefact is run, not differentiated",
               "multi-axis": "torch BatchNorm normalizes over one channel dim (dim 1)",
               "rank": "BatchNorm1d takes 2-D/3-D input, BatchNorm2d 4-D, BatchNorm3d 5-D",
               "bfloat16": "ONNX Runtime's and OpenVINO's CPU kernels take no bfloat16 model here",
               "inference": "exported in training mode, the model normalizes with the batch's own "
                            "statistics; the inference-form export is torch-onnx"}
        dtypes = {"float16", "float32", "float64"} | ({"bfloat16"} if self.exporter == "fuse" else set())
        self.capabilities = Capabilities(dtypes=frozenset(dtypes), checks=frozenset(checks), min_rank=2,
                                         max_rank=5, features=frozenset({"preceding", "momentum-null"}),
                                         why=why)

    def versions(self) -> dict[str, str]:
        out = {"torch": torch.__version__}
        if self.exporter != "fuse":
            out |= {"onnx": onnx.__version__}
        if self.exporter.startswith("dynamo"):
            import onnxscript

            out["onnxscript"] = onnxscript.__version__
        if self.runtime.startswith("ort"):
            out["onnxruntime"] = ort.__version__
        if self.runtime == "openvino":
            import openvino

            out["openvino"] = openvino.__version__
            out["openvino CPU default INFERENCE_PRECISION_HINT"] = self._openvino_default()
        return out

    @staticmethod
    @functools.cache
    def _openvino_default() -> str:
        """The machine's CPU precision hint, asked once (translations run for every check)."""
        import openvino

        return str(openvino.Core().get_property("CPU", "INFERENCE_PRECISION_HINT"))

    def not_expressible(self, problem: Problem, check: Check) -> str | None:
        if self.exporter == "fuse" and problem.preceding is None:
            return ("fuse_conv_bn_eval / fuse_linear_bn_eval fold BN into the layer before it; the case "
                    "has no params.preceding")
        if problem.epsilon <= 0 and check == "training":
            # torch/nn/functional.py (2.13) batch_norm: "batch_norm eps must be positive during training"
            return "torch rejects eps <= 0 in training (ValueError: eps must be positive during training)"
        inference_form = self.exporter not in TRAINING_EXPORTS
        if check == "training" and inference_form and not problem.infer_after_training:
            return ("the exported model is inference-only: the training check compares what it outputs "
                    "after the source trained (training.expected.inference_output), which this case "
                    "does not give")
        return None

    def translations(self, problem: Problem) -> list[str]:
        out = []
        if problem.momentum is None:
            out.append("momentum null -> momentum=None (cumulative average)")
        else:
            out.append(f"momentum {problem.momentum:g} -> momentum={1 - problem.momentum:g} (1 - m)")
        axis = problem.axes[0]
        if axis not in (1, 1 - problem.rank):
            out.append(f"channel axis {axis} -> np.moveaxis({axis}, 1) before the model and back after")
        if problem.preceding is not None:
            layer = "Linear(C, C)" if problem.rank == 2 else f"{CONVS[problem.rank].__name__}(C, C, 1)"
            out.append(f"preceding -> {layer} with the case's weight and bias")
        out.append({
            "fuse": "fuse_linear_bn_eval" if problem.rank == 2 else "fuse_conv_bn_eval",
            "torchscript": "torch.onnx.export(dynamo=False, opset default)",
            "dynamo": "torch.onnx.export(dynamo=True)",
            "torchscript-training": "torch.onnx.export(dynamo=False, training=TrainingMode.TRAINING, "
                                    "do_constant_folding=False)",
            "dynamo-training": "model.train(); torch.onnx.export(dynamo=True, "
                               "training=TrainingMode.TRAINING)",
        }[self.exporter])
        out.append({"torch": "run eagerly", "ort-off": "ONNX Runtime, ORT_DISABLE_ALL",
                    "ort-all": "ONNX Runtime, ORT_ENABLE_ALL",
                    "openvino": "OpenVINO CPU, INFERENCE_PRECISION_HINT=f32 (default here: "
                                f"{self._openvino_default()})"}[self.runtime])
        return out

    # -- the source model, as a torch user builds and trains it

    def source(self, problem: Problem) -> torch.nn.Sequential:
        dtype = TORCH_DTYPES[problem.dtype]
        channels = np.moveaxis(problem.batches[0], problem.axes[0], 1).shape[1]
        bn = BATCH_NORMS[problem.rank](
            channels, eps=problem.epsilon,
            momentum=None if problem.momentum is None else 1.0 - problem.momentum,
            affine=problem.center or problem.scale, dtype=dtype)
        layers: list[torch.nn.Module] = []
        with torch.no_grad():
            if problem.preceding is not None:
                pre = (torch.nn.Linear(channels, channels, dtype=dtype) if problem.rank == 2
                       else CONVS[problem.rank](channels, channels, 1, dtype=dtype))
                pre.weight.copy_(torch.tensor(problem.preceding.weight).reshape(pre.weight.shape))
                pre.bias.copy_(torch.tensor(problem.preceding.bias))
                layers.append(pre)
            if bn.affine:
                bn.weight.copy_(torch.tensor(problem.gamma))
                bn.bias.copy_(torch.tensor(problem.beta))
            bn.running_mean.copy_(torch.tensor(problem.moving_mean))
            bn.running_var.copy_(torch.tensor(problem.moving_variance))
        return torch.nn.Sequential(*layers, bn)

    def tensor(self, x: np.ndarray, problem: Problem) -> torch.Tensor:
        return torch.tensor(np.moveaxis(x, problem.axes[0], 1), dtype=TORCH_DTYPES[problem.dtype])

    def back(self, y: np.ndarray, problem: Problem) -> np.ndarray:
        return np.moveaxis(np.asarray(y, np.float64), 1, problem.axes[0])

    # -- the trip to deployment

    def exported(self, model: torch.nn.Sequential, x: torch.Tensor) -> bytes:
        """The ONNX model's bytes, exported once per exporter, shape, mode and state."""
        # repr(model) holds what the state does not: eps, momentum, affine, the layer types
        digest = hashlib.sha256(
            f"{self.exporter} {x.dtype} {tuple(x.shape)} {model.training} {model!r}".encode())
        for t in model.state_dict().values():
            digest.update(t.detach().cpu().numpy().tobytes())
        key = digest.hexdigest()
        if key not in _EXPORTS:
            _EXPORTS[key] = self._export(model, x)
        return _EXPORTS[key]

    def _export(self, model: torch.nn.Sequential, x: torch.Tensor) -> bytes:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation notices of the TorchScript exporter
            if self.exporter.startswith("dynamo"):
                _quiet()
                mode = torch.onnx.TrainingMode.TRAINING if model.training else torch.onnx.TrainingMode.EVAL
                program = torch.onnx.export(model, (x,), dynamo=True, verbose=False, training=mode)
                return program.model_proto.SerializeToString()
            f = io.BytesIO()
            if self.exporter == "torchscript-training":
                torch.onnx.export(model, (x,), f, dynamo=False, training=torch.onnx.TrainingMode.TRAINING,
                                  do_constant_folding=False)
            else:
                torch.onnx.export(model, (x,), f, dynamo=False)
            return f.getvalue()

    def run_artefact(self, model: torch.nn.Sequential, x: np.ndarray, problem: Problem) -> np.ndarray:
        """The model, in the mode it is in, through this id's path, on one batch (case layout)."""
        xt = self.tensor(x, problem)
        if self.exporter == "fuse":
            pre, bn = model[0], model[1]
            fuse = fuse_linear_bn_eval if isinstance(pre, torch.nn.Linear) else fuse_conv_bn_eval
            with torch.no_grad():
                return self.back(to_numpy(fuse(pre.eval(), bn.eval())(xt)), problem)
        data = self.exported(model, xt)
        feed = np.ascontiguousarray(xt.numpy(), dtype=NUMPY_DTYPES[problem.dtype])
        if self.runtime == "openvino":
            return self.back(run_openvino(data, feed), problem)
        try:
            session = onnxruntime_session(data, optimized=self.runtime == "ort-all")
        except ort.capi.onnxruntime_pybind11_state.NotImplemented as exc:  # as adapters/onnx_runtime.py
            raise NotExpressible(f"ONNX Runtime CPU cannot run the exported model: {exc}") from exc
        return self.back(run_session(session, feed), problem)

    def train(self, problem: Problem) -> TrainingRun:
        model = self.source(problem).train()
        with torch.no_grad():
            for x in problem.batches[:-1] if self.exporter in TRAINING_EXPORTS else problem.batches:
                model(self.tensor(x, problem))
        if self.exporter in TRAINING_EXPORTS:
            return TrainingRun(output=self.run_artefact(model, problem.batches[-1], problem),
                               moving_mean=None, moving_variance=None)
        return TrainingRun(output=None, moving_mean=None, moving_variance=None,
                           inference_output=self.run_artefact(model.eval(), problem.batches[-1], problem))

    def infer(self, problem: Problem) -> np.ndarray:
        return self.run_artefact(self.source(problem).eval(), problem.batches[-1], problem)

    def gradients(self, problem: Problem) -> Gradients:
        raise NotExpressible(self.why_not_expressible(problem, "gradients"))


def make(adapter_id: str) -> Adapter:
    return TorchExport(adapter_id)
