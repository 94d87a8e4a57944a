"""OIALR for JAX: parameter pytrees (plain dicts, Flax Linen ``params``, Flax NNX ``State``) and optax.

The schedule of the PyTorch integration (:mod:`lowrank_torch.oialr`), functional: the controller keeps
the bookkeeping (step count, switched kernels, ranks, history), the arrays travel in and out.

- **Trainable tree.** The parameter pytree keeps its structure; a switched kernel's leaf becomes its
  ``Sigma`` ``(r, r)``. The frozen bases live in :attr:`OIALR.frozen`, a dict ``{path: Basis}`` (a pytree:
  pass it to your jitted step as an argument; it changes only at a switch or a rank update).
- **Apply.** :func:`materialize` ``(trainable, frozen)`` gives the dense parameter tree, each switched
  kernel rebuilt as ``U @ Sigma @ V.T`` (``lowrank_core.reconstruct``), differentiable in Sigma: works
  with any model function. :func:`factored` gives the tree with :class:`FactoredKernel` leaves instead,
  and :func:`dense` ``(x, kernel)`` applies either kind, factored (``x -> U -> Sigma -> V.T`` for a Flax
  ``(in, out)`` kernel, i.e. torch's ``x -> V -> Sigma -> U`` for an ``(out, in)`` weight) when that is
  cheaper than the dense product.
- **optax state** is carried over at every switch, rotation and truncation by the rule of
  :mod:`lowrank_jax.optim_state` (first moments like Sigma, second moments with squared maps, counts
  kept); any optax optimizer whose state mirrors the parameters works.
- **Sigma's learning rate**: :meth:`OIALR.optimizer` wraps the optax optimizer so that each switched
  kernel's updates are multiplied by ``OIALRConfig.sigma_lr_scale`` (as PyTorch's controller does through
  the optimizer's step hooks).
- **Shapes change** at a switch and at a truncation: :meth:`OIALR.step` runs outside ``jit`` (its
  stability checks and re-diagonalizations are jitted inside); the jitted training step retraces once
  for each new shape. :attr:`OIALR.structure_changed` says when that happens.

Kernels and layouts: ``layout="flax"`` (default) reads a kernel ``(*k, in, out)`` as the matrix
``(prod(k) * in, out)`` (Flax's ``Dense`` and ``Conv``: ``y = x @ kernel``); ``layout="torch"`` reads a
weight ``(out, *rest)`` as ``(out, prod(rest))`` (``lowrank_core.weight_to_matrix``). Usage::

    ctrl = OIALR(params, OIALRConfig(switch_step=1000, update_every=200))
    tx = ctrl.optimizer(optax.adamw(1e-3))   # applies sigma_lr_scale to Sigma after the switch
    trainable, opt_state = params, tx.init(params)
    for batch in data:
        trainable, opt_state, loss = train_step(trainable, ctrl.frozen, opt_state, batch)  # jitted
        trainable, opt_state = ctrl.step(trainable, opt_state)

    def train_step(trainable, frozen, opt_state, batch):
        loss, g = jax.value_and_grad(lambda t: loss_fn(materialize(t, frozen), batch))(trainable)
        updates, opt_state = tx.update(g, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import lowrank_core as lc
import lowrank_core.oialr as core_oialr

from .optim_state import dense_to_sigma_state, rotate_sigma_state, truncate_sigma_state

__all__ = [
    "OIALR",
    "Basis",
    "FactoredKernel",
    "OIALRConfig",
    "SigmaScaleState",
    "count_params",
    "dense",
    "factored",
    "kernel_matrix",
    "materialize",
]

LAYOUTS = ("flax", "torch")


def kernel_matrix(kernel: jax.Array, layout: str = "flax") -> jax.Array:
    """The matrix view of a kernel: ``(prod(k) * in, out)`` (flax) or ``(out, prod(rest))`` (torch)."""
    if layout == "flax":
        return jnp.reshape(kernel, (-1, kernel.shape[-1]))
    if layout == "torch":
        return lc.weight_to_matrix(kernel)  # type: ignore[no-any-return]
    raise lc.ParameterError(f"`layout` must be one of {LAYOUTS}, got {layout!r}")


def _matrix_shape(shape: tuple[int, ...], layout: str) -> tuple[int, int]:
    if layout == "flax":
        return math.prod(shape[:-1]), shape[-1]
    return shape[0], math.prod(shape[1:])


@jax.tree_util.register_pytree_node_class
class Basis:
    """The frozen bases of a switched kernel: ``U (m, r)``, ``V (n, r)``; ``shape`` and ``layout`` static."""

    def __init__(self, U: jax.Array, V: jax.Array, shape: tuple[int, ...], layout: str) -> None:
        self.U, self.V, self.shape, self.layout = U, V, tuple(shape), layout

    def tree_flatten(self) -> tuple[tuple[jax.Array, jax.Array], tuple[tuple[int, ...], str]]:
        return (self.U, self.V), (self.shape, self.layout)

    @classmethod
    def tree_unflatten(cls, aux: tuple[tuple[int, ...], str], children: Any) -> Basis:
        return cls(children[0], children[1], aux[0], aux[1])

    @property
    def rank(self) -> int:
        return int(self.U.shape[-1])

    def kernel(self, sigma: jax.Array) -> jax.Array:
        """The dense kernel ``U @ Sigma @ V.T`` in the kernel's own shape."""
        m = lc.reconstruct(self.U, sigma, self.V, check_finite=False)
        if self.layout == "flax":
            return jnp.reshape(m, self.shape)
        return lc.matrix_to_weight(m, self.shape, check_finite=False)  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"Basis(shape={self.shape}, rank={self.rank}, layout={self.layout!r})"


