"""One case x adapter x check: build the problem, run the adapter, compare, diagnose, decide.

Kept free of pytest so the plugin, the fuzzer and the benchmarks share it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from adapters.base import Adapter, Check, NotExpressible, Problem
from conformance import problem as problems
from conformance.compare import Metric, Tolerance, compare, tolerance
from conformance.outputs import outputs_of
from conformance.results import Record, Status
from conformance.schema import Case


@dataclass
class Outcome:
    """What evaluating one check found; `fill` copies it into the results record."""

    status: Status = Status.ERROR
    metrics: list[Metric] = field(default_factory=list)
    translations: list[str] = field(default_factory=list)
    reason: str = ""  # why not expressible, what a case that must fail raised, a rule's reason
    tolerance: Tolerance | None = None
    conventions: tuple[str, ...] = ()  # variant names the adapter declared for this problem
    explained_by: list[str] = field(default_factory=list)
    closest: dict[str, Any] | None = None
    rule: dict[str, Any] | None = None
    raised: str = ""  # the framework's exception where the reference computes a value

    def fill(self, record: Record) -> Record:
        record.status = self.status
        record.metrics = [m.as_dict() for m in self.metrics]
        record.translations = self.translations
        record.reason = self.reason
        record.tolerance_rule = self.tolerance.rule if self.tolerance else ""
        record.conventions = list(self.conventions)
        record.explained_by = self.explained_by
        record.closest = self.closest
        record.rule = self.rule
        return record


def execute(adapter: Adapter, problem: Problem, check: Check) -> dict[str, np.ndarray | None]:
    """Run one check; the framework's results by output name (`conformance.outputs`)."""
    if check == "training":
        return vars(adapter.train(problem))
    if check == "inference":
        return {"output": adapter.infer(problem)}
    return vars(adapter.gradients(problem))


def evaluate(adapter: Adapter, case: Case, check: Check, outcome: Outcome | None = None) -> Outcome:
    """Run and compare. Exceptions from the adapter propagate (the caller records an error);
    `outcome`, when given, is filled in place so a caller keeps what was learnt before a raise."""
    outcome = outcome if outcome is not None else Outcome()
    problem = problems.build(case, check)
    reason = adapter.why_not_expressible(problem, check)
    if reason:
        outcome.status, outcome.reason = Status.NOT_EXPRESSIBLE, reason
        return outcome
    outcome.translations = adapter.translations(problem)
    outcome.conventions = adapter.conventions_for(problem).variants
    if case.expect_error:
        return _must_raise(adapter, problem, check, outcome)
    tol = tolerance(case.dtype, problems.conditioning(case, check, problem), case.tolerance)
    outcome.tolerance = tol
    try:
        got = execute(adapter, problem, check)
    except NotExpressible as exc:
        outcome.status, outcome.reason = Status.NOT_EXPRESSIBLE, str(exc)
        return outcome
    expected = problems.expected(case, check, problem, outcome.conventions)
    outcome.metrics = measure(check, expected, got, case.dtype, tol)
    outcome.status = Status.PASS if all(m.passed for m in outcome.metrics) else Status.FAIL
    return outcome


def measure(check: str, expected: problems.Expected, got: dict[str, np.ndarray | None], dtype: str,
            tol: Tolerance) -> list[Metric]:
    """Compare every output the case asks for and the framework exposes, in table order."""
    metrics = []
    for output in outputs_of(check):
        value = got.get(output.name)
        if not output.compared or value is None or not expected.asks_for(output.name):
            continue
        array, derived, shown_as = expected.get(output.name)
        if array is not None:
            metrics.append(compare(shown_as, array, value, dtype, tol, derived))
    return metrics


def _must_raise(adapter: Adapter, problem: Problem, check: Check, outcome: Outcome) -> Outcome:
    """`expect_error: true`: pass only if the framework itself raises."""
    try:
        execute(adapter, problem, check)
    except NotExpressible as exc:
        outcome.status, outcome.reason = Status.NOT_EXPRESSIBLE, str(exc)
        return outcome
    except Exception as exc:  # the framework rejected the case, as it must
        outcome.status, outcome.reason = Status.PASS, f"raised {type(exc).__name__}: {exc}".strip()
        return outcome
    outcome.status, outcome.reason = Status.FAIL, "the framework accepted a case it must reject"
    return outcome
