"""OIALR's saved state: one versioned schema for every framework, its validator and the 0.1.0 upgrade.

:meth:`OIALRSchedule.state_dict <lowrank_core.oialr.OIALRSchedule.state_dict>` writes it;
:func:`check_state` validates one against the layers it is loaded into, before anything changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import array_api_compat

from .._validate import check_float, check_int, describe
from ..errors import CheckpointError, LowRankError

__all__ = [
    "LEGACY_FORMATS",
    "STATE_FORMAT",
    "STATE_VERSION",
    "CheckedState",
    "check_state",
    "upgrade_state",
]

#: The ``format`` entry of a saved OIALR state, and its schema version.
STATE_FORMAT = "lowrank_core.OIALR"
STATE_VERSION = 2
#: The formats of version 0.1.0, which :func:`check_state` reads too.
LEGACY_FORMATS = ("lowrank_torch.OIALR/1", "lowrank_jax.OIALR/1")


@dataclass(frozen=True)
class CheckedState:
    """A saved OIALR state, validated (:meth:`OIALRSchedule.check_state`); apply it with
    :meth:`OIALRSchedule.apply_state` once the framework's part of it is in place."""

    step_count: int
    updates: int
    switch_order: tuple[tuple[str, int], ...]
    ranks: dict[str, int]
    warmup: dict[str, list[Any]]
    history: list[dict[str, Any]]
    extra: dict[str, Any]
    reference_rates: dict[str, float] = field(default_factory=dict)


def check_state(
    eligible: Sequence[str],
    state: Any,
    parts: Callable[[str], Mapping[str, int]],
    warmup_shapes: Callable[[str], Sequence[tuple[int, ...]]],
    extra_keys: Sequence[str] = (),
) -> CheckedState:
    """Validate a saved OIALR state against the ``eligible`` layers; changes nothing.

    ``parts(layer)`` gives ``{part: largest rank}`` of the low-rank parts a switch of ``layer``
    creates; ``warmup_shapes(layer)`` the shapes of its warm-up factors; ``extra_keys`` the
    framework's own entries that must be present. States of version 0.1.0 (formats
    ``lowrank_torch.OIALR/1`` and ``lowrank_jax.OIALR/1``) are read too. Anything that does not fit
    raises :class:`~lowrank_core.CheckpointError` naming it.
    """
    state = upgrade_state(state)
    missing = [k for k in (*_STATE_KEYS, *extra_keys) if k not in state]
    if missing:
        raise CheckpointError(f"the OIALR state lacks the entries {missing}")
    here = list(eligible)
    saved = state["eligible"]
    if not isinstance(saved, list | tuple) or list(saved) != here:
        raise CheckpointError(
            f"the checkpoint was made for other eligible layers: saved {saved!r}, these have {here}"
        )
    try:
        step_count = check_int("step_count", state["step_count"], min=0)
        updates = check_int("updates", state["updates"], min=0)
    except LowRankError as exc:
        raise CheckpointError(f"the OIALR state is invalid: {exc}") from None
    switched, ranks, warmup, history = (
        state["switched"],
        state["ranks"],
        state["warmup"],
        state["history"],
    )
    for key, value, kind in (
        ("switched", switched, dict),
        ("ranks", ranks, dict),
        ("warmup", warmup, dict),
        ("history", history, list),
    ):
        if not isinstance(value, kind):
            raise CheckpointError(
                f"the OIALR state's {key!r} must be a {kind.__name__}, got {describe(value)}"
            )
    if not all(isinstance(e, dict) for e in history):
        raise CheckpointError("the OIALR state's 'history' must be a list of dicts")
    order = {n: i for i, n in enumerate(here)}
    expected: dict[str, int] = {}
    steps: dict[str, int] = {}
    for name, t in switched.items():
        if name not in order:
            raise CheckpointError(f"the checkpoint switched {name!r}, which is not eligible here")
        try:
            steps[name] = check_int(f"switched[{name!r}]", t, min=0, max=step_count)
        except LowRankError as exc:
            raise CheckpointError(f"the OIALR state is invalid: {exc}") from None
        expected.update(parts(name))
    saved_ranks: dict[str, int] = {}
    for part, upper in expected.items():
        if part not in ranks:
            raise CheckpointError(f"the checkpoint has no rank for {part!r}")
        try:
            saved_ranks[part] = check_int(
                f"ranks[{part!r}]", ranks[part], min=1, max=upper, max_name="min(m, n)"
            )
        except LowRankError as exc:
            raise CheckpointError(f"the OIALR state is invalid: {exc}") from None
    extra = sorted(set(ranks) - set(expected))
    if extra:
        raise CheckpointError(f"the checkpoint has ranks for layers it did not switch: {extra}")
    checked_warmup: dict[str, list[Any]] = {}
    for name, mats in warmup.items():
        if name not in order or name in switched:
            raise CheckpointError(
                f"the checkpoint has a warm-up factor of {name!r}, which is not a pending "
                "eligible layer"
            )
        want = list(warmup_shapes(name))
        if not isinstance(mats, list | tuple) or len(mats) != len(want):
            raise CheckpointError(
                f"the warm-up factors of {name!r} must be a list of {len(want)} arrays"
            )
        for m, w in zip(mats, want, strict=True):
            _check_factor(name, m, tuple(w))
        checked_warmup[name] = list(mats)
    rates = state.get("reference_rates", {})
    if not isinstance(rates, dict):
        raise CheckpointError(
            f"the OIALR state's 'reference_rates' must be a dict, got {describe(rates)}"
        )
    checked_rates: dict[str, float] = {}
    for name, value in rates.items():
        if name not in order:
            raise CheckpointError(
                f"the checkpoint has a rotation rate of {name!r}, which is not eligible"
            )
        try:
            checked_rates[name] = check_float(f"reference_rates[{name!r}]", value, min=0.0)
        except LowRankError as exc:
            raise CheckpointError(f"the OIALR state is invalid: {exc}") from None
    switch_order = tuple(sorted(steps.items(), key=lambda item: (item[1], order[item[0]])))
    return CheckedState(
        step_count=step_count,
        updates=updates,
        switch_order=switch_order,
        ranks=saved_ranks,
        warmup=checked_warmup,
        history=[dict(e) for e in history],
        extra={k: state[k] for k in extra_keys},
        reference_rates=checked_rates,
    )


