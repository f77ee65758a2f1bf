"""Adapter registry: stable ids and families (README), modules imported only on demand.

Importing this package imports no framework: `load(id)` imports the one module asked for.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from importlib import metadata

from adapters.base import Adapter


@dataclass(frozen=True)
class AdapterInfo:
    id: str
    family: str
    module: str  # "module" with `make(adapter_id) -> Adapter`, or "module:factory"
    environment: tuple[tuple[str, str], ...] = ()  # variables its process needs before imports


# JAX sees this many host CPU devices (set before JAX starts); other JAX adapters use the first one
JAX_HOST_DEVICES = (("XLA_FLAGS", "--xla_force_host_platform_device_count=4"),)

ADAPTERS: dict[str, AdapterInfo] = {
    info.id: info
    for info in [
        AdapterInfo("tf-layers", "tf", "adapters.tf_layers", (("TF_USE_LEGACY_KERAS", "1"),)),
        AdapterInfo("tf-keras", "tf", "adapters.tf_keras_layer", (("TF_USE_LEGACY_KERAS", "1"),)),
        AdapterInfo("tf-keras-unfused", "tf", "adapters.tf_keras_layer", (("TF_USE_LEGACY_KERAS", "1"),)),
        AdapterInfo("tf-slim", "tf", "adapters.tf_slim", (("TF_USE_LEGACY_KERAS", "1"),)),
        AdapterInfo("tf-nn", "tf", "adapters.tf_nn"),
        AdapterInfo("tf-nn-fused", "tf", "adapters.tf_nn_fused"),
        # `keras` runs on the backend the user chose (tensorflow when unset), fixed per process
        AdapterInfo("keras", "keras", "adapters.keras3",
                    (("KERAS_BACKEND", os.environ.get("KERAS_BACKEND", "tensorflow")),)),
        AdapterInfo("keras-jax", "keras", "adapters.keras3", (("KERAS_BACKEND", "jax"),)),
        AdapterInfo("keras-torch", "keras", "adapters.keras3", (("KERAS_BACKEND", "torch"),)),
        AdapterInfo("torch", "torch", "adapters.torch_module"),
        AdapterInfo("torch-functional", "torch", "adapters.torch_functional"),
        AdapterInfo("torch-compile", "torch-compile", "adapters.torch_compile"),
        AdapterInfo("flax-linen", "jax", "adapters.flax_linen"),
        AdapterInfo("flax-nnx", "jax", "adapters.flax_nnx"),
        AdapterInfo("onnxruntime", "onnx", "adapters.onnx_runtime"),
        # export paths (issue 15): the source framework's layer taken to a deployment runtime
        *(AdapterInfo(i, "torch-export", "adapters.torch_export") for i in (
            "torch-fuse", "torch-onnx", "torch-onnx-ortopt", "torch-onnx-dynamo", "torch-onnx-dynamo-ortopt",
            "torch-onnx-openvino", "torch-onnx-training", "torch-onnx-dynamo-training")),
        *(AdapterInfo(i, "tf-export", "adapters.tf_export", (("TF_USE_LEGACY_KERAS", "1"),)) for i in (
            "tf-keras-tflite", "tf-keras-tf2onnx", "tf-keras-tf2onnx-openvino", "tf-layers-tflite",
            "tf-layers-tflite-training-default",
            "tf-layers-tflite-no-update-ops")),
        *(AdapterInfo(i, "keras-export", "adapters.keras_export", (("KERAS_BACKEND", backend),))
          for i, backend in (("keras-tflite", "tensorflow"), ("keras-onnx", "tensorflow"),
                             ("keras-onnx-openvino", "tensorflow"),
                             ("keras-torch-onnx", "torch"), ("keras-jax-onnx", "jax"))),
        # data-parallel replicas (params.replicas cases only) on each framework's own engine
        AdapterInfo("tf-keras-mirrored", "tf", "adapters.tf_mirrored"),
        AdapterInfo("keras-mirrored", "keras", "adapters.tf_mirrored", (("KERAS_BACKEND", "tensorflow"),)),
        AdapterInfo("torch-sync", "torch", "adapters.torch_sync"),
        AdapterInfo("flax-linen-pmap", "jax", "adapters.flax_replicas", JAX_HOST_DEVICES),
        AdapterInfo("flax-nnx-shard", "jax", "adapters.flax_replicas", JAX_HOST_DEVICES),
    ]
}

def _extra_adapters(spec: str) -> list[AdapterInfo]:
    """Adapters from outside this package: BNCONFORM_EXTRA_ADAPTERS="id=family:module,..." names
    an importable module with `make(adapter_id)`. A shortcut for trying an adapter without
    installing it; installed packages use the entry-point group below."""
    out = []
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        adapter_id, _, rest = entry.partition("=")
        family, _, module = rest.partition(":")
        if not (adapter_id and family and module):
            raise ValueError(f"BNCONFORM_EXTRA_ADAPTERS entry {entry!r} is not id=family:module")
        out.append(AdapterInfo(adapter_id, family, f"{module}:make"))
    return out


ENTRY_POINT_GROUP = "bnconform.adapters"


def _installed_adapters() -> list[AdapterInfo]:
    """Adapters from installed packages, as pytest finds its plugins: entry points in the group
    `bnconform.adapters`, name = adapter id, value = `module:factory` (called with the id). An
    entry point may name its family as an extra, `module:factory [family]`; otherwise the
    adapters of one distribution form one family (one process in `python -m conformance run`)."""
    out = []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        family = ep.extras[0] if ep.extras else (dist.name if dist is not None and dist.name else ep.name)
        out.append(AdapterInfo(ep.name, family, ep.value.split("[")[0].strip()))
    return out


for _info in [*_installed_adapters(), *_extra_adapters(os.environ.get("BNCONFORM_EXTRA_ADAPTERS", ""))]:
    ADAPTERS.setdefault(_info.id, _info)  # never replace a built-in id

FAMILIES: dict[str, list[str]] = {}
for _info in ADAPTERS.values():
    FAMILIES.setdefault(_info.family, []).append(_info.id)

# Adapters that fix a process-wide setting another adapter of the same run would contradict:
# `--framework=all` leaves them out; `python -m conformance run` gives each its own process.
# The MirroredStrategy adapters configure logical CPU devices, which TF allows only before it starts.
OWN_PROCESS = {"keras-jax", "keras-torch", "keras-torch-onnx", "keras-jax-onnx", "tf-keras-mirrored",
               "keras-mirrored"}


def resolve(selection: str, own_process_too: bool = False) -> list[str]:
    """Adapter ids for a `--framework` value: families and/or ids, comma-separated. In one pytest
    process, `all` and family names leave out OWN_PROCESS adapters (named alone they run);
    `own_process_too` keeps them, for callers that start a process per group."""
    ids: list[str] = []
    for name in (part.strip() for part in selection.split(",")):
        if not name:
            continue
        if name == "all":
            chosen = list(ADAPTERS)
        elif name in FAMILIES:
            chosen = FAMILIES[name]
        elif name in ADAPTERS:
            chosen = [name]
        else:
            valid = ", ".join(["all", *FAMILIES, *ADAPTERS])
            raise ValueError(f"unknown framework {name!r}; valid names: {valid}")
        if not own_process_too and (name == "all" or name in FAMILIES):
            chosen = [i for i in chosen if i not in OWN_PROCESS]
        ids.extend(i for i in chosen if i not in ids)
    if not ids:
        raise ValueError("--framework selects no adapter")
    if not own_process_too:
        _check_one_environment(ids)
    return ids


def _check_one_environment(ids: list[str]) -> None:
    environment: dict[str, tuple[str, str]] = {}
    for i in ids:
        for key, value in ADAPTERS[i].environment:
            if key in environment and environment[key][1] != value:
                raise ValueError(
                    f"{environment[key][0]} and {i} need different {key} and cannot share a "
                    "process; run them separately (python -m conformance run does)"
                )
            environment.setdefault(key, (i, value))


def environment_for(ids: list[str]) -> dict[str, str]:
    """Environment variables that must be set before the selected adapters import anything."""
    return {key: value for i in ids for key, value in ADAPTERS[i].environment}


def load(adapter_id: str) -> Adapter:
    """Import the adapter's module (and so its framework) and build the adapter."""
    info = ADAPTERS[adapter_id]
    module_name, _, factory = info.module.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, factory or "make")(adapter_id)
