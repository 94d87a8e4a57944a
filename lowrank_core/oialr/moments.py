"""Optimizer moments that follow OIALR's factors, over array-API arrays: one rule for every framework.

OIALR changes the trained tensor twice: at the switch a dense weight ``W`` is replaced by the mixing
matrix ``Sigma`` of ``W = U Sigma V^T`` (``U``, ``V`` frozen), and at every rank update ``Sigma`` is
re-diagonalized (``Sigma_new = left^T Sigma right``) and truncated. An optimizer's per-parameter state
must move with it. Each state array of the parameter's shape is one of three *kinds*:

- ``"first"`` (SGD's momentum, Adam's first moment, and anything not known to be another kind): a
  linear combination of gradients, which transforms exactly like Sigma and its gradient:
  ``M -> U^T M V`` at the switch, ``M -> left^T M right`` at a re-diagonalization;
- ``"second"`` (element-wise averages of squares: Adam's / RMSprop's second moment, AMSGrad's maximum,
  Adagrad's sum): mapped with the element-wise squares of the same maps (``∘``), ``v -> (L∘L)^T v (R∘R)``,
  and clamped at ``>= 0``. That is ``E[g'^2]`` if the gradient's entries were uncorrelated; for
  orthogonal maps it keeps ``sum(v)``, and it is exact for a signed permutation;
- ``"magnitude"`` (non-negative element-wise magnitudes: Adamax's infinity norm, Rprop's step sizes):
  mapped through their squares, ``x -> sqrt(map(x^2))`` with the squared map (a linear map would make
  them negative).

Each framework keeps only its table of state names and kinds (``lowrank_torch.optim_state``: torch's
optimizer keys; ``lowrank_jax.optim_state``: optax's fields); :class:`MomentMap` does the arithmetic.
The maps are computed in at least float32 (half-precision state is upcast; float64 maps promote to
float64) and the result takes the state array's dtype. Truncation to rank ``r'`` keeps the leading
``[..., :r', :r']`` block (:func:`truncate_moment`), exact for the kept coordinates.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import array_api_compat

from ..factors import rotate_sigma

__all__ = [
    "FIRST",
    "MAGNITUDE",
    "MOMENT_KINDS",
    "SECOND",
    "MomentMap",
    "moment_kind",
    "rotate_cheaper",
    "truncate_moment",
]

FIRST, SECOND, MAGNITUDE = "first", "second", "magnitude"
#: The kinds of per-parameter optimizer state (see the module docstring).
MOMENT_KINDS: tuple[str, ...] = (FIRST, SECOND, MAGNITUDE)

Array = Any
#: A linear map ``apply(x, left, right)`` of one state array (``left^T x right`` or a view of it).
LinearMap = Callable[[Array, Array, Array], Array]


def moment_kind(name: str, table: Mapping[str, str], overrides: Mapping[str, str] = {}) -> str:
    """The kind of the state named ``name``: ``overrides`` first, then the framework's ``table``,
    else ``"first"`` (a linear combination of gradients is the safe default: it is exact for any
    linear state)."""
    return overrides.get(name) or table.get(name) or FIRST


def rotate_cheaper(x: Array, left: Array, right: Array) -> Array:
    """``left^T x right``, multiplied in the cheaper order (the same product up to rounding).

    ``(left^T x) right`` costs ``r1 m n + r1 n r2`` multiply-adds per matrix, ``left^T (x right)``
    ``m n r2 + m r1 r2`` (``x`` ``m x n``, ``left`` ``m x r1``, ``right`` ``n x r2``): equal for a square
    full-rank switch, up to ~2x apart for a rectangular weight. The second order is computed as
    ``rotate_sigma(x^T, right, left)^T``.
    """
    xp = array_api_compat.array_namespace(x, left, right)
    m, n = int(x.shape[-2]), int(x.shape[-1])
    r1, r2 = int(left.shape[-1]), int(right.shape[-1])
    if m * r2 * (n + r1) < r1 * n * (m + r2):
        swapped = rotate_sigma(xp.matrix_transpose(x), right, left, check_finite=False)
        return xp.matrix_transpose(swapped)
    return rotate_sigma(x, left, right, check_finite=False)


class MomentMap:
    """The maps of one event (a switch or a re-diagonalization) for every state array it moves.

    ``left`` / ``right`` are the event's maps (``U`` / ``V`` at a switch, the rotations at a
    re-diagonalization); ``apply(x, left, right)`` is the linear map of one state array (default
    :func:`rotate_cheaper`; a switch first takes the weight's matrix view). The maps in each compute
    dtype and device, and their element-wise squares, are built at most once per event, so that
    several state arrays (Adam's two moments, AMSGrad's maximum) share them.
    """

    def __init__(self, left: Array, right: Array, apply: LinearMap = rotate_cheaper) -> None:
        self.left, self.right, self.apply = left, right, apply
        self._plain: dict[tuple[Any, Any], tuple[Array, Array]] = {}
        self._squared: dict[tuple[Any, Any], tuple[Array, Array]] = {}

    def _maps(self, dtype: Any, device: Any, squared: bool) -> tuple[Array, Array]:
        key = (dtype, device)
        cache = self._squared if squared else self._plain
        if key not in cache:
            if squared:
                left, right = self._maps(dtype, device, False)
                cache[key] = (left * left, right * right)
            else:
                xp = array_api_compat.array_namespace(self.left, self.right)
                cache[key] = tuple(
                    xp.astype(array_api_compat.to_device(a, device), dtype)
                    if array_api_compat.device(a) != device
                    else xp.astype(a, dtype)
                    for a in (self.left, self.right)
                )
        return cache[key]

    def __call__(self, x: Array, kind: str) -> Array:
        """``x`` (a state array of one ``kind``) mapped by the rule of the module docstring, in
        ``x``'s dtype and on its device."""
        xp = array_api_compat.array_namespace(x, self.left, self.right)
        dt = xp.result_type(xp.float32, x.dtype, self.left.dtype, self.right.dtype)
        dev = array_api_compat.device(x)
        xc = xp.astype(x, dt)
        if kind == SECOND:
            y = xp.clip(self.apply(xc, *self._maps(dt, dev, True)), min=0)
        elif kind == MAGNITUDE:
            y = xp.sqrt(xp.clip(self.apply(xc * xc, *self._maps(dt, dev, True)), min=0))
        else:
            y = self.apply(xc, *self._maps(dt, dev, False))
        return xp.astype(y, x.dtype)


def truncate_moment(x: Array, rank: int) -> Array:
    """The leading ``[..., :rank, :rank]`` block of a Sigma-shaped state array."""
    return x[..., :rank, :rank]
