"""Embedded CMD: choosing the parameters that are replaced by their CMD model."""

from __future__ import annotations

import math

import numpy as np

from .._array import Array, namespace
from ..errors import DTypeError, ShapeError
from .validation import _check_fraction, _check_vector, _device, _host_indices, _index_dtype

__all__ = ["select_embedding"]


def select_embedding(
    a: Array,
    b: Array,
    a_prev: Array,
    b_prev: Array,
    embedded: Array,
    references: np.ndarray,
    fraction: float = 0.1,
) -> Array:
    """The new embedded mask: ``embedded`` plus the ``ceil(fraction N)`` most settled other parameters.

    Settled = smallest ``d_n = sqrt((a_n - a_prev_n)^2 + (b_n - b_prev_n)^2)`` (the change of the CMD
    coefficients since the last embedding; computed without overflow). References and already embedded
    parameters are never chosen; ties go to the lower index. ``a``, ``b``, ``a_prev``, ``b_prev``: finite
    real floating ``(N,)``; ``embedded``: boolean ``(N,)``; ``references``: distinct integer indices in
    ``0 .. N-1``; ``fraction`` in ``(0, 1]``. Returns a new boolean ``(N,)`` array.
    """
    xp = namespace(a=a, b=b, a_prev=a_prev, b_prev=b_prev, embedded=embedded)
    if a.ndim != 1 or a.shape[0] < 1:
        raise ShapeError(f"`a` must be 1-D with N >= 1, got shape {tuple(a.shape)}")
    n = int(a.shape[0])
    for name, v in (("a", a), ("b", b), ("a_prev", a_prev), ("b_prev", b_prev)):
        _check_vector(xp, v, name, n)
    if embedded.ndim != 1 or int(embedded.shape[0]) != n:
        raise ShapeError(f"`embedded` must have shape ({n},), got {tuple(embedded.shape)}")
    if not xp.isdtype(embedded.dtype, "bool"):
        raise DTypeError(f"`embedded` must be a boolean mask, got {embedded.dtype}")
    frac = _check_fraction(fraction, "fraction")
    refs = _host_indices(references, "references", n)
    da = xp.abs(a - a_prev)
    db = xp.abs(b - b_prev)
    big = xp.maximum(da, db)
    small = xp.minimum(da, db)
    safe = xp.where(big > 0, big, xp.ones_like(big))
    ratio = small / safe
    d = big * xp.sqrt(1.0 + ratio * ratio)  # hypot without overflow
    dev = _device(a)
    is_ref = xp.asarray(np.isin(np.arange(n), refs), device=dev)
    blocked = embedded | is_ref
    d = xp.where(blocked, xp.asarray(float("inf"), dtype=d.dtype, device=dev), d)
    eligible = n - int(xp.sum(xp.astype(blocked, _index_dtype(xp, a))))
    k = min(math.ceil(frac * n), eligible)
    if k <= 0:
        return xp.asarray(embedded, copy=True)
    # rank of each parameter in the stable order (the inverse permutation): no scatter, no writes
    rank = xp.argsort(xp.argsort(d, stable=True), stable=True)
    return embedded | (rank < k)
