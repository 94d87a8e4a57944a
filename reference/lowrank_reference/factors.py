"""Low-rank factors ``U @ Sigma @ V^T`` of a single matrix: factorize, rediagonalize, truncate."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from ._checks import Float64Array, as_matrix, check_rank
from .linalg import svd


def _factors(
    U: ArrayLike, Sigma: ArrayLike, V: ArrayLike
) -> tuple[Float64Array, Float64Array, Float64Array]:
    """Validate ``U (m, r)``, ``Sigma (r, r)``, ``V (n, r)``."""
    u = as_matrix(U, "U")
    sig = as_matrix(Sigma, "Sigma")
    v = as_matrix(V, "V")
    r = u.shape[1]
    if sig.shape != (r, r):
        raise ValueError(f"Sigma: expected shape ({r}, {r}) to match U {u.shape}, got {sig.shape}")
    if v.shape[1] != r:
        raise ValueError(f"V: expected {r} columns to match U {u.shape}, got {v.shape}")
    return u, sig, v


def factorize(
    a: ArrayLike, rank: int | None = None
) -> tuple[Float64Array, Float64Array, Float64Array]:
    """``(U[:, :r], diag(S[:r]), V[:, :r])`` from :func:`svd`; ``rank=None`` means ``min(m, n)``."""
    x = as_matrix(a, "a")
    k = min(x.shape)
    r = k if rank is None else check_rank(rank, k)
    U, S, Vh = svd(x)
    V = Vh.T
    Sigma = np.zeros((r, r))
    for i in range(r):
        Sigma[i, i] = S[i]
    return U[:, :r].copy(), Sigma, V[:, :r].copy()


def reconstruct(U: ArrayLike, Sigma: ArrayLike, V: ArrayLike) -> Float64Array:
    """``U @ Sigma @ V^T``."""
    u, sig, v = _factors(U, Sigma, V)
    result: Float64Array = u @ sig @ v.T
    return result


def rediagonalize(
    U: ArrayLike, Sigma: ArrayLike, V: ArrayLike
) -> tuple[Float64Array, Float64Array, Float64Array, Float64Array, Float64Array, Float64Array]:
    """SVD ``Sigma = P diag(sig) Q^T`` (sign-canonical); returns
    ``(U P, diag(sig), V Q, sig, P, Q)``."""
    u, s, v = _factors(U, Sigma, V)
    P, sig, Qh = svd(s)
    Q = Qh.T
    return u @ P, np.diag(sig), v @ Q, sig, P, Q


def rotate_sigma(x: ArrayLike, left: ArrayLike, right: ArrayLike) -> Float64Array:
    """``left^T @ x @ right``."""
    xm = as_matrix(x, "x")
    lm = as_matrix(left, "left")
    rm = as_matrix(right, "right")
    if lm.shape[0] != xm.shape[0] or rm.shape[0] != xm.shape[1]:
        raise ValueError(f"x/left/right: incompatible shapes {xm.shape}, {lm.shape}, {rm.shape}")
    result: Float64Array = lm.T @ xm @ rm
    return result


def truncate(
    U: ArrayLike, Sigma: ArrayLike, V: ArrayLike, rank: int
) -> tuple[Float64Array, Float64Array, Float64Array]:
    """``(U[:, :rank], Sigma[:rank, :rank], V[:, :rank])`` with ``1 <= rank <= r``."""
    u, sig, v = _factors(U, Sigma, V)
    r = check_rank(rank, u.shape[1])
    return u[:, :r].copy(), sig[:r, :r].copy(), v[:, :r].copy()
