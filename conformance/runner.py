"""One case x adapter x check: build the problem, run the adapter, compare, describe the outcome.

Kept free of pytest so the plugin, `python -m conformance` and the benchmarks share it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from adapters.base import Adapter, Check, Conventions, NotExpressible, Problem, TrainingRun
from conformance import problem as problems
from conformance.cases import Case
from conformance.compare import Metric, Tolerance, compare, tolerance

OTHER_ESTIMATOR = {"biased": "unbiased", "unbiased": "biased"}


@dataclass
class Outcome:
    """status: pass | fail | not-expressible (error and xfail are decided by whoever ran it)."""

    status: str
    metrics: list[Metric] = field(default_factory=list)
    translations: list[str] = field(default_factory=list)
    reason: str = ""  # why not expressible, or what a case that must fail raised
    tolerance: Tolerance | None = None
    conventions: Conventions | None = None  # as declared for this problem

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "metrics": [m.as_dict() for m in self.metrics],
            "translations": self.translations,
            "reason": self.reason,
            "tolerance_rule": self.tolerance.rule if self.tolerance else "",
            "conventions": asdict(self.conventions) if self.conventions else None,
        }


def execute(adapter: Adapter, problem: Problem, check: Check) -> Any:
    if check == "training":
        return adapter.train(problem)
    if check == "inference":
        return adapter.infer(problem)
    return adapter.gradients(problem)


def evaluate(adapter: Adapter, case: Case, check: Check, outcome: Outcome | None = None) -> Outcome:
    """Run and compare. Exceptions from the adapter propagate (the caller records an error);
    `outcome`, when given, is filled in place so a caller keeps what was learnt before a raise."""
    outcome = outcome or Outcome("pass")
    problem = problems.build(case, check)
    reason = adapter.not_expressible(problem, check)
    if reason:
        outcome.status, outcome.reason = "not-expressible", reason
        return outcome
    outcome.translations = adapter.translations(problem)
    outcome.conventions = adapter.conventions_for(problem)
    if case.expect_error:
        try:
            execute(adapter, problem, check)
        except NotExpressible as exc:
            outcome.status, outcome.reason = "not-expressible", str(exc)
            return outcome
        except Exception as exc:  # the framework rejected the case, as it must
            outcome.status, outcome.reason = "pass", f"raised {type(exc).__name__}: {exc}".strip()
            return outcome
        outcome.status, outcome.reason = "fail", "the framework accepted a case it must reject"
        return outcome
    expected = problems.expected(case, check, problem)
    tol = tolerance(case.dtype, problems.conditioning(case, check, problem), case.tolerance)
    outcome.tolerance = tol
    try:
        got = execute(adapter, problem, check)
    except NotExpressible as exc:
        outcome.status, outcome.reason = "not-expressible", str(exc)
        return outcome
    if check == "training":
        outcome.metrics = training_metrics(outcome.conventions, expected, got, case.dtype, tol)
    elif check == "gradients":
        outcome.metrics = [
            compare(name, array, getattr(got, name), case.dtype, tol)
            for name, array in expected.given.items()
            if getattr(got, name) is not None
        ]
    elif "output" in expected.given:
        outcome.metrics = [compare("output", expected.given["output"], got, case.dtype, tol)]
    outcome.status = "pass" if all(m.passed for m in outcome.metrics) else "fail"
    return outcome


def training_metrics(conventions: Conventions, expected: problems.Expected, got: TrainingRun, dtype: str,
                     tol: Tolerance) -> list[Metric]:
    """Compare what the case gives; where the adapter declares the unbiased estimator, the moving
    variance and the inference output after training are held to the Bessel-corrected track."""
    metrics = []
    declared = conventions.moving_variance_estimator
    for name in ("output", "batch_mean", "moving_mean"):
        if name in expected.given and getattr(got, name) is not None:
            metrics.append(compare(name, expected.given[name], getattr(got, name), dtype, tol))
    follows_estimator = {
        "batch_variance": conventions.batch_variance_estimator,
        "moving_variance": declared,
        "inference_output": declared,
    }
    for name, estimator in follows_estimator.items():
        value = getattr(got, name)
        given = name in expected.given or (
            name == "moving_variance" and "moving_variance_unbiased" in expected.given)
        if value is None or not given:
            continue
        target = name if estimator == "biased" else f"{name}_unbiased"
        array, derived = expected.get(target)
        if array is None:
            continue
        metric = compare(target, array, value, dtype, tol, derived)
        if not metric.passed:
            other = name if estimator == "unbiased" else f"{name}_unbiased"
            other_array, _ = expected.get(other)
            if other_array is not None and compare("", other_array, value, dtype, tol).passed:
                metric.note = (f"the measured {name} follows the {OTHER_ESTIMATOR[estimator]} "
                               f"estimator; the adapter declares {estimator}")
        metrics.append(metric)
    return metrics
