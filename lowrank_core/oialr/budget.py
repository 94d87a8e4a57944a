"""A rank budget for OIALR: one global allocation of ranks across every low-rank layer.

A per-layer rank rule (:class:`~lowrank_core.SigmaCutoff`, ...) looks at one layer at a time, relative to
that layer's own largest singular value, so it cannot promise what the whole model costs. A
:class:`RankBudget` states that promise: the factored layers' cost, as a fraction of what the same
layers cost dense, is at most ``target``. Two measures of cost:

- ``"flops"``: the forward (and so, up to a constant factor, forward plus backward) multiply-adds per
  token of each layer, ``r (m + n) + r^2`` factorized and ``m n`` dense, whichever is smaller (a layer
  runs the cheaper path), against ``m n``;
- ``"params"``: the trained scalars, ``r^2`` (Sigma) against ``m n``.

:func:`allocate_ranks` ranks every singular value of every layer on one scale, each divided by its
layer's largest (a flatter spectrum has more large values, so it keeps more rank), and keeps them from
the largest down, each layer's in order, while the total cost stays within the budget: one global
threshold on normalized singular values, not one cutoff per layer. It never raises a rank, keeps at
least ``min_rank`` per layer (the floor wins when the floors alone exceed the budget), and breaks ties
by layer name, then index, so the result does not depend on the order in which the layers are given.

``reach_at`` makes the budget gradual: the target falls linearly from 1 (the dense cost) at the first
switch to ``target`` at step ``reach_at`` (an int) or at that fraction of the run (a float in
``(0, 1]``, which needs the run's length, :attr:`OIALRConfig.total_steps`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._validate import check_choice, check_float, check_int, check_shape_pair, describe
from ..errors import NonFiniteError, ParameterError, ParameterTypeError, RankError

__all__ = [
    "MEASURES",
    "RankBudget",
    "allocate_ranks",
    "budget_cost",
    "layer_cost",
    "stack_spectrum",
]

#: The measures of cost a budget can be stated in.
MEASURES = ("flops", "params")


def layer_cost(measure: str, m: int, n: int, rank: int) -> float:
    """The cost of an ``(m, n)`` layer at ``rank`` (see the module docstring), in the unit of ``m n``."""
    if measure == "params":
        return float(rank * rank)
    return float(min(rank * (m + n) + rank * rank, m * n))


def stack_spectrum(s: Any) -> np.ndarray:
    """One spectrum for a stack of matrices that share a rank (``(..., r)`` singular values): each
    matrix's values divided by its largest, then the largest of each index over the stack."""
    a = np.abs(np.asarray(s, dtype=np.float64))
    if a.ndim == 1:
        return a
    a = a.reshape(-1, a.shape[-1])
    top = a.max(axis=-1, keepdims=True)
    normalized = np.divide(a, top, out=np.zeros_like(a), where=top > 0)
    out: np.ndarray = normalized.max(axis=0)
    return out


def budget_cost(
    measure: str, shapes: Mapping[str, tuple[int, int]], ranks: Mapping[str, int]
) -> float:
    """The layers' cost at ``ranks`` as a fraction of their dense cost (``sum m n``)."""
    dense = sum(m * n for m, n in shapes.values())
    return sum(layer_cost(measure, *shapes[k], ranks[k]) for k in shapes) / dense


@dataclass(frozen=True)
class RankBudget:
    """OIALR's rank budget: the low-rank layers cost at most ``target`` of their dense cost.

    - ``target``: a fraction in ``(0, 1]``;
    - ``measure``: ``"flops"`` (default) or ``"params"`` (module docstring);
    - ``min_rank``: the floor of every layer's rank (a layer already below it keeps its rank);
    - ``reach_at``: ``None`` (the whole budget at the first rank update), a step (``int``), or a fraction
      of the run (``float`` in ``(0, 1]``) by which the target is reached, linearly from the first switch.

    Used through :attr:`OIALRConfig.budget`, where it replaces the per-layer ``rule``.
    """

    target: float
    measure: str = "flops"
    min_rank: int = 1
    reach_at: int | float | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "target", check_float("target", self.target, min=0.0, max=1.0, min_open=True))
        set_(self, "measure", check_choice("measure", self.measure, MEASURES))
        set_(self, "min_rank", check_int("min_rank", self.min_rank, min=1))
        reach: Any = self.reach_at
        if reach is not None:
            if isinstance(reach, bool) or not isinstance(
                reach, int | float | np.integer | np.floating
            ):
                raise ParameterTypeError(
                    f"`reach_at` must be a step (int), a fraction of the run (float) or None, got "
                    f"{describe(reach)}"
                )
            if isinstance(reach, int | np.integer):
                reach = check_int("reach_at", reach, min=0)
            else:
                reach = check_float("reach_at", reach, min=0.0, max=1.0, min_open=True)
            set_(self, "reach_at", reach)

    def reach_step(self, total_steps: int | None) -> int | None:
        """The step by which the target is reached (``None``: at once)."""
        if self.reach_at is None or isinstance(self.reach_at, int):
            return self.reach_at
        if total_steps is None:
            raise ParameterError(
                f"RankBudget(reach_at={self.reach_at}) is a fraction of the run: set "
                "OIALRConfig(total_steps=...) (the trainer callbacks set it from the trainer)"
            )
        return round(self.reach_at * total_steps)

    def target_at(self, step: int, first_switch: int, total_steps: int | None = None) -> float:
        """The target in force at ``step``: ``target``, or on the way there from 1 at ``first_switch``."""
        end = self.reach_step(total_steps)
        if end is None or end <= first_switch or step >= end:
            return self.target
        done = max(0.0, (step - first_switch) / (end - first_switch))
        return 1.0 - done * (1.0 - self.target)


