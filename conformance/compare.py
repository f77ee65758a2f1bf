"""Error figures and tolerances.

Default tolerance (rtol = atol) per dtype, in ulps of a value near 1 about 4 for float16 and
bfloat16, 84 for float32 and 450,000 for float64 (float64 cases check the algorithm, not last bits):

    float64 1e-10   float32 1e-5   float16 4e-3   bfloat16 3e-2

widened by the input's conditioning c = max over channels of |mean| / sqrt(var + eps): an element
held to one ulp of its own magnitude is off by c ulps of sqrt(var + eps) once the mean is subtracted,
so a correct two-pass implementation is off by about eps * c, and both tolerances are multiplied by
(1 + c). An E[x^2] - E[x]^2 implementation is off by about eps * c^2 and still fails. A case may
override rtol/atol only with a written reason. Where the reference is NaN (undefined), any
non-finite result matches; where rounding leaves an output undetermined (`Undetermined`, built by
`problem.undetermined`), the finite values derived for it match too, and the metric counts them.

Folded outputs (`folded_tolerance`): with a preceding layer, y of the training and inference
checks is held per channel to base x (1 + T_i), T_i the size of the terms channel i's folded
output sums (`problem.folded_magnitudes`), instead of the case-wide (1 + c).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from conformance.dtypes import finfo, ulp
from conformance.schema import ToleranceOverride

DEFAULT_TOLERANCE = {"float64": 1e-10, "float32": 1e-5, "float16": 4e-3, "bfloat16": 3e-2}


def coarser(a: str, b: str) -> str:
    """The dtype with the wider default tolerance."""
    return a if DEFAULT_TOLERANCE[a] >= DEFAULT_TOLERANCE[b] else b


def held_dtype(held_in: str, dtype: str, param_dtype: str | None) -> str:
    """The dtype an output is held in (`outputs.HeldIn`) under mixed precision: the input's, the
    parameters' (gamma, beta and the moving statistics: `params.param_dtype`, default the
    input's), or the coarser of the two (inference after training reads the stored statistics)."""
    params = param_dtype or dtype
    return {"input": dtype, "params": params, "both": coarser(dtype, params)}[held_in]


@dataclass(frozen=True)
class Tolerance:
    # a float, or (folded outputs) an array that broadcasts over the output: one value per channel
    rtol: float | np.ndarray
    atol: float | np.ndarray
    rule: str  # how it was chosen, for the report
    # the c it was widened by, rtol = atol = default(dtype)·(1 + c): the input's, or for inference
    # after training the moving statistics' (`problem.moving_conditioning`), which a diagnosis
    # widens a lower compute dtype's band by too (`variants.tolerance_for`)
    conditioning: float = 0.0


def tolerance(dtype: str, conditioning: float, override: ToleranceOverride | None) -> Tolerance:
    base = DEFAULT_TOLERANCE[dtype]
    factor = 1.0 + conditioning
    rtol = atol = base * factor
    rule = f"{dtype} default {base:g} x (1 + conditioning {conditioning:.3g})"
    if override is not None:
        rtol = override.rtol if override.rtol is not None else rtol
        atol = override.atol if override.atol is not None else atol
        rule = f"case override: {override.reason}"
    return Tolerance(rtol, atol, rule, conditioning)


