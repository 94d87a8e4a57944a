"""P-BFGS math as pure functions of small arrays: the BFGS update, the direction, the Armijo line search."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._array import Array, Namespace, check_finite, check_floating, compute_dtype, namespace
from .._validate import check_float, check_int, describe
from ..errors import NonFiniteError, ParameterError, ParameterTypeError, ShapeError
from .chunked import _check_vector, _host

__all__ = [
    "LineSearchResult",
    "armijo_backtracking",
    "armijo_condition",
    "bfgs_direction",
    "bfgs_update",
    "curvature_ok",
]


def _check_pair(s: Array, y: Array, *, finite: bool = True) -> Namespace:
    xp = namespace(s=s, y=y)
    _check_vector(xp, s, "s", finite=finite)
    _check_vector(xp, y, "y", finite=finite)
    if s.shape != y.shape:
        raise ShapeError(f"`s` {tuple(s.shape)} and `y` {tuple(y.shape)} must have the same shape")
    return xp


def _check_h(xp: Namespace, H: Array, d: int, what: str, *, finite: bool = True) -> None:
    if H.ndim != 2 or tuple(H.shape) != (d, d):
        raise ShapeError(f"`H` must have shape ({d}, {d}) to match {what}, got {tuple(H.shape)}")
    check_floating(xp, H, "H")
    if finite:
        check_finite(xp, H, "H")


def _common(xp: Namespace, *arrays: Array) -> tuple[Array, ...]:
    """The arrays in their promoted floating dtype (float16 / bfloat16 computed in float32)."""
    dtype = compute_dtype(xp, xp.result_type(*arrays))
    return tuple(a if a.dtype == dtype else xp.astype(a, dtype) for a in arrays)


def curvature_ok(s: Array, y: Array, *, eps: float = 1e-8) -> bool:
    """The curvature guard: ``s.y > eps |s| |y|`` (scale invariant; False for a zero pair)."""
    xp = _check_pair(s, y)
    eps = check_float("eps", eps, min=0.0)
    s, y = _common(xp, s, y)
    sy = float(_host(xp.sum(s * y)))
    ns = float(_host(xp.sqrt(xp.sum(s * s))))
    ny = float(_host(xp.sqrt(xp.sum(y * y))))
    return sy > eps * ns * ny and sy > 0.0


def bfgs_update(
    H: Array, s: Array, y: Array, *, eps: float = 1e-8, check_finite: bool = True
) -> tuple[Array, Any]:
    """One inverse-Hessian BFGS update ``H+ = (I - r s y^T) H (I - r y s^T) + r s s^T``, ``r = 1/(y.s)``.

    Returns ``(H+, True)``, or ``(H, False)`` when the pair fails :func:`curvature_ok` (then ``H``
    is returned unchanged). ``H+ y = s`` (secant equation); ``H+`` stays symmetric positive definite
    when ``H`` is. Computed in the expanded, symmetric form (``O(d^2)``), in the promoted dtype of the
    three arrays (mixed float32 / float64 inputs give float64).

    ``check_finite=False`` reads nothing back to the host (the form for traced code, e.g. inside
    ``jax.jit``): the inputs are not checked for NaN/Inf, the guard is applied element-wise (``H+``
    where the pair passes it, ``H`` in the promoted dtype where not) and the second value is a 0-d
    boolean array of the inputs' library instead of a Python ``bool``.
    """
    xp = _check_pair(s, y, finite=check_finite)
    xp = namespace(H=H, s=s, y=y)
    _check_h(xp, H, int(s.shape[0]), "`s`", finite=check_finite)
    eps = check_float("eps", eps, min=0.0)
    if check_finite and not curvature_ok(s, y, eps=eps):
        return H, False
    H, s, y = _common(xp, H, s, y)
    sy = xp.sum(s * y)
    ok = None
    if not check_finite:  # the guard of curvature_ok, on the device
        norms = xp.sqrt(xp.sum(s * s)) * xp.sqrt(xp.sum(y * y))
        ok = xp.logical_and(sy > eps * norms, sy > 0.0)
        sy = xp.where(ok, sy, xp.ones_like(sy))
    # with t = s / (s.y) and c = y.Hy + s.y: H+ = H - (t (Hy)^T + Hy t^T) + c t t^T, the same update
    # without rho^2 (it overflows for a tiny s while s s^T underflows: Inf * 0 = NaN); c t t^T is
    # formed as sign(c) u u^T with u = sqrt(|c|) t (exactly symmetric; t t^T alone may overflow)
    t = s / sy
    Hy = H @ y
    c = xp.sum(y * Hy) + sy
    u = xp.sqrt(xp.abs(c)) * t
    outer_tHy = t[:, None] * Hy[None, :]
    H_new = (
        H - (outer_tHy + xp.matrix_transpose(outer_tHy)) + xp.sign(c) * (u[:, None] * u[None, :])
    )
    if ok is None:
        return H_new, True
    return xp.where(ok, H_new, H), ok


def bfgs_direction(H: Array, g: Array, *, check_finite: bool = True) -> Array:
    """The quasi-Newton direction ``p = -H g`` (in the promoted dtype of ``H`` and ``g``).

    ``check_finite=False``: ``H`` and ``g`` are not checked for NaN/Inf (no host read; for traced code).
    """
    xp = namespace(H=H, g=g)
    _check_vector(xp, g, "g", finite=check_finite)
    _check_h(xp, H, int(g.shape[0]), "`g`", finite=check_finite)
    H, g = _common(xp, H, g)
    return -(H @ g)


def _real(name: str, value: object) -> float:
    """A real number (Python or NumPy scalar, the project's rule: an array, 0-d included, is refused;
    pass ``float(x)``) as a float; NaN and infinities pass (the caller decides)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (numbers.Real, np.integer, np.floating)
    ):
        hint = " (use float(x) for a 0-d array or tensor)" if hasattr(value, "shape") else ""
        raise ParameterTypeError(f"`{name}` must be a real number{hint}, got {describe(value)}")
    return float(value)


