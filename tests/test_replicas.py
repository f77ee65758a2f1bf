"""params.replicas and --device: validation, the feature gate, results merged across devices, the
report's table of what replicas' moving statistics read back as. (The reference and the variants
are tested in test_reference.py and test_variants.py; the engines by `pytest conformance` on
cases/replicas.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from adapters.base import DEVICE_VARIABLE, Capabilities, Problem, Replicas, requested_device
from conformance.loader import load_text
from conformance.problem import build
from conformance.results import Record, Results, Status, write_atomically
from reports.model import load
from reports.render import replica_readings

ROOT = Path(__file__).resolve().parent.parent

CASE = """\
id: replicas-case
input: {{shape: {shape}, random: {{seed: 0}}}}
params: {{axis: {axis}, replicas: {{count: {count}, synchronized: false}}}}
training: {{{gradients}}}
"""


def errors(tmp_path: Path, shape="[6, 3]", axis=1, count=2, gradients="") -> list[str]:
    text = CASE.format(shape=shape, axis=axis, count=count, gradients=gradients)
    _, found = load_text(tmp_path / "c.yaml", text)
    return [str(e) for e in found]


def test_replicas_validate(tmp_path):
    assert errors(tmp_path) == []
    assert "at least 4 samples on axis 0" in errors(tmp_path, count=4, shape="[3, 3]")[0]
    assert "axis 0, which is a channel axis" in errors(tmp_path, axis=0)[0]
    upstream = "gradients: {upstream: {random: {seed: 1}}}"
    assert "not defined with replicas" in errors(tmp_path, gradients=upstream)[0]
    assert "params.replicas.count" in errors(tmp_path, count=0)[0]


def test_an_adapter_without_the_feature_finds_replicas_not_expressible(tmp_path):
    loaded, _ = load_text(tmp_path / "c.yaml", CASE.format(shape="[7, 3]", axis=1, count=3, gradients=""))
    problem = build(loaded[0].case, "training")
    assert problem.replicas == Replicas(3, False) and problem.features() == ["replicas"]
    assert [len(s) for s in problem.replicas.shards(problem.batches[0])] == [3, 2, 2]
    assert Capabilities().missing(problem, "training") == \
        "data-parallel replicas (params.replicas) is not supported"
    assert Capabilities(features=frozenset({"replicas"})).missing(problem, "training") is None


def test_values_per_channel_of_a_rule_counts_one_replica_s_shard(tmp_path):
    """Unsynchronized replicas each normalize their own shard: a rule's `values_per_channel` sees
    the smallest one (3 rows on 2 replicas: 1 row), synchronized ones the whole batch."""
    from conformance.known import When

    loaded, _ = load_text(tmp_path / "c.yaml", CASE.format(shape="[3, 4, 2]", axis=1, count=2, gradients=""))
    case = loaded[0].case
    assert When.smallest_count(case) == 2  # shards of 2 and 1 rows, times 2 values per row
    synced = case.model_copy(update={"params": case.params.model_copy(
        update={"replicas": case.params.replicas.model_copy(update={"synchronized": True})})})
    assert When.smallest_count(synced) == 6


def test_requested_device(monkeypatch):
    monkeypatch.delenv(DEVICE_VARIABLE, raising=False)
    assert requested_device() == "cpu"
    monkeypatch.setenv(DEVICE_VARIABLE, "GPU")
    assert requested_device() == "cuda"
    monkeypatch.setenv(DEVICE_VARIABLE, "tpu")
    with pytest.raises(ValueError, match="cpu, cuda, gpu"):
        requested_device()


def test_device_cpu_is_recorded_in_every_record(tmp_path):
    """The --device path on the CPU, end to end: torch runs where it was asked and says so."""
    results = tmp_path / "r.json"
    subprocess.run([sys.executable, "-m", "pytest", "cases/hand/hand-two-samples-one-step.yaml",
                    "--framework=torch", "--device=cpu", "-q", "-p", "no:cacheprovider",
                    "--results", str(results)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    data = json.loads(results.read_text())
    assert data["environment"]["device"] == "cpu"
    assert {a["device"] for a in data["environment"]["adapters"].values()} == {"cpu"}
    assert data["records"] and {r["device"] for r in data["records"]} == {"cpu"}


def test_device_picks_jax_platform():
    """JAX adapters import adapters.jax_setup first, which takes the platform from --device."""
    shown = subprocess.run(
        [sys.executable, "-c", "import adapters.jax_setup, jax; print(jax.config.jax_platforms, "
         "jax.devices()[0].platform)"], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, DEVICE_VARIABLE: "cpu"})
    assert shown.stdout.split() == ["cpu", "cpu"], shown.stderr[-2000:]


def record(case: str, adapter: str, synchronized: bool, status: Status, moving_passed: bool,
           explained_by: list[str]) -> Record:
    return Record(case=case, file="f.yaml", adapter=adapter, check="training", status=status,
                  case_info={"params": {"axis": 1, "replicas": {"count": 2, "synchronized": synchronized}}},
                  metrics=[{"name": "moving_mean", "passed": moving_passed}], explained_by=explained_by)


def test_report_merges_devices_and_tabulates_replica_readings(tmp_path):
    def env(device: str) -> dict:
        return {"adapters": {"torch-sync": {"family": "torch", "device": device}}, "hostname": device}

    write_atomically(tmp_path / "cpu.json", Results(env("cpu"), [
        record("sync", "torch-sync", True, Status.NOT_EXPRESSIBLE, False, []),
        record("unsync", "torch-sync", False, Status.KNOWN, False, ["replica-0-stats"])]))
    write_atomically(tmp_path / "gpu.json", Results(env("cuda"), [
        record("sync", "torch-sync", True, Status.PASS, True, []),
        record("unsync", "torch-sync", False, Status.FAIL, False, [])]))
    report = load([tmp_path / "cpu.json", tmp_path / "gpu.json"])
    assert [c.key for c in report.columns] == ["torch-sync", "torch-sync @ cuda"]
    table = replica_readings(report)
    texts = {r["row"].id: [c["text"] for c in r["cells"]] for r in table["rows"]}
    assert texts == {"sync": ["n/e", "whole batch"], "unsync": ["replica 0's", "unexplained"]}


def test_reading_back_does_not_depend_on_the_split():
    """Shards are consecutive: concatenated they are the batch, in order."""
    x = np.arange(14.0).reshape(7, 2)
    assert np.array_equal(np.concatenate(Replicas(3, True).shards(x)), x)
    assert isinstance(Problem.__dataclass_fields__["replicas"].metadata["feature"], str)


def test_an_unsynchronized_shard_s_conditioning_sets_the_tolerance():
    """Each unsynchronized replica normalizes its shard with the shard's own statistics, so the
    rounding of a shard's mean is scaled by that shard's |mean|/sqrt(var + eps), which can be far
    larger than the batch's (gen-2611-0038: two values 5e-5 apart per shard, 1e-3 relative off on
    flax-linen-pmap, where the batch's conditioning allowed 1.7e-5)."""
    from conformance.problem import input_conditioning
    from conformance.reference import normalized_together

    x = np.array([[1.0], [1.0 + 1e-4], [-1.0], [-1.0 - 1e-4]])  # shards of mean ±1, var 2.5e-9
    one = np.ones(1)
    p = Problem(case_id="t", dtype="float32", batches=(x,), axes=(1,), momentum=0.9, epsilon=0.0,
                center=True, scale=True, gamma=one, beta=0 * one, moving_mean=0 * one, moving_variance=one)
    shards = [slice(0, 3), slice(3, 5), slice(5, 7)]  # numpy.array_split's: the first n mod 3 larger
    assert Replicas(3, False).slices(7) == shards
    assert normalized_together(7, replace(p, replicas=Replicas(3, False))) == [slice(None), *shards]
    assert normalized_together(7, replace(p, replicas=Replicas(3, True))) == [slice(None)]
    assert input_conditioning(p) < 1.01
    assert input_conditioning(replace(p, replicas=Replicas(2, False))) > 1e4
