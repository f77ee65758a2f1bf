"""`python -m conformance port`: recipes built from measurements, never from a table of API facts."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from conformance.port import BATCH, Side, recipe, text
from conformance.results import Record, Status
from reports import synthetic

ROOT = Path(__file__).resolve().parent.parent


def side(adapter: str, momentum: float, estimator: str, variance: list[float], **names: str) -> Side:
    probes = {"default_momentum": {"value": momentum}, "default_epsilon": {"value": 1e-3},
              "moving_variance_estimator": {"value": estimator}, "variance_algorithm": {"value": "two-pass"},
              "default_mode": {"value": "inference"}}
    record = Record(case="port-typical", file="", adapter=adapter, check="training", status=Status.PASS,
                    translations=[f"momentum 0.9 -> momentum={momentum} (as {adapter} takes it)"])
    return Side(adapter, {"moving_variance": "var", **names}, probes, [], [record],
                {"canonical": {"moving_variance": variance}, "default": {"moving_mean": [0.1 * momentum]}})


def test_recipe_lines_come_from_the_sides() -> None:
    # moving = 0.9 * 1 + 0.1 * batch variance: a averaged in 8/7 of what b did
    a = side("a", 0.9, "unbiased", [0.9 + 0.1 * 8 / 7], gamma="weight")
    b = side("b", 0.99, "biased", [1.0], gamma="gamma")
    r = recipe(a, b, "test")
    rows = {line.topic: line for line in r.parameters + r.conventions}
    params = rows["gamma / beta"]
    assert params.source.startswith("weight") and params.target.startswith("gamma")
    assert rows["momentum"].differs and "(default 0.9)" in rows["momentum"].source
    assert "b: momentum 0.9 -> momentum=0.99 (as b takes it)" in rows["momentum"].note
    assert "1.1x a's" in rows["momentum"].note  # default moving means 0.099 / 0.09
    estimator = rows["moving variance estimator"]
    assert estimator.differs and (estimator.source, estimator.target) == ("unbiased", "biased")
    ratio = 1.0 / (0.9 + 0.1 * 8 / 7)
    assert f"moving variance b/a = {ratio:.4g}" in estimator.note and "0.875x" in estimator.note
    assert not rows["variance algorithm"].differs
    printed = text(r)
    assert "Same in both: variance algorithm (two-pass)" in printed
    assert "* moving variance estimator" in printed


def test_recipe_from_results_files(tmp_path: Path) -> None:
    results = synthetic.write(tmp_path / "run.json", synthetic.results(400, ["torch", "keras"], seed=2))
    command = [sys.executable, "-m", "conformance", "port", "--from", "torch", "--to", "keras",
               "--results", str(results)]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert f"from results files {results}" in out
    assert "running_mean / running_var" in out and "moving_mean / moving_variance" in out
    assert "Divergences in these results" in out


def test_port_measures_both_adapters() -> None:
    """torch -> onnxruntime, each measured in its own process: the probes and the typical case."""
    command = [sys.executable, "-m", "conformance", "port", "--from", "torch", "--to", "onnxruntime",
               "--json"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    assert r["origin"].startswith("measured now")
    rows = {line["topic"]: line for line in r["parameters"] + r["conventions"]}
    assert rows["moving statistics"]["source"] == "running_mean / running_var"
    assert rows["moving statistics"]["target"] == "input_mean / running_mean / input_var / running_var"
    estimator = rows["moving variance estimator"]
    assert (estimator["source"], estimator["target"]) == ("unbiased", "biased")
    # onnxruntime averages the biased batch variance in, torch the unbiased one: (n - 1) / n
    implied = float(re.search(r"the batch variance it averaged in ([0-9.]+)x", estimator["note"]).group(1))
    assert abs(implied - (BATCH - 1) / BATCH) < 1e-3
    assert "momentum=0.1 (1 - m)" in rows["momentum"]["note"]