def armijo_condition(
    f_new: float, f0: float, alpha: float, slope: float, *, c1: float = 0.4
) -> bool:
    """Sufficient decrease: ``f(w + alpha p) <= f(w) + c1 alpha g.p`` (``slope = g.p < 0``).

    A NaN / infinite ``f_new`` is a rejection (False); ``f0``, ``alpha`` (> 0), ``slope`` and ``c1``
    (in (0, 1)) must be finite real numbers."""
    value = _real("f_new", f_new)
    f0 = check_float("f0", f0, error=NonFiniteError)
    alpha = check_float("alpha", alpha, min=0.0, min_open=True)
    slope = check_float("slope", slope, error=NonFiniteError)
    c1 = check_float("c1", c1, min=0.0, max=1.0, min_open=True, max_open=True)
    if not math.isfinite(value):
        return False
    return value <= f0 + c1 * alpha * slope


@dataclass(frozen=True)
class LineSearchResult:
    """Outcome of :func:`armijo_backtracking`.

    ``alpha``: the accepted step length (0.0 when none was accepted); ``value``: the objective there
    (``f0`` when none); ``trials``: objective evaluations made; ``accepted``: whether a step passed.
    """

    alpha: float
    value: float
    trials: int
    accepted: bool


def armijo_backtracking(
    f: Callable[[float], float],
    f0: float,
    slope: float,
    *,
    alpha0: float = 1.0,
    shrink: float = 0.4,
    c1: float = 0.4,
    max_trials: int = 20,
) -> LineSearchResult:
    """Backtracking line search: try ``alpha = alpha0 * shrink^m``, ``m = 0 .. max_trials - 1``, and
    accept the first with :func:`armijo_condition`. ``f(alpha)`` evaluates the objective at
    ``w + alpha p`` (a Python or NumPy real number, e.g. ``float(loss)``; NaN / Inf counts as a
    rejected trial); ``slope = g.p`` must be
    negative (a descent direction), else ``ParameterError``.
    """
    if not callable(f):
        raise ParameterTypeError(f"`f` must be callable (alpha -> objective), got {describe(f)}")
    f0 = check_float("f0", f0, error=NonFiniteError)
    slope = check_float("slope", slope, error=NonFiniteError)
    if slope >= 0:
        raise ParameterError(f"`slope` = g.p must be negative (a descent direction), got {slope}")
    shrink = check_float("shrink", shrink, min=0.0, max=1.0, min_open=True, max_open=True)
    c1 = check_float("c1", c1, min=0.0, max=1.0, min_open=True, max_open=True)
    alpha = check_float("alpha0", alpha0, min=0.0, min_open=True)
    max_trials = check_int("max_trials", max_trials, min=1)
    for m in range(max_trials):
        value = _real("f(alpha)", f(alpha))
        if armijo_condition(value, f0, alpha, slope, c1=c1):
            return LineSearchResult(alpha, value, m + 1, True)
        alpha *= shrink
    return LineSearchResult(0.0, float(f0), max_trials, False)
