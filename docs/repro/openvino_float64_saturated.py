"""OpenVINO on a float64 model: converted to float32 and back, saturating at ±float32 max both ways.

Found by the fuzzer (issue 16: torch-onnx-openvino, float64, a moving variance of 0 with eps 0, where
the reference gives ±inf and OpenVINO ±3.4028235e38). OpenVINO's CPU plugin has no f64 kernels: the
model is compiled to float32 between two Convert nodes, and the CPU plugin's Convert clamps to the
range both types share (src/plugins/intel_cpu/src/nodes/common/cpu_convert.cpp at 00262eae2491,
ConvertPrecision: `dst[i] = static_cast<dst_t>(std::max(std::min(src[i], ubound), lbound))`, the
bounds float32's lowest and max for f64 -> f32 and for f32 -> f64 alike; std::min/max keep a NaN).
So an input past float32's range comes in as ±max, and an output that is ±inf in float32 goes out as
±max; the constants are clamped the same way when the model is converted (ConvertPrecision's
convert_value, docs/repro/openvino_inf_constants.py). This is the variant `float32-saturated`.

What runs between the Converts, measured below bit for bit (NaN equal to NaN):
- A BatchNormalization node alone: ((x + (-mean))·s) + beta in float32, s = gamma/sqrt(var + eps)
  from the converted constants (one fused Eltwise, "Add, Multiply, y"), not folded into x·s + shift
  as OpenVINO does to a float32 model (there: NaN where x and the mean share a sign).
- Conv + BN exported by torch's TorchScript exporter (ranks 3-5): the exporter folds BN into the Conv
  in float64, W' = W·s and b' = (b - mean)·s + beta; OpenVINO converts W' and b' saturating and its
  convolution sums acc = fma(x_i, W'_i, acc) from 0 in input-channel order, adding b' last
  (`variants._folded_into_layer`, form centred). A Linear + BN (rank 2) stays a BatchNormalization
  node: the first form.
`conformance.variants.simulate` with the variant's knobs is compared with each output.

    python docs/repro/openvino_float64_saturated.py [--draws N --seed S]

Output with openvino 2026.4.1, torch 2.13.0 (x86-64, AVX512):

    BN alone, var 0 and eps 0, mean [0.1, -0.1, 0.0, 0.0], gamma [1.0, 1.0, 2.0, -1.0],
      beta [0.5, 0.0, 0.0, 1.0]
      runtime graph: Input f64, Convert f32, Eltwise f32, Convert f64, Output f64
      x [-2.0, -0.5, 0.5, 2.0]         -> [-3.40282347e+38 -3.40282347e+38  3.40282347e+38 -3.40282347e+38]
      x [1e+300, -1e+300, 0.0, 1.0]    -> [ 3.40282347e+38 -3.40282347e+38             nan -3.40282347e+38]
      float32-saturated equal: True
    BN alone, var 1, gamma 2: x [3e38, -3e38, 1e38] -> [ 3.40282347e+38 -3.40282347e+38  1.99999994e+38]
      float32-saturated equal: True
    Conv2d 1x1 + BN (TorchScript: Conv), var 0, eps 0:
      W [[1.0, 2.0, 0.5], [0.5, -1.0, 0.25], [-0.5, 0.25, 1.0]]
      rows [0.5, -1.5, 0.75], [0.25, 1.0, -0.5]
      OpenVINO            [-3.40282347e+38  3.40282347e+38 -3.40282347e+38]
                          [ 3.40282347e+38 -3.40282347e+38 -2.55211775e+38]
      bias added first    [-3.40282347e+38  3.40282347e+38 -3.40282347e+38]
                          [-8.50705816e+37  3.40282347e+38 -3.40282347e+38]
      float32-saturated equal: True
    One-channel Conv + BN (TorchScript folds), W -0.5, mean 0.6, var 0, eps 0, x = -1.3:
      rank 3: x [-1.3, -0.5, 2.0] -> [ 3.40282347e+38 -1.70141173e+38 -3.40282347e+38]  equal to: bias last
      rank 4: x [-1.3, -0.5, 2.0] -> [ 1.02084684e+38 -1.70141173e+38 -3.40282347e+38]  equal to: bias first
      rank 5: x [-1.3, -0.5, 2.0] -> [ 1.02084684e+38 -1.70141173e+38 -3.40282347e+38]  equal to: bias first

The order is oneDNN's kernel's, picked per shape and CPU. `--draws 200 --seed 1`, 2 and 3 (600 random
draws: ranks 2-5, 1-8 channels, weights and biases with zeros, moving variances 0, 1e-300, 1e-320,
1e-80 and 0.5, gamma down to 1e-200, inputs up to ±1e300; finite outputs compared to rtol 1e-5) put
every draw within a form: a rank-2 model (Linear + BatchNormalization node) and BN alone the plain
form; a Conv of two or more channels bias last (or both orders, where they agree), never bias
first alone; a one-channel Conv either order (bias first alone once, rank 5). A constant the
conversion leaves subnormal in float32 (gamma 1e-200 over sqrt(1e-320): s = 1e-40) is read as 0 by
the convolution (three draws of seed 1 before that was modelled).
"""

