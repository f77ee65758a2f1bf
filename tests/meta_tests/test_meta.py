"""Meta-tests: the suite catches each defect of the fake adapter, with the right figures, names it by
its variant, and reaches every status (pass, fail, known, not-expressible, error)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conformance import ROOT
from conformance.evaluate import Outcome, evaluate
from conformance.fill import fill_file
from conformance.known import Rule, Rules, When
from conformance.loader import load_file
from conformance.results import Status
from conformance.variants import CATALOGUE
from tests.meta_tests.fake_adapter import make

TWO_STEPS = """\
id: meta-two-steps
title: two training steps on NHWC input, a mean far enough from 0 that every defect shows
tags: [meta]
batches:
  - {shape: [4, 2, 2, 3], random: {seed: 1, mean: 2.0, std: 1.5}}
  - {shape: [4, 2, 2, 3], random: {seed: 2, mean: -1.0, std: 0.5}}
params: {axis: -1, momentum: 0.9, epsilon: 1.0e-3}
training:
  expected: {}
  gradients: {upstream: {random: {seed: 3}}}
inference:
  expected: {}
"""

LARGE_MEAN = """\
id: meta-large-mean
title: float32, mean 1e3 against std 1, where E[x^2] - E[x]^2 cancels
tags: [meta]
input: {shape: [64, 2], random: {seed: 4, mean: 1000.0, std: 1.0}}
params: {axis: 1}
training:
  expected: {}