_STATE_KEYS = ("step_count", "updates", "switched", "ranks", "eligible", "warmup", "history")


def upgrade_state(state: Any) -> dict[str, Any]:
    """A saved OIALR state in the current schema: version 2 as it is, the 0.1.0 formats converted
    (PyTorch's ``snapshots`` and JAX's ``polar`` become ``warmup``); anything else raises
    :class:`~lowrank_core.CheckpointError`. The input is not changed."""
    if not isinstance(state, dict):
        raise CheckpointError(f"not an OIALR state: expected a dict, got {describe(state)}")
    fmt = state.get("format")
    if fmt == STATE_FORMAT:
        if state.get("version") != STATE_VERSION:
            raise CheckpointError(
                f"this OIALR state has schema version {state.get('version')!r}; this version of "
                f"lowrank-core reads versions 1 (0.1.0) and {STATE_VERSION}"
            )
        return state
    if fmt == LEGACY_FORMATS[0]:
        out = {k: v for k, v in state.items() if k != "snapshots"}
        snapshots = state.get("snapshots", {})
        out["warmup"] = snapshots
        return out
    if fmt == LEGACY_FORMATS[1]:
        out = {k: v for k, v in state.items() if k != "polar"}
        polar = state.get("polar", {})
        out["warmup"] = {n: [q] for n, q in polar.items()} if isinstance(polar, dict) else polar
        return out
    raise CheckpointError("not an OIALR state (missing or unknown 'format' entry)")


def _check_factor(name: str, m: Any, shape: tuple[int, ...]) -> None:
    """A warm-up factor: a finite floating array of ``shape`` (any array library)."""
    if not array_api_compat.is_array_api_obj(m) or isinstance(m, int | float | bool):
        raise CheckpointError(
            f"the warm-up factor of {name!r} must be an array of shape {shape}, got {describe(m)}"
        )
    xp = array_api_compat.array_namespace(m)
    if tuple(m.shape) != shape or not xp.isdtype(m.dtype, "real floating"):
        raise CheckpointError(
            f"the warm-up factor of {name!r} does not fit: expected a floating array of shape "
            f"{shape}, got {tuple(m.shape)} ({m.dtype})"
        )
    if not bool(xp.all(xp.isfinite(m))):
        raise CheckpointError(f"the warm-up factor of {name!r} contains NaN or Inf")
