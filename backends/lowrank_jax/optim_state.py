"""optax state that follows OIALR's factors: the switch to Sigma, re-diagonalization, truncation.

The same rule as the PyTorch integration (:mod:`lowrank_torch.optim_state`), for optax states, which are
pytrees (``ScaleByAdamState(count, mu, nu)``, ``TraceState(trace)``, chains, ``inject_hyperparams``,
``masked``, ...) whose per-parameter parts mirror the parameter tree. A state leaf belongs to the
parameter at path ``p`` when its own path *ends with* ``p`` and its shape is the parameter's shape; each
such leaf is one of:

- **second-moment-like**: the path passes through a field in :data:`SECOND_MOMENT_FIELDS` (Adam's and
  RMSprop's ``nu``, AMSGrad's ``nu_max``, Adagrad's ``sum_of_squares``, AdaDelta's ``e_g`` / ``e_x``):
  mapped with the element-wise squares of the maps, ``v -> (U∘U)^T v (V∘V)`` at the switch and
  ``v -> (left∘left)^T v (right∘right)`` at a re-diagonalization, clamped at ``>= 0``;
- **first-moment-like** (everything else: ``mu``, ``trace``, ...): mapped exactly like Sigma,
  ``M -> U^T M V`` and ``M -> left^T M right`` (``lowrank_core.rotate_sigma``).

Counts (``count``) and every other leaf are kept, so Adam's bias correction stays consistent with moments
that are carried over rather than zeroed. Truncation to rank ``r'`` keeps the leading ``[:r', :r']`` block.
The maps are computed in at least float32 and cast back to each leaf's dtype. All linear algebra is
``lowrank_core.rotate_sigma``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

import lowrank_core as lc

__all__ = [
    "SECOND_MOMENT_FIELDS",
    "dense_to_sigma_state",
    "map_param_state",
    "rotate_sigma_state",
    "truncate_sigma_state",
]

#: Fields of optax states that hold element-wise second moments (mapped with the squared maps).
SECOND_MOMENT_FIELDS: frozenset[str] = frozenset({"nu", "nu_max", "sum_of_squares", "e_g", "e_x"})

Path = tuple[Any, ...]


def _key_name(key: Any) -> str | None:
    for attr in ("name", "key"):
        value = getattr(key, attr, None)
        if isinstance(value, str):
            return value
    return None


def _is_second(path: Path) -> bool:
    return any(_key_name(k) in SECOND_MOMENT_FIELDS for k in path)


def map_param_state(
    opt_state: Any,
    param_path: Sequence[Any],
    shape: tuple[int, ...],
    fn: Callable[[jax.Array, bool], jax.Array],
) -> tuple[Any, int]:
    """Replace every leaf of ``opt_state`` that belongs to the parameter at ``param_path`` (its path
    ends with ``param_path`` and it has ``shape``) by ``fn(leaf, is_second_moment)``.

    Returns the new state and the number of leaves mapped. Nothing else changes (a new pytree).
    """
    suffix = tuple(param_path)
    n = len(suffix)
    count = 0

    def visit(path: Path, leaf: Any) -> Any:
        nonlocal count
        if (
            isinstance(leaf, jax.Array)
            and tuple(leaf.shape) == tuple(shape)
            and len(path) >= n
            and tuple(path[len(path) - n :]) == suffix
        ):
            count += 1
            return fn(leaf, _is_second(path[: len(path) - n]))
        return leaf

    new = jax.tree_util.tree_map_with_path(visit, opt_state)
    return new, count


def _compute_dtype(*arrays: jax.Array) -> Any:
    return jnp.result_type(jnp.float32, *(a.dtype for a in arrays))


def _mapped(
    x: jax.Array, second: bool, to: Callable[..., jax.Array], left: jax.Array, right: jax.Array
) -> jax.Array:
    dt = _compute_dtype(x, left, right)
    xc, lc_, rc = (a.astype(dt) for a in (x, left, right))
    y = jnp.maximum(to(xc, lc_ * lc_, rc * rc), 0) if second else to(xc, lc_, rc)
    return y.astype(x.dtype)


def dense_to_sigma_state(
    opt_state: Any,
    param_path: Sequence[Any],
    kernel_shape: tuple[int, ...],
    to_matrix: Callable[[jax.Array], jax.Array],
    U: jax.Array,
    V: jax.Array,
) -> Any:
    """OIALR's switch: the state of the dense kernel at ``param_path`` mapped into Sigma's coordinates.

    ``to_matrix`` gives the kernel's matrix view (the one ``U`` / ``V`` factor).
    """

    def rot(x: jax.Array, left: jax.Array, right: jax.Array) -> jax.Array:
        return lc.rotate_sigma(to_matrix(x), left, right, check_finite=False)  # type: ignore[no-any-return]

    new, _ = map_param_state(
        opt_state, param_path, kernel_shape, lambda x, second: _mapped(x, second, rot, U, V)
    )
    return new


def rotate_sigma_state(
    opt_state: Any, param_path: Sequence[Any], left: jax.Array, right: jax.Array
) -> Any:
    """After ``lowrank_core.rediagonalize`` (``Sigma_new = left^T Sigma right``): rotate Sigma's state."""
    r1, r2 = int(left.shape[-2]), int(right.shape[-2])

    def rot(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
        return lc.rotate_sigma(x, a, b, check_finite=False)  # type: ignore[no-any-return]

    new, _ = map_param_state(
        opt_state, param_path, (r1, r2), lambda x, second: _mapped(x, second, rot, left, right)
    )
    return new


def truncate_sigma_state(
    opt_state: Any, param_path: Sequence[Any], old_rank: int, rank: int
) -> Any:
    """After truncating Sigma from ``old_rank`` to ``rank``: keep the leading ``[:rank, :rank]`` block."""
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= old_rank:
        raise lc.RankError(f"`rank` must be an int in 1..{old_rank}, got {rank!r}")
    new, _ = map_param_state(
        opt_state, param_path, (old_rank, old_rank), lambda x, second: x[:rank, :rank]
    )
    return new
