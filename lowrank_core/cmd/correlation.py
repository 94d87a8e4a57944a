"""CMD step 2: row statistics (shift, scale, constant rows), ``|corr|`` and the clustering distances."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .._array import Array, Namespace, namespace, upcast
from .._validate import check_bool
from ..errors import ParameterError
from .validation import CONSTANT_TOLERANCE, METRICS, _check_finite, _check_trajectory, _eps

__all__ = ["abs_correlation"]


@dataclass(frozen=True)
class _Rows:
    """What CMD needs of a block of rows ``x`` ``(c, T)`` (compute dtype).

    ``shifted`` are the rows minus their first value, divided by ``scale`` (a power of two per row, 1
    unless squares would overflow or underflow); ``shift_mean`` their means (so the centred rows are
    ``shifted - shift_mean``, see :meth:`centred`), ``norm`` the norms of the centred rows (scaled
    units), ``mean`` the row means (data units), ``constant`` the rows whose motion is at rounding level
    (see the module docstring).
    """

    shifted: Array
    shift_mean: Array
    mean: Array
    norm: Array
    scale: Array
    constant: Array

    def centred(self, xp: Namespace) -> Array:
        return self.shifted - self.shift_mean[:, None]


def _rows(
    xp: Namespace,
    x: Array,
    eps: float,
    *,
    finite_name: str | None = None,
    against: Array | None = None,
) -> tuple[_Rows, Array | None]:
    """Row statistics of ``x``, and with ``against`` ``(T, M + 1)`` also ``shifted @ against``.

    Three passes over the block: the shift (which also reads it), the sum of squares, and one GEMM.
    With ``against = [U^T | 1]`` (the unit profiles and a column of ones, see :class:`_Profiles`) the
    GEMM gives both the products with the profiles and the row sums ``sum d``; without it ``sum d`` is
    one more pass. The shift by the first value is exact for values within a factor 2 of it (Sterbenz),
    so a constant row gives exact zeros, and the centred sum of squares ``sum d^2 - (sum d)^2 / T`` of
    the shifted rows loses at most ``log2(T + 1)`` bits (``|mean(d)| <= max|d - mean(d)|``) beyond the
    rounding of the two sums (each within ``T eps sum |d|``, whatever order the library sums in). Rows
    whose squares would overflow or underflow are redone scaled by a power of two (exact). With
    ``finite_name`` the block is checked for NaN / Inf on the way (a finite sum of squares proves it
    finite).
    """
    x = upcast(xp, x)
    t = int(x.shape[1])
    x0 = xp.asarray(
        x[:, 0], copy=True
    )  # contiguous: the broadcast below and the vector ops are faster
    d = x - x0[:, None]
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is detected below and redone
        ss = xp.vecdot(d, d, axis=-1)
        prod = None if against is None else d @ against
    if finite_name is not None and not bool(xp.all(xp.isfinite(ss) & xp.isfinite(x0))):
        _check_finite(x, finite_name)  # raises for NaN / Inf; else only the squares overflowed
    info = xp.finfo(x.dtype)
    lo = float(info.smallest_normal) * 2.0**32
    hi = float(info.max) * 2.0**-32
    sd = xp.sum(d, axis=1) if prod is None else prod[:, -1]
    one = xp.ones_like(x0)
    if bool(xp.any((ss > hi) | ((ss < lo) & ((ss > 0) | (sd != 0))))):
        amax = xp.max(xp.abs(d), axis=1)
        pos = amax > 0
        scale = xp.where(pos, 2.0 ** xp.floor(xp.log2(xp.where(pos, amax, one))), one)
        d = d / scale[:, None]  # a power of two: exact
        ss = xp.vecdot(d, d, axis=-1)
        if against is None:
            sd = xp.sum(d, axis=1)
        else:
            prod = d @ against
            sd = prod[:, -1]
    else:
        scale = one
    mu = sd / t
    norm = xp.sqrt(xp.clip(ss - sd * mu, 0.0, None))
    mean = x0 + scale * mu
    magnitude = xp.abs(x0) / scale + xp.sqrt(ss / t)  # |x_0| + rms(x - x_0), scaled
    constant = norm <= (CONSTANT_TOLERANCE * eps * math.sqrt(t)) * magnitude
    rows = _Rows(shifted=d, shift_mean=mu, mean=mean, norm=norm, scale=scale, constant=constant)
    return rows, prod


def _unit(xp: Namespace, rows: _Rows) -> Array:
    """Unit centred rows (0 for a constant row)."""
    const = rows.constant
    safe = xp.where(const, xp.ones_like(rows.norm), rows.norm)
    centred = rows.centred(xp)
    return xp.where(const[:, None], xp.zeros_like(centred), centred / safe[:, None])


def _abs_corr(xp: Namespace, unit: Array) -> Array:
    return xp.clip(xp.abs(unit @ xp.matrix_transpose(unit)), 0.0, 1.0)


def abs_correlation(x: Array, *, check_finite: bool = True) -> Array:
    """``|corrcoef(x)|`` of the rows of ``x`` (``(K, T)`` -> ``(K, K)``), clipped to [0, 1].

    A constant row (motion at rounding level, see the module docstring) has correlation 0 with
    everything, itself included (``corrcoef``'s NaN replaced by 0). Needs ``T >= 2``. Same library,
    device and floating dtype as ``x`` (half precision computed in float32). Scale-invariant.
    """
    xp = namespace(x=x)
    _check_trajectory(xp, x, "x")
    if check_bool("check_finite", check_finite):
        _check_finite(x, "x")
    c = _abs_corr(xp, _unit(xp, _rows(xp, x, _eps(xp, x.dtype))[0]))
    return xp.astype(c, x.dtype) if c.dtype != x.dtype else c


def _distance(xp: Namespace, c: Array, metric: str) -> Array:
    if metric == "correlation":
        return 1.0 - c
    if metric == "euclidean":
        sq = xp.sum(c * c, axis=1)
        d2 = sq[:, None] + sq[None, :] - 2.0 * (c @ xp.matrix_transpose(c))
        return xp.sqrt(xp.clip(d2, 0.0, None))
    raise ParameterError(f"`metric` must be one of {METRICS}, got {metric!r}")
