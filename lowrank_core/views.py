"""Weight tensors seen as matrices (and back).

A weight of shape ``(out, *rest)`` is the matrix ``(out, prod(rest))``: a Linear's ``(out, in)`` as is,
a ConvNd's ``(out, in/groups, *kernel)`` as ``(out, in/groups * prod(kernel))``. With ``groups > 1`` the
rows are split into ``groups`` equal blocks, giving a stack ``(groups, out/groups, cols)``: one matrix per
group of a grouped convolution, or the separate q/k/v projections of a packed attention
``in_proj_weight`` (``groups=3``). Both directions are reshapes (views where the library allows).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ._array import Array, check_floating, namespace
from ._array import check_finite as _check_finite
from ._validate import check_bool, check_int, check_shape
from .errors import ShapeError

__all__ = ["matrix_shape", "matrix_to_weight", "weight_to_matrix"]


def _check_groups(groups: object) -> int:
    g: int = check_int("groups", groups, min=1)
    return g


def matrix_shape(weight_shape: Sequence[int], *, groups: int = 1) -> tuple[int, ...]:
    """The shape :func:`weight_to_matrix` gives a weight of ``weight_shape``.

    ``weight_shape`` is a tuple (or list, ``torch.Size``) of at least 2 positive integers.
    """
    shape = check_shape("weight_shape", weight_shape, min_ndim=2)
    g = _check_groups(groups)
    out, cols = shape[0], math.prod(shape[1:])
    if out % g:
        raise ShapeError(
            f"the output dimension {out} of a weight of shape {shape} is not divisible by groups={g}"
        )
    return (out, cols) if g == 1 else (g, out // g, cols)


def weight_to_matrix(weight: Array, *, groups: int = 1, check_finite: bool = True) -> Array:
    """Reshape a weight ``(out, *rest)`` to ``(out, prod(rest))`` or ``(groups, out/groups, prod(rest))``.

    ``weight`` must be a real floating array with every dimension >= 1. Raises ``NonFiniteError`` on
    NaN/Inf unless ``check_finite=False`` (hot paths that reshape every step pass False).
    """
    xp = namespace(weight=weight)
    finite = check_bool("check_finite", check_finite)
    shape = tuple(int(d) for d in weight.shape)
    if len(shape) < 2 or min(shape) < 1:
        raise ShapeError(
            f"`weight` must have at least 2 dimensions (out, in, ...), each >= 1, got shape {shape}"
        )
    target = matrix_shape(shape, groups=groups)
    check_floating(xp, weight, "weight")
    if finite:
        _check_finite(xp, weight, "weight")
    return xp.reshape(weight, target)


def matrix_to_weight(
    matrix: Array, weight_shape: Sequence[int], *, check_finite: bool = True
) -> Array:
    """Inverse of :func:`weight_to_matrix`: reshape ``matrix`` back to ``weight_shape``.

    Raises ``NonFiniteError`` on NaN/Inf unless ``check_finite=False``.
    """
    xp = namespace(matrix=matrix)
    finite = check_bool("check_finite", check_finite)
    shape = check_shape("weight_shape", weight_shape, min_ndim=2)
    out, cols = shape[0], math.prod(shape[1:])
    mshape = tuple(int(d) for d in matrix.shape)
    ok = (len(mshape) == 2 and mshape == (out, cols)) or (
        len(mshape) == 3 and mshape[0] * mshape[1] == out and mshape[2] == cols
    )
    if not ok:
        raise ShapeError(
            f"a matrix of shape {mshape} is not a view of a weight of shape {shape} "
            f"(expected ({out}, {cols}) or (groups, {out}/groups, {cols}))"
        )
    check_floating(xp, matrix, "matrix")
    if finite:
        _check_finite(xp, matrix, "matrix")
    return xp.reshape(matrix, shape)
