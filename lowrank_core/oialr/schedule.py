"""OIALR's schedule, written once: its settings, its decisions, its history and its saved state.

Orthogonality-informed adaptive low-rank training (Coquelin et al., arXiv 2401.08505) in three phases:

1. **Full-rank warm-up.** Every ``stability_every`` steps the basis stability of each pending layer
   (between this check and the last) is measured; the framework computes it, :meth:`OIALRSchedule.ready`
   says which layers reached ``stability_threshold``.
2. **Switch.** A layer is put into ``U @ Sigma @ V.T`` form at ``switch_step``, or earlier once its
   stability reaches the threshold (when set).
3. **Rank reduction.** Every ``update_every`` steps, each layer switched at an earlier step is
   re-diagonalized and truncated by the rank rule. With ``progressive=True`` only the last layers are
   updated at first, and 10% more of them (at least one) at each update.

:class:`OIALRSchedule` makes these decisions from plain values (step counts, layer names, stability
values); the framework controllers (``lowrank_torch.OIALR``, ``lowrank_jax.OIALR``) do what it decides
to their parameters and optimizer states and report back, so that both frameworks take the same
decisions, keep the same history and save the same state (:meth:`OIALRSchedule.state_dict`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .._validate import check_bool, check_float, check_int, describe
from ..errors import CheckpointError, ParameterError, ParameterTypeError
from ..rank import RankRule, SigmaCutoff
from .budget import RankBudget, allocate_ranks
from .moments import MOMENT_KINDS
from .selection import LayerSelection
from .state import STATE_FORMAT, STATE_VERSION, CheckedState, check_state

__all__ = [
    "STATE_FORMAT",
    "STATE_VERSION",
    "CheckedState",
    "OIALRConfig",
    "OIALRSchedule",
    "ScheduleView",
    "StepPlan",
]

_Config = TypeVar("_Config", bound="OIALRConfig")


def _check_moment_kinds(value: object) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ParameterTypeError(
            "`moment_kinds` must map optimizer state names to moment kinds, got " + describe(value)
        )
    out: dict[str, str] = {}
    for key, kind in value.items():
        if kind not in MOMENT_KINDS:
            raise ParameterError(
                f"`moment_kinds[{key!r}]` must be one of {MOMENT_KINDS}, got {kind!r}"
            )
        out[key] = str(kind)
    return out


@dataclass
class OIALRConfig:
    """Settings of OIALR, the same for every framework (defaults after the published configuration).

    - ``switch_step``: step at which every remaining eligible layer switches to low rank (``None``: only
      the stability rule switches).
    - ``stability_threshold``: switch a layer as soon as its basis stability reaches this value
      (``None``: only ``switch_step`` switches). At least one of the two must be set.
    - ``stability_every``: steps between stability checks during the warm-up.
    - ``update_every``: steps between rank updates of a low-rank layer.
    - ``rule``: rank rule applied at each update (any :class:`lowrank_core.RankRule`).
    - ``progressive``: update only the last layers first, 10% more layers per update.
    - ``selection``: which layers are eligible (:class:`~lowrank_core.oialr.LayerSelection`).
    - ``moment_kinds``: ``{state name: "first" | "second" | "magnitude"}``, overriding the framework's
      table of optimizer-state names (:mod:`lowrank_core.oialr.moments`), e.g. ``{"nu": "magnitude"}``
      for optax's Adamax, whose state has Adam's field names.
    - ``budget``: a :class:`~lowrank_core.oialr.RankBudget`: the ranks of all low-rank layers are
      chosen together to meet it (at each rank update; ``rule`` is then not used).
    - ``total_steps``: the run's length in steps; needed by ``switch_fraction`` and by a budget whose
      ``reach_at`` is a fraction (the trainer callbacks set it from the trainer's maximum steps).
    - ``switch_fraction``: switch at this fraction of the run, ``round(switch_fraction * total_steps)``,
      instead of at ``switch_step`` (which it replaces when set).
    - ``rotation_threshold``: switch a layer once its bases turn at most this fraction of the rate at
      which they turned at its first measurement (the rotation per step, ``arccos(stability) /
      stability_every``, relative to its first value): a trigger that does not depend on the check
      interval or on the learning rate's scale, as the raw ``stability_threshold`` does
      (``benchmarks/stability_trigger.py`` measures both). Either trigger switches a layer.
    - ``sigma_lr_scale``: a multiplier of Sigma's learning rate after the switch, for every layer (a
      float) or per layer (``{fnmatch pattern: scale}``, the first matching pattern wins, 1 for the
      rest); each optimizer update of Sigma is scaled by it, whatever the optimizer (in JAX, through
      ``OIALR.optimizer(tx)``). Default 4, measured: a trained Sigma alone moves the weight less per
      step than the dense update did (AdamW: byte LM 1.172 -> 1.097 x dense loss, MNIST-1D MLP +0.4-0.6
      points; SGD with momentum: MNIST-1D MLP +0.3 points on average, 2 of 3 seeds; 16 diverges on the
      LM). ``1.0`` is the published method.

    Every field is checked at construction (:class:`~lowrank_core.ParameterError` /
    :class:`~lowrank_core.ParameterTypeError`, naming the field); NumPy scalars are accepted.
    """

    switch_step: int | None = 1000
    stability_threshold: float | None = None
    stability_every: int = 100
    update_every: int = 100
    rule: RankRule = field(default_factory=lambda: SigmaCutoff(0.1))
    progressive: bool = False
    selection: LayerSelection = field(default_factory=LayerSelection)
    moment_kinds: Mapping[str, str] = field(default_factory=dict)
    budget: RankBudget | None = None
    total_steps: int | None = None
    switch_fraction: float | None = None
    sigma_lr_scale: float | Mapping[str, float] = 4.0
    rotation_threshold: float | None = None

    def __post_init__(self) -> None:
        triggers = (self.switch_step, self.switch_fraction, self.stability_threshold)
        if all(x is None for x in triggers) and self.rotation_threshold is None:
            raise ParameterError(
                "OIALRConfig needs `switch_step` (or `switch_fraction`), a stability trigger "
                "(`stability_threshold` or `rotation_threshold`), or both"
            )
        self.rotation_threshold = check_float(
            "rotation_threshold", self.rotation_threshold, min=0.0, max=1.0, min_open=True,
            optional=True,
        )  # fmt: skip
        self.switch_step = check_int("switch_step", self.switch_step, min=0, optional=True)
        self.total_steps = check_int("total_steps", self.total_steps, min=1, optional=True)
        self.switch_fraction = check_float(
            "switch_fraction", self.switch_fraction, min=0.0, max=1.0, optional=True
        )
        if self.budget is not None and not isinstance(self.budget, RankBudget):
            raise ParameterTypeError(
                f"`budget` must be a lowrank_core.oialr.RankBudget or None, got {describe(self.budget)}"
            )
        self.stability_threshold = check_float(
            "stability_threshold",
            self.stability_threshold,
            min=0.0,
            max=1.0,
            min_open=True,
            optional=True,
        )
        self.stability_every = check_int("stability_every", self.stability_every, min=1)
        self.update_every = check_int("update_every", self.update_every, min=1)
        if not callable(self.rule) or isinstance(self.rule, type):
            raise ParameterTypeError(
                f"`rule` must be a rank rule (e.g. lowrank_core.SigmaCutoff(0.1)), got "
                f"{describe(self.rule)}"
            )
        self.progressive = check_bool("progressive", self.progressive)
        if not isinstance(self.selection, LayerSelection):
            raise ParameterTypeError(
                f"`selection` must be a lowrank_core.oialr.LayerSelection, got {describe(self.selection)}"
            )
        self.moment_kinds = _check_moment_kinds(self.moment_kinds)
        scale: Any = self.sigma_lr_scale
        if isinstance(scale, Mapping):
            if not all(isinstance(k, str) for k in scale):
                raise ParameterTypeError(
                    f"`sigma_lr_scale` must be a float or map layer-name patterns to floats, got "
                    f"{describe(scale)}"
                )
            self.sigma_lr_scale = {
                k: check_float(f"sigma_lr_scale[{k!r}]", v, min=0.0, min_open=True)
                for k, v in scale.items()
            }
        else:
            self.sigma_lr_scale = check_float("sigma_lr_scale", scale, min=0.0, min_open=True)

    def sigma_scale(self, layer: str) -> float:
        """The multiplier of Sigma's learning rate for ``layer`` (``sigma_lr_scale``'s rule)."""
        scale = self.sigma_lr_scale
        if not isinstance(scale, Mapping):
            return float(scale)
        for pattern, value in scale.items():
            if fnmatch.fnmatchcase(layer, pattern):
                return float(value)
        return 1.0

    def switch_at(self) -> int | None:
        """The step at which every pending layer switches: ``switch_step``, or ``switch_fraction`` of
        ``total_steps`` (:class:`~lowrank_core.ParameterError` when the run's length is not known)."""
        if self.switch_fraction is None:
            return self.switch_step
        if self.total_steps is None:
            raise ParameterError(
                f"switch_fraction={self.switch_fraction} is a fraction of the run: set "
                "OIALRConfig(total_steps=...) (the trainer callbacks set it from the trainer)"
            )
        return round(self.switch_fraction * self.total_steps)

    def for_run(self: _Config, total_steps: int) -> _Config:
        """A copy for a run of ``total_steps`` steps (what the trainer callbacks use); the fractions
        of the run (``switch_fraction``, a budget's ``reach_at``) are resolved against it."""
        copy = dataclasses.replace(self, total_steps=check_int("total_steps", total_steps, min=1))
        copy.switch_at()
        if copy.budget is not None:
            copy.budget.reach_step(copy.total_steps)
        return copy


@dataclass(frozen=True)
class StepPlan:
    """What one step of the schedule does (from :meth:`OIALRSchedule.plan`).

    - ``step``: the step number (1 for the first call after the first optimizer step);
    - ``check_stability``: measure the stability of every pending layer;
    - ``switch_all``: switch every pending layer (``switch_step`` is reached);
    - ``update``: the switched layers whose rank is updated, in eligible order (``None``: no update is
      due; an empty tuple: an update is due, but ``progressive`` holds back every due layer).
    """

    step: int
    check_stability: bool
    switch_all: bool
    update: tuple[str, ...] | None

    @property
    def idle(self) -> bool:
        """Nothing to do at this step but count it."""
        return not (self.check_stability or self.switch_all or self.update is not None)


class OIALRSchedule:
    """OIALR's bookkeeping and decisions over layer names: no arrays, no framework.

    ``eligible`` is the ordered list of the layers OIALR may switch (the selection's result). The
    controller calls :meth:`plan` at each step, carries the plan out, and records what it did
    (:meth:`record_switch`, :meth:`record_rank`, ...). All mutable state is in :attr:`step_count`,
    :attr:`switched`, :attr:`updates` and :attr:`history`; :meth:`snapshot` / :meth:`restore` put it back
    after a step that failed halfway.
    """

    def __init__(self, config: OIALRConfig, eligible: Sequence[str]) -> None:
        if not isinstance(config, OIALRConfig):
            raise ParameterTypeError(f"`config` must be an OIALRConfig, got {describe(config)}")
        self.config = config
        #: the step at which every pending layer switches (``None``: only the stability rule switches)
        self.switch_step = config.switch_at()
        if config.budget is not None:
            config.budget.reach_step(config.total_steps)  # a fraction needs the run's length
        self.eligible: list[str] = list(eligible)
        self.step_count = 0
        self.switched: dict[str, int] = {}
        self.updates = 0
        self.history: list[dict[str, Any]] = []
        #: each pending layer's first rotation rate (radians per step), for ``rotation_threshold``
        self.reference_rates: dict[str, float] = {}

    # ------------------------------------------------------------------ queries
    @property
    def pending(self) -> list[str]:
        """Eligible layers not switched yet, in eligible order."""
        return [n for n in self.eligible if n not in self.switched]

    def plan(self) -> StepPlan:
        """The decisions of the next step (``step_count + 1``); changes nothing."""
        t = self.step_count + 1
        c = self.config
        pending = bool(self.pending)
        triggered = c.stability_threshold is not None or c.rotation_threshold is not None
        stability = pending and triggered and t % c.stability_every == 0
        switch_all = pending and self.switch_step is not None and t >= self.switch_step
        update: tuple[str, ...] | None = None
        if self.switched and t % c.update_every == 0:
            due = [n for n in self.eligible if n in self.switched and t - self.switched[n] > 0]
            if due:
                if c.progressive:
                    per_update = max(1, math.ceil(0.1 * len(self.eligible)))
                    k = min(len(self.eligible), per_update * (self.updates + 1))
                    allowed = set(self.eligible[-k:])
                    due = [n for n in due if n in allowed]
                update = tuple(due)
        return StepPlan(t, stability, switch_all, update)

    def allocate(
        self,
        step: int,
        spectra: Mapping[str, Any],
        shapes: Mapping[str, tuple[int, int]],
        fixed: Mapping[str, tuple[tuple[int, int], int]] | None = None,
        counts: Mapping[str, int] | None = None,
    ) -> dict[str, int] | None:
        """The ranks the budget gives the updated parts at ``step`` (``None`` without a budget).

        ``spectra`` / ``shapes``: the singular values (host arrays) and matrix shapes of the parts being
        updated; ``fixed``: the other low-rank parts, ``{part: ((m, n), rank)}``, which keep their rank
        (see :func:`~lowrank_core.oialr.allocate_ranks`)."""
        budget = self.config.budget
        if budget is None:
            return None
        first = min(self.switched.values()) if self.switched else step
        target = budget.target_at(step, first, self.config.total_steps)
        return allocate_ranks(
            spectra,
            shapes,
            target,
            measure=budget.measure,
            min_rank=budget.min_rank,
            fixed=fixed,
            counts=counts,
        )

    def ready(self, values: Mapping[str, float]) -> list[str]:
        """The layers among ``values`` (``{layer: stability}``, one check's) that reached a trigger:
        ``stability_threshold``, or the ``rotation_threshold`` relative to the layer's first rotation
        rate (recorded here at its first value)."""
        c = self.config
        out = []
        for n in self.eligible:
            if n not in values:
                continue
            v = values[n]
            hit = c.stability_threshold is not None and v >= c.stability_threshold
            if c.rotation_threshold is not None:
                rate = math.acos(min(1.0, max(-1.0, v))) / c.stability_every
                first = self.reference_rates.setdefault(n, rate)
                hit = hit or rate <= c.rotation_threshold * first
            if hit:
                out.append(n)
        return out

    def to_switch(self, plan: StepPlan, ready: Sequence[str]) -> list[str]:
        """The layers a step switches, in eligible order: every pending one when ``switch_step`` is
        reached, else those of ``ready`` (from the stability check)."""
        chosen = set(self.pending) if plan.switch_all else set(ready)
        return [n for n in self.eligible if n in chosen]

    # ------------------------------------------------------------------ recording
    def begin(self, plan: StepPlan) -> None:
        """Count the step of ``plan``."""
        self.step_count = plan.step

    def record_stability(self, step: int, layer: str, value: float) -> None:
        self.history.append({"step": step, "event": "stability", "layer": layer, "value": value})

    def record_switch(self, step: int, layer: str, ranks: Mapping[str, int]) -> None:
        """``layer`` switched at ``step``; ``ranks`` holds the rank of each of its low-rank parts."""
        self.switched[layer] = step
        for part, rank in ranks.items():
            self.history.append({"step": step, "event": "switch", "layer": part, "rank": rank})

    def record_update(self) -> None:
        """A rank update took place (the ``progressive`` rule counts them)."""
        self.updates += 1

    def record_rank(self, step: int, part: str, old: int, new: int) -> None:
        self.history.append({"step": step, "event": "rank", "layer": part, "old": old, "new": new})

    def record_share(self, step: int, value: float) -> None:
        self.history.append({"step": step, "event": "share", "value": value})

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Recorded events (all, or those of one ``kind``: stability, switch, rank, share)."""
        return [e for e in self.history if kind is None or e["event"] == kind]

    def snapshot(self) -> tuple[Any, ...]:
        """The mutable state, to :meth:`restore` after a step that failed halfway."""
        return (
            self.step_count,
            dict(self.switched),
            self.updates,
            list(self.history),
            dict(self.reference_rates),
        )

    def restore(self, saved: tuple[Any, ...]) -> None:
        self.step_count, switched, self.updates, history, rates = saved
        self.switched.clear()
        self.switched.update(switched)
        self.history[:] = history
        self.reference_rates.clear()
        self.reference_rates.update(rates)

    # ------------------------------------------------------------------ saved state
    def state_dict(
        self,
        ranks: Mapping[str, int],
        warmup: Mapping[str, Sequence[Any]],
        **extra: Any,
    ) -> dict[str, Any]:
        """The saved state (schema :data:`STATE_FORMAT` version :data:`STATE_VERSION`).

        ``ranks`` is the rank of every low-rank part, ``warmup`` the warm-up factors (the last
        stability check's polar factors, a list of arrays per pending layer); ``extra`` holds what a
        framework needs besides (e.g. JAX's frozen bases). Arrays are stored as given.
        """
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "step_count": self.step_count,
            "updates": self.updates,
            "switched": dict(self.switched),
            "ranks": dict(ranks),
            "eligible": list(self.eligible),
            "warmup": {n: list(ms) for n, ms in warmup.items()},
            "reference_rates": dict(self.reference_rates),
            "history": [dict(e) for e in self.history],
            **extra,
        }

    def check_state(
        self,
        state: Any,
        parts: Callable[[str], Mapping[str, int]],
        warmup_shapes: Callable[[str], Sequence[tuple[int, ...]]],
        extra_keys: Sequence[str] = (),
    ) -> CheckedState:
        """Validate a saved state against this schedule; changes nothing.

        ``parts(layer)`` gives ``{part: largest rank}`` of the low-rank parts a switch of ``layer``
        creates; ``warmup_shapes(layer)`` the shapes of its warm-up factors; ``extra_keys`` the
        framework's own entries that must be present. States of version 0.1.0 (formats
        ``lowrank_torch.OIALR/1`` and ``lowrank_jax.OIALR/1``) are read too. Anything that does not fit
        raises :class:`~lowrank_core.CheckpointError` naming it (:func:`~lowrank_core.oialr.state.
        check_state`).
        """
        if self.switched:
            raise CheckpointError(
                "load_state_dict needs a controller that has not switched any layer yet"
            )
        return check_state(self.eligible, state, parts, warmup_shapes, extra_keys)

    def apply_state(self, checked: CheckedState) -> None:
        """Take the counts and history of a checked state (the framework switched the layers)."""
        self.step_count = checked.step_count
        self.updates = checked.updates
        self.switched = dict(checked.switch_order)
        self.history = [dict(e) for e in checked.history]
        self.reference_rates = dict(checked.reference_rates)


class ScheduleView:
    """Read access to a controller's :attr:`schedule` (an :class:`OIALRSchedule`): the properties every
    framework's OIALR controller shows."""

    schedule: OIALRSchedule

    @property
    def eligible(self) -> list[str]:
        """The layers OIALR may switch, in the model's order."""
        return self.schedule.eligible

    @property
    def step_count(self) -> int:
        """Steps counted so far (calls of ``step``)."""
        return self.schedule.step_count

    @property
    def switched(self) -> dict[str, int]:
        """``{layer: step of its switch}``."""
        return self.schedule.switched

    @property
    def history(self) -> list[dict[str, Any]]:
        """Recorded events (stability, switch, rank, share), oldest first."""
        return self.schedule.history

    @property
    def pending(self) -> list[str]:
        """Eligible layers not switched yet."""
        return self.schedule.pending

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Recorded events (all, or those of one ``kind``: stability, switch, rank, share)."""
        return self.schedule.events(kind)
