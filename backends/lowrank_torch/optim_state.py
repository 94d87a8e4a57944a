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
Only state tensors whose shape equals the parameter's are transformed. Each is one of two kinds:

- **first-moment-like** (``momentum_buffer``, ``exp_avg``, ``grad_avg``, ``ax`` and *any key not listed
  below*): a linear combination of gradients (and weights), so it transforms exactly like Sigma and its
  gradient (``dL/dSigma = U^T dL/dW V``):

  - switch: ``M -> rotate_sigma(weight_to_matrix(M, groups), U, V)``, i.e. ``U^T M V``;
  - re-diagonalization: ``M -> rotate_sigma(M, left, right)``, i.e. ``left^T M right``.

  This is exact: with SGD (momentum, Nesterov, weight decay) a re-diagonalization does not change the
  training trajectory at all, and neither does the switch for a square weight (``U``, ``V`` orthogonal).

- **second-moment-like** (keys in :data:`SECOND_MOMENT_KEYS`: Adam's ``exp_avg_sq``, AMSGrad's
  ``max_exp_avg_sq``, RMSprop's / Adadelta's ``square_avg``, Adagrad's ``sum``, Adadelta's ``acc_delta``):
  element-wise averages of squares, which have no exact transform under a change of basis. They are
  mapped with the element-wise squares of the same maps (``∘`` = element-wise square)::

      v -> (U∘U)^T v (V∘V)            (switch)
      v -> (left∘left)^T v (right∘right)   (re-diagonalization)

  and clamped at ``>= 0``. This is what ``E[g'^2]`` would be if the entries of the gradient were
  uncorrelated; for orthogonal maps (rows and columns of unit norm) it keeps ``sum(v)``, hence the
  overall scale of Adam's denominator, and it is exact when the map is a signed permutation.

- **magnitude-like** (keys in :data:`MAGNITUDE_KEYS`: Adamax's ``exp_inf``, Rprop's ``step_size``):
  non-negative element-wise magnitudes; they are mapped through their squares, ``x -> sqrt(map(x^2))``
  with the squared map above (a linear map would make them negative).

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

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

import lowrank_core as lc
from lowrank_core._array import check_device, check_rank
from lowrank_core._validate import check_int, describe

__all__ = [
    "MAGNITUDE_KEYS",
    "SECOND_MOMENT_KEYS",
    "dense_to_sigma_state",
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

_Map = Callable[[Tensor, Tensor, Tensor], Tensor]


def _find(optimizer: torch.optim.Optimizer, param: Tensor) -> tuple[int, int] | None:
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
    where = _find(optimizer, param)
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
    if _find(optimizer, new) is not None:
        raise lc.ParameterError(
            f"`new` (a parameter of shape {tuple(new.shape)}) is already in the "
            f"{type(optimizer).__name__}; a parameter may appear only once"
        )
    optimizer.param_groups[gi]["params"][pi] = new
    optimizer.state.pop(old, None)


# --------------------------------------------------------------------------------------------------
# the maps
# --------------------------------------------------------------------------------------------------
def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    dt = torch.float32
    for t in tensors:
        dt = torch.promote_types(dt, t.dtype)
    return dt


class _Maps:
    """``left`` / ``right`` in each compute dtype and device asked for, and their element-wise squares.

    Built once per event, so that several state tensors (Adam's two moments, AMSGrad's maximum) share
    the conversions and the squares (each an ``O(n^2)`` pass, computed at most once).
    """

    def __init__(self, left: Tensor, right: Tensor) -> None:
        self.left, self.right = left.detach(), right.detach()
        self._plain: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}
        self._squared: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}

    def plain(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        key = (dtype, device)
        if key not in self._plain:
            self._plain[key] = (
                self.left.to(device=device, dtype=dtype),
                self.right.to(device=device, dtype=dtype),
            )
        return self._plain[key]

    def squared(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        key = (dtype, device)
        if key not in self._squared:
            left, right = self.plain(dtype, device)
            self._squared[key] = (left * left, right * right)
        return self._squared[key]


def _transform(key: str, x: Tensor, apply: _Map, maps: _Maps) -> Tensor:
    """Map one state tensor by the rule of the module docstring; ``apply(x, left, right)`` is linear.

    (An all-zero state tensor is not special-cased: testing for it costs a pass over the tensor and a
    host synchronisation, ~1.5% of a 2048^2 map, for a case that is rare after a real step.)
    """
    dt = _compute_dtype(x, maps.left, maps.right)
    xc = x.detach().to(dtype=dt)
    if key in SECOND_MOMENT_KEYS:
        y = apply(xc, *maps.squared(dt, x.device)).clamp_min_(0)
    elif key in MAGNITUDE_KEYS:
        y = apply(xc * xc, *maps.squared(dt, x.device)).clamp_min_(0).sqrt_()
    else:
        y = apply(xc, *maps.plain(dt, x.device))
    return y.to(dtype=x.dtype, device=x.device).contiguous()


def _map_state(
    state: Mapping[str, Any], shape: torch.Size, apply: _Map, left: Tensor, right: Tensor
) -> tuple[dict[str, Any], list[str]]:
    """The new state (a new dict, new tensors) and the keys that were mapped."""
    out: dict[str, Any] = {}
    mapped: list[str] = []
    maps = _Maps(left, right)
    for key, value in state.items():
        if isinstance(value, Tensor) and value.shape == shape:
            out[key] = _transform(key, value, apply, maps)
            mapped.append(key)
        else:
            out[key] = value
    return out, mapped


def _rotate(x: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """``left^T x right``, multiplied in the cheaper order (the same product up to rounding).

    ``(left^T x) right`` costs ``r1 m n + r1 n r2`` multiply-adds per matrix, ``left^T (x right)``
    ``m n r2 + m r1 r2`` (``x`` ``m x n``, ``left`` ``m x r1``, ``right`` ``n x r2``): equal for a square
    full-rank switch, up to ~2x apart for a rectangular weight. The second order is
    ``rotate_sigma(x^T, right, left)^T``.
    """
    m, n = int(x.shape[-2]), int(x.shape[-1])
    r1, r2 = int(left.shape[-1]), int(right.shape[-1])
    if m * r2 * (n + r1) < r1 * n * (m + r2):
        y: Tensor = lc.rotate_sigma(x.mT, right, left, check_finite=False).mT
    else:
        y = lc.rotate_sigma(x, left, right, check_finite=False)
    return y


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
        return _rotate(lc.weight_to_matrix(x, groups=groups, check_finite=False), left, right)

    new_state: dict[str, Any] | None = None
    if old_state:
        new_state, mapped = _map_state(old_state, shape, to_sigma, U, V)
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
    optimizer: torch.optim.Optimizer, sigma: nn.Parameter, left: Tensor, right: Tensor
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
    optimizer.state[sigma], _ = _map_state(state, sigma.shape, _rotate, left, right)


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
