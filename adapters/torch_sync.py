"""Data-parallel BatchNorm on `torch.distributed`, one process per replica, as the PyTorch DDP
tutorial runs it: `count` ranks started with `torch.multiprocessing`, a process group over a file
rendezvous, rank r fed shard r of the batch.

- synchronized -> `torch.nn.SyncBatchNorm` (what `SyncBatchNorm.convert_sync_batchnorm` puts in a
  model): statistics all-gathered with their counts (`batch_norm_gather_stats_with_counts`), so
  uneven shards weigh by their size; the running variance takes the whole batch's unbiased
  variance (n/(n-1) over every replica's rows). SyncBatchNorm runs only on GPU-like devices: on the
  CPU its forward raises once a process group exists (torch/nn/modules/batchnorm.py L843-855), so
  on `--device cpu` synchronized cases are not expressible with that message, captured from torch
  itself in a one-process gloo group.
- unsynchronized -> `torch.nn.BatchNorm1d/2d/3d` wrapped in `DistributedDataParallel` (default
  `broadcast_buffers=True`: rank 0's buffers are broadcast to every rank before each forward), the
  running statistics read back from rank 0's `state_dict()` (the checkpoint a DDP script saves).
  Runs on the CPU with gloo.
- Backend: gloo on the CPU; on `--device cuda` nccl with rank r on `cuda:r` where there is a GPU
  per rank, else gloo with rank r on `cuda:(r mod GPUs)`: nccl refuses two ranks on one GPU
  ("Duplicate GPU detected"), gloo takes CUDA tensors (SyncBatchNorm all-gathers through
  `dist.all_gather` on gloo, torch/nn/modules/_functions.py L64-83), and the statistics are
  combined by the same CUDA kernels either way. Processes are forked on the CPU (torch is already
  imported), spawned on CUDA (a forked child cannot use CUDA).
- momentum m -> `momentum=1 - m` (torch weighs the batch); null -> `momentum=None`; epsilon ->
  `eps=`; center/scale -> `affine=` (both or neither; one alone as adapters/torch_module.py does it:
  weight 1 or bias 0 frozen); channel axis moved to dim 1 and back.
- Train-then-infer: the read-back state loaded into a plain BatchNorm in eval mode on this process.
  The inference check: SyncBatchNorm / BatchNorm in eval mode, which never communicates.
"""

from __future__ import annotations

import functools
import importlib
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from adapters.base import (
    REPLICA_WHY,
    Adapter,
    Capabilities,
    Check,
    Conventions,
    Gradients,
    NotExpressible,
    Problem,
    TrainingRun,
)
from adapters.torch_setup import DEVICE, to_numpy

# Ranks are forked: a parent that has started OpenMP's thread pool leaves its children deadlocked in
# their first parallel op (measured: a forked rank hung after an eval call here). One thread never
# starts the pool, and the tiny tensors here gain nothing from more (adapters/torch_module.py too).
torch.set_num_threads(1)
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # every rank on this host: the loopback interface
RANK_TIMEOUT_S = 120
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                "float64": torch.float64}
MODULES = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}


def build(problem: Problem, synchronized: bool, device: torch.device) -> torch.nn.Module:
    """The layer with the Problem's parameters and state, on `device`."""
    momentum = None if problem.momentum is None else 1.0 - problem.momentum
    kind = torch.nn.SyncBatchNorm if synchronized else MODULES[problem.rank]
    bn = kind(problem.gamma.size, eps=problem.epsilon, momentum=momentum, device=device,
              dtype=TORCH_DTYPES[problem.dtype])
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(problem.gamma))
        bn.bias.copy_(torch.tensor(problem.beta))
        bn.running_mean.copy_(torch.tensor(problem.moving_mean))
        bn.running_var.copy_(torch.tensor(problem.moving_variance))
    bn.weight.requires_grad_(problem.scale)
    bn.bias.requires_grad_(problem.center)
    return bn


def channels_first(x: np.ndarray, problem: Problem, device: torch.device) -> torch.Tensor:
    return torch.tensor(x, dtype=TORCH_DTYPES[problem.dtype], device=device).movedim(problem.axes[0], 1)