def folded_tolerance(dtype: str, magnitude: np.ndarray, axis: int, ndim: int) -> Tolerance:
    """The tolerance of a folded output (y with a preceding layer), per channel i along `axis`:
    rtol = atol = base(dtype) x (1 + T_i), T_i = `problem.folded_magnitudes`.

    Derivation. An exporter folds BN into the preceding layer, y_i = sum_j W'_ij x_j + b'_i with
    W'_ij = s_i W_ij, b'_i = s_i (b_i - mean_i) + beta_i, s_i = gamma_i / sqrt(var_i + eps), and
    evaluates it in the case dtype (unit roundoff u). Rounding W' and b', the C products and the
    C + 1 additions (Higham, "Accuracy and Stability of Numerical Algorithms", 3.1) leaves
    |error_i| <= (C + 2) u |s_i| (sum_j |W_ij| |x_j| + |b_i - mean_i|) + u |y_i|
              <= (C + 2) u T_i + u |y_i|.
    Unfolded (z = W x + b rounded, then BN) z is off by u (|W| |x| + |b|) and the mean computed
    from it by about as much, both scaled by |s_i|: 2 u T_i.
    The bound depends on channel i only, so each channel is held to its own T_i: a folded output
    near 0 is a difference of large products, where ULPs of the output mislead, but a channel of
    small products is not given another channel's allowance. The base is 8.2 u for float16
    (4e-3 / 2^-11), 7.7 u for bfloat16, 168 u for float32, so base x (1 + T_i) covers the worst
    case (C + 2) u T_i for C <= 6 channels in float16 and bfloat16 and any C in float32; beyond
    that it covers the typical error, about sqrt(C + 2) u T_i (random rounding). No dtype gets a
    factor of its own: float16 folds are held to float16's base like every other float16 output."""
    base = DEFAULT_TOLERANCE[dtype]
    shape = [1] * ndim
    shape[axis] = magnitude.size
    factor = (1.0 + magnitude).reshape(shape)
    span = f"from {float(magnitude.min()):.3g} to {float(magnitude.max()):.3g}" if magnitude.size else "none"
    return Tolerance(base * factor, base * factor,
                     f"folded, per channel: {dtype} default {base:g} x (1 + T_i), T_i (size of the folded "
                     f"products) {span}")


@dataclass
class Metric:
    """How far one output is from its expected value."""

    name: str
    passed: bool
    max_abs: float
    max_rel: float
    max_ulp: float
    worst_index: list[int]
    worst_expected: float
    worst_got: float
    rtol: float
    atol: float
    derived: bool = False  # the expected value came from the reference, not the case
    note: str = ""
    undetermined: int = 0  # elements rounding leaves undetermined (`Undetermined`), judged by its set

    def as_dict(self) -> dict:
        # field by field: dataclasses.asdict deep-copies every value
        return {f.name: _json_float(getattr(self, f.name)) for f in METRIC_FIELDS} | {
            "worst_index": list(self.worst_index)}


METRIC_FIELDS = fields(Metric)


def _json_float(v):
    if isinstance(v, float) and not math.isfinite(v):  # math: np.isfinite costs 1 us per scalar
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


@dataclass(frozen=True)
class Undetermined:
    """Elements of one output whose value exact arithmetic does not fix under rounding
    (`problem.undetermined`): there a result is accepted when it is non-finite, or within the
    tolerance of one of `accepted` (arrays that broadcast over the output), or anything at all with
    `anything`; with `upto`, only from 0 to `upto` (a rounding residue's square, within tolerance,
    never non-finite). The reference there is NaN (0/0), the 0 of a variance a rounded mean leaves a
    residue in, or a quotient by a statistic the stored dtype cannot resolve; a wrong finite value
    still fails."""

    mask: np.ndarray  # bool, broadcasts over the output
    accepted: tuple[np.ndarray, ...] = ()
    anything: bool = False
    upto: np.ndarray | None = None  # also accepted: 0 <= value <= upto (broadcasts over the output)
    why: str = ""

    def settles(self, got: np.ndarray, tol: Tolerance) -> np.ndarray:
        """Per element: inside the mask and a member of the accepted set."""
        mask = np.broadcast_to(self.mask, got.shape)
        if self.anything:
            return mask
        ok = ~np.isfinite(got) if self.upto is None else np.zeros(got.shape, bool)
        with np.errstate(invalid="ignore", over="ignore"):
            for value in self.accepted:
                ok = ok | (np.abs(got - value) <= tol.atol + tol.rtol * np.abs(value))
            if self.upto is not None:
                ok = ok | ((got >= -tol.atol) & (got <= self.upto + tol.atol + tol.rtol * self.upto))
        return mask & ok