@jax.tree_util.register_pytree_node_class
class FactoredKernel:
    """A switched kernel as its three factors (see :func:`factored` and :func:`dense`)."""

    def __init__(
        self, U: jax.Array, Sigma: jax.Array, V: jax.Array, shape: tuple[int, ...], layout: str
    ) -> None:
        self.U, self.Sigma, self.V, self.shape, self.layout = U, Sigma, V, tuple(shape), layout

    def tree_flatten(self) -> tuple[tuple[jax.Array, ...], tuple[tuple[int, ...], str]]:
        return (self.U, self.Sigma, self.V), (self.shape, self.layout)

    @classmethod
    def tree_unflatten(cls, aux: tuple[tuple[int, ...], str], children: Any) -> FactoredKernel:
        U, Sigma, V = children
        return cls(U, Sigma, V, aux[0], aux[1])

    def kernel(self) -> jax.Array:
        return Basis(self.U, self.V, self.shape, self.layout).kernel(self.Sigma)

    @property
    def cheaper_factored(self) -> bool:
        """Whether ``x -> U -> Sigma -> V`` costs fewer multiply-adds per row than the dense product."""
        m, n = int(self.U.shape[0]), int(self.V.shape[0])
        r = int(self.Sigma.shape[0])
        return r * (m + n) + r * r < m * n


def _map_switched(
    trainable: Any, frozen: dict[str, Basis], fn: Callable[[jax.Array, Basis], Any]
) -> Any:
    def visit(path: Any, leaf: Any) -> Any:
        b = frozen.get(jax.tree_util.keystr(path))
        return leaf if b is None else fn(leaf, b)

    return jax.tree_util.tree_map_with_path(visit, trainable)


def materialize(trainable: Any, frozen: dict[str, Basis]) -> Any:
    """The dense parameter tree: every switched leaf (a Sigma) replaced by ``U @ Sigma @ V.T`` in its
    kernel shape. Pure and differentiable (gradients flow to Sigma); use it inside ``jit``."""
    return _map_switched(trainable, frozen, lambda s, b: b.kernel(s))


