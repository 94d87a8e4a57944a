"""OIALR for PyTorch: the training schedule around the low-rank layers.

Orthogonality-informed adaptive low-rank training (Coquelin et al., arXiv 2401.08505) in three phases:

1. **Full-rank warm-up.** The model trains as it is. Every ``stability_every`` steps the basis stability
   of each eligible weight (:func:`lowrank_core.basis_stability` between this check and the last) is
   recorded.
2. **Switch.** A layer is put into ``U @ sigma @ V.T`` form (:mod:`lowrank_torch.layers`) at
   ``switch_step``, or earlier once its stability reaches ``stability_threshold`` (when set). ``U`` and
   ``V`` are frozen; ``sigma`` takes the weight's place in its optimizer param group (same group, same
   position, same hyper-parameters), and the weight's optimizer state is carried into Sigma's coordinates
   (:mod:`lowrank_torch.optim_state`), so there is no oversized first step.
3. **Rank reduction.** Every ``update_every`` steps after its switch, each low-rank layer is
   re-diagonalized and truncated by the rank rule (:func:`lowrank_core.update_rank`; OIALR's
   :class:`~lowrank_core.SigmaCutoff` by default); the optimizer state is rotated and truncated with it.
   With ``progressive=True`` only the last layers are updated at first, and 10% more of them (at least
   one) at each update.

All math (stability, SVDs, rank rules, rotations) is ``lowrank_core``'s. Usage::

    ctrl = OIALR(model, optimizer, OIALRConfig(switch_step=1000, update_every=200))
    for x, y in data:
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        ctrl.step()
        if ctrl.structure_changed:  # parameters were replaced or changed shape:
            ...                     # rebuild a DistributedDataParallel wrapper here (and only then)

The controller's own state (switched layers, ranks, step count, stability snapshots, history) is saved
with :meth:`OIALR.state_dict`; :func:`lowrank_torch.checkpoint.load_checkpoint` restores it into a
freshly built dense model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import lowrank_core as lc
import lowrank_core.oialr as core_oialr
from lowrank_core._array import check_rank
from lowrank_core._validate import describe
from lowrank_core.errors import ParameterError, ParameterTypeError
from lowrank_core.oialr import LayerSelection

from .amp import full_precision
from .convert import DEFAULT_INCLUDE, check_include, count_trainable, eligible_names, to_low_rank
from .layers import LowRankLayer, dense_matrix_shape
from .optim_state import (
    dense_to_sigma_state,
    find_parameter,
    rotate_sigma_state,
    swap_parameter,
    truncate_sigma_state,
)
from .undo import Undo

__all__ = ["OIALR", "CheckpointError", "LayerSelection", "OIALRConfig"]


#: :class:`lowrank_core.CheckpointError` (the same class in every framework; also importable from
#: :mod:`lowrank_torch.checkpoint`)
CheckpointError = lc.CheckpointError


#: The default of the flat selection fields: "not given, take `selection`'s value".
_UNSET: Any = core_oialr.UNSET

#: The flat layer-selection fields of :class:`OIALRConfig` and the :class:`LayerSelection` field each sets.
_FLAT_SELECTION = {
    "include": "include",
    "exclude_names": "exclude",
    "keep_first": "keep_first",
    "keep_last": "keep_last",
    "min_aspect": "min_aspect",
    "allow_rank_one": "allow_rank_one",
}


def _module_types(value: Any) -> tuple[type[nn.Module], ...]:
    """``include`` as a tuple of supported module types (ParameterTypeError / UnsupportedLayerError)."""
    include: Any = value
    if isinstance(include, type):
        include = (include,)
    if isinstance(include, str) or not isinstance(include, tuple | list):
        raise ParameterTypeError(
            f"`include` must be a tuple of module types, got {describe(value)}"
        )
    try:
        return check_include(include)
    except TypeError as exc:
        raise ParameterTypeError(str(exc)) from None


@dataclass
class OIALRConfig(core_oialr.OIALRConfig):
    """Settings of :class:`OIALR`: :class:`lowrank_core.oialr.OIALRConfig`, the same for every framework.

    Which layers are eligible is ``selection`` (a :class:`lowrank_core.oialr.LayerSelection`; its
    ``include`` is a tuple of module types here, default every supported type, see
    :mod:`lowrank_torch.convert`). The flat fields ``include``, ``exclude_names``, ``keep_first``,
    ``keep_last``, ``min_aspect`` and ``allow_rank_one`` are shorthands: each one given replaces that
    field of ``selection``; after construction they show the selection's values.
    """

    include: tuple[type[nn.Module], ...] = _UNSET
    exclude_names: tuple[str, ...] = _UNSET
    keep_first: bool = _UNSET
    keep_last: bool = _UNSET
    min_aspect: float = _UNSET
    allow_rank_one: bool = _UNSET

    def __post_init__(self) -> None:
        super().__post_init__()
        given = {
            field_: getattr(self, flat)
            for flat, field_ in _FLAT_SELECTION.items()
            if getattr(self, flat) is not _UNSET
        }
        chosen = dataclasses.replace(self.selection, **given)
        include = DEFAULT_INCLUDE if chosen.include is None else _module_types(chosen.include)
        self.selection = dataclasses.replace(chosen, include=include)
        for flat, field_ in _FLAT_SELECTION.items():
            setattr(self, flat, getattr(self.selection, field_))


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper (or the model itself)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def dense_params(module: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters a conversion replaces: ``{role: parameter}``."""
    if isinstance(module, nn.MultiheadAttention):
        found: dict[str, nn.Parameter] = {}
        if module.in_proj_weight is not None and isinstance(module.in_proj_weight, nn.Parameter):
            found["in_proj_weight"] = module.in_proj_weight
        out_proj: Any = module.out_proj
        found["out_proj.weight"] = out_proj.weight
        if isinstance(out_proj.bias, nn.Parameter):
            found["out_proj.bias"] = out_proj.bias
        return found
    weight: Any = module.weight
    found = {"weight": weight}
    bias = getattr(module, "bias", None)
    if isinstance(bias, nn.Parameter):
        found["bias"] = bias
    return found


