"""One crashing framework never loses the others' results; results files are written atomically."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conformance.results import write_atomically

ROOT = Path(__file__).resolve().parent.parent

MISBEHAVING = '''
"""An adapter that misbehaves on purpose, selected only by tests/test_isolation.py."""
import os, signal, time
import numpy as np
from adapters.base import Adapter, Conventions

class Misbehaving(Adapter):
    family = "test"
    conventions = Conventions()

    def __init__(self, adapter_id):
        self.id = adapter_id

    def versions(self):
        return {}

    def misbehave(self):
        if self.id == "segfaulting":
            os.kill(os.getpid(), signal.SIGSEGV)
        time.sleep(3600)

    def train(self, problem):
        self.misbehave()

    def infer(self, problem):
        self.misbehave()

    def gradients(self, problem):
        self.misbehave()

def make(adapter_id):
    return Misbehaving(adapter_id)
'''


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "misbehaving_adapter.py").write_text(MISBEHAVING)
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}",
               BNCONFORM_EXTRA_ADAPTERS="segfaulting=crash:misbehaving_adapter,"
                                        "hanging=hang:misbehaving_adapter,ghost=ghost:no_such_module")
    return subprocess.run([sys.executable, "-m", "conformance", "run", "--no-report", "-j", "2",
                           "--results-dir", str(tmp_path / "results"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_a_segfaulting_family_is_reported_and_the_others_kept(tmp_path: Path):
    proc = run(tmp_path, "--framework=segfaulting,torch-functional", "--cases", str(ROOT / "cases/hand"))
    assert proc.returncode == 1
    assert "crash: crashed (SIGSEGV)" in proc.stdout
    assert "segfaulting" in proc.stdout.split("crash: crashed (SIGSEGV)")[1]  # the tail of its log
    kept = json.loads((tmp_path / "results" / "torch.json").read_text())
    statuses = [r["status"] for r in kept["records"]]  # hand cases of features torch lacks: not expressible
    assert set(statuses) <= {"pass", "not-expressible"} and statuses.count("pass") >= 6


def test_a_hanging_family_times_out(tmp_path: Path):
    proc = run(tmp_path, "--framework=hanging", "--timeout", "5", "--cases", str(ROOT / "cases/hand"))
    assert proc.returncode == 1
    assert "hang: timed out after 5 s" in proc.stdout


def test_a_family_that_cannot_import_is_reported_as_such(tmp_path: Path):
    proc = run(tmp_path, "--framework=ghost", "--cases", str(ROOT / "cases/hand"))
    assert proc.returncode == 1
    expected = "ghost: could not import: ghost: adapter ghost could not be loaded: ModuleNotFoundError"
    assert expected in proc.stdout


def test_an_interrupted_write_leaves_the_previous_results(tmp_path: Path, monkeypatch):
    path = tmp_path / "results.json"
    write_atomically(path, {"records": ["old"]})

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if the run were stopped between writing and renaming

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_atomically(path, {"records": ["new"]})
    assert json.loads(path.read_text()) == {"records": ["old"]}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left


def test_xdist_gives_the_same_records_as_a_serial_run(tmp_path: Path):
    def records(*extra: str) -> list[tuple]:
        out = tmp_path / f"r{len(extra)}.json"
        subprocess.run([sys.executable, "-m", "pytest", "conformance", "-q", "-p", "no:cacheprovider",
                        "--framework=torch-functional", "--cases", str(ROOT / "cases/hand"),
                        "--cases", str(ROOT / "cases/epsilon"), f"--results={out}", *extra],
                       cwd=ROOT, capture_output=True, timeout=600)
        data = json.loads(out.read_text())
        return sorted((r["case"], r["check"], r["status"], json.dumps(r["metrics"], sort_keys=True))
                      for r in data["records"])

    serial, parallel = records(), records("-n", "2")
    assert serial == parallel and len(serial) > 10
