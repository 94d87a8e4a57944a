"""Factor updates: factorize, reconstruct, re-diagonalize, rotate, truncate, change rank.

A low-rank matrix is held as ``U (..., m, r)``, a dense ``Sigma (..., r, r)`` and ``V (..., n, r)``; the
matrix is ``U @ Sigma @ V.mT``. That is OIALR's layout: ``U`` and ``V`` frozen, ``Sigma`` trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from ._array import (
    Array,
    Namespace,
    cast_to,
    check_matrix,
    check_rank,
    diag_embed,
    namespace,
    result_dtype,
    upcast,
)
from ._validate import check_shape_pair, describe
from .errors import ParameterTypeError, RankError, ShapeError
from .linalg import _svd
from .rank import RankRule

__all__ = [
    "LowRankFactors",
    "RankUpdate",
    "Rediagonalized",
    "factorize",
    "reconstruct",
    "rediagonalize",
    "rotate_sigma",
    "truncate",
    "update_rank",
]


class LowRankFactors(NamedTuple):
    """``U (..., m, r)``, dense ``Sigma (..., r, r)``, ``V (..., n, r)``: the matrix ``U @ Sigma @ V.mT``."""

    U: Array
    Sigma: Array
    V: Array


class Rediagonalized(NamedTuple):
    """Result of :func:`rediagonalize`.

    ``Sigma_old = left @ diag(singular_values) @ right.mT``; ``U = U_old @ left``, ``V = V_old @ right``,
    ``Sigma = diag(singular_values)``. Anything living in Sigma's coordinates (its gradient, a momentum
    buffer) maps to the new coordinates with ``rotate_sigma(x, left, right)``.
    """

    U: Array
    Sigma: Array
    V: Array
    singular_values: Array
    left: Array
    right: Array

    @property
    def factors(self) -> LowRankFactors:
        return LowRankFactors(self.U, self.Sigma, self.V)


class RankUpdate(NamedTuple):
    """Result of :func:`update_rank`: the truncated factors, the rank kept, and the re-diagonalization."""

    factors: LowRankFactors
    rank: int
    rediagonalized: Rediagonalized


def _check_factors(
    U: Array, Sigma: Array, V: Array, check_finite: bool
) -> tuple[Namespace, int, int, int]:
    xp = namespace(U=U, Sigma=Sigma, V=V)
    for name, x in (("U", U), ("Sigma", Sigma), ("V", V)):
        check_matrix(xp, x, name, finite=check_finite)
    r1, r2 = Sigma.shape[-2], Sigma.shape[-1]
    if U.shape[-1] != r1 or V.shape[-1] != r2:
        raise ShapeError(
            f"factors do not fit together: U {tuple(U.shape)}, Sigma {tuple(Sigma.shape)}, "
            f"V {tuple(V.shape)} (need U (..., m, r1), Sigma (..., r1, r2), V (..., n, r2))"
        )
    try:
        np.broadcast_shapes(tuple(U.shape[:-2]), tuple(Sigma.shape[:-2]), tuple(V.shape[:-2]))
    except ValueError:
        raise ShapeError(
            f"batch dimensions of U {tuple(U.shape)}, Sigma {tuple(Sigma.shape)}, V {tuple(V.shape)} "
            "do not broadcast"
        ) from None
    return xp, int(U.shape[-2]), int(V.shape[-2]), int(r1)


def _promote(xp: Namespace, *arrays: Array) -> tuple[Array, ...]:
    """Cast to the standard's promoted dtype (torch's ``@`` does not promote by itself)."""
    dt = result_dtype(xp, *arrays)
    return tuple(cast_to(xp, a, dt) for a in arrays)


def factorize(a: Array, rank: int | None = None, *, check_finite: bool = True) -> LowRankFactors:
    """Best rank-``rank`` factors of ``a`` (Eckart-Young) from its sign-canonical thin SVD.

    ``rank=None`` keeps all ``min(m, n)`` (exact). ``Sigma`` is the dense diagonal matrix of the kept
    singular values. Raises ``RankError`` for a rank that is not an integer in ``1..min(m, n)``.
    """
    xp = namespace(a=a)
    check_matrix(xp, a, "a", finite=check_finite)
    k = min(int(a.shape[-2]), int(a.shape[-1]))
    r = k if rank is None else check_rank(rank, k)
    U, S, V = _svd(xp, a)
    dt = a.dtype
    return LowRankFactors(
        cast_to(xp, U[..., :r], dt),
        cast_to(xp, diag_embed(xp, S[..., :r]), dt),
        cast_to(xp, V[..., :r], dt),
    )


def reconstruct(U: Array, Sigma: Array, V: Array, *, check_finite: bool = True) -> Array:
    """The matrix ``U @ Sigma @ V.mT`` (associated as ``(U @ Sigma) @ V.mT``, cheap for small ``r``)."""
    xp, _, _, _ = _check_factors(U, Sigma, V, check_finite)
    U, Sigma, V = _promote(xp, U, Sigma, V)
    return (U @ Sigma) @ xp.matrix_transpose(V)


def rediagonalize(U: Array, Sigma: Array, V: Array, *, check_finite: bool = True) -> Rediagonalized:
    """OIALR's re-diagonalization: absorb the rotations of Sigma's SVD into the bases.

    With ``Sigma = P diag(sig) Q^T`` (sign-canonical SVD, computed in at least float32) it returns
    ``U P``, ``diag(sig)``, ``V Q``, ``sig``, ``P`` and ``Q``. The product ``U Sigma V^T`` is unchanged
    and the bases stay orthonormal if they were. Batched over stacks of same-shape factors.
    """
    xp, _, _, _ = _check_factors(U, Sigma, V, check_finite)
    if Sigma.shape[-1] != Sigma.shape[-2]:
        raise ShapeError(f"`Sigma` must be square (..., r, r), got shape {tuple(Sigma.shape)}")
    U, Sigma, V = _promote(xp, U, Sigma, V)
    dt = Sigma.dtype
    P, sig, Q = _svd(xp, Sigma)  # in the compute dtype (float16/bfloat16 upcast to float32)
    new_U = upcast(xp, U) @ P
    new_V = upcast(xp, V) @ Q
    return Rediagonalized(
        U=cast_to(xp, new_U, dt),
        Sigma=cast_to(xp, diag_embed(xp, sig), dt),
        V=cast_to(xp, new_V, dt),
        singular_values=cast_to(xp, sig, dt),
        left=cast_to(xp, P, dt),
        right=cast_to(xp, Q, dt),
    )


def rotate_sigma(x: Array, left: Array, right: Array, *, check_finite: bool = True) -> Array:
    """Map ``x`` from Sigma's old coordinates into the rotated ones: ``left.mT @ x @ right``.

    Use it for anything that transforms like Sigma under a change of bases: Sigma itself, its gradient,
    an SGD momentum buffer. (Element-wise statistics such as Adam's second moment do not transform
    linearly; the optimizer integration documents its rule for them.)
    """
    xp = namespace(x=x, left=left, right=right)
    for name, a in (("x", x), ("left", left), ("right", right)):
        check_matrix(xp, a, name, finite=check_finite)
    if left.shape[-2] != x.shape[-2] or right.shape[-2] != x.shape[-1]:
        raise ShapeError(
            f"cannot rotate x {tuple(x.shape)} with left {tuple(left.shape)} and right "
            f"{tuple(right.shape)}: need left (..., r1, *), right (..., r2, *) for x (..., r1, r2)"
        )
    x, left, right = _promote(xp, x, left, right)
    return (xp.matrix_transpose(left) @ x) @ right


def truncate(
    U: Array, Sigma: Array, V: Array, rank: int, *, check_finite: bool = True
) -> LowRankFactors:
    """Keep the leading ``rank`` columns of ``U`` and ``V`` and the leading ``rank x rank`` block of Sigma.

    Meaningful after :func:`rediagonalize` (or :func:`factorize`), when Sigma is diagonal and sorted.
    Raises ``NonFiniteError`` on NaN/Inf in a factor unless ``check_finite=False``. The results are
    views (slices) of the inputs where the library allows.
    """
    _check_factors(U, Sigma, V, check_finite)
    r = check_rank(rank, min(int(Sigma.shape[-2]), int(Sigma.shape[-1])), what="the current rank")
    return LowRankFactors(U[..., :r], Sigma[..., :r, :r], V[..., :r])


def update_rank(
    U: Array,
    Sigma: Array,
    V: Array,
    rule: RankRule,
    *,
    shape: Sequence[int] | None = None,
    check_finite: bool = True,
) -> RankUpdate:
    """Re-diagonalize, choose a rank with ``rule`` and truncate: one OIALR rank update.

    ``shape`` is the ``(m, n)`` of the full weight matrix passed to the rule (default: from ``U`` and
    ``V``), a pair of positive integers. For a stack the largest per-matrix rank is kept, since a
    stack shares one shape. ``rule`` must return an integer in ``1..r`` (``r`` the current rank), or a
    NumPy integer array of such ranks for a stack; anything else (None, a string, a float, NaN)
    raises ``RankError`` naming the rule.
    """
    if not callable(rule):
        raise ParameterTypeError(
            f"`rule` must be a rank rule (called as rule(s, shape=(m, n))), got {describe(rule)}"
        )
    _, m, n, _ = _check_factors(U, Sigma, V, check_finite)
    full = (m, n) if shape is None else check_shape_pair("shape", shape)
    if Sigma.shape[-1] != Sigma.shape[-2]:
        raise ShapeError(f"`Sigma` must be square (..., r, r), got shape {tuple(Sigma.shape)}")
    k = int(Sigma.shape[-1])
    rd = rediagonalize(U, Sigma, V, check_finite=False)
    chosen: Any = rule(rd.singular_values, shape=full)
    rank = _chosen_rank(chosen, k, rule)
    return RankUpdate(truncate(rd.U, rd.Sigma, rd.V, rank, check_finite=False), rank, rd)


def _chosen_rank(chosen: object, k: int, rule: object) -> int:
    """The rank a rule returned (the largest, for a stack), validated to lie in ``1..k``."""
    what = f"the current rank {k}"
    label = getattr(rule, "__qualname__", None) or type(rule).__name__
    name = f"rank returned by rule {label}"
    if isinstance(chosen, np.ndarray):
        if chosen.dtype == np.bool_ or not np.issubdtype(chosen.dtype, np.integer):
            raise RankError(
                f"{name} must be an integer (or an integer array for a stack), got an array of "
                f"dtype {chosen.dtype}"
            )
        if chosen.size == 0:
            raise RankError(f"{name} is an empty array")
        low = int(np.min(chosen))
        check_rank(low, k, name=name, what=what)
        return check_rank(int(np.max(chosen)), k, name=name, what=what)
    return check_rank(chosen, k, name=name, what=what)
