"""Basis stability (OIALR) and sign-invariant subspace similarity."""

from __future__ import annotations

from typing import Any

from ._array import Array, Namespace, cast_to, check_matrix, namespace, result_dtype, upcast
from .errors import ShapeError
from .linalg import _polar, _qr

__all__ = [
    "basis_stability",
    "polar_stability",
    "principal_angle_cosines",
    "projector_distance",
]


def basis_stability(previous: Array, current: Array, *, check_finite: bool = True) -> Array:
    """OIALR's basis stability between two snapshots of a weight matrix (or two stacks).

    Both snapshots are replaced by their orthogonal polar factors ``Q = U V^T``; the result is the mean
    cosine between corresponding unit vectors of the two factors: its columns when ``m >= n``, its rows
    when ``m < n``. It is 1 for identical full-rank snapshots, does not depend on the signs an SVD
    returns, and falls as the basis rotates. Returns an array of shape ``(...)`` (0-d for one matrix).
    """
    xp = namespace(previous=previous, current=current)
    check_matrix(xp, previous, "previous", finite=check_finite)
    check_matrix(xp, current, "current", finite=check_finite)
    if tuple(previous.shape) != tuple(current.shape):
        raise ShapeError(
            "`previous` and `current` must have the same shape, got "
            f"{tuple(previous.shape)} and {tuple(current.shape)}"
        )
    dtype = result_dtype(xp, previous, current)
    qp = _polar(xp, upcast(xp, cast_to(xp, previous, dtype)))
    qc = _polar(xp, upcast(xp, cast_to(xp, current, dtype)))
    return cast_to(xp, _polar_cosine(xp, qp, qc), dtype)


def polar_stability(
    previous_polar: Array, current_polar: Array, *, check_finite: bool = True
) -> Array:
    """:func:`basis_stability` from already computed orthogonal polar factors.

    The inputs are :func:`lowrank_core.orthogonal_factor` of each snapshot:
    ``basis_stability(a, b) == polar_stability(orthogonal_factor(a), orthogonal_factor(b))``. A caller
    that checks a layer repeatedly (OIALR's warm-up) keeps the previous check's polar factor and so computes one SVD per
    check instead of two. The inputs are used as given (not re-orthogonalized).
    """
    xp = namespace(previous_polar=previous_polar, current_polar=current_polar)
    check_matrix(xp, previous_polar, "previous_polar", finite=check_finite)
    check_matrix(xp, current_polar, "current_polar", finite=check_finite)
    if tuple(previous_polar.shape) != tuple(current_polar.shape):
        raise ShapeError(
            "`previous_polar` and `current_polar` must have the same shape, got "
            f"{tuple(previous_polar.shape)} and {tuple(current_polar.shape)}"
        )
    dtype = result_dtype(xp, previous_polar, current_polar)
    qp = upcast(xp, cast_to(xp, previous_polar, dtype))
    qc = upcast(xp, cast_to(xp, current_polar, dtype))
    return cast_to(xp, _polar_cosine(xp, qp, qc), dtype)


def _max_abs(xp: Namespace, x: Array) -> Array:
    """``max |x|`` over the last two axes, shape ``(..., 1, 1)``; 1 where ``x`` is all zero."""
    top = xp.max(xp.max(xp.abs(x), axis=-1, keepdims=True), axis=-2, keepdims=True)
    return xp.where(top > 0, top, xp.ones_like(top))


def _polar_cosine(xp: Namespace, qp: Array, qc: Array) -> Array:
    """Mean cosine of corresponding unit-side vectors of two polar factors (columns if m >= n)."""
    m, n = qp.shape[-2], qp.shape[-1]
    axis = -2 if m >= n else -1
    # cosines are scale-free: divide by max|.| first so that the squared norms cannot overflow
    qp, qc = qp / _max_abs(xp, qp), qc / _max_abs(xp, qc)
    dots = xp.sum(qp * qc, axis=axis)
    norms = xp.sqrt(xp.sum(qp * qp, axis=axis) * xp.sum(qc * qc, axis=axis))
    positive = norms > 0
    cos = xp.where(
        positive, dots / xp.where(positive, norms, xp.ones_like(norms)), xp.zeros_like(dots)
    )
    cos = xp.clip(cos, -1.0, 1.0)
    return xp.mean(cos, axis=-1)


def _orthonormal_bases(
    a: Array, b: Array, check_finite: bool
) -> tuple[Namespace, Array, Array, Any]:
    xp = namespace(a=a, b=b)
    check_matrix(xp, a, "a", finite=check_finite)
    check_matrix(xp, b, "b", finite=check_finite)
    if a.shape[-2] != b.shape[-2]:
        raise ShapeError(
            f"bases `a` {tuple(a.shape)} and `b` {tuple(b.shape)} must have the same ambient "
            "dimension (second-to-last axis)"
        )
    for name, x in (("a", a), ("b", b)):
        if x.shape[-1] > x.shape[-2]:
            raise ShapeError(
                f"`{name}` has more basis vectors ({x.shape[-1]}) than dimensions ({x.shape[-2]}); "
                "its columns cannot be linearly independent"
            )
    dtype = result_dtype(xp, a, b)
    qa, _ = _qr(xp, cast_to(xp, a, dtype))
    qb, _ = _qr(xp, cast_to(xp, b, dtype))
    return xp, qa, qb, dtype


def principal_angle_cosines(a: Array, b: Array, *, check_finite: bool = True) -> Array:
    """Cosines of the principal angles between the column spaces of ``a (..., m, ka)`` and ``b (..., m, kb)``.

    The columns of each must be linearly independent (they need not be orthonormal). Returns
    ``(..., min(ka, kb))`` values in ``[0, 1]``, descending: all ones for the same subspace, whatever
    basis (or signs) describes it.
    """
    xp, qa, qb, dtype = _orthonormal_bases(a, b, check_finite)
    cross = xp.matrix_transpose(qa) @ qb
    s = xp.linalg.svdvals(cross)
    return cast_to(xp, xp.clip(s, 0.0, 1.0), dtype)


def projector_distance(a: Array, b: Array, *, check_finite: bool = True) -> Array:
    """Frobenius distance ``||P_a - P_b||_F`` between the orthogonal projectors onto two column spaces.

    0 for the same subspace; ``sqrt(ka + kb)`` for orthogonal ones. Computed from ``Qa^T Qb`` without
    forming the ``m x m`` projectors. Returns an array of shape ``(...)``.
    """
    xp, qa, qb, dtype = _orthonormal_bases(a, b, check_finite)
    cross = xp.matrix_transpose(qa) @ qb
    ka, kb = qa.shape[-1], qb.shape[-1]
    overlap = xp.sum(cross * cross, axis=(-2, -1))
    d2 = xp.clip((ka + kb) - 2.0 * overlap, 0.0, None)
    return cast_to(xp, xp.sqrt(d2), dtype)
