"""Small argument checks shared by the reference modules (plain ValueError everywhere)."""

from __future__ import annotations

import numbers
from typing import TypeGuard

import numpy as np
from numpy.typing import ArrayLike, NDArray

Float64Array = NDArray[np.float64]


def as_float64(x: ArrayLike, name: str) -> Float64Array:
    """Convert ``x`` to a float64 NumPy array (a copy is never needed: nothing is written)."""
    arr = np.asarray(x)
    if np.iscomplexobj(arr):
        raise TypeError(f"{name}: complex input is not supported")
    return np.asarray(arr, dtype=np.float64)


def as_matrix(x: ArrayLike, name: str) -> Float64Array:
    """A single finite 2-D float64 matrix."""
    a = as_float64(x, name)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D matrix, got ndim={a.ndim}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: contains NaN or Inf")
    return a


def as_measure_spectrum(s: ArrayLike, name: str = "s") -> Float64Array:
    """A single finite, non-negative 1-D spectrum (ordering not checked)."""
    arr = as_float64(s, name)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D spectrum, got ndim={arr.ndim}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: contains NaN or Inf")
    if np.any(arr < 0):
        raise ValueError(f"{name}: contains negative values")
    return arr


def as_rule_spectrum(s: ArrayLike, name: str = "s") -> Float64Array:
    """A single non-empty, finite, non-negative, non-increasing 1-D spectrum."""
    arr = as_measure_spectrum(s, name)
    if arr.shape[0] == 0:
        raise ValueError(f"{name}: the spectrum is empty")
    for i in range(arr.shape[0] - 1):
        if arr[i + 1] > arr[i]:
            raise ValueError(f"{name}: not non-increasing (s[{i + 1}] > s[{i}])")
    return arr


def is_int(x: object) -> TypeGuard[numbers.Integral]:
    """True for Python / NumPy integers, False for bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def check_rank(rank: object, upper: int, name: str = "rank") -> int:
    """``rank`` must be an int (not bool) with ``1 <= rank <= upper``."""
    if not is_int(rank):
        raise ValueError(f"{name}: must be an int, got {type(rank).__name__}")
    r = int(rank)
    if r < 1 or r > upper:
        raise ValueError(f"{name}: must satisfy 1 <= {name} <= {upper}, got {r}")
    return r


def check_real(value: object, name: str, *, nonnegative: bool = True) -> float:
    """A finite real number (not bool), optionally required to be >= 0."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}: must be a real number, got {type(value).__name__}")
    v = float(value)
    if not np.isfinite(v):
        raise ValueError(f"{name}: must be finite, got {v}")
    if nonnegative and v < 0.0:
        raise ValueError(f"{name}: must be >= 0, got {v}")
    return v


def check_unit_interval(
    value: object, name: str, *, include_zero: bool, include_one: bool = True
) -> float:
    """A real number in [0, 1] / (0, 1] / [0, 1) / (0, 1)."""
    v = check_real(value, name, nonnegative=False)
    low_ok = v >= 0.0 if include_zero else v > 0.0
    high_ok = v <= 1.0 if include_one else v < 1.0
    if not (low_ok and high_ok):
        lo = "[0" if include_zero else "(0"
        hi = "1]" if include_one else "1)"
        raise ValueError(f"{name}: must lie in {lo}, {hi}, got {v}")
    return v
