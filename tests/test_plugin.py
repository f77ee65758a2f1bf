"""`pytest conformance` end to end on real torch, in a subprocess, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

EXTERNAL = """\
id: external-nhwc
title: a case written outside this repository
input:
  shape: [3, 2, 2, 2]
  random: {seed: 5}
params:
  axis: -1
  momentum: 0.9
training: {}
inference: {}
"""

WRONG = """\
id: wrong-expectation
title: inference output deliberately off in one element
input:
  shape: [2, 2]
  values: [[1.0, 2.0], [3.0, 4.0]]
params: {axis: 1, epsilon: 0.0, moving_variance: [1.0, 1.0]}
inference:
  expected:
    output: [[1.0, 2.0], [3.0, 4.5]]
"""

ACCEPTED = """\
id: must-fail-but-valid
title: a valid case marked expect_error, which torch runs happily
input: {shape: [2, 2], values: [[1.0, 2.0], [3.0, 4.0]]}
params: {axis: 1}
inference: {}
expect_error: true
"""


def pytest_run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "conformance", "-p", "no:cacheprovider",
                           "-q", "-rA", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run_on_a_foreign_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("foreign")
    (folder / "external.yaml").write_text(EXTERNAL)
    (folder / "wrong.yaml").write_text(WRONG)
    (folder / "accepted.yaml").write_text(ACCEPTED)
    (folder / "broken.yaml").write_text("id: broken\nparams: {axis: 1}\ninput: {shape: [2], valus: [1, 2]}\n")
    subprocess.run([sys.executable, "-m", "conformance", "fill", str(folder / "external.yaml")], check=True,
                   cwd=ROOT, capture_output=True)
    results = folder / "results.json"
    proc = pytest_run("--framework=torch", "--cases", str(folder), "--results", str(results),
                      "--progress", str(folder / "progress.json"))
    return proc, json.loads(results.read_text())


def test_items_are_named_case_adapter_check(run_on_a_foreign_folder):
    proc, _ = run_on_a_foreign_folder
    assert "PASSED" in proc.stdout
    for name in ("external-nhwc[torch-training]", "external-nhwc[torch-inference]",
                 "external-nhwc[torch-functional-training]"):
        assert f"::{name}" in proc.stdout


def test_broken_file_fails_alone_with_path_and_line(run_on_a_foreign_folder):
    proc, results = run_on_a_foreign_folder
    assert proc.returncode == 1
    assert "broken.yaml:3:" in proc.stdout and "did you mean 'values'" in proc.stdout
    passed = {(r["case"], r["adapter"], r["check"]) for r in results["records"] if r["status"] == "pass"}
    assert ("external-nhwc", "torch", "training") in passed


def test_mismatch_shows_the_case_not_a_harness_traceback(run_on_a_foreign_folder):
    proc, _ = run_on_a_foreign_folder
    section = proc.stdout.split("wrong-expectation[torch-inference]")[1]
    assert "FAIL output" in section and "worst at [1, 1]: expected 4.5, got 4.0" in section
    assert "conformance/evaluate.py" not in section and "Traceback" not in section


def test_expect_error_fails_when_the_framework_accepts(run_on_a_foreign_folder):
    _, results = run_on_a_foreign_folder
    [record] = [r for r in results["records"]
                if r["case"] == "must-fail-but-valid" and r["adapter"] == "torch"]
    assert record["status"] == "fail" and "accepted" in record["reason"]


def test_results_file_records_environment_and_metrics(run_on_a_foreign_folder):
    _, results = run_on_a_foreign_folder
    env = results["environment"]
    assert env["adapters"]["torch"]["versions"]["torch"].startswith("2.")
    assert env["adapters"]["torch"]["conventions"]["variants"] == ["moving-variance-unbiased"]
    assert env["cpu_s"] > 0 and env["costs"] == {}  # torch adds no costs of its own (JAX does)
    [record] = [r for r in results["records"]
                if (r["case"], r["adapter"], r["check"]) == ("external-nhwc", "torch", "training")]
    names = {m["name"] for m in record["metrics"]}
    assert {"output", "moving_mean", "moving_variance_unbiased"} <= names
    assert any("movedim" in t for t in record["translations"])
    assert next(m for m in record["metrics"] if m["name"] == "moving_variance_unbiased")["derived"] is False


def test_unknown_framework_is_rejected_with_the_valid_names():
    proc = pytest_run("--framework=tensorflw", "--co")
    assert proc.returncode == 4
    assert "unknown framework 'tensorflw'" in proc.stderr and "tf-layers" in proc.stderr


def test_a_case_folder_runs_as_a_pytest_path():
    proc = subprocess.run([sys.executable, "-m", "pytest", "cases/hand", "--framework=torch", "--co", "-q",
                           "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    files = {line.split("::")[0] for line in proc.stdout.splitlines() if "::" in line}
    on_disk = len(list((ROOT / "cases" / "hand").glob("*.yaml")))
    assert len(files) == on_disk and all(f.startswith("cases/hand/") for f in files), proc.stdout


def test_a_printed_id_runs_that_item_alone_and_lf_reruns_only_failures(tmp_path):
    folder = ROOT / "results" / "test-lf-cases"  # inside the rootdir, as cases/ is
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "wrong.yaml").write_text(WRONG)
    (folder / "external.yaml").write_text(EXTERNAL)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-o", f"cache_dir={tmp_path}",
                               "--framework=torch", "--results", str(tmp_path / "r.json"), *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)

    try:
        first = run("conformance", "--cases", str(folder))
        failed = [line.split()[1] for line in first.stdout.splitlines() if line.startswith("FAILED")]
        assert failed == ["results/test-lf-cases/wrong.yaml::wrong-expectation[torch-inference]",
                          "results/test-lf-cases/wrong.yaml::wrong-expectation[torch-functional-inference]"]
        again = run(failed[0])
        assert again.stdout.strip().splitlines()[-1].startswith("1 failed in")
        last_failed = run("conformance", "--cases", str(folder), "--lf")
        assert last_failed.stdout.strip().splitlines()[-1].startswith("2 failed in")
    finally:
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()


def test_progress_is_kept_while_running(run_on_a_foreign_folder, tmp_path_factory):
    proc, results = run_on_a_foreign_folder
    folder = Path(results["environment"]["case_dirs"][0])
    progress = json.loads((folder / "progress.json").read_text())
    assert progress["done"] == progress["total"] > len(results["records"])  # probe items count too
    assert progress["failed"] == proc.stdout.count("FAILED ")
