"""Optimizer state that follows OIALR's factors: the switch to Sigma, re-diagonalization, truncation.

OIALR changes the trained tensor twice: at the switch a dense weight ``W`` is replaced by the mixing
matrix ``Sigma`` of ``W = U Sigma V^T`` (``U``, ``V`` frozen), and at every rank update ``Sigma`` is
re-diagonalized (``Sigma = P diag(sig) Q^T``, ``U <- U P``, ``V <- V Q``, ``Sigma <- P^T Sigma Q``) and
truncated. The optimizer's per-parameter state (momenta) must move with it. The published code zeroes
Adam's moments at the switch but keeps the step count, so bias correction no longer compensates the empty
moments and the first updates are about ``sqrt(1 - beta2) / (1 - beta1) ~ 3`` times too large; and it does
not rotate the moments when Sigma is rotated. This module does both properly.

The rule
--------
The rule is :mod:`lowrank_core.oialr.moments`'s, the same for every framework: only state tensors whose
shape equals the parameter's are transformed, each by its kind. This module holds torch's table of
state keys (:data:`KINDS`):

- **second-moment-like** (:data:`SECOND_MOMENT_KEYS`: Adam's ``exp_avg_sq``, AMSGrad's
  ``max_exp_avg_sq``, RMSprop's / Adadelta's ``square_avg``, Adagrad's ``sum``, Adadelta's ``acc_delta``):
  mapped with the element-wise squares of the maps, clamped at ``>= 0``;
- **magnitude-like** (:data:`MAGNITUDE_KEYS`: Adamax's ``exp_inf``, Rprop's ``step_size``): mapped
  through their squares, ``x -> sqrt(map(x^2))``;
- **first-moment-like** (``momentum_buffer``, ``exp_avg``, ``grad_avg``, ``ax`` and *any other key*):
  mapped exactly like Sigma (``U^T M V`` at the switch, ``left^T M right`` at a re-diagonalization).

``kinds=`` (or :attr:`lowrank_torch.OIALRConfig.moment_kinds`) overrides the table for an optimizer with
other key names.

Every other entry (scalars such as ``step``, ``mu_product``, ``eta``; tensors of another shape) is kept as
it is. Keeping ``step`` *together with* properly transformed (not zeroed) moments keeps Adam's bias
correction consistent, so the first update after the switch has the size of the updates before it.

Truncation to rank ``r'`` (after re-diagonalization, when Sigma is diagonal and sorted) keeps the leading
``[..., :r', :r']`` block of every Sigma-shaped state tensor, which is exact for the kept coordinates.

Precision and placement: the maps are computed in at least float32 (half-precision state is upcast, and
float64 factors promote the computation to float64); results take the state tensor's own dtype and device.
All the linear algebra is ``lowrank_core.rotate_sigma`` and ``lowrank_core.weight_to_matrix``.

Parameters keep their identity: :func:`swap_parameter` writes the new parameter into the same slot of the
same param group (the group dict, and so its ``lr``, ``weight_decay`` and everything else, is untouched),
so LR schedulers and anything else holding the optimizer keep working. Optimizers that keep state that is
not per parameter in the above sense (``LBFGS``, or ``Adafactor``'s factored row/column statistics) are not
supported. State that is absent (the optimizer never stepped) is fine: there is then nothing to move.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

import lowrank_core as lc
from lowrank_core._array import check_device, check_rank
from lowrank_core._validate import check_int, describe
from lowrank_core.oialr import moments

__all__ = [
    "KINDS",
    "MAGNITUDE_KEYS",
    "SECOND_MOMENT_KEYS",
    "dense_to_sigma_state",
    "find_parameter",
    "rotate_sigma_state",
    "swap_parameter",
    "truncate_sigma_state",
]

#: State keys of element-wise second moments (mapped with the squared maps, clamped at >= 0).
SECOND_MOMENT_KEYS: frozenset[str] = frozenset(
    {"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "acc_delta"}
)
#: State keys of element-wise non-negative magnitudes (mapped through their squares).
MAGNITUDE_KEYS: frozenset[str] = frozenset({"exp_inf", "step_size"})


def find_parameter(optimizer: torch.optim.Optimizer, param: Tensor) -> tuple[int, int] | None:
    """``(group index, position)`` of ``param`` in ``optimizer``'s param groups (``None``: not there)."""
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            if p is param:
                return gi, pi
    return None


