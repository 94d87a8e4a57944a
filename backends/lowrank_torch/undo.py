"""All-or-nothing structural changes: a record of a model, an optimizer and further objects to put back.

Used by every operation of ``lowrank_torch`` that changes a model's structure (OIALR's switch and rank
updates, checkpoint loading, low-rank initialization): on any failure, the model, the optimizer and the
controllers are restored, object identities included.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from lowrank_core.oialr import OIALRSchedule

__all__ = ["Undo"]


def _restore_container(obj: Any, saved: Any) -> None:
    """Put ``saved``'s items back into the (possibly mutated) container ``obj``, keeping its identity."""
    obj.clear()
    if isinstance(obj, list):
        obj.extend(saved)
    else:
        obj.update(saved)


class Undo:
    """A cheap record of what a structural change may touch, to put everything back on failure.

    Records, shallowly (tensors are shared, not copied): every module of ``model`` (its class, its
    attributes, its parameter / buffer / child dictionaries: conversions replace modules and
    parametrize attentions), the optimizer's param groups (the group dicts, their parameter lists) and
    state (the per-parameter dicts), the controller's fields, and any further objects' attributes
    (``extra``, e.g. an LR scheduler). :meth:`restore` puts all of it back, object identities included.
    Values written *into* existing tensors are not recorded: callers validate first and write in place
    only once nothing can fail any more.
    """

    _CONTAINERS = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        *extra: object,
    ) -> None:
        self.modules = [
            (
                m,
                m.__class__,
                dict(m.__dict__),
                {k: copy.copy(m.__dict__[k]) for k in self._CONTAINERS if k in m.__dict__},
            )
            for m in model.modules()
        ]
        self.optimizer = optimizer
        if optimizer is not None:
            groups = optimizer.param_groups
            self.groups = (groups, list(groups), [(g, dict(g), list(g["params"])) for g in groups])
            state = optimizer.state
            self.state = (state, dict(state), [(d, dict(d)) for d in state.values()])
        # an OIALR controller's schedule holds its counts and history
        extra = (
            *extra,
            *(s for o in extra if isinstance(s := getattr(o, "schedule", None), OIALRSchedule)),
        )
        self.objects = [
            (
                obj,
                dict(obj.__dict__),
                {k: copy.copy(v) for k, v in obj.__dict__.items() if isinstance(v, dict | list)},
            )
            for obj in extra
            if obj is not None
        ]

    def restore(self) -> None:
        """Put every recorded module, the optimizer and the objects back as they were."""
        for m, cls, attrs, containers in self.modules:
            if m.__class__ is not cls:
                m.__class__ = cls
            m.__dict__.clear()
            m.__dict__.update(attrs)
            for key, items in containers.items():
                _restore_container(m.__dict__[key], items)
        opt = self.optimizer
        if opt is not None:
            groups, group_list, group_items = self.groups
            for g, items, params in group_items:
                _restore_container(items["params"], params)
                _restore_container(g, items)
            opt.param_groups = groups
            _restore_container(groups, group_list)
            state, state_items, per_param = self.state
            for d, items in per_param:
                _restore_container(d, items)
            opt.state = state
            _restore_container(state, state_items)
        for obj, attrs, containers in self.objects:
            obj.__dict__.clear()
            obj.__dict__.update(attrs)
            for key, items in containers.items():
                _restore_container(attrs[key], items)
