"""Spectrum measures of a single 1-D spectrum."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

from ._checks import Float64Array, as_measure_spectrum


def squares(s: Float64Array) -> Float64Array:
    """``s**2``; if their sum over/underflows (not finite, or 0 with ``s`` nonzero), the squares of
    ``s / max(s)`` instead. Every use of this is a ratio of sums, so the rescaling changes nothing
    mathematically; it only keeps extreme spectra computable."""
    with np.errstate(over="ignore", under="ignore"):
        sq: Float64Array = s * s
        total = float(np.sum(sq))
    peak = float(np.max(s)) if s.shape[0] > 0 else 0.0
    if peak > 0.0 and (not math.isfinite(total) or total == 0.0):
        scaled = s / peak
        sq = scaled * scaled
    return sq


def effective_rank(s: ArrayLike) -> float:
    """Roy & Vetterli effective rank ``exp(-sum p log p)`` with ``p = s / sum(s)``.

    ``0 log 0`` is taken as 0; the result is 0 for an all-zero spectrum.
    """
    x = as_measure_spectrum(s)
    with np.errstate(over="ignore"):
        total = float(np.sum(x))
    if total == 0.0:
        return 0.0
    if not math.isfinite(total):
        x = x / float(np.max(x))
        total = float(np.sum(x))
    p = x / total
    h = 0.0
    for pi in p:
        value = float(pi)
        if value > 0.0:  # 0 log 0 = 0
            h -= value * math.log(value)
    return math.exp(h)


def stable_rank(s: ArrayLike) -> float:
    """``sum(s^2) / s[0]^2``; 0 for an all-zero (or empty) spectrum."""
    x = as_measure_spectrum(s)
    if x.shape[0] == 0 or float(x[0]) == 0.0:
        if np.any(x > 0):
            raise ValueError("s: s[0] is 0 but the spectrum is not all zero (not non-increasing)")
        return 0.0
    with np.errstate(over="ignore", under="ignore"):
        sq = x * x
        total = float(np.sum(sq))
    first = float(sq[0])
    if not math.isfinite(total) or first == 0.0:
        scaled = x / float(x[0])
        return float(np.sum(scaled * scaled))
    return total / first
