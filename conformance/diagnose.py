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
from dataclasses import dataclass, field

import numpy as np

from adapters.base import Check, Problem
from conformance import variants
from conformance.compare import Tolerance, Undetermined, held_in, undefined_or_equal
from conformance.outputs import outputs_of


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
    held_to = {out: _as_measured(problem, check, out, value, got[out]) if out in got else value
               for out, value in held_to.items()}
    judge = _Judge(problem, check, got, held_to, tol, conditioning, atol_scales or {}, per_output or {},
                   settled or {})
    # The adapter's own conventions alone give the measurement, and differ from the case's expected
    # values (they "move" it): what is off is the expectation (written by hand, not filled from the
    # reference), not the framework, and any variant would explain it by moving away from it too
    # (tests/test_plugin.py's wrong-expectation case, made known by an eps-0 rule before this).
    own = variants.apply(list(declared), None, problem, check)
    if any((judged := judge._judge(k)) is not None and judged[0] <= 1 and judged[1] for k in own):
        return Diagnosis([])
    names = [n for n, v in variants.CATALOGUE.items()
             if n not in declared and not v.raises and v.applies(problem, check)]
    scored = [(judge.score((*declared, n)), n) for n in names]
    # sharpest first: a variant judged at the case's own tolerance before one judged in a wider band
    matched = [n for (worst, moves, _), n in sorted(scored, key=lambda s: s[0][2]) if worst <= 1 and moves]
    for a, b in itertools.combinations(names, 2):  # a pair only where neither explains it alone
        if a not in matched and b not in matched and judge.explains((*declared, a, b)):
            matched.append(f"{a}+{b}")
    if any(set(m.split("+")) <= set(ruled) for m in matched):
        return Diagnosis(matched)
    # no match is what the rules name: the ruled variants together too (a variant the rules do not
    # name can match by its wide band alone: epsilon-outside-sqrt on the Keras-on-torch 1-D case)
    together = [n for n in dict.fromkeys(ruled) if n in names]
    for size in range(3, len(together) + 1):
        combo = next((c for c in itertools.combinations(together, size) if judge.explains((*declared, *c))),
                     None)
        if combo is not None:
            return Diagnosis([*matched, "+".join(combo)])
    if matched:
        return Diagnosis(matched)
    plausible = [(worst, n) for (worst, moves, _), n in scored if moves]
    if not plausible:
        return Diagnosis([])
    worst, name = min(plausible)
    return Diagnosis([], {"variant": name, "badness": worst})


