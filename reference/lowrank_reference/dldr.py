"""DLDR oracle: plain NumPy float64, written independently of ``lowrank_core.dldr``.

PCA by the SVD of the explicitly centred ``(t, D)`` snapshot matrix; BFGS by the textbook product
formula; Armijo backtracking by a plain loop. Slow and obvious on purpose.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike

from ._checks import Float64Array, as_float64, as_matrix

__all__ = ["armijo_backtracking", "bfgs_update", "gram", "lift", "pca", "project"]


def gram(snapshots: ArrayLike) -> Float64Array:
    """``X X^T`` of the ``(t, D)`` snapshot matrix."""
    X = as_matrix(snapshots, "snapshots")
    return X @ X.T


def pca(snapshots: ArrayLike, d: int) -> tuple[Float64Array, Float64Array, Float64Array]:
    """``(centre (D,), P (d, D), explained_variance (d,))`` of the rows of ``snapshots``.

    ``P`` holds the top-``d`` right singular vectors of ``X - mean`` as rows; the variances are the
    squared singular values divided by ``t - 1``.
    """
    X = as_matrix(snapshots, "snapshots")
    t = X.shape[0]
    if not 1 <= d <= min(t - 1, X.shape[1]):
        raise ValueError(f"d: must lie in 1..{min(t - 1, X.shape[1])}, got {d}")
    centre = X.mean(axis=0)
    _, s, Vt = np.linalg.svd(X - centre, full_matrices=False)
    return centre, Vt[:d], s[:d] ** 2 / (t - 1)


def project(P: ArrayLike, centre: ArrayLike, w: ArrayLike) -> Float64Array:
    """``P (w - centre)``."""
    return as_float64(P, "P") @ (as_float64(w, "w") - as_float64(centre, "centre"))


def lift(P: ArrayLike, centre: ArrayLike, c: ArrayLike) -> Float64Array:
    """``centre + P^T c``."""
    return as_float64(centre, "centre") + as_float64(P, "P").T @ as_float64(c, "c")


def bfgs_update(
    H: ArrayLike, s: ArrayLike, y: ArrayLike, eps: float = 1e-8
) -> tuple[Float64Array, bool]:
    """Textbook inverse BFGS: ``(I - r s y^T) H (I - r y s^T) + r s s^T`` with ``r = 1 / y^T s``;
    skipped (``H`` returned, False) when ``y^T s <= eps ||s|| ||y||``."""
    H0 = as_float64(H, "H")
    sv = as_float64(s, "s")
    yv = as_float64(y, "y")
    sy = float(yv @ sv)
    if not sy > eps * np.linalg.norm(sv) * np.linalg.norm(yv) or sy <= 0:
        return H0.copy(), False
    r = 1.0 / sy
    identity = np.eye(sv.shape[0])
    left = identity - r * np.outer(sv, yv)
    right = identity - r * np.outer(yv, sv)
    return left @ H0 @ right + r * np.outer(sv, sv), True


def armijo_backtracking(
    f: Callable[[float], float],
    f0: float,
    slope: float,
    alpha0: float = 1.0,
    shrink: float = 0.4,
    c1: float = 0.4,
    max_trials: int = 20,
) -> tuple[float, float, int]:
    """First ``alpha = alpha0 shrink^m`` with ``f(alpha) <= f0 + c1 alpha slope``:
    ``(alpha, f(alpha), trials)``; ``(0.0, f0, max_trials)`` when none."""
    for m in range(max_trials):
        alpha = alpha0 * shrink**m
        value = f(alpha)
        if np.isfinite(value) and value <= f0 + c1 * alpha * slope:
            return alpha, value, m + 1
    return 0.0, f0, max_trials
