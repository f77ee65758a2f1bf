"""One case x adapter x check: build the problem, run the adapter, compare, diagnose, decide.

Kept free of pytest so the plugin, the fuzzer and the benchmarks share it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, is_dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from adapters.base import Adapter, Check, NotExpressible, Problem
from conformance import ROOT, known, reference
from conformance import problem as problems
from conformance.compare import (
    Metric,
    Tolerance,
    Undetermined,
    coarser,
    compare,
    folded_tolerance,
    held_dtype,
    tolerance,
)
from conformance.diagnose import diagnose, rejects
from conformance.outputs import CHECKS, outputs_of
from conformance.results import Record, Status
from conformance.schema import Case

OWN_CODE = (ROOT / "adapters", ROOT / "conformance")


@functools.cache
def default_rules() -> known.Rules:
    return known.load()


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
    """Run one check; the framework's results by output name (`conformance.outputs`): an adapter
    method returns a dataclass of outputs, or the array of a check's single output."""
    result = getattr(adapter, CHECKS[check].method)(problem)
    return vars(result) if is_dataclass(result) else {outputs_of(check)[0].name: result}


def evaluate(adapter: Adapter, case: Case, check: Check, outcome: Outcome | None = None,
             rules: known.Rules | None = None) -> Outcome:
    """Run, compare, diagnose a failure and apply the known-divergence rules. An exception from
    the adapter's own code propagates (the caller records an error); one from the framework is
    the `rejects` divergence. `outcome`, when given, is filled in place so a caller keeps what was
    learnt before a raise."""
    outcome = outcome if outcome is not None else Outcome()
    problem = problems.build(case, check)
    reason = adapter.why_not_expressible(problem, check)
    if reason:
        outcome.status, outcome.reason = Status.NOT_EXPRESSIBLE, reason
        return outcome
    outcome.translations = adapter.translations(problem)
    outcome.conventions = adapter.conventions_for(problem).variants
    rules = rules or default_rules()
    if case.expect_error:
        _must_raise(adapter, problem, check, outcome)
        if outcome.status == Status.FAIL:
            outcome.explained_by = ["accepts"]
            apply_rules(outcome, rules.for_check(adapter, case, check))
        return outcome
    conditioning = problems.conditioning(case, check, problem)
    tol, per_output = tolerances(problem, check, conditioning, case)
    outcome.tolerance = tol
    got, raised = run_framework(adapter, problem, check, outcome)
    if outcome.status == Status.NOT_EXPRESSIBLE:
        return outcome
    if raised is not None:
        outcome.status, outcome.explained_by = Status.FAIL, ["rejects"]
        outcome.reason = f"the framework raised where the reference computes a value: {rejects(raised)}"
    else:
        expected = problems.expected(case, check, problem, outcome.conventions)
        scales = case.memo(("gradient-scales",), lambda: problems.gradient_scales(problem)) \
            if check == "gradients" and case.tolerance is None else {}
        unsure = problems.undetermined(case, check, problem)
        compared = measure(check, expected, got, case.dtype, tol, scales, per_output, unsure)
        outcome.metrics = [m for _, _, _, m in compared]
        if all(m.passed for m in outcome.metrics):
            outcome.status = Status.PASS
            return outcome
        outcome.status = Status.FAIL
    covering = rules.for_check(adapter, case, check)
    if raised is None:
        found = diagnose(problem, check, outcome.conventions, {name: value for name, _, value, _ in compared},
                         {name: held for name, held, _, _ in compared}, tol, conditioning, scales, per_output,
                         tuple(rule.explained_by for rule in covering), unsure)
        outcome.explained_by, outcome.closest = found.explained_by, found.closest
    apply_rules(outcome, covering)
    return outcome


def apply_rules(outcome: Outcome, rules: list[known.Rule]) -> None:
    """A failure that rules explain is known: one rule's variant, or for a pair "a+b" a rule for
    each. Under rules that explain it otherwise, it fails and says what they expected."""
    named = {rule.explained_by: rule for rule in rules}
    for explanation in outcome.explained_by:
        parts = explanation.split("+")
        if all(part in named for part in parts):
            first, *others = (named[part] for part in parts)
            outcome.status = Status.KNOWN
            outcome.reason = "; ".join(r.reason for r in (first, *others))
            outcome.rule = first.model_dump() | ({"with": [r.model_dump() for r in others]} if others else {})
            return
    if rules:
        expected = ", ".join(f"{r.explained_by} ({r.source})" for r in rules)
        found = ", ".join(outcome.explained_by) or "no variant"
        outcome.reason = (f"{outcome.reason}; " if outcome.reason else "") + (
            f"known-divergence rules expect {expected}; the measurement is explained by {found}")


PROGRAMMING_ERRORS = (AssertionError, AttributeError, NameError, TypeError, KeyError, ImportError)


