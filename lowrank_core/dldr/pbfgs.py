"""The P-BFGS step policy, written once for every framework: the state and the rules of one step.

One P-BFGS step on a minibatch, around a line search that each framework runs its own way (PyTorch with
a Python loop over closures, JAX inside a ``jax.lax.while_loop``):

1. :func:`bfgs_step_direction`: the previous pair ``(s, y = g - g_prev)`` updates ``H`` (unless it fails
   the curvature guard, :func:`~lowrank_core.dldr.curvature_ok`); ``p = -H g``; if ``p`` is not a
   descent direction (``g.p >= 0``) the step *restarts*: ``H = I`` and ``p = -g``; a line search can run
   when ``g.p < 0`` (not for a zero gradient);
2. the framework's line search along ``p`` from the coordinates ``c`` (Armijo backtracking);
3. :func:`bfgs_step_finish`: an accepted step length ``alpha`` moves ``c`` by ``s = alpha p`` and keeps
   ``s`` for the next pair; a failed search *resets* ``H`` to the identity and forgets the pair; the
   counters (pair updates, skipped pairs, failed searches, line-search trials) are advanced.

Both functions are pure: they take a :class:`BFGSState` and arrays and return new values, nothing is
written in place. With ``check_finite=True`` (eager frameworks) the decisions are made on the host and
are Python ``bool`` values, exactly as :func:`~lowrank_core.dldr.bfgs_update` does; with
``check_finite=False`` nothing is read back to the host and every decision is a 0-d boolean array applied
with ``where`` (the form for traced code: ``jax.jit``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import array_api_compat

from .._array import Array, Namespace, namespace
from .._validate import describe
from ..errors import CheckpointError
from .bfgs import bfgs_direction, bfgs_update

__all__ = ["BFGSDirection", "BFGSState", "bfgs_step_direction", "bfgs_step_finish"]

_COUNTERS = ("updates", "skipped", "failed_searches", "trials")


class BFGSState(NamedTuple):
    """State of P-BFGS in a ``d``-dimensional subspace.

    ``c`` ``(d,)``: the coordinates; ``H`` ``(d, d)``: the inverse-Hessian approximation; ``g_prev``,
    ``s_prev`` ``(d,)``: the previous gradient and step, which pair up with the next gradient when
    ``has_prev``; counters: ``updates`` (pairs that updated ``H``), ``skipped`` (pairs that failed the
    curvature guard), ``failed_searches`` (line searches that accepted no step), ``trials`` (objective
    evaluations of the line searches). In traced code every field is an array (``has_prev`` a 0-d
    boolean, the counters 0-d integers); an eager framework may keep ``has_prev`` and the counters as
    Python values.
    """

    c: Array
    H: Array
    g_prev: Array
    s_prev: Array
    has_prev: Any
    updates: Any
    skipped: Any
    failed_searches: Any
    trials: Any

    @classmethod
    def initial(cls, c: Array) -> BFGSState:
        """The state at the coordinates ``c``: ``H = I``, no previous pair, every counter 0 (int32)."""
        xp = namespace(c=c)
        d, dev = int(c.shape[0]), array_api_compat.device(c)
        zero = xp.zeros((), dtype=xp.int32, device=dev)
        return cls(
            c,
            xp.eye(d, dtype=c.dtype, device=dev),
            xp.zeros((d,), dtype=c.dtype, device=dev),
            xp.zeros((d,), dtype=c.dtype, device=dev),
            xp.zeros((), dtype=xp.bool, device=dev),
            zero,
            zero,
            zero,
            zero,
        )

    def state_dict(self) -> dict[str, Any]:
        """The fields by name (the arrays themselves, not copies); see :meth:`from_state_dict`."""
        return dict(self._asdict())

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, Any], *, d: int | None = None, dtype: Any = None
    ) -> BFGSState:
        """A state from :meth:`state_dict` (arrays of any one library), every entry checked first.

        ``c``, ``g_prev``, ``s_prev`` must be real floating ``(d,)`` arrays and ``H`` ``(d, d)``, all of
        one dtype (``d`` and ``dtype``, when given, must match); ``has_prev`` a boolean and the counters
        non-negative integers (0-d arrays or Python values). Raises
        :class:`~lowrank_core.errors.CheckpointError` naming the first entry that does not fit; the
        arrays are neither copied nor moved.
        """
        if not isinstance(state, Mapping):
            raise CheckpointError(f"the P-BFGS state must be a dict, got {describe(state)}")
        missing = [k for k in cls._fields if k not in state]
        extra = sorted(str(k) for k in state if k not in cls._fields)
        if missing or extra:
            raise CheckpointError(
                f"the P-BFGS state has the wrong entries: missing {missing}, unexpected {extra}"
            )
        try:
            xp = namespace(**{k: state[k] for k in ("c", "H", "g_prev", "s_prev")})
        except Exception as exc:
            raise CheckpointError(f"the P-BFGS state's vectors are not arrays: {exc}") from None
        c = state["c"]
        n = int(c.shape[0]) if c.ndim == 1 else -1
        if n < 1 or (d is not None and n != d):
            want = f"({d},)" if d is not None else "(d,) with d >= 1"
            raise CheckpointError(
                f"the P-BFGS state entry 'c' has shape {tuple(c.shape)}; the subspace needs {want}"
            )
        for name, shape in (("H", (n, n)), ("g_prev", (n,)), ("s_prev", (n,))):
            if tuple(state[name].shape) != shape:
                raise CheckpointError(
                    f"the P-BFGS state entry {name!r} has shape {tuple(state[name].shape)}; the "
                    f"subspace needs {shape}"
                )
        for name in ("c", "H", "g_prev", "s_prev"):
            got = state[name].dtype
            if not xp.isdtype(got, "real floating") or got != c.dtype:
                raise CheckpointError(
                    f"the P-BFGS state entry {name!r} is {got}; every vector must be real floating "
                    f"of one dtype ('c' is {c.dtype})"
                )
            if dtype is not None and got != dtype:
                raise CheckpointError(
                    f"the P-BFGS state entry {name!r} is {got}, the subspace {dtype}"
                )
        flag = _scalar(xp, state["has_prev"], "has_prev", "bool")
        if not isinstance(flag, bool):
            raise CheckpointError(
                f"the P-BFGS state entry 'has_prev' must be a boolean, got {flag!r}"
            )
        for name in _COUNTERS:
            value = _scalar(xp, state[name], name, "integral")
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CheckpointError(
                    f"the P-BFGS state entry {name!r} must be a non-negative integer, got {value!r}"
                )
        return cls(**{k: state[k] for k in cls._fields})


def _scalar(xp: Namespace, value: Any, name: str, kind: str) -> object:
    """A 0-d array of ``kind`` or a Python value, as a Python value (CheckpointError otherwise)."""
    if isinstance(value, (bool, int)):
        return value
    shape = getattr(value, "shape", None)
    if shape is None or tuple(shape) != () or not xp.isdtype(value.dtype, kind):
        raise CheckpointError(
            f"the P-BFGS state entry {name!r} must be a 0-d {kind} array, got {describe(value)}"
        )
    return bool(value) if kind == "bool" else int(value)


class BFGSDirection(NamedTuple):
    """What :func:`bfgs_step_direction` decides before the line search.

    ``H``: the inverse Hessian after the pair update (the identity after a restart); ``p``: the search
    direction; ``slope``: ``g.p`` (0-d array); ``updated`` / ``skipped``: whether the previous pair
    updated ``H`` / failed the curvature guard; ``restarted``: ``-H g`` was not a descent direction, so
    ``H = I`` and ``p = -g``; ``searchable``: ``g.p < 0``, a line search can run (False only for a zero
    gradient). The decisions are Python ``bool`` values (``check_finite=True``) or 0-d boolean arrays.
    """

    H: Array
    p: Array
    slope: Array
    updated: Any
    skipped: Any
    restarted: Any
    searchable: Any


def _where(xp: Namespace, cond: Any, a: Any, b: Any) -> Any:
    """``a`` where ``cond`` else ``b``: a Python choice for a Python bool, ``where`` for an array."""
    if isinstance(cond, bool):
        return a if cond else b
    return xp.where(cond, a, b)


def _and(xp: Namespace, a: Any, b: Any) -> Any:
    if isinstance(a, bool) and isinstance(b, bool):
        return a and b
    return xp.logical_and(a, b)


def _not(xp: Namespace, a: Any) -> Any:
    return (not a) if isinstance(a, bool) else xp.logical_not(a)


def _count(xp: Namespace, counter: Any, flag: Any) -> Any:
    """``counter + flag``: a Python sum, or the flag cast to the counter's integer dtype."""
    if isinstance(flag, bool):
        return counter + int(flag)
    return counter + xp.astype(flag, counter.dtype if hasattr(counter, "dtype") else xp.int32)


