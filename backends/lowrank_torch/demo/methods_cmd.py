"""The demo's ``cmd`` method: plain training with online CMD weights for evaluation.

Importing this module registers it (``methods.py`` imports it at its end).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from ..convert import count_trainable
from .methods import MethodUnavailable, register_method

__all__ = ["CMD"]


@register_method("cmd")
class CMD:
    """Online CMD (:class:`lowrank_torch.cmd.CMDTracker`, Brokman et al., ICLR 2024) as a shadow model.

    Training is plain dense training (every parameter trains, the optimizer steps as usual), so the
    trainable share is 1.0: CMD does not make the trained model smaller, it models the trajectory of the
    dense model and evaluates the CMD weights ``a r(t) + b`` instead of the last weights, like EMA or SWA.
    After every epoch the weights are fed to CMD (recorded during the warm-up, then the exact online
    update); once the modes are fitted, the test set is evaluated with the CMD weights swapped in (and
    the trained weights swapped back afterwards, bit for bit).

    Options: ``warmup_epochs`` (default: a third of the run, between 2 and 20, so that short demo runs
    fit too; the paper uses 20), ``max_modes`` (2) or ``tol`` (automatic ``M``), ``embed`` (embedded CMD,
    off), and any other :class:`~lowrank_torch.cmd.CMDConfig` field.
    """

    name = "cmd"

    def __init__(self, warmup_epochs: int | None = None, **config: Any) -> None:
        try:
            from lowrank_torch.cmd import CMDConfig, CMDTracker
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise MethodUnavailable(
                f"the 'cmd' method needs lowrank_torch.cmd, which cannot be imported: {exc}"
            ) from exc
        if warmup_epochs is not None and int(warmup_epochs) < 2:
            raise ValueError(f"`warmup_epochs` must be >= 2, got {warmup_epochs}")
        self._config_cls = CMDConfig
        self._cmd_cls = CMDTracker
        self.warmup_epochs = warmup_epochs
        self.config = dict(config)
        self.cmd: Any = None

    def setup(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        steps_per_epoch: int,
        epochs: int,
    ) -> None:
        warmup = self.warmup_epochs or min(20, max(2, round(epochs / 3)))
        self.cmd = self._cmd_cls(model, self._config_cls(warmup_epochs=warmup, **self.config))

    def after_step(self, step: int) -> None:
        pass

    def after_epoch(self, epoch: int) -> None:
        self.cmd.after_epoch(epoch)

    def evaluation(self, model: nn.Module) -> contextlib.AbstractContextManager[object]:
        if self.cmd is None or not self.cmd.fitted:
            return contextlib.nullcontext()
        ctx: contextlib.AbstractContextManager[object] = self.cmd.swapped()
        return ctx

    def trainable_share(self, model: nn.Module, dense_params: int) -> float:
        return count_trainable(model) / dense_params

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.config.items())
        return f"CMD(warmup_epochs={self.warmup_epochs}{extra})"
