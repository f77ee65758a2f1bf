"""Two CUDA-only behaviours of torch's batch norm found by the suite's GPU run (cases on
`--device cuda`), reduced to plain torch for an upstream report. Prints one line per variation.

    python docs/repro/torch_cuda_batch_norm.py            # needs a CUDA build of torch and a GPU

1. `F.batch_norm(x, rm, rv, weight=None, bias=b, training=True)` then `backward()` raises
   "tensor does not have a device" on CUDA (scale off: no weight, a trainable bias); the CPU computes it.
2. `eps=0` is refused on CUDA ("batch_norm eps must be positive") in eval mode; the CPU computes
   x / sqrt(var) there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attempt(label: str, fn) -> None:
    try:
        fn()
        print(f"{label}: ok")
    except Exception as exc:  # the message is the finding
        print(f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0]}")


def backward_without_weight(device: str, dtype: torch.dtype, shape: tuple[int, ...], bias: bool,
                            weight_dtype: torch.dtype | None = None) -> None:
    c = shape[1]
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    pdtype = weight_dtype or dtype
    rm, rv = torch.zeros(c, device=device, dtype=pdtype), torch.ones(c, device=device, dtype=pdtype)
    b = torch.zeros(c, device=device, dtype=pdtype, requires_grad=True) if bias else None
    y = F.batch_norm(x, rm, rv, None, b, training=True, eps=1e-3)
    y.backward(torch.ones_like(y))


def eps_zero(device: str, training: bool, cudnn: bool) -> None:
    with torch.backends.cudnn.flags(enabled=cudnn):
        x = torch.randn(4, 3, 2, 2, device=device)
        F.batch_norm(x, torch.zeros(3, device=device), torch.ones(3, device=device), training=training,
                     eps=0.0)


if __name__ == "__main__":
    print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
    devices = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    for device in devices:
        for dtype in (torch.float32, torch.float64, torch.float16):
            for shape in ((8, 3), (4, 3, 2, 2)):
                for bias in (True, False):
                    attempt(f"{device} backward weight=None bias={bias} {dtype} {shape}",
                            lambda d=device, t=dtype, s=shape, b=bias: backward_without_weight(d, t, s, b))
        attempt(f"{device} backward weight=None bias=True bfloat16 input, float32 bias (4, 3, 2, 2)",
                lambda d=device: backward_without_weight(d, torch.bfloat16, (4, 3, 2, 2), True,
                                                         torch.float32))
        with torch.backends.cudnn.flags(enabled=False):
            attempt(f"{device} backward weight=None bias=True float32 (4, 3, 2, 2), cudnn off",
                    lambda d=device: backward_without_weight(d, torch.float32, (4, 3, 2, 2), True))
        for training in (False, True):
            for cudnn in (True, False):
                attempt(f"{device} eps=0 training={training} cudnn={cudnn}",
                        lambda d=device, t=training, c=cudnn: eps_zero(d, t, c))
