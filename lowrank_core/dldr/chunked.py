"""DLDR's shared numerics: float64 reductions over column chunks, host/library conversions, checks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Literal

import array_api_compat
import numpy as np

from .._array import Array, Namespace, check_finite, check_floating, check_rank
from ..backend import get_backend
from ..errors import ShapeError

__all__ = ["CHUNK", "PCAMethod", "ShardReduce", "Slabs"]


PCAMethod = Literal["exact", "randomized"]


#: Sums a float64 host array over the shards of sharded vectors (e.g. an all-reduce); the identity
#: when nothing is sharded. See :func:`subspace_from_gram`.
ShardReduce = Callable[[np.ndarray], np.ndarray]


_METHODS = ("exact", "randomized")


CHUNK = 1 << 16
"""Columns per chunk of every long reduction (float32 or float64 products, chunks summed in float64)."""


_EPS64 = float(np.finfo(np.float64).eps)


_OVERFLOW = (
    "overflow in {dtype}: {what} cannot be represented although the snapshots are finite (their "
    "scale is too large for squared norms and variances); rescale them (the subspace is scale "
    "invariant)"
)


def _check_vector(xp: Namespace, x: Array, name: str, *, finite: bool = True) -> None:
    if x.ndim != 1:
        raise ShapeError(f"`{name}` must be a 1-D vector, got shape {tuple(x.shape)}")
    check_floating(xp, x, name)
    if x.shape[0] == 0:
        raise ShapeError(f"`{name}` must not be empty")
    if finite:
        check_finite(xp, x, name)


def _check_d(d: object, t: int) -> int:
    return check_rank(
        d, max(t - 1, 0), name="d", what="t - 1 (centred snapshots span at most t - 1 directions)"
    )


def _host(x: Array) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    return np.asarray(get_backend(x).to_numpy(x))


def _to_xp(xp: Namespace, a: np.ndarray, like: Array) -> Array:
    """``a`` (NumPy) as an array of ``like``'s library, device and dtype."""
    if not _f64_ok(xp) and a.dtype == np.float64:
        a = a.astype(np.float32)  # the library has no float64: say so explicitly, no warning
    out = xp.asarray(np.ascontiguousarray(a), device=array_api_compat.device(like))
    return xp.astype(out, like.dtype) if out.dtype != like.dtype else out


def _f64_ok(xp: Namespace) -> bool:
    """Whether ``xp`` computes in float64 (JAX only with ``jax_enable_x64``)."""
    if array_api_compat.is_jax_namespace(xp):
        import jax  # already imported: the arrays are JAX's

        config: Any = jax.config
        return bool(config.jax_enable_x64)
    return True


def _to64(xp: Namespace, x: Array) -> Any:
    """``x`` in float64: in its own library, or as a host NumPy array where the library has none."""
    if _f64_ok(xp):
        return x if x.dtype == xp.float64 else xp.astype(x, xp.float64)
    return np.asarray(_host(x), dtype=np.float64)


def _gram64(xp: Namespace, A: Array, B: Array | None = None) -> Any:
    """``A B^T`` (``B = A`` by default) computed in float64 (see :func:`_to64`)."""
    A64 = _to64(xp, A)
    B64 = A64 if B is None else _to64(xp, B)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is detected and reported later
        if isinstance(A64, np.ndarray):
            return A64 @ np.swapaxes(B64, -1, -2)
        return A64 @ xp.matrix_transpose(B64)


def _sumsq64(xp: Namespace, x: Array, *, centred: bool = False) -> Any:
    """``sum(x^2)`` in float64 (of ``x`` minus its column means when ``centred``)."""
    x64 = _to64(xp, x)
    with np.errstate(over="ignore", invalid="ignore"):
        return _sumsq64_(xp, x64, centred)


def _sumsq64_(xp: Namespace, x64: Any, centred: bool) -> Any:
    if isinstance(x64, np.ndarray):
        c = x64 - x64.mean(axis=0, keepdims=True) if centred else x64
        return np.sum(c * c)
    c = x64 - xp.mean(x64, axis=0, keepdims=True) if centred else x64
    return xp.sum(c * c)


def _chunks(D: int, width: int = CHUNK) -> list[tuple[int, int]]:
    return [(j, min(D, j + width)) for j in range(0, D, width)]


# A column slab source: ``slabs()`` yields ``(j0, j1, S)`` with ``S`` the ``(t, j1 - j0)`` columns
# ``j0:j1`` of the t stored (shifted) vectors, in the snapshots' dtype, for consecutive chunks covering
# ``0..D``. Every fit is written against this one interface (the store, a matrix, a shard of columns).
Slabs = Callable[[], Iterator[tuple[int, int, Array]]]
