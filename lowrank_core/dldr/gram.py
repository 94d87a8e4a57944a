"""Gram matrices of snapshots and their top eigenpairs (on the host, in float64)."""

from __future__ import annotations

import math

import numpy as np

from .._array import Array, Namespace, check_finite, check_floating, namespace
from .._validate import check_bool
from ..backend import get_backend
from ..errors import DTypeError, NonFiniteError, ParameterError, RankError, ShapeError
from .chunked import _EPS64, _OVERFLOW, CHUNK, _host

__all__ = ["centred_gram", "gram_matrix"]


def gram_matrix(snapshots: Array, *, check_finite: bool = True) -> Array:
    """``X X^T`` of a ``(t, D)`` snapshot matrix (one snapshot per row): a ``(t, t)`` array."""
    xp = namespace(snapshots=snapshots)
    _check_snapshot_matrix(xp, snapshots, check_bool("check_finite", check_finite))
    X = snapshots
    with np.errstate(over="ignore", invalid="ignore"):
        G = X @ xp.matrix_transpose(X)
    if not get_backend(G).all_finite(G):
        raise NonFiniteError(_OVERFLOW.format(what="X X^T", dtype=X.dtype))
    return G


def centred_gram(gram: Array) -> Array:
    """``J G J`` with ``J = I - 1 1^T / t``: the Gram matrix of the mean-centred snapshots."""
    xp = namespace(gram=gram)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] == 0:
        raise ShapeError(
            f"`gram` must be a non-empty square (t, t) matrix, got {tuple(gram.shape)}"
        )
    check_floating(xp, gram, "gram")
    check_finite(xp, gram, "gram")
    row = xp.mean(gram, axis=1, keepdims=True)
    col = xp.mean(gram, axis=0, keepdims=True)
    return gram - row - col + xp.mean(gram)


def _check_snapshot_matrix(xp: Namespace, X: Array, finite: bool) -> None:
    if X.ndim != 2:
        raise ShapeError(
            f"`snapshots` must be a (t, D) matrix, one flattened snapshot per row, got shape "
            f"{tuple(X.shape)}"
        )
    check_floating(xp, X, "snapshots")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ShapeError(f"`snapshots` must have t, D >= 1, got shape {tuple(X.shape)}")
    if finite:
        check_finite(xp, X, "snapshots")


def _centre_host(G: np.ndarray) -> np.ndarray:
    Gc = G - G.mean(axis=1, keepdims=True) - G.mean(axis=0, keepdims=True) + G.mean()
    return np.asarray(0.5 * (Gc + Gc.T))


def _resolution(trace: float, t: int, eps: float) -> float:
    """The smallest eigenvalue of a centred Gram matrix that the stored data resolve.

    ``trace`` is that of the (uncentred) Gram of the stored vectors, ``eps`` their dtype's machine
    epsilon. Two limits, the larger wins:

    * the data: each stored vector carries a relative rounding of at most ``eps`` per entry (the shift
      ``w_i - w_1`` and the storage dtype), a perturbation ``E`` of the snapshot matrix with
      ``|E|_2 <= eps sqrt(trace)``, so the singular values move by at most that (Weyl) and a direction
      with variance below ``eps^2 trace`` cannot be told from zero; the basis row of a direction with
      eigenvalue ``lam`` is assembled in the stored dtype with a relative error of about
      ``eps sqrt(t trace / lam)``; so we require ``lam > 4 t eps^2 trace`` (basis rows resolved to
      better than one half);
    * the computation: the Gram entries are float64 sums of chunk products (relative error about
      ``sqrt(W) eps64``) and the float64 eigensolver adds ``t eps64 |G|``, so
      ``4 max(t, sqrt(W)) eps64 trace``.
    """
    return 4.0 * max(t * eps * eps, max(t, math.sqrt(CHUNK)) * _EPS64) * max(trace, 0.0)


def _top_eigen(
    gc: np.ndarray, d: int, *, trace: float, eps: float, what: str = "centred Gram matrix"
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``d`` eigenpairs (descending) of a centred float64 Gram; RankError beyond what is resolved."""
    t = gc.shape[0]
    lam, V = np.linalg.eigh(0.5 * (gc + gc.T))
    lam, V = lam[::-1], V[:, ::-1]
    tol = _resolution(trace, t, eps)
    rank = int(np.sum(lam > tol)) if t and float(lam[0]) > 0 else 0
    if d > rank:
        shown = float(lam[d - 1]) if d - 1 < lam.shape[0] else 0.0
        raise RankError(
            f"`d` = {d} exceeds the number of directions with non-zero variance that the snapshots "
            f"resolve ({rank}): eigenvalue {d} of their {what} is {shown:.3g}, not above the "
            f"rounding-error level {tol:.3g} of the stored data and of the float64 Gram (trace "
            f"{trace:.3g}, stored dtype eps {eps:.3g}); take more (or more diverse) snapshots or a "
            "smaller `d`"
        )
    V = V[:, :d]
    # sign-canonical: the largest-|.| entry of each eigenvector positive
    pivot = V[np.argmax(np.abs(V), axis=0), np.arange(d)]
    V = V * np.where(pivot < 0, -1.0, 1.0)
    return lam[:d].copy(), V


def _check_gram(gram: Array) -> np.ndarray:
    """A finite, symmetric, real floating ``(t, t)`` Gram matrix (any library) as float64 NumPy."""
    if isinstance(gram, np.ndarray):
        if not np.issubdtype(gram.dtype, np.floating):
            raise DTypeError(f"`gram` must have a real floating dtype, got {gram.dtype}")
        G = gram
    else:
        xp = namespace(gram=gram)
        check_floating(xp, gram, "gram")
        G = _host(gram)
    if G.ndim != 2 or G.shape[0] != G.shape[1] or G.shape[0] < 2:
        raise ShapeError(f"`gram` must be a square (t, t) matrix with t >= 2, got {G.shape}")
    eps = float(np.finfo(G.dtype).eps)
    G = G.astype(np.float64)
    if not np.all(np.isfinite(G)):
        raise NonFiniteError("`gram` contains NaN or Inf")
    scale = float(np.abs(G).max())
    if float(np.abs(G - G.T).max()) > 100 * G.shape[0] * eps * scale:
        raise ParameterError("`gram` is not symmetric: not a Gram matrix")
    if float(np.diag(G).min()) < 0:
        raise ParameterError("`gram` has a negative diagonal entry: not a Gram matrix")
    return G