def rank_main(rank: int, problem: Problem, folder: str) -> None:
    """One replica: join the group, train on shard `rank` of every batch, save what it saw."""
    assert problem.replicas is not None
    count, synchronized = problem.replicas.count, problem.replicas.synchronized
    cuda = DEVICE.type == "cuda"
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    backend = backend_for(count)
    try:
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=f"file://{folder}/rendezvous", rank=rank,
                                world_size=count)
        bn = build(problem, synchronized, device)
        model = bn if synchronized else torch.nn.parallel.DistributedDataParallel(
            bn, device_ids=[device.index] if cuda else None)
        model.train()
        for x in problem.batches:
            y = model(channels_first(problem.replicas.shards(x)[rank], problem, device))
        state = {k: to_numpy(v) for k, v in bn.state_dict().items() if v.is_floating_point()}
        np.savez(f"{folder}/rank{rank}.tmp.npz", output=to_numpy(y.movedim(1, problem.axes[0])), **state)
        os.replace(f"{folder}/rank{rank}.tmp.npz", f"{folder}/rank{rank}.npz")  # whole, or not there
    except Exception:
        Path(f"{folder}/rank{rank}.error").write_text(traceback.format_exc())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()  # gloo's teardown sometimes hangs: `run_ranks` reaps


def backend_for(count: int) -> str:
    """nccl where every rank has a GPU of its own, gloo where ranks share one (or on the CPU)."""
    return "nccl" if DEVICE.type == "cuda" and torch.cuda.device_count() >= count else "gloo"


def run_ranks(problem: Problem, folder: str) -> list[dict[str, np.ndarray]]:
    """Start a process per rank and wait for every rank's results (or the first error): what each
    saved, by rank. A rank still alive then is stuck in gloo's teardown (measured: now and then
    after both ranks had saved) and is terminated."""
    assert problem.replicas is not None
    count = problem.replicas.count
    context = mp.start_processes(rank_main, args=(problem, folder), nprocs=count, join=False,
                                 start_method="spawn" if DEVICE.type == "cuda" else "fork")
    saved = [Path(f"{folder}/rank{r}.npz") for r in range(count)]
    reap(context, lambda: all(p.exists() for p in saved) or any(Path(folder).glob("*.error")))
    errors = sorted(Path(folder).glob("*.error"))
    if errors:
        raise RuntimeError(errors[0].read_text().strip().splitlines()[-1])
    if not all(p.exists() for p in saved):
        codes = [p.exitcode for p in context.processes]
        raise RuntimeError(f"{count} ranks gave no results in {RANK_TIMEOUT_S} s (exit codes {codes})")
    return [dict(np.load(p)) for p in saved]


def reap(context: mp.ProcessContext, done: Callable[[], bool]) -> None:
    """Wait until `done()` (every rank has answered), every process has exited, or RANK_TIMEOUT_S;
    then end the processes still alive (stuck in gloo's teardown, or in a rank that never got its
    peers)."""
    deadline = time.monotonic() + RANK_TIMEOUT_S
    while not done() and time.monotonic() < deadline and any(p.is_alive() for p in context.processes):
        time.sleep(0.02)
    for p in context.processes:
        p.join(timeout=0.5)
        if p.is_alive():
            p.kill()
            p.join()


def refusal_main(rank: int, folder: str) -> None:
    """A one-process gloo group calling SyncBatchNorm in training on a CPU tensor."""
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=1)
    try:
        torch.nn.SyncBatchNorm(1).train()(torch.zeros(2, 1))
        message = "(it ran)"
    except ValueError as exc:
        message = f"{type(exc).__name__}: {exc}"
    Path(f"{folder}/refusal.tmp").write_text(message)
    os.replace(f"{folder}/refusal.tmp", f"{folder}/refusal.txt")
    dist.destroy_process_group()


@functools.lru_cache(maxsize=1)
def cpu_refusal() -> str:
    """SyncBatchNorm's own message for a CPU tensor in training, from torch itself. In a child
    process: ranks forked after this process had a gloo group of its own would hang."""
    with tempfile.TemporaryDirectory() as folder:
        context = mp.start_processes(refusal_main, args=(folder,), nprocs=1, join=False, start_method="fork")
        answer = Path(f"{folder}/refusal.txt")
        reap(context, lambda: answer.exists())
        return answer.read_text() if answer.exists() else "(no answer from SyncBatchNorm)"