def undefined_or_equal(expected: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Where no error is counted: equal values (infinities included), and where the reference is
    NaN, an undefined value (0/0 on a constant channel with eps 0, the statistics of an empty
    batch), any non-finite result (a framework's inf for the same 0/0 is just as undefined)."""
    return (np.isnan(expected) & ~np.isfinite(got)) | (expected == got)


def held_in(values: np.ndarray, dtype: str) -> np.ndarray:
    """`values` as an output held in `dtype` holds them: beyond the dtype's range, the infinity of
    that sign (a float16 output of 8e4 is inf, whatever the framework computed it in)."""
    largest = float(finfo(dtype).max)
    with np.errstate(invalid="ignore"):
        return np.where(np.abs(values) > largest, np.copysign(np.inf, values), values)


def compare(name: str, expected: np.ndarray, got: np.ndarray, dtype: str, tol: Tolerance,
            derived: bool = False, in_dtype: bool = False,
            undetermined: Undetermined | None = None) -> Metric:
    """`in_dtype`: the output is held in the case dtype (y, dL/dx), so an expected value beyond the
    dtype's range is the infinity the dtype holds for it (a float16 output of 8e4 is inf).
    `undetermined`: elements judged by its accepted set instead (counted in the metric, with why)."""
    expected = held_in(np.asarray(expected, dtype=np.float64), dtype) if in_dtype else \
        np.asarray(expected, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    if got.shape != expected.shape:
        if got.size == expected.size:
            got = got.reshape(expected.shape)
        else:
            return Metric(name, False, np.inf, np.inf, np.inf, [], np.nan, np.nan, widest(tol.rtol),
                          widest(tol.atol), derived,
                          f"shape {list(got.shape)}, expected {list(expected.shape)}")
    exact = undefined_or_equal(expected, got)
    unsure, note = 0, ""
    if undetermined is not None:
        exact = exact | undetermined.settles(got, tol)
        unsure = int(np.broadcast_to(undetermined.mask, expected.shape).sum())
        note = f"{unsure} undetermined: {undetermined.why}" if unsure else ""
    with np.errstate(invalid="ignore", over="ignore"):
        abs_err = np.where(exact, 0.0, np.abs(got - expected))
    abs_err = np.where(np.isnan(abs_err), np.inf, abs_err)  # NaN on one side only
    allowed = tol.atol + tol.rtol * np.where(np.isfinite(expected), np.abs(expected), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(exact, 0.0, abs_err / np.abs(expected))
        ulps = np.where(exact, 0.0, abs_err / ulp(np.where(np.isfinite(expected), expected, 0), dtype))
        badness = np.where(allowed > 0, abs_err / allowed, np.where(abs_err > 0, np.inf, 0.0))
    if expected.size == 0:
        return Metric(name, True, 0.0, 0.0, 0.0, [], 0.0, 0.0, widest(tol.rtol), widest(tol.atol), derived,
                      note, unsure)
    worst = np.unravel_index(int(np.argmax(badness)), expected.shape)
    finite_rel = rel[np.isfinite(rel)] if np.any(expected != 0) else np.zeros(1)
    return Metric(
        name=name,
        passed=bool(np.all(abs_err <= allowed)),
        max_abs=float(abs_err.max()),
        max_rel=float(finite_rel.max()) if finite_rel.size else float("inf"),
        max_ulp=float(ulps.max()),
        worst_index=[int(i) for i in worst],
        worst_expected=float(expected[worst]),
        worst_got=float(got[worst]),
        rtol=float(np.broadcast_to(tol.rtol, expected.shape)[worst]),  # the worst element's own
        atol=float(np.broadcast_to(tol.atol, expected.shape)[worst]),
        derived=derived,
        note=note,
        undetermined=unsure,
    )


def widest(value: float | np.ndarray) -> float:
    """A per-channel tolerance's largest value (0 with no channels), for the record."""
    return float(np.max(value)) if np.size(value) else 0.0
