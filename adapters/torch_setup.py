"""Process-wide torch settings shared by the torch adapters: the device `--device` asked for.

On `cpu` (the default) nothing changes. On `cuda` every tensor and module the adapters create is
made there (`torch.set_default_device`), and results are copied back with `.cpu()`. Asking for a
device torch does not see fails the adapter's load, naming the device: never a silent CPU run.
"""

from __future__ import annotations

import numpy as np
import torch

from adapters.base import requested_device

DEVICE = torch.device(requested_device())
if DEVICE.type == "cuda":
    if not torch.cuda.is_available():
        raise RuntimeError(f"--device cuda: torch {torch.__version__} sees no CUDA device")
    torch.set_default_device(DEVICE)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A result as float64 NumPy, copied from the device first."""
    return t.detach().to(torch.float64).cpu().numpy()