@dataclass
class _Judge:
    """One diagnosis's measurement, judged against the forms (`Knobs`) of variants. Each form is
    judged once (16% of the pairs' forms are a single's or another pair's on the ONNX Runtime items
    of a generated corpus), and a pair or combination is first asked only whether some form brings
    every output within its band (`_inside`, which stops at the first output that is not: 1.4
    outputs per form there), since few explain anything."""

    problem: Problem
    check: Check
    got: dict[str, np.ndarray]
    held_to: dict[str, np.ndarray]
    tol: Tolerance
    conditioning: float
    scale: dict[str, float]
    per_output: dict[str, Tolerance]
    settled: dict[str, Undetermined]
    judged: dict[variants.Knobs, tuple[float, bool, bool] | None] = field(default_factory=dict)
    inside: dict[variants.Knobs, bool] = field(default_factory=dict)

    def forms(self, names: tuple[str, ...]) -> list[variants.Knobs]:
        return variants.apply(list(names[:-1]), names[-1], self.problem, self.check)

    def score(self, names: tuple[str, ...]) -> tuple[float, bool, bool]:
        """For the variants `names` (the last on top of the others): (the best form's worst badness,
        whether the variants move the result at all, whether they are judged in a band wider than
        the case's tolerance). A variant moves it when its simulation leaves the case's tolerance,
        or, for one that only predicts the size of a rounding error (sum of squares, a lower compute
        dtype, a folded formula), when the error it allows is larger than the case's tolerance."""
        best, moves, wide = math.inf, False, False
        for knobs in self.forms(names):
            if knobs not in self.judged:
                self.judged[knobs] = self._judge(knobs)
            judged = self.judged[knobs]
            if judged is not None:
                best, moves, wide = min(best, judged[0]), moves or judged[1], wide or judged[2]
        return best, moves, wide

    def explains(self, names: tuple[str, ...]) -> bool:
        """The variants `names` together explain the measurement: scored only where some form
        brings every output within its band."""
        forms = self.forms(names)
        for knobs in forms:
            if knobs not in self.inside:
                judged = self.judged.get(knobs, False)
                self.inside[knobs] = self._inside(knobs) if judged is False else (
                    judged is not None and judged[0] <= 1)
        return any(self.inside[k] for k in forms) and _explains(self.score(names))

    def _bands(self, knobs: variants.Knobs) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray],
                                                     dict[str, float], dict[str, tuple]] | None:
        """(simulated outputs, undetermined masks, own absolute bands, (rtol, atol) per output) of
        one form; None where it does not simulate every compared output."""
        problem, check = self.problem, self.check
        simulated = variants.simulate(problem, check, knobs)
        if not all(out in simulated for out in self.got):
            return None
        simulated = {out: _as_measured(problem, check, out, simulated[out], value)
                     for out, value in self.got.items()}
        unknown = variants.undetermined(problem, check, knobs)
        # an output's own absolute band, replacing the scaled one: a folded gradient's, a sum of squares'
        folded = variants.folded_gradient_atol(knobs, problem, check) | variants.sum_of_squares_atol(
            knobs, problem, check)
        bands: dict[int, tuple] = {}  # per base Tolerance (its rtol may be per channel): outputs share one
        for out in self.got:
            base = self.per_output.get(out, self.tol)
            if id(base) not in bands:
                bands[id(base)] = variants.tolerance_for(knobs, problem, check, base.rtol, base.atol,
                                                         self.conditioning, base.conditioning)
        return simulated, unknown, folded, bands

    def _settled(self, out: str) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(mask, accepted) of an output's elements undetermined by rounding under every
        convention (`settled`): the mask is not judged, and what its set accepts is no failure."""
        if out not in self.settled:
            return None, None
        value = np.asarray(self.got[out], np.float64)
        mask = np.broadcast_to(self.settled[out].mask, value.shape)
        return mask, self.settled[out].settles(value, self.per_output.get(out, self.tol))

    def _ignored(self, out: str, unknown: dict[str, np.ndarray]) -> np.ndarray | None:
        """The elements of `out` a form's badness leaves out: its own undetermined, and those of
        `settled` whose value its set accepts. A settled element outside that set is judged like
        any other: otherwise every variant that explains the rest would explain it (Keras 3 on jax
        computing a float64 layer in float32 gives 0.25 where the 0/0 set accepts ±0.217, which the
        fold's rounding explains, normalize-folded, not the compute dtype)."""
        _, accepted = self._settled(out)
        ignore = unknown.get(out)
        return accepted if ignore is None else ignore if accepted is None else ignore | accepted

    def _inside(self, knobs: variants.Knobs) -> bool:
        """Every output within the form's band (worst <= 1), stopping at the first that is not."""
        found = self._bands(knobs)
        if found is None:
            return False
        simulated, unknown, folded, bands = found
        for out, value in self.got.items():
            rtol, atol = bands[id(self.per_output.get(out, self.tol))]
            band = np.maximum(atol * self.scale.get(out, 1.0), folded.get(out, 0.0))
            if badness(simulated[out], value, rtol, band, self._ignored(out, unknown)) > 1:
                return False
        return True

    def _judge(self, knobs: variants.Knobs) -> tuple[float, bool, bool] | None:
        """(worst badness, moves, wide) of one form; None where it does not simulate every output."""
        found = self._bands(knobs)
        if found is None:
            return None
        simulated, unknown, folded, bands = found
        worst, moves, wide = 0.0, False, False
        for out, value in self.got.items():
            base = self.per_output.get(out, self.tol)
            rtol, atol = bands[id(base)]
            scale = self.scale.get(out, 1.0)
            held_atol = base.atol * scale
            fold = folded.get(out, 0.0)
            _, accepted = self._settled(out)
            worst = max(worst, badness(simulated[out], value, rtol, np.maximum(atol * scale, fold),
                                       self._ignored(out, unknown)))
            wider = bool(np.any(rtol > base.rtol) or np.any(atol > base.atol) or np.any(fold > held_atol))
            wide = wide or wider
            # a settled element counts where the set does not accept the measurement: a variant that
            # simulates it moves the result there (tf.compat.v1.layers' default training=False
            # normalizes a 0/0 channel with the moving statistics: a determined 157.4, no beta ± gamma)
            moves = moves or wider or badness(self.held_to[out], simulated[out], base.rtol, held_atol,
                                              accepted) > 1
            # the measurement leaves the case's tolerance where the simulation cannot say (undetermined),
            # not counting what the rounding-undetermined set accepts
            unsure = unknown.get(out)
            if unsure is not None and bool(np.any(unsure)):
                outside = ~np.asarray(unsure) if accepted is None else ~np.asarray(unsure) | accepted
                moves = moves or badness(self.held_to[out], value, base.rtol, held_atol, outside) > 1
        return worst, moves, wide


def _as_measured(problem: Problem, check: Check, out: str, value: np.ndarray, got: np.ndarray) -> np.ndarray:
    """`value` (expected or simulated) as the measurement holds an output shaped like the input (y,
    dL/dx): where the framework gave ±inf, a value past the case dtype's range is that dtype's
    infinity, as `compare` holds it (a float16 y of 1.4e5 is inf: TF's fused kernel computes in
    float32 and casts y to float16, fused_batch_norm_op.cc), under every variant, not only one that
    computes in float16. Where the framework gave a finite value it is compared as it is (a
    float16-quantized TFLite model outputs float32: 1.4e5 stays finite, adapters/known/tf-export.yaml)."""
    if not _INPUT_SHAPED[check].get(out, False):
        return value
    value = np.asarray(value, np.float64)
    got = np.asarray(got, np.float64)
    if got.size != value.size:
        return value
    return np.where(np.isinf(got.reshape(value.shape)), held_in(value, problem.dtype), value)


_INPUT_SHAPED = {check: {o.name: o.shape == "input" for o in outputs_of(check)}
                 for check in ("training", "inference", "gradients")}


def _explains(scored: tuple[float, bool, bool]) -> bool:
    worst, moves, _ = scored
    return worst <= 1 and moves


def rejects(exc: BaseException, message_limit: int = 300) -> str:
    """The framework's own words when it raised where the reference computes a value."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:message_limit]}"
