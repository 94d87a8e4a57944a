"""Weight tensor <-> matrix views (row-major reshapes)."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

from ._checks import Float64Array, as_float64, is_int


def weight_to_matrix(weight: ArrayLike, groups: int = 1) -> Float64Array:
    """Reshape a weight ``(out, *rest)`` to ``(out, prod(rest))``.

    With ``groups > 1`` the result is the stack ``(groups, out // groups, prod(rest))`` of
    consecutive row blocks. Returns a new float64 array (never a view of the input).
    """
    w = as_float64(weight, "weight")
    if w.ndim < 2:
        raise ValueError(f"weight: expected ndim >= 2, got ndim={w.ndim}")
    if not is_int(groups) or int(groups) < 1:
        raise ValueError(f"groups: must be a positive int, got {groups!r}")
    g = int(groups)
    out = w.shape[0]
    cols = 1
    for d in w.shape[1:]:
        cols *= d
    if out % g != 0:
        raise ValueError(f"groups: out={out} is not divisible by groups={g}")
    if g == 1:
        return w.reshape(out, cols).copy()
    rows = out // g
    result = w.reshape(out, cols).copy()
    # Explicit stacking of the row blocks g*rows ... (g+1)*rows - 1.
    blocks = [result[i * rows : (i + 1) * rows, :] for i in range(g)]
    stacked: Float64Array = np.stack(blocks, axis=0)
    return stacked


def matrix_to_weight(matrix: ArrayLike, weight_shape: tuple[int, ...]) -> Float64Array:
    """Inverse of :func:`weight_to_matrix`.

    Reshapes ``(out, cols)`` or ``(groups, out // groups, cols)`` back to ``weight_shape``; the
    matrix size must equal ``prod(weight_shape)``.
    """
    m = as_float64(matrix, "matrix")
    if m.ndim not in (2, 3):
        raise ValueError(f"matrix: expected ndim 2 or 3, got ndim={m.ndim}")
    shape = tuple(weight_shape)
    if len(shape) < 2:
        raise ValueError(f"weight_shape: expected at least 2 dimensions, got {shape}")
    for d in shape:
        if not is_int(d) or int(d) < 0:
            raise ValueError(f"weight_shape: entries must be non-negative ints, got {shape}")
    dims = tuple(int(d) for d in shape)
    if m.size != math.prod(dims):
        raise ValueError(
            f"matrix: size {m.size} does not match prod(weight_shape)={math.prod(dims)}"
        )
    return m.reshape(dims).copy()
