#!/bin/sh
# The one script a GPU host runs: the torch and JAX families (the replica adapters among them) on
# the GPU, results in results/gpu/, ready to merge with a CPU run into one report. Nothing here runs
# without a GPU: it stops first if torch or JAX sees none.
#
# Setup on the GPU host, in the checkout (the pinned wheels are CPU-only; swap in CUDA builds of the
# same versions):
#   make install
#   .venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
#   .venv/bin/pip install "jax[cuda12]==0.10.2"
# Then:
#   sh benchmarks/gpu_host.sh                      # results/gpu/{torch,jax}.json and a GPU-only report
#   .venv/bin/python -m reports results/*.json results/gpu/*.json -o results/cpu-and-gpu.html
# (results/*.json from `python -m conformance run` on any CPU machine; copy them over, or copy
# results/gpu/ back.) GPU columns are named `<adapter> @ cuda`, next to the CPU ones.
#
# What to look at: torch-sync's synchronized cases run there (SyncBatchNorm refuses CPU tensors);
# flax-linen-pmap / flax-nnx-shard with count above the number of GPUs are not expressible (JAX
# sees that many devices), and run on as many GPUs as the host has (a host with 4 GPUs runs every
# case of cases/replicas/ there). torch-sync runs every replica case on any number of GPUs: nccl
# where each rank has a GPU of its own, gloo where ranks share one (measured on one H200, stop 23).
#
# Variables: PY (the Python, default .venv/bin/python), OUT (results folder), FRAMEWORKS (default
# torch,jax,torch-compile,keras-jax,keras-torch: every adapter that honours --device), TIMEOUT
# (seconds per family process, default 1800).
set -eu
PY=${PY:-.venv/bin/python}
OUT=${OUT:-results/gpu}
FRAMEWORKS=${FRAMEWORKS:-torch,jax,torch-compile,keras-jax,keras-torch}
# JAX takes 75% of the GPU's memory per process by default; the JAX processes of one run share it
export XLA_PYTHON_CLIENT_PREALLOCATE=false
BNCONFORM_DEVICE=cuda $PY -c "import adapters.torch_setup" \
    || { echo "torch sees no CUDA device: install a CUDA build of torch (see the top of $0)"; exit 2; }
BNCONFORM_DEVICE=cuda $PY -c "import adapters.jax_setup, jax; print('JAX devices:', jax.devices())" \
    || { echo "JAX sees no CUDA device: install jax[cuda12] (see the top of $0)"; exit 2; }
nvidia-smi --query-gpu=name,memory.total --format=csv || true
$PY -m conformance run --framework="$FRAMEWORKS" --device=cuda --results-dir "$OUT" --timeout "${TIMEOUT:-1800}"