def factored(trainable: Any, frozen: dict[str, Basis]) -> Any:
    """The parameter tree with a :class:`FactoredKernel` at every switched leaf (for :func:`dense`)."""
    return _map_switched(
        trainable, frozen, lambda s, b: FactoredKernel(b.U, s, b.V, b.shape, b.layout)
    )


def dense(x: jax.Array, kernel: jax.Array | FactoredKernel) -> jax.Array:
    """``x @ kernel`` for a Flax-layout 2-D kernel ``(in, out)`` or a :class:`FactoredKernel` of one.

    A factored kernel is applied as ``((x @ U) @ Sigma) @ V.T`` when that is cheaper than rebuilding it
    (:attr:`FactoredKernel.cheaper_factored`), else through the rebuilt kernel.
    """
    if isinstance(kernel, FactoredKernel):
        if kernel.layout != "flax" or len(kernel.shape) != 2:
            raise lc.ShapeError(
                f"dense() applies 2-D flax-layout kernels (in, out); got {kernel.shape} ({kernel.layout})"
            )
        if kernel.cheaper_factored:
            return ((x @ kernel.U) @ kernel.Sigma) @ kernel.V.T
        return x @ kernel.kernel()
    return x @ kernel


class SigmaScaleState(NamedTuple):
    """The state of :meth:`OIALR.optimizer`'s transformation: the wrapped optimizer's state (``inner``)
    and ``scales``, ``{kernel path: multiplier}`` of each eligible kernel whose ``sigma_lr_scale`` is
    not 1 (1 until that kernel switches, then its scale; the controller sets it at the switch)."""

    inner: Any
    scales: dict[str, jax.Array]


def _scale_updates(updates: Any, scales: Mapping[str, Any]) -> Any:
    """``updates`` with the leaf at each path of ``scales`` multiplied by its scale (in the leaf's
    dtype, so a bfloat16 update stays bfloat16)."""
    if not scales:
        return updates

    def visit(path: Any, leaf: Any) -> Any:
        scale = scales.get(jax.tree_util.keystr(path))
        return leaf if scale is None else leaf * jnp.asarray(scale, dtype=leaf.dtype)

    return jax.tree_util.tree_map_with_path(visit, updates)


def _is_scale_state(node: Any) -> bool:
    return isinstance(node, SigmaScaleState)


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree's array leaves."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


#: The flat layer-selection fields of :class:`OIALRConfig` and the ``LayerSelection`` field each sets.
_FLAT_SELECTION = {
    "include": "include",
    "exclude": "exclude",
    "keep_first": "keep_first",
    "keep_last": "keep_last",
    "min_aspect": "min_aspect",
    "allow_rank_one": "allow_rank_one",
}


@dataclass
class OIALRConfig(core_oialr.OIALRConfig):
    """Settings of :class:`OIALR`: :class:`lowrank_core.oialr.OIALRConfig` (the same as PyTorch's), plus
    the kernel ``layout``.

    - ``layout``: ``"flax"`` (kernels ``(*k, in, out)``) or ``"torch"`` (weights ``(out, *rest)``).
    - ``selection``: a :class:`lowrank_core.oialr.LayerSelection` whose ``include`` is a predicate
      ``include(path, leaf)`` (default: every leaf whose last key is ``kernel`` or ``weight``, or any
      >= 2-D leaf of a plain dict without such names); candidates are the floating, at least 2-D leaves
      it accepts, in the pytree's flattening order, and the aspect rule applies to every one (matrix
      view by ``layout``). ``exclude`` patterns (``fnmatch`` globs) are matched against the leaf's
      ``jax.tree_util.keystr`` path (``"['l1']['kernel']"``) and its dotted form (``"l1.kernel"``).
    - The flat fields ``include``, ``exclude``, ``keep_first``, ``keep_last``, ``min_aspect`` and
      ``allow_rank_one`` are shorthands: each one given replaces that field of ``selection``.
    """

    layout: str = "flax"
    include: Callable[[str, jax.Array], bool] | None = core_oialr.UNSET
    exclude: tuple[str, ...] = core_oialr.UNSET
    keep_first: bool = core_oialr.UNSET
    keep_last: bool = core_oialr.UNSET
    min_aspect: float = core_oialr.UNSET
    allow_rank_one: bool = core_oialr.UNSET

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layout not in LAYOUTS:
            raise lc.ParameterError(f"`layout` must be one of {LAYOUTS}, got {self.layout!r}")
        given = {
            field_: getattr(self, flat)
            for flat, field_ in _FLAT_SELECTION.items()
            if getattr(self, flat) is not core_oialr.UNSET
        }
        self.selection = dataclasses.replace(self.selection, **given)
        include = self.selection.include
        if include is not None and not callable(include):
            raise lc.ParameterTypeError(
                f"`include` must be a predicate include(path, leaf) or None, got {include!r}"
            )
        for flat, field_ in _FLAT_SELECTION.items():
            setattr(self, flat, getattr(self.selection, field_))


