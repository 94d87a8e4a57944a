"""Thin, sign-canonical decompositions over stacks of matrices.

Different libraries (and CuPy for different shapes) return singular vectors with different signs.
Everything here fixes the signs so that results are comparable across libraries and devices:

* :func:`svd` makes the entry of largest magnitude of each left singular vector positive (the first
  such entry on ties) and flips the matching right singular vector with it;
* :func:`qr` makes the diagonal of ``R`` non-negative.

float16 and bfloat16 inputs are computed in float32 and the results cast back to the input dtype.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from ._array import Array, Namespace, cast_to, check_matrix, namespace, power_of_two_near, upcast
from .backend import get_backend
from .errors import NonFiniteError, ParameterError

__all__ = ["PolarResult", "QRResult", "SVDResult", "orthogonal_factor", "polar", "qr", "svd"]


class SVDResult(NamedTuple):
    """Thin SVD ``a = U @ diag(S) @ Vh`` with ``U (..., m, k)``, ``S (..., k)``, ``Vh (..., k, n)``.

    The same fields, in the same order, as the array API standard's and ``torch.linalg.svd``'s
    result: ``U, S, Vh = lowrank_core.svd(a)`` unpacks exactly like ``xp.linalg.svd``. The right
    singular vectors as columns are ``Vh.mT`` (a view, no copy).
    """

    U: Array
    S: Array
    Vh: Array


class PolarResult(NamedTuple):
    """Polar decomposition, as ``scipy.linalg.polar`` returns it.

    ``side="right"``: ``a = u @ p`` with ``p (..., n, n)``; ``side="left"``: ``a = p @ u`` with
    ``p (..., m, m)``. ``u (..., m, n)`` has orthonormal columns (``m >= n``) or rows (``m < n``),
    ``p`` is symmetric positive semi-definite.
    """

    u: Array
    p: Array


class QRResult(NamedTuple):
    """Reduced QR ``a = Q @ R`` with ``Q (..., m, k)``, ``R (..., k, n)`` and ``diag(R) >= 0``."""

    Q: Array
    R: Array


def _raw_svd(xp: Namespace, a: Array) -> tuple[Array, Array, Array]:
    """Thin SVD of an already validated, already upcast stack: ``(U, S, V)``, signs unspecified.

    A wide matrix (``m < n``) is decomposed as its transpose, which is tall (``a.mT = V S U^T``): the
    same factors, but LAPACK-based drivers are faster on the tall layout (``benchmarks/bench_core.py``
    measures it), and the transpose is a free view (a row-major wide matrix is a column-major tall one,
    the layout LAPACK wants).

    The driver sees ``a / 2^k`` when ``max|a|`` lies so far from 1 that squares of its entries could
    over- or underflow (``2^k`` near ``max|a|``, per matrix; dividing by a power of two is exact), and
    ``S`` is scaled back: the singular values are exact whenever they are representable, whatever the
    driver does internally (some form ``a^T a``). Inputs of ordinary size are divided by 1 (the same
    bits as without the scaling).
    """
    scale = _range_scale(xp, a)
    if scale is not None:
        a = a / scale
    if a.shape[-2] < a.shape[-1]:
        Ut, S, Vht = get_backend(a).svd(xp.matrix_transpose(a))
        U, V = xp.matrix_transpose(Vht), Ut
    else:
        U, S, Vh = get_backend(a).svd(a)
        V = xp.matrix_transpose(Vh)
    if scale is not None:
        # S * scale, Inf where that exceeds the range (masked first: no overflow warning)
        s = scale[..., 0]
        limit = float(xp.finfo(S.dtype).max) / s
        over = limit < S
        S = xp.where(over, xp.full_like(S, math.inf), xp.where(over, xp.zeros_like(S), S) * s)
    return U, S, V


def _range_scale(xp: Namespace, a: Array) -> Array | None:
    """Per matrix of the stack, ``2^floor(log2 max|a|)`` where ``max|a|`` is outside ``[2^-e, 2^e]``
    (``e`` a quarter of the dtype's largest exponent: 2^31 for float32, 2^255 for float64) and 1 elsewhere, shape
    ``(..., 1, 1)``; ``None`` (nothing to do) for an empty stack."""
    if any(int(d) == 0 for d in a.shape):
        return None
    top = xp.max(xp.max(xp.abs(a), axis=-1, keepdims=True), axis=-2, keepdims=True)
    bound = 2.0 ** math.floor(math.log2(float(xp.finfo(a.dtype).max)) / 4)
    extreme = (top > bound) | ((top < 1.0 / bound) & (top > 0))
    return xp.where(extreme, power_of_two_near(xp, top), xp.ones_like(top))


def _canonical_signs(xp: Namespace, U: Array, V: Array) -> tuple[Array, Array]:
    idx = xp.argmax(xp.abs(U), axis=-2, keepdims=True)
    pivot = xp.take_along_axis(U, idx, axis=-2)
    one = xp.ones_like(pivot)
    signs = xp.where(pivot < 0, -one, one)
    return U * signs, V * signs


def _svd(xp: Namespace, a: Array) -> tuple[Array, Array, Array]:
    """Sign-canonical thin SVD of a validated stack, computed in ``a``'s compute dtype (not cast back)."""
    U, S, V = _raw_svd(xp, upcast(xp, a))
    U, V = _canonical_signs(xp, U, V)
    return U, S, V


def svd(a: Array, *, check_finite: bool = True) -> SVDResult:
    """Thin, sign-canonical SVD of a matrix or a stack of matrices.

    Returns ``SVDResult(U, S, Vh)`` with ``a = U @ diag(S) @ Vh`` and ``S`` descending, exactly the
    layout of the array API standard's ``linalg.svd(a, full_matrices=False)``; the signs are fixed:
    in each column of ``U`` the entry of largest magnitude (the first on ties) is positive, and the
    matching row of ``Vh`` is flipped with it. Raises ``NonFiniteError`` on NaN/Inf unless
    ``check_finite=False``. Computed on ``a`` divided by a power of two when its entries are extreme
    (exact whenever the singular values are representable); a finite ``a`` whose largest singular
    value exceeds the dtype's range raises ``NonFiniteError`` (it cannot be represented; with
    ``check_finite=False`` it is returned as Inf).
    """
    xp = namespace(a=a)
    check_matrix(xp, a, "a", finite=check_finite)
    U, S, V = _svd(xp, a)
    Vh = xp.matrix_transpose(V)
    top = float(xp.finfo(a.dtype).max)
    # a checked (finite) input whose S is beyond the dtype (a float32 S beyond float16 included);
    # with check_finite=False nothing is read back and NaN / Inf pass through
    if check_finite and not bool(xp.all(top >= S)):
        raise NonFiniteError(
            f"the singular values of the finite `a` overflow {a.dtype}: the largest exceeds the "
            "dtype's range (scale `a` down, or compute in a wider dtype)"
        )
    return SVDResult(cast_to(xp, U, a.dtype), cast_to(xp, S, a.dtype), cast_to(xp, Vh, a.dtype))


def _qr(xp: Namespace, a: Array) -> tuple[Array, Array]:
    Q, R = xp.linalg.qr(upcast(xp, a), mode="reduced")
    d = xp.linalg.diagonal(R)
    one = xp.ones_like(d)
    signs = xp.where(d < 0, -one, one)
    return Q * signs[..., None, :], R * signs[..., :, None]


def qr(a: Array, *, check_finite: bool = True) -> QRResult:
    """Reduced QR with a non-negative diagonal of ``R``, for a matrix or a stack of matrices."""
    xp = namespace(a=a)
    check_matrix(xp, a, "a", finite=check_finite)
    Q, R = _qr(xp, a)
    return QRResult(cast_to(xp, Q, a.dtype), cast_to(xp, R, a.dtype))


def _polar(xp: Namespace, a: Array) -> Array:
    U, _, V = _raw_svd(xp, upcast(xp, a))
    return U @ xp.matrix_transpose(V)


def orthogonal_factor(a: Array, *, check_finite: bool = True) -> Array:
    """The orthogonal polar factor ``u = U @ V.mT`` of ``a`` (thin SVD), shape ``(..., m, n)``.

    The ``u`` of :func:`polar`, without computing ``p``: what basis-stability checks need. For a
    full-rank ``a`` it is unique (independent of the signs of singular vectors): the closest matrix
    with orthonormal columns (``m >= n``) or rows (``m < n``) to ``a``.
    """
    xp = namespace(a=a)
    check_matrix(xp, a, "a", finite=check_finite)
    return cast_to(xp, _polar(xp, a), a.dtype)


def polar(a: Array, side: str = "right", *, check_finite: bool = True) -> PolarResult:
    """Polar decomposition of a matrix or a stack, with ``scipy.linalg.polar``'s conventions.

    ``side="right"`` (default): ``a = u @ p``, ``p = V diag(S) V^T`` of shape ``(..., n, n)``;
    ``side="left"``: ``a = p @ u``, ``p = U diag(S) U^T`` of shape ``(..., m, m)``. ``u`` is
    :func:`orthogonal_factor` ``(a)``. Computed from one thin SVD (in float32 for half-precision
    inputs, cast back).
    """
    if side not in ("right", "left"):
        raise ParameterError(f"`side` must be 'right' or 'left', got {side!r}")
    xp = namespace(a=a)
    check_matrix(xp, a, "a", finite=check_finite)
    U, S, V = _raw_svd(xp, upcast(xp, a))
    u = U @ xp.matrix_transpose(V)
    basis = V if side == "right" else U
    p = (basis * S[..., None, :]) @ xp.matrix_transpose(basis)
    p = p / 2 + xp.matrix_transpose(p) / 2  # (p + p^T) / 2 would overflow near the dtype's top
    return PolarResult(cast_to(xp, u, a.dtype), cast_to(xp, p, a.dtype))