def allocate_ranks(
    spectra: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, int]],
    target: float,
    *,
    measure: str = "flops",
    min_rank: int = 1,
    fixed: Mapping[str, tuple[tuple[int, int], int]] | None = None,
    counts: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """New ranks for the layers of ``spectra`` so that all layers together cost at most ``target``.

    ``spectra[name]`` are a layer's singular values (its current Sigma's, descending; the current rank
    is their number), ``shapes[name]`` its matrix shape ``(m, n)``; ``fixed`` holds layers that keep
    their rank, ``{name: ((m, n), rank)}``, counted in the cost; ``counts[name]`` (default 1) is the
    number of matrices of that shape a layer holds (the groups of a grouped convolution, which share one
    rank: pass the largest normalized value of each index over the groups as its spectrum). See the
    module docstring for the rule.
    Raises :class:`~lowrank_core.NonFiniteError` for NaN or Inf in a spectrum and
    :class:`~lowrank_core.RankError` for an empty one.
    """
    target = check_float("target", target, min=0.0, max=1.0, min_open=True)
    measure = check_choice("measure", measure, MEASURES)
    min_rank = check_int("min_rank", min_rank, min=1)
    for name, value in (
        ("spectra", spectra),
        ("shapes", shapes),
        ("fixed", fixed),
        ("counts", counts),
    ):
        if value is not None and not isinstance(value, Mapping):
            raise ParameterTypeError(
                f"`{name}` must map layer names to values, got {describe(value)}"
            )
    if spectra is None or shapes is None:
        raise ParameterTypeError("`spectra` and `shapes` must map layer names to values, got None")
    shapes = {k: check_shape_pair(f"shapes[{k!r}]", v) for k, v in shapes.items()}
    fixed = {
        k: (
            check_shape_pair(f"fixed[{k!r}] shape", v[0]),
            check_int(f"fixed[{k!r}] rank", v[1], min=1),
        )
        for k, v in (fixed or {}).items()
    }
    mult = {k: check_int(f"counts[{k!r}]", v, min=1) for k, v in (counts or {}).items()}
    if set(spectra) != set(shapes):
        raise ParameterError(
            f"`spectra` and `shapes` must name the same layers, got {sorted(spectra)} and {sorted(shapes)}"
        )
    values: dict[str, np.ndarray] = {}
    for name in sorted(spectra):
        s = np.asarray(spectra[name], dtype=np.float64).reshape(-1)
        if s.size == 0:
            raise RankError(f"the spectrum of {name!r} is empty")
        if not np.isfinite(s).all():
            raise NonFiniteError(f"the spectrum of {name!r} contains NaN or Inf")
        top = float(np.abs(s).max())
        s = np.sort(np.abs(s))[::-1]
        values[name] = s / top if top > 0 else np.zeros_like(s)
    every = {**{k: shapes[k] for k in values}, **{k: sh for k, (sh, _) in fixed.items()}}
    dense = float(sum(mult.get(k, 1) * m * n for k, (m, n) in every.items()))
    ranks = {k: min(min_rank, v.size) for k, v in values.items()}
    cost = sum(mult.get(k, 1) * layer_cost(measure, *shapes[k], r) for k, r in ranks.items())
    cost += sum(mult.get(k, 1) * layer_cost(measure, *sh, r) for k, (sh, r) in fixed.items())
    limit = target * dense
    order = sorted(
        ((-float(v[i]), k, i) for k, v in values.items() for i in range(ranks[k], v.size)),
    )
    for _, name, i in order:
        if i != ranks[name]:  # pragma: no cover - each layer's values are non-increasing
            continue
        m, n = shapes[name]
        step = layer_cost(measure, m, n, i + 1) - layer_cost(measure, m, n, i)
        new = cost + mult.get(name, 1) * step
        if new > limit * (1 + 1e-12):
            break
        ranks[name] = i + 1
        cost = new
    return ranks
