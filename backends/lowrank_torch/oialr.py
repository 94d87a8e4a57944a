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

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import lowrank_core as lc

from .convert import DEFAULT_INCLUDE, count_trainable, eligible_names, to_low_rank
from .layers import LowRankLayer
from .optim_state import (
    _find,
    dense_to_sigma_state,
    rotate_sigma_state,
    swap_parameter,
    truncate_sigma_state,
)

__all__ = ["OIALR", "OIALRConfig"]


@dataclass
class OIALRConfig:
    """Settings of :class:`OIALR` (defaults after the published reference configuration).

    - ``switch_step``: step at which every remaining eligible layer switches to low rank (``None``: only
      the stability rule switches).
    - ``stability_threshold``: switch a layer as soon as its basis stability reaches this value (``None``:
      only ``switch_step`` switches). At least one of the two must be set.
    - ``stability_every``: steps between stability checks during the warm-up.
    - ``update_every``: steps between rank updates of a low-rank layer.
    - ``rule``: rank rule applied at each update (any :class:`lowrank_core.RankRule`).
    - ``progressive``: update only the last layers first, 10% more layers per update.
    - ``include``, ``exclude_names``, ``keep_first``, ``keep_last``, ``min_aspect``: which layers are
      eligible (see :func:`lowrank_torch.convert.to_low_rank`).
    """

    switch_step: int | None = 1000
    stability_threshold: float | None = None
    stability_every: int = 100
    update_every: int = 100
    rule: lc.RankRule = field(default_factory=lambda: lc.SigmaCutoff(0.1))
    progressive: bool = False
    include: tuple[type[nn.Module], ...] = DEFAULT_INCLUDE
    exclude_names: tuple[str, ...] = ()
    keep_first: bool = False
    keep_last: bool = True
    min_aspect: float = 0.1

    def __post_init__(self) -> None:
        if self.switch_step is None and self.stability_threshold is None:
            raise ValueError("OIALRConfig needs `switch_step`, `stability_threshold`, or both")
        if self.switch_step is not None and (
            isinstance(self.switch_step, bool) or int(self.switch_step) < 0
        ):
            raise ValueError(f"`switch_step` must be a non-negative int, got {self.switch_step!r}")
        if self.stability_threshold is not None and not 0.0 < self.stability_threshold <= 1.0:
            raise ValueError(
                f"`stability_threshold` must lie in (0, 1], got {self.stability_threshold}"
            )
        for name in ("stability_every", "update_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        if not callable(self.rule):
            raise TypeError(f"`rule` must be a rank rule (callable), got {self.rule!r}")
        self.include = tuple(self.include)
        self.exclude_names = tuple(self.exclude_names)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper (or the model itself)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def _dense_params(module: nn.Module) -> dict[str, nn.Parameter]:
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
    matrix: Tensor = lc.weight_to_matrix(weight.detach(), groups=groups)
    return [matrix]


class OIALR:
    """Drives OIALR on ``model`` trained by ``optimizer``: call :meth:`step` after each optimizer step.

    ``model`` may be wrapped in DistributedDataParallel: the controller works on ``model.module``. Every
    process must call :meth:`step` at the same steps; the decisions depend only on the (identical)
    weights, so all processes make the same ones. After a :meth:`step` that replaced parameters or changed
    their shapes, :attr:`structure_changed` is ``True`` and a DDP wrapper must be rebuilt; after checks
    that change no shape it is ``False``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: OIALRConfig | None = None,
    ) -> None:
        self.config = config or OIALRConfig()
        self.model = _unwrap(model)
        self.optimizer = optimizer
        c = self.config
        self.eligible: list[str] = eligible_names(
            self.model,
            include=c.include,
            exclude_names=c.exclude_names,
            keep_first=c.keep_first,
            keep_last=c.keep_last,
            min_aspect=c.min_aspect,
        )
        for name in self.eligible:
            for role, p in _dense_params(self.model.get_submodule(name)).items():
                if p.requires_grad and _find(optimizer, p) is None:
                    raise ValueError(
                        f"parameter {name}.{role} is trainable but not in the optimizer; build the "
                        "optimizer from model.parameters() before creating OIALR"
                    )
        self.dense_trainable = count_trainable(self.model)
        self.step_count = 0
        #: True when the last :meth:`step` replaced parameters or changed their shapes (the optimizer
        #: already holds the new ones; a DDP wrapper must be rebuilt); False after checks that change
        #: no shape.
        self.structure_changed = False
        self.switched: dict[str, int] = {}  # layer name -> step of its switch
        self.layers: dict[str, LowRankLayer] = {}  # low-rank part name -> layer
        self._parts: dict[str, list[str]] = {}  # layer name -> its low-rank part names
        self._snapshots: dict[str, list[Tensor]] = {}
        self._updates = 0
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ queries
    @property
    def pending(self) -> list[str]:
        """Eligible layers still dense."""
        return [n for n in self.eligible if n not in self.switched]

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
        """
        self.structure_changed = False
        self.step_count += 1
        t = self.step_count
        c = self.config
        changed = False
        with torch.no_grad():
            if self.pending:
                to_switch: list[str] = []
                if c.stability_threshold is not None and t % c.stability_every == 0:
                    to_switch += self._check_stability(t)
                if c.switch_step is not None and t >= c.switch_step:
                    to_switch = list(self.pending)
                if to_switch:
                    self._switch([n for n in self.eligible if n in set(to_switch)], t)
                    changed = True
            if self.layers and t % c.update_every == 0:
                changed |= self._update_ranks(t)
        self.structure_changed = changed

    def _check_stability(self, t: int) -> list[str]:
        ready: list[str] = []
        for name in self.pending:
            # Keep each check's polar factors, not the weights: one SVD per matrix per check.
            polars = [
                lc.orthogonal_factor(m) for m in _weight_matrices(self.model.get_submodule(name))
            ]
            prev = self._snapshots.get(name)
            self._snapshots[name] = polars
            if prev is None:
                continue
            values = [
                float(torch.mean(lc.polar_stability(p, q)))
                for p, q in zip(prev, polars, strict=True)
            ]
            value = sum(values) / len(values)
            self.history.append({"step": t, "event": "stability", "layer": name, "value": value})
            assert self.config.stability_threshold is not None
            if value >= self.config.stability_threshold:
                ready.append(name)
        return ready

    def _switch(self, names: list[str], t: int) -> None:
        for name in names:
            module = self.model.get_submodule(name)
            old = _dense_params(module)
            parts = to_low_rank(
                self.model,
                include=self.config.include,
                exclude_names=self.config.exclude_names,
                keep_first=self.config.keep_first,
                keep_last=self.config.keep_last,
                min_aspect=self.config.min_aspect,
                names=[name],
            )
            self._adopt(name, old, parts)
            self.switched[name] = t
            self._snapshots.pop(name, None)
            for part, layer in parts.items():
                self.history.append(
                    {"step": t, "event": "switch", "layer": part, "rank": layer.rank}
                )
        self.history.append({"step": t, "event": "share", "value": self.trainable_share()})

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
            if _find(opt, weight) is not None:
                dense_to_sigma_state(
                    opt, weight, layer.sigma, layer.U, layer.V, groups=layer.groups
                )
            if old_bias is not None and new_bias is not None:
                self._replace_in_optimizer(old_bias, new_bias)
        self._parts[name] = list(parts)
        self.layers.update(parts)

    def _replace_in_optimizer(self, old: nn.Parameter, new: nn.Parameter) -> None:
        """``new`` takes ``old``'s slot in its param group, with ``old``'s (already adapted) state."""
        opt = self.optimizer
        if _find(opt, old) is None:
            return
        state = opt.state.pop(old, None)
        swap_parameter(opt, old, new)
        if state is not None:
            opt.state[new] = state

    def _update_ranks(self, t: int) -> bool:
        due = [n for n in self.switched if (t - self.switched[n]) > 0]
        if not due:
            return False
        self._updates += 1
        if self.config.progressive:
            per_update = max(1, math.ceil(0.1 * len(self.eligible)))
            k = min(len(self.eligible), per_update * self._updates)
            allowed = set(self.eligible[-k:])
            due = [n for n in due if n in allowed]
        shape_changed = False
        for name in due:
            for part in self._parts[name]:
                layer = self.layers[part]
                old_rank = layer.rank
                upd = lc.update_rank(
                    layer.U,
                    layer.sigma.detach(),
                    layer.V,
                    self.config.rule,
                    shape=(layer.rows, layer.cols),
                )
                rd = upd.rediagonalized
                old_sigma = layer.sigma
                rotate_sigma_state(self.optimizer, old_sigma, rd.left, rd.right)
                if upd.rank < old_rank:
                    truncate_sigma_state(self.optimizer, old_sigma, upd.rank)
                    shape_changed = True
                layer.set_factors(*upd.factors)
                if layer.sigma is not old_sigma:  # a new rank: a new Parameter, same optimizer slot
                    self._replace_in_optimizer(old_sigma, layer.sigma)
                self.history.append(
                    {"step": t, "event": "rank", "layer": part, "old": old_rank, "new": upd.rank}
                )
        self.history.append({"step": t, "event": "share", "value": self.trainable_share()})
        return shape_changed

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The controller's state: enough to rebuild the low-rank structure in a fresh dense model."""
        return {
            "format": "lowrank_torch.OIALR/1",
            "step_count": self.step_count,
            "updates": self._updates,
            "switched": dict(self.switched),
            "ranks": self.ranks(),
            "eligible": list(self.eligible),
            "snapshots": {n: [m.clone() for m in ms] for n, ms in self._snapshots.items()},
            "history": [dict(e) for e in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rebuild the saved structure on this (freshly built, dense) model and optimizer.

        Converts the saved layers at their saved ranks, in the saved order, moving their parameters into
        the optimizer exactly as training did, so that ``model.load_state_dict`` and
        ``optimizer.load_state_dict`` of the same checkpoint fit afterwards. Raises ``ValueError`` naming
        the problem when the state does not belong to this model.
        """
        if not isinstance(state, dict) or state.get("format") != "lowrank_torch.OIALR/1":
            raise ValueError("not an OIALR state (missing or unknown 'format' entry)")
        if self.switched:
            raise ValueError(
                "load_state_dict needs a controller that has not switched any layer yet"
            )
        if list(state["eligible"]) != self.eligible:
            raise ValueError(
                "the checkpoint was made for other eligible layers: saved "
                f"{state['eligible']}, this model has {self.eligible}"
            )
        ranks: dict[str, int] = state["ranks"]
        order = {n: i for i, n in enumerate(self.eligible)}
        saved = state["switched"]
        for name in sorted(saved, key=lambda n: (saved[n], order.get(n, -1))):
            t = saved[name]
            if name not in order:
                raise ValueError(f"the checkpoint switched {name!r}, which is not eligible here")
            module = self.model.get_submodule(name)
            old = _dense_params(module)
            parts = to_low_rank(
                self.model,
                include=self.config.include,
                exclude_names=self.config.exclude_names,
                keep_first=self.config.keep_first,
                keep_last=self.config.keep_last,
                min_aspect=self.config.min_aspect,
                names=[name],
            )
            for part, layer in parts.items():
                if part not in ranks:
                    raise ValueError(f"the checkpoint has no rank for {part}")
                r = int(ranks[part])
                if r < layer.rank:
                    layer.set_factors(*lc.truncate(layer.U, layer.sigma.detach(), layer.V, r))
            self._adopt(name, old, parts)
            self.switched[name] = int(t)
        self.step_count = int(state["step_count"])
        self._updates = int(state["updates"])
        self._snapshots = {n: [m.clone() for m in ms] for n, ms in state["snapshots"].items()}
        self.history = [dict(e) for e in state["history"]]

    # ------------------------------------------------------------------ convenience
    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Recorded events (all, or those of one ``kind``: stability, switch, rank, share)."""
        return [e for e in self.history if kind is None or e["event"] == kind]

    def __repr__(self) -> str:
        return (
            f"OIALR(step={self.step_count}, switched={len(self.switched)}/{len(self.eligible)}, "
            f"share={self.trainable_share():.3f})"
        )