def _negative(xp: Namespace, x: Array, host: bool) -> Any:
    """``x < 0`` for a 0-d ``x``: a Python bool read on the host, or a 0-d boolean array."""
    return float(x) < 0 if host else x < 0


def bfgs_step_direction(
    state: BFGSState, g: Array, *, eps: float = 1e-8, check_finite: bool = True
) -> BFGSDirection:
    """Step 1 of P-BFGS (see the module docstring): the pair update, the direction, the restart rule.

    ``g`` ``(d,)``: the gradient in the subspace at ``state.c``; ``eps``: the curvature guard's
    tolerance. ``check_finite=True``: decisions on the host (Python ``bool``), ``H`` and ``g`` checked
    for NaN/Inf; ``check_finite=False``: nothing read back to the host (traced code).
    """
    xp = namespace(H=state.H, g=g)
    has_prev = state.has_prev
    if check_finite and not isinstance(has_prev, bool):
        has_prev = bool(has_prev)
    if isinstance(has_prev, bool) and not has_prev:
        H, updated, skipped = state.H, False, False  # no pair yet: nothing to update
    else:
        H_upd, ok = bfgs_update(
            state.H, state.s_prev, g - state.g_prev, eps=eps, check_finite=check_finite
        )
        H = _where(xp, has_prev, H_upd, state.H)
        updated = _and(xp, has_prev, ok)
        skipped = _and(xp, has_prev, _not(xp, ok))
    p = bfgs_direction(H, g, check_finite=check_finite)
    descent = _negative(xp, g @ p, check_finite)
    eye = xp.eye(int(g.shape[0]), dtype=H.dtype, device=array_api_compat.device(H))
    H = _where(xp, descent, H, eye)  # not a descent direction: restart from the identity
    p = _where(xp, descent, p, -g)
    slope = g @ p
    searchable = _negative(xp, slope, check_finite)  # False only for a zero gradient
    return BFGSDirection(H, p, slope, updated, skipped, _not(xp, descent), searchable)