from __future__ import annotations

import io
import tempfile

import numpy as np
import onnx
import openvino
import torch
from onnx import TensorProto, helper, numpy_helper

from adapters.base import Preceding, Problem
from conformance import variants

np.set_printoptions(linewidth=140)
SATURATED = variants.Knobs(compute_dtype="float32", float32_saturated=True)
CONVS = {3: torch.nn.Conv1d, 4: torch.nn.Conv2d, 5: torch.nn.Conv3d}
BATCH_NORMS = {3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}
FOLDED = variants.replace(SATURATED, folded_into_layer="centred", layer_bias_last=True)
FOLDED_BIAS_FIRST = variants.replace(FOLDED, layer_bias_last=False)


def compile_onnx(model: bytes) -> openvino.CompiledModel:
    """As adapters/exports.py run_openvino: CPU, f32, one thread."""
    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/model.onnx"
        with open(path, "wb") as f:
            f.write(model)
        core = openvino.Core()
        return core.compile_model(core.read_model(path), "CPU",
                                  {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32"})


def bn_node(gamma, beta, mean, var, eps: float) -> bytes:
    c = len(gamma)
    inits = [numpy_helper.from_array(np.asarray(v, np.float64), n)
             for v, n in zip((gamma, beta, mean, var), "gbmv", strict=True)]
    node = helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"], epsilon=eps)
    x, y = (helper.make_tensor_value_info(name, TensorProto.DOUBLE, [None, c]) for name in "xy")
    graph = helper.make_graph([node], "bn", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]).SerializeToString()


def problem(x, gamma, beta, mean, var, preceding=None) -> Problem:
    return Problem(case_id="repro", dtype="float64", batches=(np.asarray(x, np.float64),), axes=(1,),
                   momentum=0.9, epsilon=0.0, center=True, scale=True, gamma=np.asarray(gamma, np.float64),
                   beta=np.asarray(beta, np.float64), moving_mean=np.asarray(mean, np.float64),
                   moving_variance=np.asarray(var, np.float64), preceding=preceding)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.array_equal(np.asarray(a).ravel(), np.asarray(b).ravel(), equal_nan=True))


def bn_alone() -> None:
    gamma, beta, mean, var = [1.0, 1.0, 2.0, -1.0], [0.5, 0.0, 0.0, 1.0], [0.1, -0.1, 0.0, 0.0], [0.0] * 4
    compiled = compile_onnx(bn_node(gamma, beta, mean, var, 0.0))
    print(f"BN alone, var 0 and eps 0, mean {mean}, gamma {gamma},\n  beta {beta}")
    ops = [(op.get_rt_info()["layerType"].astype(str), op.get_rt_info()["outputPrecisions"].astype(str))
           for op in compiled.get_runtime_model().get_ordered_ops()]
    print("  runtime graph:", ", ".join(f"{kind} {precision}" for kind, precision in ops if kind != "Const"))
    x = np.array([[-2.0, -0.5, 0.5, 2.0], [1e300, -1e300, 0.0, 1.0]])
    y = np.asarray(compiled([x])[0])
    for row, out in zip(x, y, strict=True):
        print(f"  x {row.tolist()!s:30s} -> {out}")
    expected = variants.simulate(problem(x, gamma, beta, mean, var), "inference", SATURATED)["output"]
    print("  float32-saturated equal:", same(y, expected))
    compiled = compile_onnx(bn_node([2.0] * 3, [0.0] * 3, [0.0] * 3, [1.0] * 3, 0.0))
    x = np.array([[3e38, -3e38, 1e38]])
    y = np.asarray(compiled([x])[0])
    print(f"BN alone, var 1, gamma 2: x [3e38, -3e38, 1e38] -> {y[0]}")
    p = problem(x, [2.0] * 3, [0.0] * 3, [0.0] * 3, [1.0] * 3)
    print("  float32-saturated equal:", same(y, variants.simulate(p, "inference", SATURATED)["output"]))


