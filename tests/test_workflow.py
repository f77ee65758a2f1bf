"""The CI workflow that shards the conformance run across machines, and the merge behind it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

from conformance import ROOT
from conformance.families import groups_for

WORKFLOW = ROOT / ".github" / "workflows" / "conformance.yml"


def test_the_workflow_runs_every_process_group_in_every_shard_and_merges_them():
    flow = yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))
    shard, report = flow["jobs"]["shard"], flow["jobs"]["report"]
    matrix = shard["strategy"]["matrix"]
    assert matrix["framework"] == [g.name for g in groups_for(None)]  # in step with the registry
    assert matrix["group"] == list(range(1, int(flow["env"]["SPLITS"]) + 1))
    run = next(step["run"] for step in shard["steps"] if "pytest conformance" in step.get("run", ""))
    for flag in ("--framework=${{ matrix.framework }}", "--splits ${{ env.SPLITS }}",
                 "--group ${{ matrix.group }}", "--results results/shards/"):
        assert flag in run
    assert report["needs"] == "shard" and report["if"] == "always()"
    merge = next(step["run"] for step in report["steps"] if "--merge" in step.get("run", ""))
    assert re.search(r"for family in ([\w -]+); do", merge).group(1).split() == matrix["framework"]
    assert any("python -m reports results/merged/" in step.get("run", "") for step in report["steps"])


def pytest_results(tmp_path: Path, name: str, *args: str) -> Path:
    path = tmp_path / f"{name}.json"
    subprocess.run([sys.executable, "-m", "pytest", "conformance", "--framework=torch", "-q",
                    "-p", "no:cacheprovider", "--results", str(path), *args],
                   cwd=ROOT, capture_output=True, text=True, timeout=300)
    return path


def comparable(path: Path) -> dict[tuple, dict]:
    records = json.loads(path.read_text())["records"]
    return {(r["case"], r["adapter"], r["check"]): {k: v for k, v in r.items() if k != "duration_s"}
            for r in records}


def test_a_sharded_run_merged_equals_the_unsharded_run_record_for_record(tmp_path: Path):
    whole = pytest_results(tmp_path, "whole")
    shards = [pytest_results(tmp_path, f"shard{i}", "--splits", "3", "--group", str(i)) for i in (1, 2, 3)]
    merged = tmp_path / "merged.json"
    subprocess.run([sys.executable, "-m", "reports", "--merge", *map(str, shards), "-o", str(merged)],
                   cwd=ROOT, check=True, capture_output=True, timeout=120)
    assert comparable(merged) == comparable(whole)
    assert all(len(comparable(s)) < len(comparable(whole)) for s in shards)  # each shard ran a part
    probes = json.loads(merged.read_text())["probes"]
    assert probes.keys() == json.loads(whole.read_text())["probes"].keys()