def bfgs_step_finish(
    state: BFGSState,
    direction: BFGSDirection,
    g: Array,
    *,
    alpha: Any,
    accepted: Any,
    trials: Any,
) -> BFGSState:
    """Step 3 of P-BFGS (see the module docstring): the new state after the line search.

    ``alpha``: the step length the search ended with (a Python float or a 0-d array); ``accepted``:
    whether it passed the Armijo condition; ``trials``: the objective evaluations it made (0 when no
    search ran). An accepted step moves ``c`` by ``s = alpha p`` and keeps ``s`` as the next pair's
    step; otherwise ``c`` is unchanged and there is no pair; a failed search (searchable, not accepted)
    resets ``H`` to the identity. ``g`` becomes ``g_prev``.
    """
    xp = namespace(g=g, p=direction.p)
    accepted = _and(xp, accepted, direction.searchable)
    failed = _and(xp, direction.searchable, _not(xp, accepted))
    s = _where(xp, accepted, alpha, 0.0) * direction.p
    eye = xp.eye(int(g.shape[0]), dtype=direction.H.dtype, device=array_api_compat.device(g))
    return BFGSState(
        c=_where(xp, accepted, state.c + s, state.c),
        H=_where(xp, failed, eye, direction.H),
        g_prev=g,
        s_prev=s,
        has_prev=accepted,
        updates=_count(xp, state.updates, direction.updated),
        skipped=_count(xp, state.skipped, direction.skipped),
        failed_searches=_count(xp, state.failed_searches, failed),
        trials=state.trials + trials,
    )
