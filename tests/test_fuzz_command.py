"""`python -m conformance fuzz` on the NumPy fake adapter: a short budget finds each injected defect by
name, writes a minimal valid case per group, and pytest on that case reproduces the group."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conformance import ROOT
from conformance.loader import load_file

DEFECTS = {"fake-momentum-complement": "momentum-complement", "fake-stats-never-updated": "stats-frozen",
           "fake-sum-of-squares": "variance-sum-of-squares"}
ENV = dict(os.environ, PYTHONPATH=str(ROOT),
           BNCONFORM_EXTRA_ADAPTERS=",".join(f"{a}=fake:tests.meta_tests.fake_adapter" for a in DEFECTS))


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("fuzz")
    proc = subprocess.run([sys.executable, "-m", "conformance", "fuzz", f"--framework={','.join(DEFECTS)}",
                           "--budget=20", "--max-cases=250", "--seed=3", f"--out={out}"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, json.loads((out / "summary.json").read_text())


def test_each_injected_defect_is_found_by_name(fuzzed):
    _, summary = fuzzed
    found = {(g["signature"].split()[0], g["signature"]) for g in summary["groups"]}
    for adapter, variant in DEFECTS.items():
        assert any(a == adapter and variant in sig for a, sig in found), (adapter, sorted(found))
    assert summary["families"]["fake"]["checks_per_s"] > 0


def test_every_group_is_a_valid_case_that_pytest_reproduces(fuzzed):
    out, summary = fuzzed
    group = next(g for g in summary["groups"]  # an explained one (with momentum null it is not)
                 if g["signature"] == "fake-momentum-complement training fail momentum-complement")
    path = out / group["case"]
    assert not load_file(path)[1]  # valid, expected values filled
    results = out / "rerun.json"
    subprocess.run([sys.executable, "-m", "pytest", "-c", "pyproject.toml", str(path), "-q", "-p",
                    "no:cacheprovider", "--framework=fake-momentum-complement", f"--results={results}"],
                   cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    [record] = [r for r in json.loads(results.read_text())["records"] if r["check"] == "training"]
    adapter, check, status, why = group["signature"].split(" ", 3)
    assert (record["adapter"], record["check"], record["status"]) == (adapter, check, status)
    assert record["explained_by"][0] == why
