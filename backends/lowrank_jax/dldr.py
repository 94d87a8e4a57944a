"""DLDR for JAX: snapshots of a parameter pytree, subspace SGD as an optax transformation, subspace BFGS.

- :class:`SnapshotRecorder` flattens the parameter pytree (``jax.flatten_util.ravel_pytree``) into a
  :class:`lowrank_core.SnapshotStore` (in memory or memory-mapped) and fits the top-``d`` subspace with
  the core (:meth:`lowrank_core.SnapshotStore.fit`). Fitting runs outside ``jit`` (``d`` and the
  eigen-decomposition's rank check are host decisions).
- :func:`subspace_sgd` is P-SGD as an ``optax.GradientTransformation``: the update of the pytree is
  ``P^T dc`` with ``dc = -lr v``, ``v <- momentum v + P g`` (the ``d``-dimensional momentum lives in the
  optax state; ``weight_decay`` adds ``wd * w`` to ``g`` before projecting), so the weights stay in
  ``w0 + span(P^T)``. Chain it with nothing that changes the update's direction (a learning-rate
  schedule is its ``learning_rate`` argument).
- :class:`SubspaceBFGS` is P-BFGS with the Armijo backtracking line search as one jitted step
  (``step(state, *batch)``) taking your loss function ``loss_fn(params, *batch)``: ``g = P grad``, the
  inverse-Hessian update (:func:`lowrank_core.dldr.bfgs_update` in its traced form, the curvature guard
  applied on the device), ``p = -H g`` (:func:`lowrank_core.dldr.bfgs_direction`), step lengths
  ``alpha0 * shrink^m`` tried on the same batch inside a ``jax.lax.while_loop`` until
  ``L(w + alpha P^T p) <= L(w) + c1 alpha g.p``; a non-descent direction or a failed search resets ``H``
  to the identity (as in :class:`lowrank_torch.dldr.SubspaceBFGS`: both run the step policy of
  :mod:`lowrank_core.dldr.pbfgs`, whose :class:`~lowrank_core.dldr.BFGSState` is the state here).

The subspace's arrays are closed over by the jitted functions (constants of the compiled step).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

import lowrank_core as lc
from lowrank_core import dldr as core
from lowrank_core.dldr import BFGSState

__all__ = [
    "BFGSState",
    "SnapshotRecorder",
    "SubspaceBFGS",
    "SubspaceSGDState",
    "flatten",
    "subspace_sgd",
]


def flatten(tree: Any) -> tuple[jax.Array, Callable[[jax.Array], Any]]:
    """``(flat, unflatten)`` of a pytree (``jax.flatten_util.ravel_pytree``)."""
    flat, unravel = ravel_pytree(tree)
    return flat, unravel


class SnapshotRecorder:
    """Flattened snapshots of a parameter pytree in a :class:`lowrank_core.SnapshotStore`.

    ``params`` fixes the tree structure (every later snapshot must have it); ``**store_options`` go to
    the store (``path=`` for a memory-mapped one, ``shift=``, ...).
    """

    def __init__(self, params: Any, **store_options: Any) -> None:
        flat, self.unflatten = flatten(params)
        self._treedef = jax.tree_util.tree_structure(params)
        self.dim = int(flat.shape[0])
        self.store = lc.SnapshotStore(**store_options)

    def record(self, params: Any) -> None:
        """Add the current parameters as one snapshot."""
        if jax.tree_util.tree_structure(params) != self._treedef:  # type: ignore[operator]
            raise lc.ShapeError(
                "`params` does not have the structure of the tree this recorder was built for"
            )
        flat, _ = flatten(params)
        self.store.add(flat)

    def __len__(self) -> int:
        return len(self.store)

    def fit(self, d: int, **options: Any) -> lc.Subspace:
        """The top-``d`` subspace of the recorded snapshots (:meth:`lowrank_core.SnapshotStore.fit`)."""
        return self.store.fit(d, **options)


class SubspaceSGDState(NamedTuple):
    """State of :func:`subspace_sgd`: the ``d``-dimensional momentum buffer and the step count."""

    momentum: jax.Array
    steps: jax.Array


def subspace_sgd(
    subspace: lc.Subspace,
    learning_rate: float | Callable[[jax.Array], jax.Array],
    momentum: float = 0.9,
    *,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> Any:
    """P-SGD as an ``optax.GradientTransformation`` (see the module docstring).

    ``update(grads, state, params)`` needs ``params`` when ``weight_decay > 0``. ``learning_rate`` may
    be an optax schedule (a function of the step count).
    """
    import optax

    if not 0.0 <= momentum < 1.0 or weight_decay < 0:
        raise lc.ParameterError("need 0 <= momentum < 1 and weight_decay >= 0")
    P = subspace.basis

    def init(params: Any) -> SubspaceSGDState:
        flat, _ = flatten(params)
        if int(flat.shape[0]) != subspace.dim:
            raise lc.ShapeError(
                f"the parameters have {int(flat.shape[0])} scalars, the subspace {subspace.dim}"
            )
        return SubspaceSGDState(jnp.zeros((subspace.d,), dtype=P.dtype), jnp.zeros((), jnp.int32))

    def update(
        grads: Any, state: SubspaceSGDState, params: Any = None
    ) -> tuple[Any, SubspaceSGDState]:
        g, unravel = flatten(grads)
        if weight_decay:
            if params is None:
                raise lc.ParameterError("subspace_sgd with weight_decay needs `params` in update()")
            w, _ = flatten(params)
            g = g + weight_decay * w
        gc = subspace.project_direction(g.astype(P.dtype), check_finite=False)
        buf = jnp.where(state.steps == 0, gc, momentum * state.momentum + gc)
        direction = gc + momentum * buf if nesterov else buf
        lr = learning_rate(state.steps) if callable(learning_rate) else learning_rate
        step = subspace.lift_direction(-lr * direction, check_finite=False)
        return unravel(step.astype(g.dtype)), SubspaceSGDState(buf, state.steps + 1)

    return optax.GradientTransformation(init, update)


def _armijo(
    f_new: jax.Array, f0: jax.Array, alpha: jax.Array, slope: jax.Array, c1: float
) -> jax.Array:
    """The traced form of :func:`lowrank_core.dldr.armijo_condition` (NaN / Inf reject)."""
    return jnp.logical_and(jnp.isfinite(f_new), f_new <= f0 + c1 * alpha * slope)


class SubspaceBFGS:
    """P-BFGS in ``origin + P^T c`` with Armijo backtracking, one jitted :meth:`step` per batch.

    ``loss_fn(params, *batch)`` returns the scalar loss of a parameter pytree; ``params`` gives the
    structure and the origin (the weights at the switch, unless ``origin`` is given as a flat vector).
    """

    def __init__(
        self,
        loss_fn: Callable[..., jax.Array],
        subspace: lc.Subspace,
        params: Any,
        *,
        origin: jax.Array | None = None,
        alpha0: float = 1.0,
        shrink: float = 0.4,
        c1: float = 0.4,
        max_trials: int = 20,
        curvature_eps: float = 1e-8,
    ) -> None:
        if not 0.0 < shrink < 1.0 or not 0.0 < c1 < 1.0 or alpha0 <= 0 or max_trials < 1:
            raise lc.ParameterError(
                "need 0 < shrink < 1, 0 < c1 < 1, alpha0 > 0 and max_trials >= 1"
            )
        flat, self.unflatten = flatten(params)
        if int(flat.shape[0]) != subspace.dim:
            raise lc.ShapeError(
                f"the parameters have {int(flat.shape[0])} scalars, the subspace {subspace.dim}"
            )
        self.subspace = subspace
        self.origin = flat.astype(subspace.basis.dtype) if origin is None else origin
        self.loss_fn = loss_fn
        self.alpha0, self.shrink, self.c1 = float(alpha0), float(shrink), float(c1)
        self.max_trials, self.curvature_eps = int(max_trials), float(curvature_eps)
        self.step = jax.jit(self._step)

    @property
    def d(self) -> int:
        return self.subspace.d

    def init(self) -> BFGSState:
        """The state at the origin: ``c = P (w0 - origin)`` (zero by default), ``H = I``."""
        flat, _ = flatten(self.unflatten(self.origin))
        c = self.subspace.project(flat, origin=self.origin, check_finite=False)
        state: BFGSState = BFGSState.initial(c)
        return state

    def params(self, state: BFGSState) -> Any:
        """The parameter pytree ``origin + P^T c`` of a state."""
        w = self.subspace.lift(state.c, origin=self.origin, check_finite=False)
        return self.unflatten(w)

    def _value(self, c: jax.Array, batch: tuple[Any, ...]) -> jax.Array:
        return self.loss_fn(self.params(BFGSState(c, *([None] * 8))), *batch)

    def _step(self, state: BFGSState, *batch: Any) -> tuple[BFGSState, jax.Array]:
        """One P-BFGS step on ``batch``; returns the new state and the loss before the step."""
        sub = self.subspace
        f0, gw = jax.value_and_grad(lambda p: self.loss_fn(p, *batch))(self.params(state))
        g_flat, _ = flatten(gw)
        g = sub.project_direction(g_flat.astype(sub.basis.dtype), check_finite=False)
        # the step policy is the core's (lowrank_core.dldr.pbfgs), traced; here: the line search
        direction = core.bfgs_step_direction(state, g, eps=self.curvature_eps, check_finite=False)
        p, slope = direction.p, direction.slope
        f0 = f0.astype(g.dtype)

        def cond(carry: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
            m, _, accepted = carry
            return jnp.logical_and(m < self.max_trials, jnp.logical_not(accepted))

        def body(
            carry: tuple[jax.Array, jax.Array, jax.Array],
        ) -> tuple[jax.Array, jax.Array, jax.Array]:
            m, alpha, _ = carry
            value = self._value(state.c + alpha * p, batch).astype(g.dtype)
            accepted = _armijo(value, f0, alpha, slope, self.c1)
            return m + 1, jnp.where(accepted, alpha, alpha * self.shrink), accepted

        start = (
            jnp.zeros((), jnp.int32),
            jnp.asarray(self.alpha0, g.dtype),
            jnp.logical_not(direction.searchable),  # a zero gradient: no search
        )
        trials, alpha, accepted = jax.lax.while_loop(cond, body, start)
        new = core.bfgs_step_finish(
            state, direction, g, alpha=alpha, accepted=accepted, trials=trials
        )
        return new, f0
