"""The four case dtypes as NumPy sees them, without a framework: rounding and ULP size."""

from __future__ import annotations

import ml_dtypes
import numpy as np

DTYPES: dict[str, type] = {
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "float32": np.float32,
    "float64": np.float64,
}


def finfo(dtype: str):
    return ml_dtypes.finfo(DTYPES[dtype]) if dtype == "bfloat16" else np.finfo(DTYPES[dtype])


def round_to(values: np.ndarray, dtype: str) -> np.ndarray:
    """float64 array holding exactly the values representable in `dtype` (round to nearest even)."""
    with np.errstate(over="ignore"):  # beyond the dtype's range: inf, as the dtype itself gives
        return np.asarray(values, dtype=np.float64).astype(DTYPES[dtype]).astype(np.float64)


def ulp(values: np.ndarray, dtype: str) -> np.ndarray:
    """Spacing of `dtype` at each value's magnitude (subnormal spacing near zero)."""
    info = finfo(dtype)
    magnitude = np.abs(np.asarray(values, dtype=np.float64))
    with np.errstate(divide="ignore"):
        exponent = np.floor(np.log2(np.where(magnitude > 0, magnitude, 1.0)))
    exponent = np.maximum(exponent, int(info.minexp))
    return np.ldexp(1.0, (exponent - int(info.nmant)).astype(int))


def eps(dtype: str) -> float:
    return float(finfo(dtype).eps)