def _check_objects(optimizer: object, **params: object) -> None:
    """``optimizer`` is a torch optimizer and every ``params`` value a tensor (else ParameterTypeError)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise lc.ParameterTypeError(
            f"`optimizer` must be a torch.optim.Optimizer, got {describe(optimizer)}"
        )
    for name, param in params.items():
        if not isinstance(param, Tensor):
            raise lc.ParameterTypeError(
                f"`{name}` must be a parameter (tensor), got {describe(param)}"
            )


def _check_rotation(sigma: Tensor, **maps: object) -> None:
    """``left`` / ``right`` of a re-diagonalization: finite floating tensors of ``sigma``'s shape."""
    for name, x in maps.items():
        if not isinstance(x, Tensor):
            raise lc.ArrayTypeError(f"`{name}` must be a torch.Tensor, got {describe(x)}")
        if not x.is_floating_point():
            raise lc.DTypeError(f"`{name}` must be a floating tensor, got {x.dtype}")
        if x.shape != sigma.shape:
            raise lc.ShapeError(
                f"`{name}` must have `sigma`'s shape {tuple(sigma.shape)} (a rotation of its "
                f"coordinates), got {tuple(x.shape)}"
            )
        check_device(x, name)
        if not bool(torch.isfinite(x).all()):
            raise lc.NonFiniteError(f"`{name}` contains NaN or Inf")


def _check_bases(dense: Tensor, sigma: Tensor, U: object, V: object, groups: object) -> None:
    """``U`` / ``V``: finite floating tensors that fit ``dense``'s matrix view and ``sigma``'s rank."""
    g = check_int("groups", groups, min=1)
    try:
        want = tuple(lc.matrix_shape(tuple(dense.shape), groups=g))
    except lc.LowRankError as exc:
        raise lc.ShapeError(
            f"`dense` (shape {tuple(dense.shape)}) has no matrix view: {exc}"
        ) from None
    batch, m, n = want[:-2], want[-2], want[-1]
    r = int(sigma.shape[-1]) if sigma.ndim >= 1 else -1
    for name, x, rows in (("U", U, m), ("V", V, n)):
        if not isinstance(x, Tensor):
            raise lc.ArrayTypeError(f"`{name}` must be a torch.Tensor, got {describe(x)}")
        if not x.is_floating_point():
            raise lc.DTypeError(f"`{name}` must be a floating tensor, got {x.dtype}")
        expect = (*batch, rows, r)
        if tuple(x.shape) != expect:
            raise lc.ShapeError(
                f"`{name}` must have shape {expect} for a dense weight {tuple(dense.shape)} "
                f"(groups={g}) and `sigma` {tuple(sigma.shape)}, got {tuple(x.shape)}"
            )
        check_device(x, name)
        if not bool(torch.isfinite(x).all()):
            raise lc.NonFiniteError(f"`{name}` contains NaN or Inf")


def _require(optimizer: torch.optim.Optimizer, param: Tensor, name: str) -> tuple[int, int]:
    _check_objects(optimizer, **{name: param})
    where = find_parameter(optimizer, param)
    if where is None:
        raise lc.ParameterError(
            f"`{name}` (a parameter of shape {tuple(param.shape)}) is not in any param group of the "
            f"{type(optimizer).__name__}"
        )
    return where


def swap_parameter(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter) -> None:
    """Put ``new`` where ``old`` is in ``optimizer``: same param group, same position.

    The group's hyper-parameters (``lr``, ``weight_decay``, ...) are unchanged and the group dict stays the
    same object (LR schedulers keep working). ``old``'s state entry is removed; ``new``'s state is left as
    it is (usually absent). Raises ``lowrank_core.ParameterError`` (a ``ValueError``) when ``old`` is not
    in the optimizer, or ``new`` already is.
    """
    gi, pi = _require(optimizer, old, "old")
    if not isinstance(new, Tensor):
        raise lc.ParameterTypeError(f"`new` must be a parameter (tensor), got {describe(new)}")
    if new is old:
        return
    if find_parameter(optimizer, new) is not None:
        raise lc.ParameterError(
            f"`new` (a parameter of shape {tuple(new.shape)}) is already in the "
            f"{type(optimizer).__name__}; a parameter may appear only once"
        )
    optimizer.param_groups[gi]["params"][pi] = new
    optimizer.state.pop(old, None)


# --------------------------------------------------------------------------------------------------
# the maps: the core's rule (lowrank_core.oialr.moments) with torch's table of state keys
# --------------------------------------------------------------------------------------------------
#: torch's optimizer state keys and their kinds (every other key is first-moment-like).
KINDS: dict[str, str] = {
    **dict.fromkeys(SECOND_MOMENT_KEYS, moments.SECOND),
    **dict.fromkeys(MAGNITUDE_KEYS, moments.MAGNITUDE),
}


def _map_state(
    state: Mapping[str, Any],
    shape: torch.Size,
    maps: moments.MomentMap,
    kinds: Mapping[str, str],
) -> tuple[dict[str, Any], list[str]]:
    """The new state (a new dict, new tensors) and the keys that were mapped."""
    out: dict[str, Any] = {}
    mapped: list[str] = []
    for key, value in state.items():
        if isinstance(value, Tensor) and value.shape == shape:
            kind = moments.moment_kind(key, KINDS, kinds)
            out[key] = maps(value.detach(), kind).contiguous()
            mapped.append(key)
        else:
            out[key] = value
    return out, mapped


