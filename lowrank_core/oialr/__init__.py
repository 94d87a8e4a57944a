"""OIALR's framework-free logic, defined once for every framework.

- :mod:`~lowrank_core.oialr.selection`: :class:`LayerSelection`, which layers are factorized;
- :mod:`~lowrank_core.oialr.schedule`: :class:`OIALRConfig` and :class:`OIALRSchedule`, when to check,
  switch and update which layers, the history, and the versioned saved state;
- :mod:`~lowrank_core.oialr.moments`: :class:`MomentMap`, how optimizer moments follow the factors;
- :mod:`~lowrank_core.oialr.budget`: :class:`RankBudget`, ranks chosen across all layers to meet a
  compute or parameter budget.

The PyTorch and JAX controllers (``lowrank_torch.OIALR``, ``lowrank_jax.OIALR``) are adapters over these:
they move parameters and optimizer states, the decisions are taken here.
"""

from __future__ import annotations

from .budget import MEASURES, RankBudget, allocate_ranks, budget_cost, layer_cost, stack_spectrum
from .moments import (
    FIRST,
    MAGNITUDE,
    MOMENT_KINDS,
    SECOND,
    MomentMap,
    moment_kind,
    rotate_cheaper,
    truncate_moment,
)
from .schedule import OIALRConfig, OIALRSchedule, ScheduleView, StepPlan
from .selection import UNSET, Candidate, LayerSelection
from .state import STATE_FORMAT, STATE_VERSION, CheckedState, check_state, upgrade_state

__all__ = [
    "FIRST",
    "MAGNITUDE",
    "MEASURES",
    "MOMENT_KINDS",
    "SECOND",
    "STATE_FORMAT",
    "STATE_VERSION",
    "UNSET",
    "Candidate",
    "CheckedState",
    "LayerSelection",
    "MomentMap",
    "OIALRConfig",
    "OIALRSchedule",
    "RankBudget",
    "ScheduleView",
    "StepPlan",
    "allocate_ranks",
    "budget_cost",
    "check_state",
    "layer_cost",
    "moment_kind",
    "rotate_cheaper",
    "stack_spectrum",
    "truncate_moment",
    "upgrade_state",
]
