"""SVD, QR and polar factor of a single matrix, canonicalized as the spec says."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from ._checks import Float64Array, as_matrix


def svd(a: ArrayLike) -> tuple[Float64Array, Float64Array, Float64Array]:
    """Thin SVD ``a = U diag(S) Vh`` with ``U (m, k)``, ``S (k,)`` descending, ``Vh (k, n)``.

    Sign-canonical: in each column j of U the entry of largest absolute value (first index on ties)
    is positive; row j of Vh is flipped together with it.
    """
    x = as_matrix(a, "a")
    m, n = x.shape
    k = min(m, n)
    if k == 0:
        return np.zeros((m, 0)), np.zeros((0,)), np.zeros((0, n))
    u, s, vh = np.linalg.svd(x, full_matrices=False)
    U = np.array(u, dtype=np.float64)
    S = np.array(s, dtype=np.float64)
    V = np.array(vh, dtype=np.float64).T.copy()
    for j in range(k):
        col = U[:, j]
        best = 0
        for i in range(m):
            if abs(col[i]) > abs(col[best]):
                best = i
        if col[best] < 0:
            U[:, j] = -U[:, j]
            V[:, j] = -V[:, j]
    return U, S, V.T.copy()


def qr(a: ArrayLike) -> tuple[Float64Array, Float64Array]:
    """Reduced QR ``a = Q R``, ``Q (m, k)``, ``R (k, n)``, with ``diag(R) >= 0``."""
    x = as_matrix(a, "a")
    m, n = x.shape
    k = min(m, n)
    if k == 0:
        return np.zeros((m, 0)), np.zeros((0, n))
    q, r = np.linalg.qr(x, mode="reduced")
    Q = np.array(q, dtype=np.float64)
    R = np.array(r, dtype=np.float64)
    for j in range(k):
        if R[j, j] < 0:
            Q[:, j] = -Q[:, j]
            R[j, :] = -R[j, :]
    return Q, R


def orthogonal_factor(a: ArrayLike) -> Float64Array:
    """Orthogonal polar factor ``U @ Vh`` (shape ``(m, n)``) from the thin SVD."""
    U, _, Vh = svd(a)
    result: Float64Array = U @ Vh
    return result


def polar(a: ArrayLike, side: str = "right") -> tuple[Float64Array, Float64Array]:
    """Polar decomposition ``(u, p)``: ``a = u p`` (``side="right"``) or ``a = p u`` (``"left"``)."""
    U, S, Vh = svd(a)
    u = U @ Vh
    if side == "right":
        p = Vh.T @ np.diag(S) @ Vh
    elif side == "left":
        p = U @ np.diag(S) @ U.T
    else:
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    return u, p