def raised_by_framework(exc: BaseException) -> bool:
    """The framework raised, not the adapter's own code: the innermost frame outside NumPy is
    outside this repository's adapters and harness, or, for an error a framework's compiled code
    raises from inside the adapter's call (torch's IndexError from `movedim`), it is not the kind
    of exception a programming error makes."""
    if not isinstance(exc, PROGRAMMING_ERRORS):
        return True
    innermost = None
    tb = exc.__traceback__
    while tb is not None:
        path = Path(tb.tb_frame.f_code.co_filename).resolve()
        if "numpy" not in path.parts:
            innermost = path
        tb = tb.tb_next
    return innermost is not None and not any(innermost.is_relative_to(own) for own in OWN_CODE)


def tolerances(problem: Problem, check: Check, conditioning: float, case: Case,
               ) -> tuple[Tolerance, dict[str, Tolerance]]:
    """The check's tolerance, and each output's own where it differs: under mixed precision
    (`param_dtype`) an output held in another dtype (`compare.held_dtype`), and with a preceding
    layer the folded outputs, per channel (`compare.folded_tolerance`). The check's is that of the
    coarsest dtype its outputs are held in: the diagnosis and the record use it."""
    if case.tolerance is not None:
        return tolerance(case.dtype, conditioning, case.tolerance), {}
    held = {o.name: held_dtype(o.held_in, problem.dtype, problem.param_dtype) for o in outputs_of(check)
            if o.exists(case.params)}
    coarsest = case.dtype
    for dtype in held.values():
        coarsest = coarser(coarsest, dtype)
    check_tol = tolerance(coarsest, conditioning, None)
    per_output = {name: tolerance(dtype, conditioning, None) for name, dtype in held.items()
                  if dtype != coarsest}
    if check == "training" and problem.infer_after_training and "inference_output" in held:
        # inference after training cancels the computed moving mean, held to u |moving mean|
        after = case.memo(("moving-conditioning",), lambda: problems.moving_conditioning(problem))
        if after > conditioning:
            per_output["inference_output"] = tolerance(held["inference_output"], after, None)
        stored = stored_variance_tolerance(case, problem, per_output.get("inference_output", check_tol))
        if stored is not None:
            per_output["inference_output"] = stored
    if check == "training" and "moving_variance" in held:
        per_output |= residue_tolerances(case, problem, check_tol, per_output)
    magnitude = problems.folded_magnitude(case, check, problem)
    if magnitude is not None:
        axis, ndim = problem.channel_axes[0], problem.batches[-1].ndim
        folded = {o.name: folded_tolerance(held[o.name], magnitude, axis, ndim) for o in outputs_of(check)
                  if o.folded and o.name in held}
        per_output |= folded
        if folded:
            check_tol = replace(check_tol, rule=f"{check_tol.rule}; {', '.join(folded)} "
                                                f"{next(iter(folded.values())).rule}")
    return check_tol, per_output


def stored_variance_tolerance(case: Case, problem: Problem, base: Tolerance) -> Tolerance | None:
    """`base` for inference after training, its atol widened per channel by rho_i · max|y_i - beta_i|
    (the reference's), where the moving variance is stored in a dtype whose resolution moves the
    output by a factor of up to 1 + rho_i (`problem.stored_variance`); None where no channel's is."""
    _, rho = case.memo(("stored-variance",), lambda: problems.stored_variance(problem))
    if not rho.any():
        return None
    bn = reference.bn_input(problem)
    y = case.memo(("reference", "training"),
                  lambda: reference.outputs(problem, "training"))["inference_output"]
    axes, x = bn.channel_axes, bn.batches[-1]
    beta = reference.broadcastable(bn.beta if bn.center else np.zeros_like(bn.beta), x.ndim, axes)
    red = reference.reduce_axes(x.ndim, axes)
    with np.errstate(invalid="ignore"):
        spread = reference.to_channels(np.nanmax(np.abs(y - beta), axis=red, keepdims=True), axes)
    widen = reference.broadcastable(rho * np.where(np.isfinite(spread), spread, 0.0), x.ndim, axes)
    return replace(base, atol=base.atol + widen, rule=f"{base.rule}; inference_output's atol + rho_i x "
                   f"max|y_i - beta_i|, rho up to {float(rho.max()):.3g} (moving variance near "
                   f"{problem.param_dtype or problem.dtype}'s resolution or its updates' rounding)")


