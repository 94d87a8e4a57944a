"""Rank rules on a single 1-D non-increasing spectrum; each returns a Python int."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

from ._checks import Float64Array, as_rule_spectrum, check_real, check_unit_interval, is_int
from .spectrum import effective_rank, squares, stable_rank


def _shape(shape: tuple[int, int] | None, k: int) -> tuple[int, int]:
    """``shape`` as ``(m, n)`` positive ints; default ``(k, k)``."""
    if shape is None:
        return k, k
    dims = tuple(shape)
    if len(dims) != 2 or not all(is_int(d) and int(d) >= 1 for d in dims):
        raise ValueError(f"shape: expected (m, n) with positive ints, got {shape!r}")
    return int(dims[0]), int(dims[1])


def _check_bounds(min_rank: int | None, max_rank: int | None) -> None:
    for name, value in (("min_rank", min_rank), ("max_rank", max_rank)):
        if value is not None and (not is_int(value) or int(value) <= 0):
            raise ValueError(f"{name}: must be None or a positive int, got {value!r}")
    if min_rank is not None and max_rank is not None and int(min_rank) > int(max_rank):
        raise ValueError(f"min_rank: {min_rank} > max_rank {max_rank}")


def _clip(r: int, k: int, min_rank: int | None, max_rank: int | None) -> int:
    """Clip to ``[lo, hi]``, ``hi = min(max_rank or k, k)``, ``lo = min(min_rank or 1, hi)``."""
    hi = min(int(max_rank) if max_rank is not None else k, k)
    lo = min(int(min_rank) if min_rank is not None else 1, hi)
    if r < lo:
        return lo
    if r > hi:
        return hi
    return r


def _prepare(
    s: ArrayLike,
    shape: tuple[int, int] | None,
    min_rank: int | None,
    max_rank: int | None,
) -> tuple[Float64Array, int, int, int]:
    _check_bounds(min_rank, max_rank)
    x = as_rule_spectrum(s)
    k = x.shape[0]
    m, n = _shape(shape, k)
    return x, k, m, n


def sigma_cutoff_rank(
    s: ArrayLike,
    fraction: float = 0.1,
    *,
    shape: tuple[int, int] | None = None,
    floor_fraction: float = 0.01,
    min_rank: int | None = None,
    max_rank: int | None = None,
) -> int:
    """OIALR SigmaCutoff rule (see the spec for the four cases)."""
    frac = check_unit_interval(fraction, "fraction", include_zero=True)
    ff = check_real(floor_fraction, "floor_fraction")
    x, k, m, n = _prepare(s, shape, min_rank, max_rank)
    cutoff = frac * float(x[0])
    j = 0
    for value in x:
        if float(value) >= cutoff:
            j += 1
    floor = max(1, int(ff * min(m, n)))
    if j == k:
        r = k
    elif j < k / 2 and k / 2 > floor:
        r = k // 2
    elif j < floor:
        r = floor
    else:
        r = j
    return _clip(r, k, min_rank, max_rank)


def tail_norm_rank(
    s: ArrayLike,
    tol: float = 0.1,
    *,
    shape: tuple[int, int] | None = None,
    min_rank: int | None = None,
    max_rank: int | None = None,
) -> int:
    """DLRT TailNorm: the smallest r in 1..k with ``sum_{i >= r} s[i]^2 < tol^2 sum s^2``.

    1 for an all-zero spectrum.
    """
    t = check_unit_interval(tol, "tol", include_zero=False)
    x, k, _, _ = _prepare(s, shape, min_rank, max_rank)
    sq = squares(x)
    total = float(np.sum(sq))
    r = 1
    if total > 0.0:
        r = k
        for cand in range(1, k + 1):
            tail = float(np.sum(sq[cand:]))
            if tail < t * t * total:
                r = cand
                break
    return _clip(r, k, min_rank, max_rank)


def energy_rank(
    s: ArrayLike,
    energy: float = 0.9,
    *,
    shape: tuple[int, int] | None = None,
    min_rank: int | None = None,
    max_rank: int | None = None,
) -> int:
    """Smallest r in 1..k with ``sum_{i < r} s[i]^2 >= energy sum s^2``; 1 if all zero."""
    e = check_unit_interval(energy, "energy", include_zero=False)
    x, k, _, _ = _prepare(s, shape, min_rank, max_rank)
    sq = squares(x)
    total = float(np.sum(sq))
    r = 1
    if total > 0.0:
        r = k
        for cand in range(1, k + 1):
            head = float(np.sum(sq[:cand]))
            if head >= e * total:
                r = cand
                break
    return _clip(r, k, min_rank, max_rank)


def _median(x: Float64Array) -> float:
    values = sorted(float(v) for v in x)
    k = len(values)
    mid = k // 2
    if k % 2 == 1:
        return values[mid]
    return (values[mid - 1] + values[mid]) / 2.0


def optimal_hard_threshold_rank(
    s: ArrayLike,
    scale: float = 1.0,
    *,
    shape: tuple[int, int] | None = None,
    min_rank: int | None = None,
    max_rank: int | None = None,
) -> int:
    """Gavish & Donoho (2014), unknown noise: r = ``#{i : s[i] > scale omega(beta) median(s)}``."""
    sc = check_real(scale, "scale")
    x, k, m, n = _prepare(s, shape, min_rank, max_rank)
    beta = min(m, n) / max(m, n)
    omega = 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43
    tau = sc * omega * _median(x)
    r = 0
    for value in x:
        if float(value) > tau:
            r += 1
    return _clip(r, k, min_rank, max_rank)


def effective_rank_rule(
    s: ArrayLike,
    *,
    shape: tuple[int, int] | None = None,
    min_rank: int | None = None,
    max_rank: int | None = None,
) -> int:
    """r = ``floor(effective_rank(s) + 0.5)``."""
    x, k, _, _ = _prepare(s, shape, min_rank, max_rank)
    r = math.floor(effective_rank(x) + 0.5)
    return _clip(r, k, min_rank, max_rank)


def stable_rank_rule(
    s: ArrayLike,
    *,
    shape: tuple[int, int] | None = None,
    min_rank: int | None = None,
    max_rank: int | None = None,
) -> int:
    """r = ``floor(stable_rank(s) + 0.5)``."""
    x, k, _, _ = _prepare(s, shape, min_rank, max_rank)
    r = math.floor(stable_rank(x) + 0.5)
    return _clip(r, k, min_rank, max_rank)


def fixed_rank(
    s: ArrayLike,
    rank: int | None = None,
    fraction: float | None = None,
    *,
    shape: tuple[int, int] | None = None,
    min_rank: int | None = None,
    max_rank: int | None = None,
) -> int:
    """r = ``rank``, or ``floor(fraction * min(m, n) + 0.5)``; exactly one must be given."""
    if (rank is None) == (fraction is None):
        raise ValueError("rank/fraction: exactly one of the two must be given")
    if rank is not None and (not is_int(rank) or int(rank) < 1):
        raise ValueError(f"rank: must be a positive int, got {rank!r}")
    frac = None
    if fraction is not None:
        frac = check_unit_interval(fraction, "fraction", include_zero=False)
    _, k, m, n = _prepare(s, shape, min_rank, max_rank)
    r = math.floor(frac * min(m, n) + 0.5) if frac is not None else int(rank)  # type: ignore[arg-type]
    return _clip(r, k, min_rank, max_rank)