# --------------------------------------------------------------------------------------------------
# the three events
# --------------------------------------------------------------------------------------------------
def dense_to_sigma_state(
    optimizer: torch.optim.Optimizer,
    dense: nn.Parameter,
    sigma: nn.Parameter,
    U: Tensor,
    V: Tensor,
    *,
    groups: int = 1,
    kinds: Mapping[str, str] | None = None,
) -> None:
    """OIALR's switch: ``sigma`` replaces ``dense`` in ``optimizer``, with the state carried over.

    ``U`` ``(m, r)`` / ``V`` ``(n, r)`` (stacks ``(groups, m/groups, r)`` / ``(groups, cols, r)`` for a grouped
    ConvNd) are the frozen bases of ``dense``'s matrix view (``lowrank_core.weight_to_matrix(dense,
    groups=groups)``). Every state tensor of ``dense``'s shape is mapped into Sigma's coordinates (see the
    module docstring); ``step`` and other entries are kept. Raises ``ParameterError`` when ``dense`` is not in
    the optimizer and ``lowrank_core.ShapeError`` when the factors do not fit; in both cases nothing changes.
    """
    _check_objects(optimizer, dense=dense, sigma=sigma)
    _check_bases(dense, sigma, U, V, groups)
    _require(optimizer, dense, "dense")
    old_state = optimizer.state.get(dense)
    shape = dense.shape

    def to_sigma(x: Tensor, left: Tensor, right: Tensor) -> Tensor:
        # state passes through as it is (like the rotation below): no finiteness check of moments
        matrix = lc.weight_to_matrix(x, groups=groups, check_finite=False)
        y: Tensor = moments.rotate_cheaper(matrix, left, right)
        return y

    new_state: dict[str, Any] | None = None
    if old_state:
        maps = moments.MomentMap(U.detach(), V.detach(), to_sigma)
        new_state, mapped = _map_state(old_state, shape, maps, kinds or {})
        for key in mapped:
            if new_state[key].shape != sigma.shape:
                raise lc.ShapeError(
                    f"state {key!r} of the dense weight {tuple(shape)} maps to shape "
                    f"{tuple(new_state[key].shape)} with U {tuple(U.shape)} and V {tuple(V.shape)}, "
                    f"but `sigma` has shape {tuple(sigma.shape)}"
                )
    swap_parameter(optimizer, dense, sigma)
    if new_state is not None:
        optimizer.state[sigma] = new_state


def rotate_sigma_state(
    optimizer: torch.optim.Optimizer,
    sigma: nn.Parameter,
    left: Tensor,
    right: Tensor,
    *,
    kinds: Mapping[str, str] | None = None,
) -> None:
    """After ``lowrank_core.rediagonalize`` (``Sigma_new = left^T Sigma right``): rotate ``sigma``'s state.

    Call it while ``sigma`` still has its old shape, or after ``set_factors`` with the same rank (the
    rotation never changes the shape). Sigma-shaped state tensors are replaced by new tensors; a missing
    state (never stepped, or ``sigma`` not trained by this optimizer) is a no-op. ``left`` and ``right``
    must be finite floating tensors of ``sigma``'s shape (else a ``LowRankError``; nothing changes).
    """
    _check_objects(optimizer, sigma=sigma)
    _check_rotation(sigma, left=left, right=right)
    state = optimizer.state.get(sigma)
    if not state:
        return
    maps = moments.MomentMap(left.detach(), right.detach())
    optimizer.state[sigma], _ = _map_state(state, sigma.shape, maps, kinds or {})


def _sigma_like(x: Tensor, sigma: Tensor, rank: int) -> bool:
    return (
        x.ndim == sigma.ndim
        and x.ndim >= 2
        and x.shape[:-2] == sigma.shape[:-2]
        and x.shape[-1] == x.shape[-2] >= rank
    )


def truncate_sigma_state(optimizer: torch.optim.Optimizer, sigma: nn.Parameter, rank: int) -> None:
    """After truncating Sigma to ``rank``: keep the leading ``[..., :rank, :rank]`` block of its state.

    ``sigma`` is the parameter that holds the state: either the old ``(..., r, r)`` one (call this before
    ``set_factors``, as OIALR does) or a ``(..., rank, rank)`` one the untruncated state was already moved
    to. Every square state tensor with Sigma's batch dimensions and side ``>= rank`` is cut; scalars
    (``step``) are kept. ``rank`` must lie in ``1..r`` (``r`` = ``sigma``'s side), else
    ``lowrank_core.RankError``.
    """
    _check_objects(optimizer, sigma=sigma)
    if sigma.ndim < 2:
        raise lc.ShapeError(
            f"`sigma` must be (a stack of) square matrices, got shape {tuple(sigma.shape)}"
        )
    r = int(sigma.shape[-1])
    rank = check_rank(rank, r, what="the rank of `sigma`")
    state = optimizer.state.get(sigma)
    if not state:
        return
    optimizer.state[sigma] = {
        key: value[..., :rank, :rank].clone(memory_format=torch.contiguous_format)
        if isinstance(value, Tensor) and _sigma_like(value, sigma, rank)
        else value
        for key, value in state.items()
    }
