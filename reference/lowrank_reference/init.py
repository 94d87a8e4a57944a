"""Reference low-rank initialization: spectral, nonlinear (ReLU) and the closed-form function error.

Plain NumPy float64, one matrix at a time, written from the formulas (``/work/shared/ALGORITHMS.md``
section 4) without sharing code with ``lowrank_core``: row by row, with explicit angles and projectors.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

from ._checks import Float64Array, as_matrix

__all__ = [
    "arc_cosine_j",
    "frobenius_decay",
    "frobenius_decay_grad",
    "nonlinear_init",
    "nonlinear_matrix",
    "relu_function_error",
    "spectral_init",
]


def arc_cosine_j(theta: float) -> float:
    """``J(theta) = sin(theta) + (pi - theta) cos(theta)`` (degree-1 arc-cosine kernel, times pi)."""
    return math.sin(theta) + (math.pi - theta) * math.cos(theta)


def _angle(u: Float64Array, v: Float64Array) -> float:
    nu, nv = float(np.linalg.norm(u)), float(np.linalg.norm(v))
    if nu == 0.0 or nv == 0.0:
        return math.pi / 2
    return math.acos(min(1.0, max(-1.0, float(u @ v) / (nu * nv))))


def _check_rank(rank: int, a: Float64Array) -> int:
    k = min(a.shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= k:
        raise ValueError(f"rank must be an int in 1..{k}, got {rank!r}")
    return rank


def relu_function_error(a: ArrayLike, b: ArrayLike, *, relative: bool = False) -> float:
    """``E ||ReLU(a x) - ReLU(b x)||^2`` for ``x ~ N(0, I)``, summed over rows.

    Row i: ``E[ReLU(u.x)^2] = |u|^2 / 2`` and ``E[ReLU(u.x) ReLU(v.x)] = |u| |v| J(theta) / (2 pi)``, so
    ``E (ReLU(u.x) - ReLU(v.x))^2 = |u|^2 / 2 + |v|^2 / 2 - |u| |v| J(theta) / pi``.
    """
    A, B = as_matrix(a, "a"), as_matrix(b, "b")
    if A.shape != B.shape:
        raise ValueError(f"shapes differ: {A.shape} vs {B.shape}")
    total = 0.0
    for u, v in zip(A, B, strict=True):
        nu, nv = float(np.linalg.norm(u)), float(np.linalg.norm(v))
        total += nu**2 / 2 + nv**2 / 2 - nu * nv * arc_cosine_j(_angle(u, v)) / math.pi
    if relative:
        return total / (float(np.sum(A**2)) / 2)
    return total


def spectral_init(a: ArrayLike, rank: int) -> tuple[Float64Array, Float64Array]:
    """``(A_r sqrt(S_r), B_r sqrt(S_r))`` from the SVD ``a = A S B^T``: the product is the best rank-r
    approximation."""
    W = as_matrix(a, "a")
    r = _check_rank(rank, W)
    A, S, Bt = np.linalg.svd(W, full_matrices=False)
    root = np.sqrt(S[:r])
    return A[:, :r] * root, Bt[:r].T * root


def nonlinear_matrix(a: ArrayLike, rank: int) -> Float64Array:
    """The nonlinear init's rank-r matrix ``M``: each row of ``a`` projected onto the top-r right singular
    subspace and rescaled to the norm ``|w_i| J(theta_i) / pi`` (``theta_i`` = angle of ``w_i`` to it)."""
    W = as_matrix(a, "a")
    r = _check_rank(rank, W)
    _, _, Bt = np.linalg.svd(W, full_matrices=False)
    P = Bt[:r].T @ Bt[:r]  # projector onto the subspace
    M = np.zeros_like(W)
    for i, w in enumerate(W):
        p = P @ w
        norm_p = float(np.linalg.norm(p))
        if norm_p == 0.0:
            continue  # row orthogonal to the subspace (or zero): left at 0
        theta = _angle(w, p)
        M[i] = p / norm_p * (float(np.linalg.norm(w)) * arc_cosine_j(theta) / math.pi)
    return M


def nonlinear_init(a: ArrayLike, rank: int) -> tuple[Float64Array, Float64Array]:
    """Balanced factors ``(left, right)`` of :func:`nonlinear_matrix` (from its SVD, ``left = A sqrt(S)``)."""
    M = nonlinear_matrix(a, rank)
    A, S, Bt = np.linalg.svd(M, full_matrices=False)
    root = np.sqrt(S[:rank])
    return A[:, :rank] * root, Bt[:rank].T * root


def frobenius_decay(left: ArrayLike, right: ArrayLike, coefficient: float = 1.0) -> float:
    """``coefficient / 2 * ||left right^T||_F^2`` (product formed explicitly)."""
    L, R = as_matrix(left, "left"), as_matrix(right, "right")
    return 0.5 * coefficient * float(np.sum((L @ R.T) ** 2))


def frobenius_decay_grad(
    left: ArrayLike, right: ArrayLike, coefficient: float = 1.0
) -> tuple[Float64Array, Float64Array]:
    """Gradients of :func:`frobenius_decay`: with ``W = L R^T``, ``(c W R, c W^T L)``."""
    L, R = as_matrix(left, "left"), as_matrix(right, "right")
    W = L @ R.T
    return coefficient * (W @ R), coefficient * (W.T @ L)
