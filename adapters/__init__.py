"""Adapter registry: ids and families as DESIGN.md fixes them, modules imported only on demand.

Importing this package imports no framework: `load(id)` imports the one module asked for.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

from adapters.base import Adapter


@dataclass(frozen=True)
class AdapterInfo:
    id: str
    family: str
    module: str  # importable module with `make(adapter_id) -> Adapter`
    environment: tuple[tuple[str, str], ...] = ()  # variables its process needs before imports


ADAPTERS: dict[str, AdapterInfo] = {
    info.id: info
    for info in [
        AdapterInfo("tf-layers", "tf", "adapters.tf_layers", (("TF_USE_LEGACY_KERAS", "1"),)),
        AdapterInfo("tf-keras", "tf", "adapters.tf_keras_layer", (("TF_USE_LEGACY_KERAS", "1"),)),
        AdapterInfo("tf-keras-unfused", "tf", "adapters.tf_keras_layer", (("TF_USE_LEGACY_KERAS", "1"),)),
        AdapterInfo("tf-nn", "tf", "adapters.tf_nn"),
        AdapterInfo("tf-nn-fused", "tf", "adapters.tf_nn_fused"),
        # `keras` runs on the backend the user chose (tensorflow when unset), fixed per process
        AdapterInfo("keras", "keras", "adapters.keras3",
                    (("KERAS_BACKEND", os.environ.get("KERAS_BACKEND", "tensorflow")),)),
        AdapterInfo("keras-jax", "keras", "adapters.keras3", (("KERAS_BACKEND", "jax"),)),
        AdapterInfo("keras-torch", "keras", "adapters.keras3", (("KERAS_BACKEND", "torch"),)),
        AdapterInfo("torch", "torch", "adapters.torch_module"),
        AdapterInfo("torch-functional", "torch", "adapters.torch_functional"),
        AdapterInfo("flax-linen", "jax", "adapters.flax_linen"),
        AdapterInfo("flax-nnx", "jax", "adapters.flax_nnx"),
        AdapterInfo("onnxruntime", "onnx", "adapters.onnx_runtime"),
    ]
}

def _extra_adapters(spec: str) -> list[AdapterInfo]:
    """Adapters from outside this package: BNCONFORM_EXTRA_ADAPTERS="id=family:module,..." names
    an importable module with `make(adapter_id)`. For converter authors running the suite on their
    own implementation, and for the suite's own crash-isolation tests."""
    out = []
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        adapter_id, _, rest = entry.partition("=")
        family, _, module = rest.partition(":")
        if not (adapter_id and family and module):
            raise ValueError(f"BNCONFORM_EXTRA_ADAPTERS entry {entry!r} is not id=family:module")
        out.append(AdapterInfo(adapter_id, family, module))
    return out


ADAPTERS.update((i.id, i) for i in _extra_adapters(os.environ.get("BNCONFORM_EXTRA_ADAPTERS", "")))

FAMILIES: dict[str, list[str]] = {}
for _info in ADAPTERS.values():
    FAMILIES.setdefault(_info.family, []).append(_info.id)

# Adapters that fix a process-wide setting another adapter of the same run would contradict:
# `--framework=all` leaves them out; `python -m conformance run` gives each its own process.
OWN_PROCESS = {"keras-jax", "keras-torch"}


def resolve(selection: str) -> list[str]:
    """Adapter ids for a `--framework` value: families and/or ids, comma-separated."""
    ids: list[str] = []
    for name in (part.strip() for part in selection.split(",")):
        if not name:
            continue
        if name == "all":
            chosen = [i for i in ADAPTERS if i not in OWN_PROCESS]
        elif name in FAMILIES:
            chosen = [i for i in FAMILIES[name] if i not in OWN_PROCESS]
        elif name in ADAPTERS:
            chosen = [name]
        else:
            valid = ", ".join(["all", *FAMILIES, *ADAPTERS])
            raise ValueError(f"unknown framework {name!r}; valid names: {valid}")
        ids.extend(i for i in chosen if i not in ids)
    if not ids:
        raise ValueError("--framework selects no adapter")
    environment: dict[str, tuple[str, str]] = {}
    for i in ids:
        for key, value in ADAPTERS[i].environment:
            if key in environment and environment[key][1] != value:
                raise ValueError(
                    f"{environment[key][0]} and {i} need different {key} and cannot share a "
                    "process; run them separately (python -m conformance run does)"
                )
            environment.setdefault(key, (i, value))
    return ids


def environment_for(ids: list[str]) -> dict[str, str]:
    """Environment variables that must be set before the selected adapters import anything."""
    return {key: value for i in ids for key, value in ADAPTERS[i].environment}


def load(adapter_id: str) -> Adapter:
    """Import the adapter's module (and so its framework) and build the adapter."""
    info = ADAPTERS[adapter_id]
    module = importlib.import_module(info.module)
    return module.make(adapter_id)
