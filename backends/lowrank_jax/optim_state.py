"""optax state that follows OIALR's factors: the switch to Sigma, re-diagonalization, truncation.

The rule is :mod:`lowrank_core.oialr.moments`'s, the same as PyTorch's (:mod:`lowrank_torch.optim_state`);
this module holds optax's table of state fields and finds, in an optax state (a pytree:
``ScaleByAdamState(count, mu, nu)``, ``TraceState(trace)``, chains, ``inject_hyperparams``, ``masked``,
...), the leaves that belong to a parameter. A state leaf belongs to the parameter at path ``p`` when its
own path *ends with* ``p`` and its shape is the parameter's shape; its kind is that of the nearest field
on its path found in :data:`KINDS` (or in the ``kinds`` overrides), else first-moment-like:

- **second-moment-like**: :data:`SECOND_MOMENT_FIELDS` (Adam's and RMSprop's ``nu``, AMSGrad's
  ``nu_max``, Adagrad's ``sum_of_squares``, AdaDelta's ``e_g`` / ``e_x``);
- **magnitude-like**: :data:`MAGNITUDE_FIELDS` (Rprop's ``step_sizes``);
- **first-moment-like**: everything else (``mu``, ``trace``, ...).

optax's Adamax keeps its infinity norm in a ``ScaleByAdamState`` too, under Adam's name ``nu``: nothing
in the state tells the two apart, so pass ``kinds={"nu": "magnitude"}`` (or
``OIALRConfig(moment_kinds=ADAMAX_KINDS)``) when training with ``optax.adamax``.

Counts (``count``) and every other leaf are kept, so Adam's bias correction stays consistent with moments
that are carried over rather than zeroed. Truncation to rank ``r'`` keeps the leading ``[:r', :r']`` block.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from lowrank_core._array import check_rank
from lowrank_core.oialr import moments

__all__ = [
    "ADAMAX_KINDS",
    "KINDS",
    "MAGNITUDE_FIELDS",
    "SECOND_MOMENT_FIELDS",
    "dense_to_sigma_state",
    "map_param_state",
    "rotate_sigma_state",
    "truncate_sigma_state",
]

#: Fields of optax states that hold element-wise second moments.
SECOND_MOMENT_FIELDS: frozenset[str] = frozenset({"nu", "nu_max", "sum_of_squares", "e_g", "e_x"})
#: Fields of optax states that hold element-wise non-negative magnitudes.
MAGNITUDE_FIELDS: frozenset[str] = frozenset({"step_sizes"})
#: optax's state fields and their kinds (every other field is first-moment-like).
KINDS: dict[str, str] = {
    **dict.fromkeys(SECOND_MOMENT_FIELDS, moments.SECOND),
    **dict.fromkeys(MAGNITUDE_FIELDS, moments.MAGNITUDE),
}
#: The overrides for ``optax.adamax`` (its ``nu`` is an infinity norm, not a second moment).
ADAMAX_KINDS: dict[str, str] = {"nu": moments.MAGNITUDE}

Path = tuple[Any, ...]


def _key_name(key: Any) -> str | None:
    for attr in ("name", "key"):
        value = getattr(key, attr, None)
        if isinstance(value, str):
            return value
    return None


def _kind(path: Path, kinds: Mapping[str, str]) -> str:
    """The kind of the nearest known field on ``path`` (innermost first), else first-moment-like."""
    for key in reversed(path):
        name = _key_name(key)
        if name is not None and (name in kinds or name in KINDS):
            return moments.moment_kind(name, KINDS, kinds)
    return moments.FIRST


def map_param_state(
    opt_state: Any,
    param_path: Sequence[Any],
    shape: tuple[int, ...],
    fn: Callable[[jax.Array, str], jax.Array],
    kinds: Mapping[str, str] | None = None,
) -> tuple[Any, int]:
    """Replace every leaf of ``opt_state`` that belongs to the parameter at ``param_path`` (its path
    ends with ``param_path`` and it has ``shape``) by ``fn(leaf, kind)`` (``kind`` one of
    :data:`lowrank_core.oialr.MOMENT_KINDS`).

    Returns the new state and the number of leaves mapped. Nothing else changes (a new pytree).
    """
    suffix = tuple(param_path)
    n = len(suffix)
    count = 0
    overrides = dict(kinds or {})

    def visit(path: Path, leaf: Any) -> Any:
        nonlocal count
        if (
            isinstance(leaf, jax.Array)
            and tuple(leaf.shape) == tuple(shape)
            and len(path) >= n
            and tuple(path[len(path) - n :]) == suffix
        ):
            count += 1
            return fn(leaf, _kind(path[: len(path) - n], overrides))
        return leaf

    new = jax.tree_util.tree_map_with_path(visit, opt_state)
    return new, count


def dense_to_sigma_state(
    opt_state: Any,
    param_path: Sequence[Any],
    kernel_shape: tuple[int, ...],
    to_matrix: Callable[[jax.Array], jax.Array],
    U: jax.Array,
    V: jax.Array,
    kinds: Mapping[str, str] | None = None,
) -> Any:
    """OIALR's switch: the state of the dense kernel at ``param_path`` mapped into Sigma's coordinates.

    ``to_matrix`` gives the kernel's matrix view (the one ``U`` / ``V`` factor).
    """

    def to_sigma(x: jax.Array, left: jax.Array, right: jax.Array) -> jax.Array:
        y: jax.Array = moments.rotate_cheaper(to_matrix(x), left, right)
        return y

    maps = moments.MomentMap(U, V, to_sigma)
    new, _ = map_param_state(opt_state, param_path, kernel_shape, maps, kinds)
    return new


def rotate_sigma_state(
    opt_state: Any,
    param_path: Sequence[Any],
    left: jax.Array,
    right: jax.Array,
    kinds: Mapping[str, str] | None = None,
) -> Any:
    """After ``lowrank_core.rediagonalize`` (``Sigma_new = left^T Sigma right``): rotate Sigma's state."""
    r1, r2 = int(left.shape[-2]), int(right.shape[-2])
    maps = moments.MomentMap(left, right)
    new, _ = map_param_state(opt_state, param_path, (r1, r2), maps, kinds)
    return new


def truncate_sigma_state(
    opt_state: Any, param_path: Sequence[Any], old_rank: int, rank: int
) -> Any:
    """After truncating Sigma from ``old_rank`` to ``rank``: keep the leading ``[:rank, :rank]`` block."""
    rank = check_rank(rank, old_rank, what="the current rank")
    new, _ = map_param_state(
        opt_state,
        param_path,
        (old_rank, old_rank),
        lambda x, kind: moments.truncate_moment(x, rank),
    )
    return new