def _key_text(key: Any) -> Any:
    """One path key as plain text (a dict key, an attribute name or a sequence index)."""
    for attr in ("key", "name", "idx"):
        value = getattr(key, attr, None)
        if value is not None:
            return value
    return key


def _last_name(path: Any) -> str | None:
    if not path:
        return None
    key = path[-1]
    for attr in ("key", "name"):
        value = getattr(key, attr, None)
        if isinstance(value, str):
            return value
    return None


@jax.jit
def _orthogonal_factor(m: jax.Array) -> jax.Array:
    out: jax.Array = lc.orthogonal_factor(m, check_finite=False)
    return out


@jax.jit
def _stability(p: jax.Array, q: jax.Array) -> jax.Array:
    out: jax.Array = lc.polar_stability(p, q, check_finite=False)
    return out


@jax.jit
def _factorize(m: jax.Array) -> lc.LowRankFactors:
    return lc.factorize(m, check_finite=False)


class OIALR(core_oialr.ScheduleView):
    """The OIALR schedule over a parameter pytree (see the module docstring).

    The decisions, the history and the saved state are :class:`lowrank_core.oialr.OIALRSchedule`'s
    (:attr:`schedule`), the same as PyTorch's; this class moves the leaves and the optax state.
    """

    def __init__(self, params: Any, config: OIALRConfig | None = None) -> None:
        if config is not None and not isinstance(config, OIALRConfig):
            raise lc.ParameterTypeError(f"`config` must be an OIALRConfig, got {config!r}")
        self.config = OIALRConfig() if config is None else config
        leaves, self._treedef = jax.tree_util.tree_flatten_with_path(params)
        self._paths: dict[str, Any] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, Any] = {}
        #: the decisions, the history and the counts (framework-free)
        self.schedule = core_oialr.OIALRSchedule(self.config, self._find_eligible(leaves))
        self.dense_params = count_params(params)
        self.frozen: dict[str, Basis] = {}
        self.structure_changed = False
        #: the last stability check's polar factor of each pending kernel (a list of one matrix)
        self.warmup: dict[str, list[jax.Array]] = {}
        self.last_stability: dict[str, float] = {}
        self._warned_scale = False

    # ------------------------------------------------------------------ eligibility
    def _find_eligible(self, leaves: Sequence[tuple[Any, Any]]) -> list[str]:
        sel = self.config.selection
        named = any(_last_name(p) in ("kernel", "weight") for p, _ in leaves)
        candidates: list[core_oialr.Candidate] = []
        for path, leaf in leaves:
            name = jax.tree_util.keystr(path)
            if not isinstance(leaf, jax.Array | np.ndarray) or leaf.ndim < 2:
                continue
            if not jnp.issubdtype(leaf.dtype, jnp.floating):
                continue
            if sel.include is not None:
                if not sel.include(name, jnp.asarray(leaf)):
                    continue
            elif named and _last_name(path) not in ("kernel", "weight"):
                continue
            self._paths[name] = path
            self.shapes[name] = tuple(int(s) for s in leaf.shape)
            self.dtypes[name] = leaf.dtype
            m, n = _matrix_shape(self.shapes[name], self.config.layout)
            dotted = ".".join(str(_key_text(k)) for k in path)
            candidates.append(
                core_oialr.Candidate(name, (m, n), rank_one=min(m, n) == 1, aliases=(dotted,))
            )
        chosen, _ = sel.choose(candidates)
        return chosen

    def ranks(self) -> dict[str, int]:
        """Current rank of every switched kernel."""
        return {n: b.rank for n, b in self.frozen.items()}

    def optimizer(self, tx: Any) -> Any:
        """``tx`` (an optax ``GradientTransformation``) with OIALR's ``sigma_lr_scale`` applied: once a
        kernel switches, each of its Sigma updates is multiplied by its scale (in the update's dtype).

        Build the optimizer with it (``tx = ctrl.optimizer(optax.adamw(...))``, then ``tx.init`` /
        ``tx.update`` as usual). Its state is a :class:`SigmaScaleState` around ``tx``'s; the multipliers
        are arrays in that state, set by :meth:`step` at each switch, so a jitted step applies them
        without retracing (a square kernel switched at full rank keeps its shape) and they are saved
        and restored with the optimizer state. Without it, a ``sigma_lr_scale`` other than 1 is not
        applied in JAX, and the first switch warns.
        """
        import optax

        inner = optax.with_extra_args_support(tx)
        names = [n for n in self.eligible if self.config.sigma_scale(n) != 1.0]

        def init(params: Any) -> SigmaScaleState:
            scales = {
                n: jnp.asarray(self.config.sigma_scale(n) if n in self.frozen else 1.0, jnp.float32)
                for n in names
            }
            return SigmaScaleState(inner.init(params), scales)

        def update(
            updates: Any, state: SigmaScaleState, params: Any = None, **extra: Any
        ) -> tuple[Any, SigmaScaleState]:
            if not isinstance(state, SigmaScaleState):
                raise lc.ParameterTypeError(
                    "the optimizer state of OIALR.optimizer(tx) is a SigmaScaleState (from its "
                    f"init), got {type(state).__name__}"
                )
            out, new_inner = inner.update(updates, state.inner, params, **extra)
            return _scale_updates(out, state.scales), SigmaScaleState(new_inner, state.scales)

        return optax.GradientTransformationExtraArgs(init, update)

    def _set_sigma_scales(self, opt_state: Any, names: Sequence[str]) -> Any:
        """``opt_state`` with the multipliers of the just-switched ``names`` set in every
        :class:`SigmaScaleState` in it; warns once when a scale other than 1 has nowhere to go."""
        values = {n: self.config.sigma_scale(n) for n in names}
        values = {n: v for n, v in values.items() if v != 1.0}
        if not values:
            return opt_state
        found = False

        def visit(node: Any) -> Any:
            nonlocal found
            if not isinstance(node, SigmaScaleState):
                return node
            found = True
            scales = {
                n: jnp.asarray(values[n], v.dtype) if n in values else v
                for n, v in node.scales.items()
            }
            return node._replace(scales=scales)

        out = jax.tree_util.tree_map(visit, opt_state, is_leaf=_is_scale_state)
        if not found and not self._warned_scale:
            self._warned_scale = True
            warnings.warn(
                f"OIALRConfig.sigma_lr_scale ({sorted(set(values.values()))} for {len(values)} "
                "kernel(s)) is not applied: the optimizer state holds no SigmaScaleState. Build the "
                "optimizer with `ctrl.optimizer(tx)`, or set sigma_lr_scale=1.0 to train Sigma at "
                "the weights' learning rate",
                UserWarning,
                stacklevel=4,
            )
        return out

    def trainable_count(self, trainable: Any) -> int:
        """Trainable scalars of ``trainable`` (``sum r^2`` for the switched kernels, the rest dense)."""
        return count_params(trainable)

    def trainable_share(self, trainable: Any) -> float:
        return self.trainable_count(trainable) / self.dense_params

    # ------------------------------------------------------------------ leaf access
    def _leaf(self, tree: Any, name: str) -> jax.Array:
        leaves = jax.tree_util.tree_leaves_with_path(tree)
        for path, leaf in leaves:
            if jax.tree_util.keystr(path) == name:
                return leaf  # type: ignore[no-any-return]
        raise KeyError(f"the parameter tree has no leaf {name}")

    def _replace(self, tree: Any, values: dict[str, jax.Array]) -> Any:
        def visit(path: Any, leaf: Any) -> Any:
            return values.get(jax.tree_util.keystr(path), leaf)

        return jax.tree_util.tree_map_with_path(visit, tree)

    def check_tree(self, trainable: Any) -> None:
        """Raise :class:`lowrank_core.ShapeError` unless ``trainable`` has this controller's structure."""
        treedef = jax.tree_util.tree_structure(trainable)
        if treedef != self._treedef:  # type: ignore[operator]
            raise lc.ShapeError(
                "`trainable` does not have the structure of the parameter tree this OIALR was built "
                f"for: {treedef} vs {self._treedef}"
            )

    # ------------------------------------------------------------------ the schedule
    def step(self, trainable: Any, opt_state: Any) -> tuple[Any, Any]:
        """Advance one training step (call it after the optimizer update); returns the new
        ``(trainable, opt_state)``. Runs outside ``jit``; :attr:`structure_changed` tells whether a
        switch or a truncation changed leaf shapes. When a due check, switch or update fails, the
        controller is left as it was before the call (the trees passed in are never changed)."""
        self.check_tree(trainable)
        sched = self.schedule
        plan = sched.plan()
        saved = (sched.snapshot(), dict(self.frozen), dict(self.warmup), dict(self.last_stability))
        self.structure_changed = False
        try:
            sched.begin(plan)
            if not plan.idle:
                t = plan.step
                ready = self.check_stability(trainable) if plan.check_stability else []
                to_switch = sched.to_switch(plan, ready)
                if to_switch:
                    trainable, opt_state = self._switch(trainable, opt_state, to_switch, t)
                    self.structure_changed = True
                if plan.update is not None:
                    trainable, opt_state, changed = self._update_ranks(
                        trainable, opt_state, plan.update, t
                    )
                    self.structure_changed |= changed
        except BaseException:
            sched.restore(saved[0])
            self.frozen, self.warmup, self.last_stability = saved[1], saved[2], saved[3]
            self.structure_changed = False
            raise
        return trainable, opt_state

    def check_stability(self, trainable: Any) -> list[str]:
        """Basis stability of every pending kernel against the previous check (jitted, one SVD per
        kernel); records it and returns the kernels that reached ``stability_threshold``."""
        measured: dict[str, float] = {}
        for name in self.pending:
            q = _orthogonal_factor(kernel_matrix(self._leaf(trainable, name), self.config.layout))
            prev = self.warmup.get(name)
            self.warmup[name] = [q]
            if prev is None:
                continue
            value = float(_stability(prev[0], q))
            self.last_stability[name] = value
            measured[name] = value
            self.schedule.record_stability(self.step_count, name, value)
        return self.schedule.ready(measured)

    def switch(
        self, trainable: Any, opt_state: Any, names: Sequence[str] | None = None
    ) -> tuple[Any, Any]:
        """Switch ``names`` (default: every pending kernel) now, at full rank."""
        self.check_tree(trainable)
        todo = self.pending if names is None else list(names)
        for name in todo:
            if name not in self.eligible:
                raise lc.ParameterError(
                    f"{name} is not an eligible kernel; eligible: {self.eligible}"
                )
        out = self._switch(trainable, opt_state, todo, self.step_count)
        self.structure_changed = True
        return out

    def _switch(
        self, trainable: Any, opt_state: Any, names: Sequence[str], t: int
    ) -> tuple[Any, Any]:
        layout = self.config.layout
        new_values: dict[str, jax.Array] = {}
        frozen = dict(self.frozen)
        for name in names:
            if name in self.switched:
                continue
            kernel = self._leaf(trainable, name)
            f = _factorize(kernel_matrix(kernel, layout))
            opt_state = dense_to_sigma_state(
                opt_state,
                self._paths[name],
                self.shapes[name],
                lambda x: kernel_matrix(x, layout),
                f.U,
                f.V,
                kinds=self.config.moment_kinds,
            )
            new_values[name] = f.Sigma
            frozen[name] = Basis(f.U, f.V, self.shapes[name], layout)
        trainable = self._replace(trainable, new_values)
        self.frozen = frozen
        for name in new_values:
            self.warmup.pop(name, None)
            self.schedule.record_switch(t, name, {name: frozen[name].rank})
        self.schedule.record_share(t, self.trainable_share(trainable))
        return trainable, self._set_sigma_scales(opt_state, list(new_values))

    def _update_ranks(
        self, trainable: Any, opt_state: Any, due: Sequence[str], t: int
    ) -> tuple[Any, Any, bool]:
        self.schedule.record_update()
        changed = False
        new_values: dict[str, jax.Array] = {}
        frozen = dict(self.frozen)
        kinds = self.config.moment_kinds
        ranks: dict[str, int] | None = None
        rds: dict[str, lc.Rediagonalized] = {}
        if self.config.budget is not None:  # every due kernel's spectrum first: one allocation
            for name in due:
                b = frozen[name]
                rds[name] = lc.rediagonalize(b.U, self._leaf(trainable, name), b.V)
            shapes = {n: _matrix_shape(b.shape, b.layout) for n, b in frozen.items()}
            ranks = self.schedule.allocate(
                t,
                {n: np.asarray(rd.singular_values) for n, rd in rds.items()},
                {n: shapes[n] for n in due},
                {n: (shapes[n], b.rank) for n, b in frozen.items() if n not in rds},
            )
        for name in due:
            b = frozen[name]
            sigma = self._leaf(trainable, name)
            old = b.rank
            m, n = _matrix_shape(b.shape, b.layout)
            if ranks is None:
                upd = lc.update_rank(b.U, sigma, b.V, self.config.rule, shape=(m, n))
            else:
                rd = rds[name]
                upd = lc.RankUpdate(lc.truncate(rd.U, rd.Sigma, rd.V, ranks[name]), ranks[name], rd)
            rd = upd.rediagonalized
            opt_state = rotate_sigma_state(
                opt_state, self._paths[name], rd.left, rd.right, kinds=kinds
            )
            if upd.rank < old:
                opt_state = truncate_sigma_state(opt_state, self._paths[name], old, upd.rank)
                changed = True
            new_values[name] = upd.factors.Sigma
            frozen[name] = Basis(upd.factors.U, upd.factors.V, b.shape, b.layout)
            self.schedule.record_rank(t, name, old, upd.rank)
        trainable = self._replace(trainable, new_values)
        self.frozen = frozen
        self.schedule.record_share(t, self.trainable_share(trainable))
        return trainable, opt_state, changed

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The controller's state (:meth:`lowrank_core.oialr.OIALRSchedule.state_dict`'s schema, with
        the frozen bases, the kernel shapes and the layout): host values and NumPy arrays."""
        return self.schedule.state_dict(
            self.ranks(),
            {n: [np.asarray(q) for q in qs] for n, qs in self.warmup.items()},
            shapes={n: list(s) for n, s in self.shapes.items() if n in self.eligible},
            layout=self.config.layout,
            bases={n: (np.asarray(b.U), np.asarray(b.V)) for n, b in self.frozen.items()},
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` into this (fresh, nothing switched) controller.

        Everything is checked first: :class:`lowrank_core.CheckpointError` names what does not fit
        (another parameter tree, a shape, a rank, a missing entry) and the controller is left as it was.
        States saved by version 0.1.0 load too.
        """
        self.apply_state(self.check_state(state))

    def _parts(self, name: str) -> dict[str, int]:
        m, n = _matrix_shape(self.shapes[name], self.config.layout)
        return {name: min(m, n)}

    def check_state(self, state: Any) -> dict[str, Any]:
        """The controller's new fields from ``state``, validated against this controller; changes nothing."""
        err = lc.CheckpointError
        checked = self.schedule.check_state(
            state,
            parts=self._parts,
            warmup_shapes=lambda n: [_matrix_shape(self.shapes[n], self.config.layout)],
            extra_keys=("shapes", "layout", "bases"),
        )
        extra = checked.extra
        if extra["layout"] != self.config.layout:
            raise err(
                f"the state uses layout {extra['layout']!r}, the config {self.config.layout!r}"
            )
        try:
            shapes = {str(n): tuple(int(d) for d in s) for n, s in dict(extra["shapes"]).items()}
            bases = {str(n): tuple(b) for n, b in dict(extra["bases"]).items()}
        except (TypeError, ValueError) as exc:
            raise err(f"the OIALR state is invalid: {exc}") from None
        for name, shape in shapes.items():
            if shape != self.shapes.get(name):
                raise err(
                    f"kernel {name} has shape {self.shapes.get(name)} here, {shape} in the state"
                )
        switched = dict(checked.switch_order)
        if set(bases) != set(switched):
            raise err(
                "the OIALR state is inconsistent: switched kernels "
                f"{sorted(switched)}, bases for {sorted(bases)}"
            )
        frozen: dict[str, Basis] = {}
        for name, pair in bases.items():
            if len(pair) != 2:
                raise err(f"the bases of {name} must be a pair (U, V)")
            U, V = (np.asarray(a) for a in pair)
            m, n = _matrix_shape(self.shapes[name], self.config.layout)
            r = checked.ranks[name]
            if U.shape != (m, r) or V.shape != (n, r):
                raise err(
                    f"the bases of {name} have shapes {U.shape}, {V.shape}; expected ({m}, {r}), ({n}, {r})"
                )
            if not (np.isfinite(U).all() and np.isfinite(V).all()):
                raise err(f"the bases of {name} hold NaN or Inf")
            dt = self.dtypes[name]
            frozen[name] = Basis(
                jnp.asarray(U, dt), jnp.asarray(V, dt), self.shapes[name], self.config.layout
            )
        warmup = {n: [jnp.asarray(np.asarray(q)) for q in qs] for n, qs in checked.warmup.items()}
        return {"checked": checked, "frozen": frozen, "warmup": warmup}

    def apply_state(self, fields: dict[str, Any]) -> None:
        """Take the fields :meth:`check_state` returned (cannot fail)."""
        self.schedule.apply_state(fields["checked"])
        self.frozen = fields["frozen"]
        self.warmup = fields["warmup"]

    def state_template(self, params: Any, ranks: dict[str, int]) -> Any:
        """``params`` with a zero Sigma of the given rank at each named kernel (changes nothing here)."""
        return self._replace(
            params, {n: jnp.zeros((r, r), dtype=self.dtypes[n]) for n, r in ranks.items()}
        )

    def trainable_template(self, params: Any) -> Any:
        """``params`` with a zero Sigma of the current rank at every switched kernel: the structure and
        shapes of the trainable tree (for ``tx.init`` and for loading a checkpoint)."""
        return self.state_template(params, self.ranks())

    def __repr__(self) -> str:
        return (
            f"OIALR(step={self.step_count}, switched={len(self.switched)}/{len(self.eligible)}, "
            f"ranks={self.ranks()})"
        )