"""


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("meta")
    out = {}
    for text in (TWO_STEPS, LARGE_MEAN):
        path = folder / (text.split("\n")[0].removeprefix("id: ") + ".yaml")
        path.write_text(text)
        fill_file(path)
        [loaded] = load_file(path)[0]
        out[loaded.case.id] = loaded.case
    return out


def run(adapter_id: str, case, check: str, rules: list[Rule] | None = None) -> Outcome:
    return evaluate(make(adapter_id), case, check, rules=Rules(rules or []))  # type: ignore[arg-type]


def failing(outcome: Outcome) -> dict[str, object]:
    return {m.name: m for m in outcome.metrics if not m.passed}


def test_the_correct_fake_passes_every_check(cases):
    for case in cases.values():
        for check in case.checks:
            outcome = run("fake", case, check)
            assert outcome.status == Status.PASS, (case.id, check, outcome.metrics)


def test_sum_of_squares_is_caught_and_named(cases):
    outcome = run("fake-sum-of-squares", cases["meta-large-mean"], "training")
    assert outcome.status == Status.FAIL
    assert {"output", "batch_variance"} <= set(failing(outcome))
    assert failing(outcome)["batch_variance"].max_rel > 1e-3  # cancellation: far beyond float32 noise
    # the fake clamps at 0; where no variance goes negative the unclamped variant matches as well
    assert outcome.explained_by[0] == "variance-sum-of-squares"
    assert set(outcome.explained_by) <= {"variance-sum-of-squares", "variance-sum-of-squares-unclamped"}


def test_momentum_complement_is_caught_with_its_figures(cases):
    case = cases["meta-two-steps"]
    outcome = run("fake-momentum-complement", case, "training")
    assert outcome.status == Status.FAIL
    metric = failing(outcome)["moving_mean"]
    # two steps from 0: canonical 0.1 b1 after one, the swapped form 0.9 b1: the error is O(|b|)
    assert metric.max_abs > 0.5
    assert set(failing(outcome)) == {"moving_mean", "moving_variance", "inference_output"}
    assert outcome.explained_by == ["momentum-complement"]


def test_a_wrong_estimator_declaration_fails_and_says_what_was_measured(cases):
    outcome = run("fake-wrong-estimator-declared", cases["meta-two-steps"], "training")
    assert outcome.status == Status.FAIL
    assert outcome.conventions == ("moving-variance-unbiased",)
    assert "moving_variance_unbiased" in failing(outcome)
    assert outcome.explained_by == ["moving-variance-biased"]


def test_statistics_never_updated_is_named(cases):
    outcome = run("fake-stats-never-updated", cases["meta-two-steps"], "training")
    assert outcome.status == Status.FAIL
    assert {"moving_mean", "moving_variance"} <= set(failing(outcome))
    assert outcome.explained_by == ["stats-frozen"]


def test_a_defect_outside_the_catalogue_is_unexplained_with_its_closest_variant(cases):
    outcome = run("fake-outside-catalogue", cases["meta-two-steps"], "inference")
    assert outcome.status == Status.FAIL
    assert outcome.explained_by == []
    assert outcome.closest is not None and outcome.closest["badness"] > 1
    assert outcome.closest["variant"] in CATALOGUE  # measured: epsilon-1e-5, 179x its tolerance


def test_a_rule_whose_variant_matches_makes_it_known_and_another_variant_fails(cases):
    case = cases["meta-two-steps"]
    rule = Rule(adapters=["fake-momentum-complement"], explained_by="momentum-complement",
                reason="swapped on purpose", link="https://example.org/fake")
    known = run("fake-momentum-complement", case, "training", [rule])
    assert known.status == Status.KNOWN and known.rule["reason"] == "swapped on purpose"
    wrong = rule.model_copy(update={"explained_by": "stats-frozen"})
    outcome = run("fake-momentum-complement", case, "training", [wrong])
    assert outcome.status == Status.FAIL and "rules expect stats-frozen" in outcome.reason
    assert run("fake-momentum-complement", case, "inference", [rule]).status == Status.PASS


def test_a_rule_for_another_device_or_release_does_not_apply(cases):
    """`when.device` and `when.versions` compare with where the adapter ran (the fake: cpu, numpy)."""
    import numpy

    case = cases["meta-two-steps"]
    rule = Rule(adapters=["fake-momentum-complement"], explained_by="momentum-complement",
                reason="r", link="https://example.org/fake")
    for when, status in (({"device": "cuda"}, Status.FAIL), ({"device": ["cpu", "cuda"]}, Status.KNOWN),
                         ({"versions": {"numpy": f"<{numpy.__version__}"}}, Status.FAIL),
                         ({"versions": {"numpy": f">={numpy.__version__}"}}, Status.KNOWN),
                         ({"versions": {"no-such-package": ">=0"}}, Status.FAIL)):
        scoped = rule.model_copy(update={"when": When(**when)})
        assert run("fake-momentum-complement", case, "training", [scoped]).status == status, when
    with pytest.raises(ValueError, match="not a version specifier"):
        When(versions={"torch": "2.13 or later"})


def test_a_framework_raising_is_diagnosed_as_rejects(cases):
    outcome = run("fake-raises-on-training", cases["meta-two-steps"], "training")
    assert outcome.status == Status.FAIL and outcome.explained_by == ["rejects"]
    assert "RuntimeError: fake framework: training is not implemented" in outcome.reason


def test_an_unsupported_feature_is_not_expressible_before_the_adapter_runs(cases):
    adapter = make("fake")
    adapter.capabilities = adapter.capabilities.__class__(dtypes=frozenset({"float64"}),
                                                          why={"float32": "the fake keeps float64"})
    outcome = evaluate(adapter, cases["meta-two-steps"], "training", rules=Rules([]))
    assert outcome.status == Status.NOT_EXPRESSIBLE
    assert outcome.reason == "dtype float32: the fake keeps float64"


ENTRY_POINTS = """\
[bnconform.adapters]
fake = tests.meta_tests.fake_adapter:make
fake-momentum-complement = tests.meta_tests.fake_adapter:make
fake-raises-on-training = tests.meta_tests.fake_adapter:make
fake-no-such-defect = tests.meta_tests.fake_adapter:make
"""


def test_every_status_through_pytest_with_an_entry_point_adapter(tmp_path: Path, cases):
    """An adapter package that is only a module and a *.dist-info/entry_points.txt on PYTHONPATH
    is selectable by id; its items reach every status."""
    dist = tmp_path / "site" / "bnconform_fake-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: bnconform-fake\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(ENTRY_POINTS)
    folder = tmp_path / "cases"
    folder.mkdir()
    path = folder / "two.yaml"
    path.write_text(TWO_STEPS)
    fill_file(path)
    (folder / "broken.yaml").write_text("id: broken\nparams: {axis: 1}\n")
    results = tmp_path / "results.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), str(ROOT)]))
    proc = subprocess.run([sys.executable, "-m", "pytest", "conformance", "-p", "no:cacheprovider", "-q",
                           "--framework=fake,fake-momentum-complement,fake-raises-on-training,fake-no-such-defect,torch",
                           "--cases", str(folder), "--results", str(results)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    data = json.loads(results.read_text())
    statuses = {(r["adapter"], r["check"]): r["status"] for r in data["records"] if r["case"]}
    assert statuses[("fake", "training")] == "pass"
    assert statuses[("fake-momentum-complement", "training")] == "fail"
    assert statuses[("fake-raises-on-training", "training")] == "fail"
    assert data["environment"]["adapters"]["fake"]["family"] == "bnconform-fake"
    assert any(r["status"] == "error" and r["case"] is None for r in data["records"])  # broken.yaml
    assert statuses[("fake-no-such-defect", "training")] == "error"  # the adapter cannot be built
    assert statuses[("torch", "inference")] == "pass"
    assert "explained by: momentum-complement" in proc.stdout
    assert proc.returncode == 1