def _weight_matrices(module: nn.Module) -> list[Tensor]:
    """Matrix views (via the core) of the weights whose stability decides the switch."""
    if isinstance(module, nn.MultiheadAttention):
        out_proj: Any = module.out_proj
        mats: list[Tensor] = [out_proj.weight.detach()]
        if module.in_proj_weight is not None:
            mats.insert(0, module.in_proj_weight.detach())
        return mats
    groups = int(getattr(module, "groups", 1))
    weight: Any = module.weight
    matrix: Tensor = lc.weight_to_matrix(weight.detach(), groups=groups, check_finite=False)
    return [matrix]


#: Largest number of matrix entries decomposed in one batched call of a stability check (a bound on
#: the extra memory of stacking: 2**26 float32 entries are 256 MiB).
_BATCH_ELEMENTS = 2**26
#: Whether CPU matrices are batched too. torch's CPU SVD loops over a stack internally, and batching
#: was measured slower there (ratios in the CHANGELOG), so on the CPU each matrix gets its own call;
#: accelerators get one batched call per shape.
_BATCH_ON_CPU = False


def _same_shape_chunks(
    slots: list[tuple[str, int, Tensor]],
) -> list[list[tuple[str, int, Tensor]]]:
    """``slots`` grouped by (shape, dtype, device), in first-seen order, each group cut into chunks of
    at most :data:`_BATCH_ELEMENTS` entries (at least one matrix per chunk)."""
    groups: dict[tuple[Any, ...], list[tuple[str, int, Tensor]]] = {}
    for slot in slots:
        m = slot[2]
        groups.setdefault((tuple(m.shape), m.dtype, m.device), []).append(slot)
    chunks: list[list[tuple[str, int, Tensor]]] = []
    for group in groups.values():
        m = group[0][2]
        per = max(1, _BATCH_ELEMENTS // max(1, m.numel()))
        if m.device.type == "cpu" and not _BATCH_ON_CPU:
            per = 1
        chunks += [group[i : i + per] for i in range(0, len(group), per)]
    return chunks


def _chunk_error(
    exc: lc.LowRankError, chunk: list[tuple[str, int, Tensor]], t: int
) -> lc.LowRankError:
    """The error of a failed batched stability check, naming the (first) layer that causes it."""
    for name, _, m in chunk:  # the error path only: find the matrix the batch failed on
        try:
            lc.orthogonal_factor(m)
        except lc.LowRankError as single:
            return _named(single, f"stability check of layer {name!r} at step {t}")
    layers = sorted({name for name, _, _ in chunk})
    return _named(exc, f"stability check of layers {layers} at step {t}")


def _named(exc: lc.LowRankError, where: str) -> lc.LowRankError:
    """``exc``'s kind of error with ``where`` in front of its message."""
    try:
        return type(exc)(f"{where}: {exc}")
    except Exception:  # pragma: no cover - an error class with another signature
        return lc.LowRankError(f"{where}: {exc}")


class OIALR(core_oialr.ScheduleView):
    """Drives OIALR on ``model`` trained by ``optimizer``: call :meth:`step` after each optimizer step.

    ``model`` may be wrapped in DistributedDataParallel: the controller works on ``model.module``. Every
    process must call :meth:`step` at the same steps; the decisions depend only on the (identical)
    weights, so all processes make the same ones. After a :meth:`step` that replaced parameters or changed
    their shapes, :attr:`structure_changed` is ``True`` and a DDP wrapper must be rebuilt; after checks
    that change no shape it is ``False``.

    The decisions (when to check, switch and update which layers), the history and the saved state are
    :class:`lowrank_core.oialr.OIALRSchedule`'s (:attr:`schedule`); this class moves parameters and
    optimizer state. A subclass changes *how* (e.g. on sharded parameters,
    :class:`~lowrank_torch.fsdp_oialr.FSDPOIALR`) through four hooks: :meth:`stability_matrices`,
    :meth:`convert_layers`, :meth:`full_factors` and :meth:`apply_rank_update`.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: OIALRConfig | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ParameterTypeError(f"`model` must be an nn.Module, got {describe(model)}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ParameterTypeError(
                f"`optimizer` must be a torch.optim.Optimizer, got {describe(optimizer)}"
            )
        if config is not None and not isinstance(config, OIALRConfig):
            raise ParameterTypeError(f"`config` must be an OIALRConfig, got {describe(config)}")
        self.config = config or OIALRConfig()
        self.model = _unwrap(model)
        self.optimizer = optimizer
        eligible = eligible_names(self.model, selection=self.config.selection)
        for name in eligible:
            for role, p in dense_params(self.model.get_submodule(name)).items():
                if p.requires_grad and find_parameter(optimizer, p) is None:
                    raise ParameterError(
                        f"parameter {name}.{role} is trainable but not in the optimizer; build the "
                        "optimizer from model.parameters() before creating OIALR"
                    )
        #: the decisions, the history and the counts (framework-free)
        self.schedule = core_oialr.OIALRSchedule(self.config, eligible)
        self.dense_trainable = count_trainable(self.model)
        #: True when the last :meth:`step` replaced parameters or changed their shapes (the optimizer
        #: already holds the new ones; a DDP wrapper must be rebuilt); False after checks that change
        #: no shape.
        self.structure_changed = False
        self.layers: dict[str, LowRankLayer] = {}  # low-rank part name -> layer
        self.parts: dict[str, list[str]] = {}  # layer name -> its low-rank part names
        #: the last stability check's polar factors of each pending layer (one per weight matrix)
        self.warmup: dict[str, list[Tensor]] = {}
        self._lr_hooks: tuple[torch.optim.Optimizer, list[Any]] | None = None
        self._before: list[tuple[Tensor, Tensor, float]] = []

    # ------------------------------------------------------------------ queries

    def ranks(self) -> dict[str, int]:
        """Current rank of every low-rank part."""
        return {name: layer.rank for name, layer in self.layers.items()}

    def trainable_share(self, dense_params: int | None = None) -> float:
        """OIALR's trainable share: trainable scalars now (``sum r^2`` + biases + the rest) / dense."""
        return count_trainable(self.model) / (dense_params or self.dense_trainable)

    # ------------------------------------------------------------------ the schedule
    def step(self) -> None:
        """Advance one training step and run the checks that are due (call it after ``optimizer.step()``).

        Returns ``None``, like ``torch.optim.lr_scheduler.LRScheduler.step``. Whether this step replaced
        parameters or changed their shapes (so that a DDP wrapper must be rebuilt) is
        :attr:`structure_changed`.

        All or nothing: when a due switch or rank update fails (a NaN in a layer, say), the error names
        the layer, and the model, the optimizer and the controller (its step count included) are left
        exactly as they were before the call.
        """
        sched = self.schedule
        plan = sched.plan()
        if plan.idle:
            sched.begin(plan)
            self.structure_changed = False
            self._ensure_lr_hooks()  # the optimizer object may have been replaced (a resume)
            return
        t = plan.step
        undo = Undo(self.model, self.optimizer, self)
        try:
            sched.begin(plan)
            changed = False
            # full precision even when called inside an autocast region (lowrank_torch.amp)
            with torch.no_grad(), full_precision(self.model):
                # rank updates are computed (and checked) before anything changes
                updates = (
                    self._plan_rank_updates(plan.update, t) if plan.update is not None else None
                )
                ready = self._check_stability(t) if plan.check_stability else []
                to_switch = sched.to_switch(plan, ready)
                if to_switch:
                    self._switch(to_switch, t)
                    changed = True
                if updates is not None:
                    changed |= self._apply_rank_updates(updates, t)
        except BaseException:
            undo.restore()
            raise
        self.structure_changed = changed
        self._ensure_lr_hooks()

    # ------------------------------------------------------------------ Sigma's learning rate
    def _scaled(self) -> list[tuple[Tensor, float]]:
        """``(sigma, scale)`` of every low-rank part whose Sigma trains at a scaled learning rate."""
        out: list[tuple[Tensor, float]] = []
        for name, parts in self.parts.items():
            scale = self.config.sigma_scale(name)
            if scale != 1.0:
                out += [(self.layers[p].sigma, scale) for p in parts]
        return out

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer that trains the model; assigning another one (a trainer's, after a resume)
        moves the hooks that scale Sigma's updates to it at once, before its next step."""
        return self._optimizer

    @optimizer.setter
    def optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizer = optimizer
        if "_lr_hooks" in self.__dict__:  # not during __init__
            self._ensure_lr_hooks()

    def _ensure_lr_hooks(self) -> None:
        """Hooks on the optimizer's step that scale each update of Sigma by ``sigma_lr_scale``
        (registered once something is switched, moved when the optimizer object changes). A wrapper
        that steps an inner optimizer without hooks of its own (accelerate's ``AcceleratedOptimizer``)
        gets them on the inner one, whose step it calls."""
        if self._lr_hooks is not None and self._lr_hooks[0] is self.optimizer:
            return
        if self._lr_hooks is not None:
            for handle in self._lr_hooks[1]:
                handle.remove()
            self._lr_hooks = None
        if not self._scaled():
            return
        opt = self.optimizer
        inner = getattr(opt, "optimizer", None)
        while "_optimizer_step_pre_hooks" not in opt.__dict__ and isinstance(
            inner, torch.optim.Optimizer
        ):
            opt, inner = inner, getattr(inner, "optimizer", None)
        handles = [
            opt.register_step_pre_hook(lambda *_: self._record_sigma()),
            opt.register_step_post_hook(lambda *_: self._scale_sigma_update()),
        ]
        self._lr_hooks = (self.optimizer, handles)

    def _record_sigma(self) -> None:
        with torch.no_grad():
            self._before = [(s, s.detach().clone(), c) for s, c in self._scaled()]

    def _scale_sigma_update(self) -> None:
        with torch.no_grad():  # sigma <- old + scale * (sigma - old)
            for sigma, old, scale in self._before:
                sigma.lerp_(old, 1.0 - scale)
        self._before = []

    def stability_matrices(self, name: str) -> list[Tensor]:
        """Hook: the matrices whose basis stability decides the switch of layer ``name`` (the whole
        weights; a sharded controller gathers them here)."""
        return _weight_matrices(self.model.get_submodule(name))

    def _check_stability(self, t: int) -> list[str]:
        """One stability check of every pending layer; returns those that reached the threshold.

        On an accelerator, matrices of the same shape (dtype, device) are decomposed in one batched
        call (in chunks of at most :data:`_BATCH_ELEMENTS` entries): one SVD call per shape instead of
        one per layer; on the CPU, where batching was measured slower, one call per matrix
        (:data:`_BATCH_ON_CPU`). Either way all values reach the host in one transfer: no host
        synchronisation per layer. Each check keeps the polar factors, not the weights: one SVD per
        matrix per check.
        """
        names = self.pending
        mats = {name: self.stability_matrices(name) for name in names}
        slots = [(name, j, m) for name in names for j, m in enumerate(mats[name])]
        polars: dict[tuple[str, int], Tensor] = {}
        values: dict[tuple[str, int], Tensor] = {}
        for chunk in _same_shape_chunks(slots):
            stack = torch.stack([m for _, _, m in chunk]) if len(chunk) > 1 else chunk[0][2][None]
            try:
                q = lc.orthogonal_factor(stack)
            except lc.LowRankError as exc:
                raise _chunk_error(exc, chunk, t) from exc
            prev = [self.warmup.get(name) for name, _, _ in chunk]
            for (name, j, _), qi in zip(chunk, q.unbind(0), strict=True):
                polars[(name, j)] = qi
            have = [i for i, p in enumerate(prev) if p is not None]
            if have:
                p_stack = torch.stack([prev[i][chunk[i][1]] for i in have])  # type: ignore[index]
                sel = q if len(have) == len(chunk) else q[torch.tensor(have, device=q.device)]
                cos = lc.polar_stability(p_stack, sel)  # (len(have), *batch)
                means = cos.reshape(len(have), -1).mean(dim=-1)
                for i, v in zip(have, means.unbind(0), strict=True):
                    values[(chunk[i][0], chunk[i][1])] = v
        host = torch.stack(list(values.values())).tolist() if values else []
        per_slot = dict(zip(values, host, strict=True))
        measured: dict[str, float] = {}
        for name in names:
            had_snapshot = name in self.warmup
            self.warmup[name] = [polars[(name, j)] for j in range(len(mats[name]))]
            if not had_snapshot:
                continue
            vals = [per_slot[(name, j)] for j in range(len(mats[name]))]
            measured[name] = float(sum(vals) / len(vals))
            self.schedule.record_stability(t, name, measured[name])
        return self.schedule.ready(measured)

    def _switch(self, names: list[str], t: int) -> None:
        for name in names:  # checked first, so that the error names the layer
            for m in self.stability_matrices(name):
                if not bool(torch.isfinite(m).all()):
                    raise lc.NonFiniteError(
                        f"switch of layer {name!r} at step {t}: its weight contains NaN or Inf"
                    )
        converted = self.convert_layers(names, t)
        for name in names:
            parts = converted[name]
            self.parts[name] = list(parts)
            self.layers.update(parts)
            self.warmup.pop(name, None)
            self.schedule.record_switch(t, name, {k: v.rank for k, v in parts.items()})
        self.schedule.record_share(t, self.trainable_share())

    def convert_layers(self, names: list[str], t: int) -> dict[str, dict[str, LowRankLayer]]:
        """Hook: put the dense layers ``names`` into low-rank form at full rank, their parameters'
        optimizer slots and state moved to the new ones; returns ``{layer: {part: low-rank layer}}``."""
        # one conversion call for all layers due (one pass over the model, not one per layer)
        olds = {name: dense_params(self.model.get_submodule(name)) for name in names}
        converted = to_low_rank(self.model, selection=self.config.selection, names=names)
        out: dict[str, dict[str, LowRankLayer]] = {}
        for name in names:
            own = (name, f"{name}.out_proj", f"{name}.parametrizations.in_proj_weight.0")
            parts = {k: converted[k] for k in own if k in converted}
            self._adopt(name, olds[name], parts)
            out[name] = parts
        return out

    def _adopt(
        self, name: str, old: dict[str, nn.Parameter], parts: dict[str, LowRankLayer]
    ) -> None:
        """Put the new layers' parameters where the old ones were in the optimizer, state carried over."""
        opt = self.optimizer
        if name in parts:  # Linear / ConvNd
            pairs = [(old["weight"], parts[name], old.get("bias"), parts[name].bias)]
        else:  # MultiheadAttention: out_proj and (packed) in_proj
            out = parts[f"{name}.out_proj"]
            pairs = [(old["out_proj.weight"], out, old.get("out_proj.bias"), out.bias)]
            in_name = f"{name}.parametrizations.in_proj_weight.0"
            if in_name in parts and "in_proj_weight" in old:
                pairs.append((old["in_proj_weight"], parts[in_name], None, None))
        for weight, layer, old_bias, new_bias in pairs:
            if find_parameter(opt, weight) is not None:
                dense_to_sigma_state(
                    opt,
                    weight,
                    layer.sigma,
                    layer.U,
                    layer.V,
                    groups=layer.groups,
                    kinds=self.config.moment_kinds,
                )
            if old_bias is not None and new_bias is not None:
                self._replace_in_optimizer(old_bias, new_bias)

    def _replace_in_optimizer(self, old: nn.Parameter, new: nn.Parameter) -> None:
        """``new`` takes ``old``'s slot in its param group, with ``old``'s (already adapted) state."""
        opt = self.optimizer
        if find_parameter(opt, old) is None:
            return
        state = opt.state.pop(old, None)
        swap_parameter(opt, old, new)
        if state is not None:
            opt.state[new] = state

    def _plan_rank_updates(self, due: tuple[str, ...], t: int) -> list[tuple[str, Any]]:
        """Every due part's new factors, computed and checked before any layer changes.

        The new rank is the rule's, or with a budget (:attr:`OIALRConfig.budget`) the one
        :meth:`lowrank_core.oialr.OIALRSchedule.allocate` gives every due part at once. A failure (NaN
        or Inf in a layer's factors, a rank rule that misbehaves) raises the core's error, its message
        prefixed with the layer's name.
        """
        parts = [part for name in due for part in self.parts[name]]
        rds: dict[str, lc.Rediagonalized] = {}
        ranks: dict[str, int] | None = None
        if self.config.budget is not None:  # every due part's spectrum first: one allocation
            for part in parts:
                try:
                    rds[part] = lc.rediagonalize(*self.full_factors(self.layers[part]))
                except lc.LowRankError as exc:
                    raise _named(exc, f"rank update of layer {part!r} at step {t}") from exc
            ranks = self._budget_ranks({p: rd.singular_values for p, rd in rds.items()}, t)
        plan: list[tuple[str, Any]] = []
        for part in parts:
            layer = self.layers[part]
            try:
                if ranks is None:
                    U, S, V = self.full_factors(layer)
                    upd = lc.update_rank(U, S, V, self.config.rule, shape=(layer.rows, layer.cols))
                else:
                    rd, r = rds[part], ranks[part]
                    upd = lc.RankUpdate(lc.truncate(rd.U, rd.Sigma, rd.V, r), r, rd)
                rd = upd.rediagonalized
                # one host transfer for the five finiteness checks (not one per tensor)
                checked = (*upd.factors, rd.left, rd.right)
                finite = torch.stack([torch.isfinite(x).all() for x in checked]).tolist()
                for fname, ok in zip(("U", "sigma", "V"), finite[:3], strict=True):
                    if not ok:
                        raise lc.NonFiniteError(f"the updated `{fname}` contains NaN or Inf")
                for fname, ok in zip(("left", "right"), finite[3:], strict=True):
                    if not ok:
                        raise lc.NonFiniteError(f"the rotation `{fname}` contains NaN or Inf")
                check_rank(upd.rank, layer.rank, name="new rank", what="the current rank")
            except lc.LowRankError as exc:
                raise _named(exc, f"rank update of layer {part!r} at step {t}") from exc
            plan.append((part, upd))
        return plan

    def _budget_ranks(self, singular_values: dict[str, Tensor], t: int) -> dict[str, int]:
        """The budget's ranks for the parts of ``singular_values`` (the other parts keep theirs)."""
        spectra = {
            p: core_oialr.stack_spectrum(s.detach().double().cpu().numpy())
            for p, s in singular_values.items()
        }
        shapes = {p: (layer.rows, layer.cols) for p, layer in self.layers.items()}
        fixed = {p: (shapes[p], layer.rank) for p, layer in self.layers.items() if p not in spectra}
        counts = {p: layer.groups for p, layer in self.layers.items()}
        due = {p: shapes[p] for p in spectra}
        ranks = self.schedule.allocate(t, spectra, due, fixed, counts)
        assert ranks is not None
        return ranks

    def full_factors(self, layer: LowRankLayer) -> tuple[Tensor, Tensor, Tensor]:
        """Hook: the layer's whole ``U``, ``sigma``, ``V`` for a rank update (a sharded controller
        gathers them here)."""
        return layer.U, layer.sigma.detach(), layer.V

    def _apply_rank_updates(self, plan: list[tuple[str, Any]], t: int) -> bool:
        """Write the planned updates (layers, optimizer state, history); returns whether shapes changed."""
        self.schedule.record_update()
        shape_changed = False
        for part, upd in plan:
            old_rank = self.layers[part].rank
            shape_changed |= self.apply_rank_update(part, upd)
            self.schedule.record_rank(t, part, old_rank, upd.rank)
        self.schedule.record_share(t, self.trainable_share())
        return shape_changed

    def apply_rank_update(self, part: str, update: lc.RankUpdate) -> bool:
        """Hook: write one planned rank update (``lowrank_core.update_rank``'s result) into the
        low-rank layer ``part`` and its optimizer state; returns whether parameters changed shape or
        were replaced."""
        layer = self.layers[part]
        rd = update.rediagonalized
        old_sigma = layer.sigma
        kinds = self.config.moment_kinds
        rotate_sigma_state(self.optimizer, old_sigma, rd.left, rd.right, kinds=kinds)
        changed = update.rank < layer.rank
        if changed:
            truncate_sigma_state(self.optimizer, old_sigma, update.rank)
        layer.set_factors(*update.factors)
        if layer.sigma is not old_sigma:  # a new rank: a new Parameter, same optimizer slot
            self._replace_in_optimizer(old_sigma, layer.sigma)
        return changed

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The controller's state (:meth:`lowrank_core.oialr.OIALRSchedule.state_dict`'s schema): enough
        to rebuild the low-rank structure in a fresh dense model."""
        warmup = {n: [m.clone() for m in ms] for n, ms in self.warmup.items()}
        return self.schedule.state_dict(self.ranks(), warmup)

    def _expected_parts(self, name: str) -> dict[str, int]:
        """``{low-rank part name: its maximal rank}`` that converting the dense layer ``name`` creates."""
        module = self.model.get_submodule(name)
        if isinstance(module, nn.MultiheadAttention):
            e = int(module.embed_dim)
            parts = {f"{name}.out_proj": e}
            if module._qkv_same_embed_dim and module.in_proj_weight is not None:
                parts[f"{name}.parametrizations.in_proj_weight.0"] = e
            return parts
        return {name: min(dense_matrix_shape(module))}

    def check_state(self, state: Any) -> core_oialr.CheckedState:
        """Validate a saved state against this controller and model; changes nothing.

        Reads the current schema and the 0.1.0 one; raises :class:`~lowrank_core.CheckpointError`
        naming what does not fit.
        """
        return self.schedule.check_state(
            state,
            parts=self._expected_parts,
            warmup_shapes=lambda n: [
                tuple(m.shape) for m in _weight_matrices(self.model.get_submodule(n))
            ],
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rebuild the saved structure on this (freshly built, dense) model and optimizer.

        Converts the saved layers at their saved ranks, in the saved order, moving their parameters into
        the optimizer exactly as training did, so that ``model.load_state_dict`` and
        ``optimizer.load_state_dict`` of the same checkpoint fit afterwards. The whole state is checked
        against this model first (names, ranks, step counts, warm-up factor shapes); a state that does
        not fit raises :class:`~lowrank_core.CheckpointError` naming the problem, and the model, the
        optimizer and the controller are left exactly as they were. States saved by version 0.1.0 load
        too.
        """
        checked = self.check_state(state)
        undo = Undo(self.model, self.optimizer, self)
        try:
            with torch.no_grad(), full_precision(self.model):
                batches: dict[int, list[str]] = {}
                for name, t in checked.switch_order:  # one conversion call per saved switch step
                    batches.setdefault(t, []).append(name)
                for names in batches.values():
                    expected = {n: self._expected_parts(n) for n in names}
                    converted = self.convert_layers(names, 0)
                    for name in names:
                        parts = converted[name]
                        if set(parts) != set(expected[name]):
                            raise CheckpointError(
                                f"converting {name!r} gave the parts {sorted(parts)}, the "
                                f"checkpoint expects {sorted(expected[name])}"
                            )
                        for part, layer in parts.items():
                            r = checked.ranks[part]
                            if r < layer.rank:
                                old_sigma = layer.sigma
                                if find_parameter(self.optimizer, old_sigma) is not None:
                                    truncate_sigma_state(self.optimizer, old_sigma, r)
                                layer.set_factors(
                                    *lc.truncate(layer.U, layer.sigma.detach(), layer.V, r)
                                )
                                if layer.sigma is not old_sigma:
                                    self._replace_in_optimizer(old_sigma, layer.sigma)
                        self.parts[name] = list(parts)
                        self.layers.update(parts)
            self.schedule.apply_state(checked)
            self._ensure_lr_hooks()
            self.warmup = {
                n: [torch.as_tensor(m).detach().clone() for m in ms]
                for n, ms in checked.warmup.items()
            }
        except BaseException as exc:
            undo.restore()
            if isinstance(exc, CheckpointError):
                raise
            if isinstance(exc, lc.LowRankError | ValueError | TypeError):
                raise CheckpointError(f"the OIALR state does not fit this model: {exc}") from exc
            raise

    # ------------------------------------------------------------------ convenience

    def __repr__(self) -> str:
        return (
            f"OIALR(step={self.step_count}, switched={len(self.switched)}/{len(self.eligible)}, "
            f"share={self.trainable_share():.3f})"
        )
