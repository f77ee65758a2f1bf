"""`python -m conformance` validate, fill and list, run as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ruamel.yaml import YAML

from conformance.fill import fill_file
from conformance.loader import load_file
from conformance.outputs import outputs_of

ROOT = Path(__file__).resolve().parent.parent

CASE = """\
# yaml-language-server: $schema=../schema.json
# a comment that must survive fill
id: fill-me
title: filled by the reference
dtype: float32
input:
  shape: [4, 2]
  random: {seed: 3}
params:
  axis: 1  # channels
  momentum: 0.9
training:
  expected: {}
  gradients:
    upstream: {random: {seed: 4}}
inference: {}
"""


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "conformance", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_validate_lists_every_error_and_exits_1(tmp_path: Path):
    (tmp_path / "good.yaml").write_text(CASE)
    (tmp_path / "bad.yaml").write_text(CASE.replace("fill-me", "bad").replace("axis: 1", "axes: 1"))
    (tmp_path / "worse.yaml").write_text("id: [\n")
    result = run("validate", str(tmp_path))
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert any(line.startswith(f"{tmp_path / 'bad.yaml'}:10:") and "'axes'" in line for line in lines)
    assert any(line.startswith(f"{tmp_path / 'worse.yaml'}:") for line in lines)
    assert "1 valid case(s)" in result.stderr


def test_validate_passes_on_the_shipped_cases():
    assert run("validate").returncode == 0


def test_fill_writes_every_field_and_keeps_comments_and_order(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text(CASE)
    fill_file(path)
    text = path.read_text()
    assert text.startswith("# yaml-language-server: $schema=../schema.json\n# a comment that must survive")
    assert "axis: 1  # channels" in text
    data = YAML(typ="safe").load(text)
    assert list(data) == ["id", "title", "dtype", "input", "params", "training", "inference"]
    [case] = load_file(path)[0]
    assert set(data["training"]["expected"]) == {o.name for o in outputs_of("training")
                                                 if o.exists(case.case.params)}
    assert set(data["training"]["gradients"]["expected"]) == {"input", "gamma", "beta"}
    assert "output" in data["inference"]["expected"]
    [loaded] = load_file(path)[0]
    assert loaded.case.training.expected.output is not None


def test_fill_round_trips_float64_exactly(tmp_path: Path):
    from conformance import reference
    from conformance.problem import build

    path = tmp_path / "c.yaml"
    path.write_text(CASE)
    fill_file(path)
    [loaded] = load_file(path)[0]
    r = reference.train(build(loaded.case, "training"))
    assert [float(v) for v in r.moving_variance] == loaded.case.training.expected.moving_variance


def test_list_shows_ids_and_checks():
    result = run("list")
    assert result.returncode == 0
    assert any(line.startswith("hand-gradients-three-samples") and "training,gradients" in line
               for line in result.stdout.splitlines())