class TorchSync(Adapter):
    id = "torch-sync"
    family = "torch"
    conventions = Conventions(variants=("moving-variance-unbiased",),
                              notes=("running_var takes the unbiased batch variance (of the whole batch when "
                                     "synchronized, of rank 0's shard when not)",))
    capabilities = Capabilities(
        checks=frozenset({"training", "inference"}),
        min_rank=2, max_rank=5,
        features=frozenset({"replicas", "momentum-null"}),
        why={**REPLICA_WHY, "multi-axis": "torch BatchNorm normalizes over one channel dim (dim 1)",
             "rank": "BatchNorm1d takes 2-D/3-D input, BatchNorm2d 4-D, BatchNorm3d 5-D"},
    )

    def versions(self) -> dict[str, str]:
        return {"torch": torch.__version__}

    def device(self) -> str:
        return DEVICE.type

    def not_expressible(self, problem: Problem, check: Check) -> str | None:
        r = problem.replicas
        if r is None:
            return ("a replica adapter runs only cases with params.replicas; torch runs the rest in one "
                    "process")
        if problem.epsilon <= 0 and check == "training":
            return "torch rejects eps <= 0 in training (torch/nn/functional.py batch_norm)"
        if r.synchronized and check == "training" and DEVICE.type == "cpu":
            return f"SyncBatchNorm refuses CPU tensors in a process group: {cpu_refusal()}"
        if not r.synchronized and check == "training" and not (problem.center or problem.scale):
            # torch/nn/parallel/distributed.py L903-907 (measured by the fuzzer): a lone BatchNorm
            # without weight and bias has nothing to train; in a model DDP wraps the whole network
            return ("DistributedDataParallel refuses a module without a parameter that requires a "
                    "gradient (RuntimeError: DistributedDataParallel is not needed when a module "
                    "doesn't have any parameter that requires a gradient), and a lone BatchNorm with "
                    "center and scale off has none")
        return None

    def translations(self, problem: Problem) -> list[str]:
        r = problem.replicas
        assert r is not None
        layer = ("SyncBatchNorm" if r.synchronized
                 else f"{MODULES[problem.rank].__name__} in DistributedDataParallel")
        momentum = "None" if problem.momentum is None else f"{1 - problem.momentum:g}"
        where = (f"{backend_for(r.count)}, rank r on cuda:(r mod {torch.cuda.device_count()})"
                 if DEVICE.type == "cuda" else "gloo on the CPU")
        return [f"replicas {r.count} -> {r.count} torch.distributed ranks ({where}), rank r fed shard r",
                f"synchronized {r.synchronized} -> {layer}",
                f"momentum {problem.momentum} -> momentum={momentum} (1 - m)",
                f"epsilon {problem.epsilon:g} -> eps={problem.epsilon:g}",
                f"channel axis {problem.axes[0]} -> movedim({problem.axes[0]}, 1) and back",
                "running statistics read back from rank 0's state_dict()"]

    def train(self, problem: Problem) -> TrainingRun:
        if problem.replicas is None:  # the probes call train/infer directly
            raise NotExpressible(self.not_expressible(problem, "training"))
        # DistributedDataParallel imports torch._dynamo (2 s here): once in this process, not in each
        # forked rank
        importlib.import_module("torch._dynamo")
        with tempfile.TemporaryDirectory() as folder:
            ranks = run_ranks(problem, folder)
        state = ranks[0]
        run = TrainingRun(output=np.concatenate([r["output"] for r in ranks]),
                          moving_mean=state["running_mean"], moving_variance=state["running_var"])
        if problem.infer_after_training:
            bn = build(problem, False, DEVICE)
            with torch.no_grad():
                bn.running_mean.copy_(torch.tensor(state["running_mean"]))
                bn.running_var.copy_(torch.tensor(state["running_var"]))
            run.inference_output = self.eval_call(bn, problem)
        return run

    def eval_call(self, bn: torch.nn.Module, problem: Problem) -> np.ndarray:
        bn.eval()
        with torch.no_grad():
            y = bn(channels_first(problem.batches[-1], problem, DEVICE))
        return to_numpy(y.movedim(1, problem.axes[0]))

    def infer(self, problem: Problem) -> np.ndarray:
        if problem.replicas is None:
            raise NotExpressible(self.not_expressible(problem, "inference"))
        return self.eval_call(build(problem, problem.replicas.synchronized, DEVICE), problem)

    def gradients(self, problem: Problem) -> Gradients:
        raise NotExpressible(self.why_not_expressible(problem, "gradients"))


def make(adapter_id: str) -> Adapter:
    return TorchSync()