def conv_bn_folded() -> None:
    weight = np.array([[1.0, 2.0, 0.5], [0.5, -1.0, 0.25], [-0.5, 0.25, 1.0]])
    mean, var = [0.25, -0.75, 1.5], [0.0] * 3
    conv, bn = CONVS[4](3, 3, 1, bias=False).double(), BATCH_NORMS[4](3, eps=0.0).double()
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(weight)[:, :, None, None])
        bn.running_mean.copy_(torch.tensor(mean))
        bn.running_var.copy_(torch.tensor(var))
    model = torch.nn.Sequential(conv, bn).eval()
    x = np.array([[0.5, -1.5, 0.75], [0.25, 1.0, -0.5]])
    buffer = io.BytesIO()
    torch.onnx.export(model, (torch.tensor(x)[:, :, None, None],), buffer, dynamo=False)
    nodes = [n.op_type for n in onnx.load_from_string(buffer.getvalue()).graph.node]
    y = np.asarray(compile_onnx(buffer.getvalue())([x[:, :, None, None]])[0]).reshape(2, 3)
    print(f"Conv2d 1x1 + BN (TorchScript: {', '.join(nodes)}), var 0, eps 0:\n  W {weight.tolist()}")
    print(f"  rows {x[0].tolist()}, {x[1].tolist()}")
    print("  OpenVINO           ", y[0], "\n                     ", y[1])
    p = problem(x, [1.0] * 3, [0.0] * 3, mean, var, Preceding(weight=weight, bias=np.zeros(3)))
    first = variants.simulate(p, "inference", FOLDED_BIAS_FIRST)["output"]
    print("  bias added first   ", first[0], "\n                     ", first[1])
    print("  float32-saturated equal:", same(y, variants.simulate(p, "inference", FOLDED)["output"]))


def one_channel() -> None:
    """One channel: W' = -0.5·inf and b' = -0.6·inf, saturated; x = -1.3 gives 1.3·max, which
    overflows if summed before b' and is 0.3·max if fused with it."""
    print("One-channel Conv + BN (TorchScript folds), W -0.5, mean 0.6, var 0, eps 0, x = -1.3:")
    for rank in (3, 4, 5):
        conv = CONVS[rank](1, 1, 1, bias=False).double()
        bn = BATCH_NORMS[rank](1, eps=0.0).double()
        with torch.no_grad():
            conv.weight.fill_(-0.5)
            bn.running_mean.fill_(0.6)
            bn.running_var.zero_()
        shape = (3, 1) + (1,) * (rank - 2)
        buffer = io.BytesIO()
        torch.onnx.export(torch.nn.Sequential(conv, bn).eval(), (torch.zeros(shape, dtype=torch.float64),),
                          buffer, dynamo=False)
        x = np.array([-1.3, -0.5, 2.0]).reshape(shape)
        y = np.asarray(compile_onnx(buffer.getvalue())([x])[0]).ravel()
        p = problem(x, [1.0], [0.0], [0.6], [0.0], Preceding(weight=np.array([[-0.5]]), bias=np.zeros(1)))
        forms = [name for name, knobs in (("bias last", FOLDED), ("bias first", FOLDED_BIAS_FIRST))
                 if same(y, variants.simulate(p, "inference", knobs)["output"])]
        print(f"  rank {rank}: x [-1.3, -0.5, 2.0] -> {y}  equal to: {', '.join(forms)}")


def random_draws(count: int, seed: int) -> None:
    """torch-onnx-openvino on random float64 draws, each output compared with the variant's forms."""
    from adapters import torch_export

    adapter, rng, tally = torch_export.make("torch-onnx-openvino"), np.random.default_rng(seed), {}
    forms = {"plain": SATURATED, "bias last": FOLDED, "bias first": FOLDED_BIAS_FIRST}
    for _ in range(count):
        rank, c = int(rng.integers(2, 6)), int(rng.choice([1, 2, 3, 4, 5, 8]))
        x = rng.normal(0, rng.choice([1.0, 3.0]), (int(rng.integers(1, 4)), c, *rng.integers(1, 3, rank - 2)))
        if rng.random() < 0.3:
            x.flat[rng.integers(x.size)] = rng.choice([1e39, -1e300, 5e38])
        var, preceding = rng.choice([0.0, 1e-300, 1e-320, 1e-80, 0.5], c), None
        if rng.random() < 0.8:
            weight = np.where(rng.random((c, c)) < 0.2, 0.0, rng.normal(0, 1, (c, c)))
            bias = np.zeros(c) if rng.random() < 0.3 else rng.normal(0, 1, c)
            preceding = Preceding(weight=weight, bias=bias)
        p = problem(x, rng.choice([1.0, -0.5, 2.0, 1e-200], c), rng.normal(0, 1, c), rng.normal(0, 1, c), var,
                    preceding)
        y = adapter.infer(p)
        # finite outputs to float32's rounding: OpenVINO multiplies by s where the simulation divides
        equal = [name for name, knobs in forms.items() if (preceding or name == "plain")
                 and np.allclose(y, variants.simulate(p, "inference", knobs)["output"], rtol=1e-5, atol=1e-6,
                                 equal_nan=True)]
        layer = "layer" if preceding else "no layer"
        key = f"rank {rank}, {'one channel' if c == 1 else 'channels > 1'}, {layer}"
        tally.setdefault(key, {}).setdefault(" = ".join(equal) or "none", 0)
        tally[key][" = ".join(equal) or "none"] += 1
    for key in sorted(tally):
        print(f"  {key}: {tally[key]}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--draws", type=int, default=0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.draws:
        random_draws(args.draws, args.seed)
    else:
        bn_alone()
        conv_bn_folded()
        one_channel()