def residue_tolerances(case: Case, problem: Problem, base: Tolerance, per_output: dict[str, Tolerance],
                       ) -> dict[str, Tolerance]:
    """Where a constant channel's rounded mean leaves residues in the moving statistics
    (`problem.residue_bands`: the mean within M, the variance up to R above): the moving
    variance's atol + R, the moving mean's + M, and inference after training, y - beta =
    gamma (x - mean') / sqrt(v' + eps), its atol + rho_i·max|y_i - beta_i| + |gamma_i|·M_i /
    sqrt(v_i + eps), rho = 1 - sqrt((v + eps) / (v + eps + R)) (v' in [v, v + R]); where v + eps
    <= R it is undetermined instead (`problem.undetermined`). Empty where no channel has residues."""
    mean_band, band = case.memo(("residue-bands",), lambda: problems.residue_bands(problem))
    if not band.any():
        return {}
    out = {}
    why = "moving statistics' residues of a constant channel's rounded mean"
    for name, widen in (("moving_variance", band), ("moving_mean", mean_band)):
        held = per_output.get(name, base)
        out[name] = replace(held, atol=held.atol + widen, rule=f"{held.rule}; {name}'s atol + up to "
                            f"{float(widen.max()):.3g} ({why})")
    if problem.infer_after_training:
        bn = reference.bn_input(problem)
        v = problems.smallest_moving_variance(problem) + problem.epsilon
        y = case.memo(("reference", "training"),
                      lambda: reference.outputs(problem, "training"))["inference_output"]
        axes, x = bn.channel_axes, bn.batches[-1]
        beta = reference.broadcastable(bn.beta if bn.center else np.zeros_like(bn.beta), x.ndim, axes)
        red = reference.reduce_axes(x.ndim, axes)
        gamma = np.abs(bn.gamma) if bn.scale else np.ones_like(bn.gamma)
        with np.errstate(invalid="ignore", divide="ignore"):
            finite = np.where(np.isfinite(y - beta), np.abs(y - beta), 0.0)
            spread = reference.to_channels(finite.max(axis=red, keepdims=True, initial=0.0), axes)
            rho = 1.0 - np.sqrt(v / (v + band))
            widen = np.where(v > band, rho * spread + gamma * mean_band / np.sqrt(v), 0.0)
        held = per_output.get("inference_output", base)
        out["inference_output"] = replace(
            held, atol=held.atol + reference.broadcastable(widen, x.ndim, axes),
            rule=f"{held.rule}; inference_output's atol + rho_i x max|y_i - beta_i| + |gamma_i| M_i / "
                 f"sqrt(v_i + eps) ({why})")
    return out


def measure(check: str, expected: problems.Expected, got: dict[str, np.ndarray | None], dtype: str,
            tol: Tolerance, atol_scales: dict[str, float] | None = None,
            per_output: dict[str, Tolerance] | None = None,
            undetermined: dict[str, Undetermined] | None = None,
            ) -> list[tuple[str, np.ndarray, np.ndarray, Metric]]:
    """Compare every output the case asks for and the framework exposes, in table order:
    (output name, the expected array it was held to, the framework's, the metric). An output
    in `atol_scales` has its atol multiplied by that scale (`problem.gradient_scales`); one in
    `per_output` is held to that tolerance instead of `tol` (mixed precision); one in `undetermined`
    is judged by its accepted set where rounding leaves it undetermined (`problem.undetermined`)."""
    compared = []
    for output in outputs_of(check):
        value = got.get(output.name)
        if not output.compared or value is None or not expected.asks_for(output.name):
            continue
        array, derived, shown_as = expected.get(output.name)
        if array is not None:
            scale = (atol_scales or {}).get(output.name, 1.0)
            base = (per_output or {}).get(output.name, tol)
            held = base if scale == 1.0 else replace(
                base, atol=base.atol * scale,
                rule=f"{base.rule}; atol x {scale:.3g} (size of the summed terms)")
            metric = compare(shown_as, array, value, dtype, held, derived, in_dtype=output.shape == "input",
                             undetermined=(undetermined or {}).get(output.name))
            compared.append((output.name, array, value, metric))
    return compared


def run_framework(adapter: Adapter, problem: Problem, check: Check, outcome: Outcome,
                  ) -> tuple[dict[str, np.ndarray | None], BaseException | None]:
    """(outputs, None) when the check ran, ({}, the exception) when the framework raised, and ({},
    None) with the outcome not expressible when the adapter says so while running. An exception
    from the adapter's own code propagates (the caller records an error)."""
    try:
        return execute(adapter, problem, check), None
    except NotExpressible as exc:
        outcome.status, outcome.reason = Status.NOT_EXPRESSIBLE, str(exc)
        return {}, None
    except Exception as exc:
        if not raised_by_framework(exc):
            raise
        return {}, exc


def _must_raise(adapter: Adapter, problem: Problem, check: Check, outcome: Outcome) -> Outcome:
    """`expect_error: true`: pass only if the framework itself raises."""
    _, raised = run_framework(adapter, problem, check, outcome)
    if outcome.status == Status.NOT_EXPRESSIBLE:
        return outcome
    if raised is not None:
        outcome.status, outcome.reason = Status.PASS, f"raised {type(raised).__name__}: {raised}".strip()
    else:
        outcome.status, outcome.reason = Status.FAIL, "the framework accepted a case it must reject"
    return outcome
