"""Weight tensors seen as matrices (and back).

A weight of shape ``(out, *rest)`` is the matrix ``(out, prod(rest))``: a Linear's ``(out, in)`` as is,
a ConvNd's ``(out, in/groups, *kernel)`` as ``(out, in/groups * prod(kernel))``. With ``groups > 1`` the
rows are split into ``groups`` equal blocks, giving a stack ``(groups, out/groups, cols)``: one matrix per
group of a grouped convolution, or the separate q/k/v projections of a packed attention
``in_proj_weight`` (``groups=3``). Both directions are reshapes (views where the library allows).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

from ._array import Array, namespace, shape_tuple
from .errors import ShapeError

__all__ = ["matrix_shape", "matrix_to_weight", "weight_to_matrix"]


def _check_groups(groups: object) -> int:
    if isinstance(groups, bool):
        raise ValueError("`groups` must be a positive integer, got a bool")
    try:
        g = operator.index(groups)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(
            f"`groups` must be a positive integer, got {type(groups).__name__}"
        ) from None
    if g < 1:
        raise ValueError(f"`groups` must be >= 1, got {g}")
    return g


def matrix_shape(weight_shape: Sequence[int], *, groups: int = 1) -> tuple[int, ...]:
    """The shape :func:`weight_to_matrix` gives a weight of ``weight_shape``."""
    shape = shape_tuple(weight_shape)
    g = _check_groups(groups)
    if len(shape) < 2:
        raise ShapeError(
            f"a weight must have at least 2 dimensions (out, in, ...), got shape {shape}"
        )
    out, cols = shape[0], math.prod(shape[1:])
    if out % g:
        raise ShapeError(
            f"the output dimension {out} of a weight of shape {shape} is not divisible by groups={g}"
        )
    return (out, cols) if g == 1 else (g, out // g, cols)


def weight_to_matrix(weight: Array, *, groups: int = 1) -> Array:
    """Reshape a weight ``(out, *rest)`` to ``(out, prod(rest))`` or ``(groups, out/groups, prod(rest))``."""
    xp = namespace(weight=weight)
    target = matrix_shape(tuple(weight.shape), groups=groups)
    return xp.reshape(weight, target)


def matrix_to_weight(matrix: Array, weight_shape: Sequence[int]) -> Array:
    """Inverse of :func:`weight_to_matrix`: reshape ``matrix`` back to ``weight_shape``."""
    xp = namespace(matrix=matrix)
    shape = shape_tuple(weight_shape)
    if len(shape) < 2:
        raise ShapeError(f"`weight_shape` must have at least 2 dimensions, got {shape}")
    out, cols = shape[0], math.prod(shape[1:])
    mshape = tuple(matrix.shape)
    ok = (len(mshape) == 2 and mshape == (out, cols)) or (
        len(mshape) == 3 and mshape[0] * mshape[1] == out and mshape[2] == cols
    )
    if not ok:
        raise ShapeError(
            f"a matrix of shape {mshape} is not a view of a weight of shape {shape} "
            f"(expected ({out}, {cols}) or (groups, {out}/groups, {cols}))"
        )
    return xp.reshape(matrix, shape)
