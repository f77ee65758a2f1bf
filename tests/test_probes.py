"""Semantic probes: how measurements are held to documented values, and the CLI's JSON shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conformance.probes import PROBES, agrees, documented, on_device

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("measured", "doc", "expected"), [
    (0.9, {"value": 0.9}, True),
    (0.91, {"value": 0.9}, True),  # within the default 2%
    (0.99, {"value": 0.9}, False),
    (1.0e-3, {"value": 1.0e-5}, False),
    (0.0004, {"max": 0.01}, True),
    (9.9, {"min": 1.0}, True),
    (0.5, {"min": 1.0}, False),
    ("biased", {"value": "biased"}, True),
    ("biased", {"value": "unbiased"}, False),
    (True, {"value": True}, True),
    (1, {"value": True}, False),  # a number is not a bool
    (None, {"value": None}, True),
    ("error", {"max": 1.0}, False),
])
def test_agrees(measured, doc, expected):
    assert agrees(measured, doc) is expected


def test_documented_values_name_known_probes_and_have_sources():
    for adapter_id, probes in documented().items():
        for name, entry in probes.items():
            assert name in PROBES, f"{adapter_id}: unknown probe {name}"
            for doc in (on_device(entry, "cpu"), on_device(entry, "cuda")):
                assert doc.get("source"), f"{adapter_id}.{name} has no source"
                assert "value" in doc or "min" in doc or "max" in doc


def test_a_device_entry_replaces_the_documented_one_where_the_adapter_ran_there():
    """torch's float32 statistics: two-pass on the CPU (0.004 measured), a Welford on CUDA (0.0105
    on an H200): each held to its own kernel's bound."""
    entry = documented()["torch"]["large_mean_output_std_rel_error"]
    assert not agrees(0.0105, on_device(entry, "cpu"))
    assert agrees(0.0105, on_device(entry, "cuda"))
    assert on_device(entry, "cpu") is entry


def test_semantics_json_shape():
    proc = subprocess.run([sys.executable, "-m", "conformance", "semantics", "--framework=torch-functional",
                           "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert set(data) == {"torch-functional"}
    assert set(data["torch-functional"]) == set(PROBES)
    for entry in data["torch-functional"].values():
        assert set(entry) == {"value", "detail"} and entry["detail"]
    assert data["torch-functional"]["default_mode"]["value"] == "inference"
