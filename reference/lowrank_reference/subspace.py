"""Basis stability and subspace similarity of single matrices."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

from ._checks import Float64Array, as_matrix
from .linalg import orthogonal_factor, qr


def _cos(x: Float64Array, y: Float64Array) -> float:
    """``x.y / (|x| |y|)``, defined as 0 when ``|x| |y| == 0``."""
    denom = float(np.linalg.norm(x)) * float(np.linalg.norm(y))
    if denom == 0.0:
        return 0.0
    return float(np.dot(x, y)) / denom


def basis_stability(previous: ArrayLike, current: ArrayLike) -> float:
    """Mean cosine of matching columns (``m >= n``) or rows (``m < n``) of the two polar factors."""
    p = as_matrix(previous, "previous")
    c = as_matrix(current, "current")
    if p.shape != c.shape:
        raise ValueError(f"previous/current: shapes differ, {p.shape} vs {c.shape}")
    m, n = int(p.shape[0]), int(p.shape[1])
    if m == 0 or n == 0:
        raise ValueError(f"previous: empty matrix of shape {p.shape}")
    Qp = orthogonal_factor(p)
    Qc = orthogonal_factor(c)
    total = 0.0
    if m >= n:
        for j in range(n):
            total += _cos(Qp[:, j], Qc[:, j])
        return total / n
    for i in range(m):
        total += _cos(Qp[i, :], Qc[i, :])
    return total / m


def _bases(a: ArrayLike, b: ArrayLike) -> tuple[Float64Array, Float64Array]:
    x = as_matrix(a, "a")
    y = as_matrix(b, "b")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"a/b: row counts differ, {x.shape[0]} vs {y.shape[0]}")
    Qa, _ = qr(x)
    Qb, _ = qr(y)
    return Qa, Qb


def principal_angle_cosines(a: ArrayLike, b: ArrayLike) -> Float64Array:
    """Cosines of the principal angles between span(a) and span(b): singular values of
    ``Qa^T Qb`` clipped to [0, 1], descending, length ``min(ka, kb)``."""
    Qa, Qb = _bases(a, b)
    M = Qa.T @ Qb
    if min(M.shape) == 0:
        return np.zeros((0,))
    sv = np.linalg.svd(M, compute_uv=False)
    values = sorted((min(max(float(v), 0.0), 1.0) for v in sv), reverse=True)
    return np.array(values, dtype=np.float64)


def projector_distance(a: ArrayLike, b: ArrayLike) -> float:
    """``||Qa Qa^T - Qb Qb^T||_F`` as ``sqrt(max(ka + kb - 2 ||Qa^T Qb||_F^2, 0))``."""
    Qa, Qb = _bases(a, b)
    ka = Qa.shape[1]
    kb = Qb.shape[1]
    M = Qa.T @ Qb
    fro2 = 0.0
    for i in range(M.shape[0]):
        for j in range(M.shape[1]):
            fro2 += float(M[i, j]) ** 2
    return math.sqrt(max(ka + kb - 2.0 * fro2, 0.0))
