"""Diagnosis: which named convention (`conformance.variants`) a failing measurement follows.

For every variant that applies, the reference is recomputed under the adapter's declared
conventions plus that variant, and the framework's outputs are compared with it at the variant's
own tolerance (`variants.tolerance_for`). A variant *explains* the failure when every compared
output is within that tolerance and the variant itself is distinguishable from what the adapter
was held to (it moves some output beyond the case's tolerance). Otherwise the failure is
unexplained and the closest variant is reported with how far off it was ("badness": the worst
error as a multiple of the allowed one; 1 is the edge of a match).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from adapters.base import Check, Problem
from conformance import variants
from conformance.compare import Tolerance, Undetermined, undefined_or_equal


@dataclass
class Diagnosis:
    explained_by: list[str]
    closest: dict[str, float | str] | None = None  # {"variant", "badness"} when unexplained


def badness(expected: np.ndarray, got: np.ndarray, rtol: float, atol: float,
            ignore: np.ndarray | None = None) -> float:
    """max |got - expected| / (atol + rtol |expected|); NaN on one side only is infinitely bad.
    Elements where `ignore` is true do not count."""
    expected = np.asarray(expected, np.float64)
    got = np.asarray(got, np.float64).reshape(expected.shape) if np.size(got) == np.size(expected) else None
    if got is None:
        return math.inf
    if expected.size == 0:
        return 0.0
    same = undefined_or_equal(expected, got)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        err = np.where(same, 0.0, np.abs(got - expected))
        allowed = atol + rtol * np.where(np.isfinite(expected), np.abs(expected), 0.0)
        ratio = np.where(err == 0, 0.0, err / allowed)
    ratio = np.where(np.isnan(ratio), np.inf, ratio)
    if ignore is not None:
        ratio = np.where(np.broadcast_to(ignore, ratio.shape), 0.0, ratio)
    return float(ratio.max())


def diagnose(problem: Problem, check: Check, declared: tuple[str, ...], got: dict[str, np.ndarray],
             held_to: dict[str, np.ndarray], tol: Tolerance, conditioning: float,
             atol_scales: dict[str, float] | None = None,
             per_output: dict[str, Tolerance] | None = None, ruled: tuple[str, ...] = (),
             settled: dict[str, Undetermined] | None = None) -> Diagnosis:
    """`got`: the framework's compared outputs by name; `held_to`: what they were compared with;
    `atol_scales`: per output, the factor its atol was scaled by (gradients); `per_output`: the
    outputs held to a tolerance of their own (mixed precision), judged from it; `ruled`: the
    variants the known rules covering this check name; `settled`: the elements rounding leaves
    undetermined for every convention (`problem.undetermined`), not judged under any variant.
    Single variants, then pairs of variants neither of which explains it alone (ONNX's float32
    momentum *and* epsilon attributes, say), named "a+b"; then, where neither does, three or more of
    the ruled variants together ("a+b+c": Keras 3 on torch computes a 1-D input in float32, by sums
    of squares, over every axis). Only ruled ones: every combination of the catalogue is too many."""
    names = [n for n, v in variants.CATALOGUE.items()
             if n not in declared and not v.raises and v.applies(problem, check)]
    scored = [(score(problem, check, (*declared, n), got, held_to, tol, conditioning, atol_scales,
                      per_output, settled), n) for n in names]
    # sharpest first: a variant judged at the case's own tolerance before one judged in a wider band
    matched = [n for (worst, moves, _), n in sorted(scored, key=lambda s: s[0][2]) if worst <= 1 and moves]
    for a, b in itertools.combinations(names, 2):  # a pair only where neither explains it alone
        if a not in matched and b not in matched:
            worst, moves, _ = score(problem, check, (*declared, a, b), got, held_to, tol, conditioning,
                                    atol_scales, per_output, settled)
            if worst <= 1 and moves:
                matched.append(f"{a}+{b}")
    if any(set(m.split("+")) <= set(ruled) for m in matched):
        return Diagnosis(matched)
    # no match is what the rules name: the ruled variants together too (a variant the rules do not
    # name can match by its wide band alone: epsilon-outside-sqrt on the Keras-on-torch 1-D case)
    together = [n for n in dict.fromkeys(ruled) if n in names]
    for size in range(3, len(together) + 1):
        combo = next((c for c in itertools.combinations(together, size) if _explains(
            score(problem, check, (*declared, *c), got, held_to, tol, conditioning, atol_scales,
                  per_output, settled))), None)
        if combo is not None:
            return Diagnosis([*matched, "+".join(combo)])
    if matched:
        return Diagnosis(matched)
    plausible = [(worst, n) for (worst, moves, _), n in scored if moves]
    if not plausible:
        return Diagnosis([])
    worst, name = min(plausible)
    return Diagnosis([], {"variant": name, "badness": worst})


def _explains(scored: tuple[float, bool, bool]) -> bool:
    worst, moves, _ = scored
    return worst <= 1 and moves


def score(problem: Problem, check: Check, names: tuple[str, ...], got: dict[str, np.ndarray],
          held_to: dict[str, np.ndarray], tol: Tolerance, conditioning: float,
          atol_scales: dict[str, float] | None = None,
          per_output: dict[str, Tolerance] | None = None,
          settled: dict[str, Undetermined] | None = None) -> tuple[float, bool, bool]:
    """(the best form's worst badness, whether the variants move the result at all, whether they
    are judged in a band wider than the case's tolerance). A variant
    moves it when its simulation leaves the case's tolerance, or, for one that only predicts the
    size of a rounding error (sum of squares, a lower compute dtype, a folded formula), when the
    error it allows is larger than the case's tolerance."""
    best, moves, wide = math.inf, False, False
    for knobs in variants.apply(list(names[:-1]), names[-1], problem, check):
        simulated = variants.simulate(problem, check, knobs)
        if not all(out in simulated for out in got):
            continue
        scale = atol_scales or {}
        unknown = variants.undetermined(problem, check, knobs)
        # an output's own absolute band, replacing the scaled one: a folded gradient's, a sum of squares'
        folded = variants.folded_gradient_atol(knobs, problem, check) | variants.sum_of_squares_atol(
            knobs, problem, check)
        worst = 0.0
        bands: dict[int, tuple] = {}  # per base Tolerance (its rtol may be per channel): outputs share one
        for out, value in got.items():
            base = (per_output or {}).get(out, tol)
            if id(base) not in bands:
                bands[id(base)] = variants.tolerance_for(knobs, problem, base.rtol, base.atol, conditioning)
            rtol, atol = bands[id(base)]
            scaled = atol * scale.get(out, 1.0)
            fold = folded.get(out, 0.0)
            ignore, mask, accepted = unknown.get(out), None, None
            if settled and out in settled:  # undetermined by rounding under every convention
                mask = np.broadcast_to(settled[out].mask, np.shape(value))
                accepted = settled[out].settles(np.asarray(value, np.float64), base)
                ignore = mask if ignore is None else ignore | mask
            worst = max(worst, badness(simulated[out], value, rtol, np.maximum(scaled, fold), ignore))
            wider = bool(np.any(rtol > base.rtol) or np.any(atol > base.atol)
                         or np.any(fold > base.atol * scale.get(out, 1.0)))
            wide = wide or wider
            moves = moves or wider or badness(held_to[out], simulated[out], base.rtol,
                                              base.atol * scale.get(out, 1.0), mask) > 1
            # the measurement leaves the case's tolerance where the simulation cannot say (undetermined),
            # not counting what the rounding-undetermined set accepts
            unsure = unknown.get(out)
            if unsure is not None and bool(np.any(unsure)):
                outside = ~np.asarray(unsure) if accepted is None else ~np.asarray(unsure) | accepted
                moves = moves or badness(held_to[out], value, base.rtol, base.atol * scale.get(out, 1.0),
                                         outside) > 1
        best = min(best, worst)
    return best, moves, wide


def rejects(exc: BaseException, message_limit: int = 300) -> str:
    """The framework's own words when it raised where the reference computes a value."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:message_limit]}"
