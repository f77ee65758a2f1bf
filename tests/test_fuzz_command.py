"""`python -m conformance fuzz` on the NumPy fake adapter: a short budget finds each injected defect by
name, writes a minimal valid case per group, and pytest on that case reproduces the group."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conformance import ROOT
from conformance.loader import load_file

DEFECTS = {"fake-momentum-complement": "momentum-complement", "fake-stats-never-updated": "stats-frozen",
           "fake-sum-of-squares": "variance-sum-of-squares"}
ENV = dict(os.environ, PYTHONPATH=str(ROOT),
           BNCONFORM_EXTRA_ADAPTERS=",".join(f"{a}=fake:tests.meta_tests.fake_adapter" for a in DEFECTS))


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory) -> tuple[Path, dict]:
    """250 cases of a seed whose draws hold float32 large-mean training cases, where a float32 sum
    of squares is named as such (on float64 cases compute-float32 is the sharper name). Any change
    to case_strategy's draws may call for another seed."""
    out = tmp_path_factory.mktemp("fuzz")
    proc = subprocess.run([sys.executable, "-m", "conformance", "fuzz", f"--framework={','.join(DEFECTS)}",
                           "--budget=100", "--max-cases=250", "--seed=2", f"--out={out}"],
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


def test_budget_shares_fit_the_wall_and_favour_the_slow_groups():
    from conformance.fuzz import FINISH_S, MIN_S, STARTUP_S, WEIGHTS, group_budgets

    names = ["tf", "keras", "keras-jax", "torch", "torch-compile", "jax", "onnx", "torch-export"]
    shares = group_budgets(names, 600, 2)
    assert shares == group_budgets(list(reversed(names)), 600, 2)  # the same run, the same shares
    assert shares["tf"] == pytest.approx(WEIGHTS["tf"] * shares["onnx"], abs=0.5)  # each floored to 0.1 s
    assert shares["keras-jax"] == pytest.approx(2 * shares["onnx"], abs=0.5)
    ends = [0.0, 0.0]  # started largest share first, two at a time
    for name in sorted(names, key=lambda n: (-shares[n], n)):
        ends[ends.index(min(ends))] += STARTUP_S + shares[name]
    assert 600 - FINISH_S - 2 * STARTUP_S < max(ends) <= 600 - FINISH_S
    assert group_budgets(["fake"], 10, 2) == {"fake": MIN_S}


def test_focus_follows_what_the_adapters_need():
    from conformance.fuzz import focus_of

    assert focus_of([frozenset({"replicas"}), frozenset({"replicas", "momentum-null"})]) == {"replicas"}
    assert focus_of([frozenset({"replicas"}), frozenset()]) == frozenset()
    assert focus_of([frozenset({"preceding"}), frozenset()]) == {"preceding"}


def test_a_rule_s_region_steers_the_draws_into_it():
    """About one case in three is drawn inside a known rule's conditions (here float16 input, both
    affine flags off, a preceding layer, the training check); the others anywhere."""
    from hypothesis import HealthCheck, Phase, given, seed, settings

    from conformance.fuzz import case_strategy, rule_region
    from conformance.known import Rule

    rule = Rule(adapters=["x"], when={"dtype": "float16", "params": {"center": False, "scale": False},
                                      "features": ["preceding"]},
                checks=["training"], explained_by="rejects", reason="r", link="https://example.org")
    region = rule_region(rule)
    assert region == {"checks": ["training"], "dtype": ["float16"],
                      "params": {"center": [False], "scale": [False]}, "features": ["preceding"]}
    inside: list[bool] = []

    @seed(0)
    @settings(max_examples=150, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case_strategy(regions=(region,)))
    def draw(doc):
        p = doc["params"]
        inside.append(doc["dtype"] == "float16" and p.get("center") is False and p.get("scale") is False
                      and "preceding" in p and "training" in doc)

    draw()
    assert 10 <= sum(inside) < len(inside)


def test_a_region_is_drawn_where_its_variant_shows():
    """A rule's region adds where its variant shows (VARIANT_REGION), one region for each way it
    shows, the rule's own conditions winning; `always` draws every case in a region."""
    from hypothesis import HealthCheck, Phase, given, seed, settings

    from conformance.fuzz import case_strategy, rule_regions
    from conformance.known import Rule
    when = {"dtype": "float16", "params": {"param_dtype": "float32", "epsilon": 0.5}}
    rule = Rule(adapters=["x"], when=when, checks=["gradients"], explained_by="compute-input-dtype",
                reason="r", link="https://example.org")
    overflow, rounded = rule_regions(rule)  # the two ways it shows: a region each
    assert overflow["dtype"] == rounded["dtype"] == ["float16"]
    assert overflow["params"] == {"epsilon": [0.5], "param_dtype": ["float32"]}  # the rule's eps wins
    assert rounded["params"] == {"scale": [True], "center": [True], "epsilon": [0.5],
                                 "param_dtype": ["float32"]}
    assert overflow["input"]["std"] == [1e-3] and rounded["input"]["std"] == [1.0]
    [flushed] = rule_regions(Rule(adapters=["x"], checks=["training"], explained_by="denormals-flushed",
                                  reason="r", link="https://example.org"))
    assert flushed["values_per_channel"] == [1] and flushed["params"]["epsilon"] == [0.0]
    assert flushed["steps"] == [1]
    drawn: list[dict] = []

    @seed(0)
    @settings(max_examples=20, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case_strategy(regions=(flushed,), always=True))
    def draw(doc):
        drawn.append(doc)

    draw()
    cases = [d for d in drawn if not d.get("expect_error")]  # an out-of-range axis: a draw in twenty
    assert len(cases) > 10
    assert all(d["params"]["epsilon"] == 0.0 and d["dtype"] in ("float64", "float32") for d in cases)


def test_the_float16_folded_overflow_region_keeps_the_canonical_output_small():
    """normalize-folded's float16 region (the torch exports' rule): a float16 channel of 1e4 with a
    moving mean of 1e4 and a small moving variance, momentum 0 for training; a rule that allows no
    float16 does not get it, and a zero-variance rule gets its own region only; epsilon-float32's
    region draws an eps that float32 does not hold."""
    from hypothesis import HealthCheck, Phase, given, seed, settings

    from conformance.fuzz import ZERO_VARIANCE_GAMMAS, ZERO_VARIANCE_ROWS, case_strategy, rule_regions
    from conformance.known import Rule

    def rule(**when):
        return Rule(adapters=["x"], when=when, checks=["training", "inference"],
                    explained_by="normalize-folded", reason="r", link="https://example.org")

    regions = rule_regions(rule(dtype="float16"))
    [overflow] = [r for r in regions if r.get("params", {}).get("moving_mean") == [1e4]]
    assert overflow["dtype"] == ["float16"] and overflow["params"]["momentum"] == [0.0]
    assert len(rule_regions(rule(dtype="float32"))) == len(regions) - 1  # no float16 region for it
    [eps] = rule_regions(Rule(adapters=["x"], when={"dtype": "float64"}, checks=["inference"],
                              explained_by="epsilon-float32", reason="r", link="https://example.org"))
    assert eps["dtype"] == ["float64"] and eps["params"] == {"epsilon": [0.1, 1e-3]}  # not in float32
    [zero] = rule_regions(rule(zero_variance=True))
    assert zero["rows"] == list(ZERO_VARIANCE_ROWS) and zero["params"]["gamma"] == list(ZERO_VARIANCE_GAMMAS)
    drawn: list[dict] = []

    @seed(0)
    @settings(max_examples=20, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case_strategy(regions=(overflow, zero), always=True))
    def draw(doc):
        drawn.append(doc)

    draw()
    cases = [d for d in drawn if not d.get("expect_error")]
    folded = [d for d in cases if d["params"].get("moving_mean", [0])[0] == 1e4]
    constant = [d for d in cases if d["input"]["random"]["std"] == 0.0]
    assert folded and constant and len(folded) + len(constant) == len(cases)
    assert all(d["dtype"] == "float16" and d["params"]["momentum"] == 0.0 for d in folded)
    for d in constant:
        p, rank = d["params"], len(d["input"]["shape"])
        assert p["epsilon"] == 0.0 and p["scale"] is True and p["gamma"][0] in ZERO_VARIANCE_GAMMAS
        assert d["input"]["shape"][0] == 8 or 0 in {a % rank for a in np.atleast_1d(p["axis"])}


def test_the_sweep_draws_a_case_of_every_region_before_a_second_of_any(monkeypatch):
    """Worker.explore evaluates the regions' sweep cases a region at a time in turn, so that a run
    too short for SWEEP cases of every region still draws in each, and skips a region whose rules
    are all reached (here float64's, reached before the sweep)."""
    from conformance.fuzz import SWEEP, Worker

    regions = tuple({"checks": ["inference"], "dtype": [d]} for d in ("float16", "float32", "float64"))
    worker = Worker.__new__(Worker)  # no adapters: the cases are recorded, not evaluated
    worker.regions, worker.focus, worker.seed, worker.progress = regions, frozenset(), 0, None
    worker.region_rules = ({"a"}, {"a", "b"}, {"c"})
    worker.found, worker.rules_reached, worker.explaining, worker.tried = {}, {"c": 1}, {}, 0
    seen: list[str] = []
    monkeypatch.setattr(Worker, "signatures", lambda self, doc: seen.append(doc["dtype"]) or {})
    worker.explore(600, 2 * SWEEP)
    assert seen[:2] == ["float16", "float32"] and seen[2:4] == ["float16", "float32"]
    assert len(seen) == 2 * SWEEP
