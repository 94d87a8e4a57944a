"""DLDR methods of the demo: ``p-sgd`` and ``p-bfgs`` (:mod:`lowrank_torch.dldr`).

During the first ``switch_at`` fraction of the run the loop's own optimizer trains every parameter and
``snapshots`` evenly spaced snapshots are recorded. At the switch the top-``d`` subspace of the
snapshots is fitted and, from then on, the method takes every step itself (``take_step``): P-SGD or
P-BFGS in ``w = w_switch + P^T c`` with only the ``d`` coordinates ``c`` trained.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .methods import MethodUnavailable, register_method

__all__ = ["PBFGSMethod", "PSGDMethod"]


class _DLDR:
    """Shared schedule: record, switch, then step in the subspace."""

    name = "dldr"

    def __init__(
        self, switch_at: float = 0.5, d: int = 40, snapshots: int = 80, **optimizer: Any
    ) -> None:
        try:
            from lowrank_torch import dldr
        except ImportError as exc:  # pragma: no cover - depends on the checkout
            raise MethodUnavailable(f"{self.name} needs lowrank_torch.dldr: {exc}") from exc
        if not 0.0 < switch_at < 1.0:
            raise ValueError(f"`switch_at` must lie in (0, 1), got {switch_at}")
        if d < 1 or snapshots < 2:
            raise ValueError("need d >= 1 and snapshots >= 2")
        self._dldr = dldr
        self.switch_at = float(switch_at)
        self.d = int(d)
        self.snapshots = int(snapshots)
        self.optimizer_options = optimizer
        self.opt: torch.optim.Optimizer | None = None
        self.fitted_d = 0

    def setup(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        steps_per_epoch: int,
        epochs: int,
    ) -> None:
        self.model = model
        total = steps_per_epoch * epochs
        self.switch_step = max(2, min(total - 1, round(self.switch_at * total)))
        self.every = max(1, self.switch_step // self.snapshots)
        self.recorder = self._dldr.SnapshotRecorder(model)
        self.opt = None

    def _build(self, subspace: Any) -> torch.optim.Optimizer:
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        if step > self.switch_step:
            return
        if step % self.every == 0 or step == self.switch_step:
            self.recorder.record()
        if step == self.switch_step:
            d = min(self.d, len(self.recorder) - 1)
            subspace = self.recorder.fit(d)
            self.recorder.store.close()
            self.fitted_d = d
            self.opt = self._build(subspace)
            del self.recorder  # the snapshots are no longer needed

    def take_step(self, step: int, closure: Callable[[], Tensor]) -> Tensor | None:
        if self.opt is None:
            return None
        loss: Tensor = self.opt.step(closure)  # type: ignore[arg-type, assignment]
        return loss

    def trainable_share(self, model: nn.Module, dense_params: int) -> float:
        if self.opt is not None:
            return self.fitted_d / dense_params
        return sum(p.numel() for p in model.parameters() if p.requires_grad) / dense_params

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.optimizer_options.items())
        return (
            f"{type(self).__name__}(switch_at={self.switch_at}, d={self.d}, "
            f"snapshots={self.snapshots}{extra})"
        )


@register_method("p-sgd")
class PSGDMethod(_DLDR):
    """P-SGD after the switch (``lr``, ``momentum`` of :class:`lowrank_torch.dldr.SubspaceSGD`)."""

    name = "p-sgd"

    def __init__(
        self,
        switch_at: float = 0.5,
        d: int = 40,
        snapshots: int = 80,
        lr: float = 0.05,
        momentum: float = 0.9,
    ) -> None:
        super().__init__(switch_at, d, snapshots, lr=lr, momentum=momentum)

    def _build(self, subspace: Any) -> torch.optim.Optimizer:
        opt: torch.optim.Optimizer = self._dldr.SubspaceSGD(
            self.model.parameters(), subspace, **self.optimizer_options
        )
        return opt

    def take_step(self, step: int, closure: Callable[[], Tensor]) -> Tensor | None:
        if self.opt is None:
            return None
        loss = closure()
        self.opt.step()
        return loss


@register_method("p-bfgs")
class PBFGSMethod(_DLDR):
    """P-BFGS after the switch (Armijo backtracking on each minibatch; BatchNorm-safe trials)."""

    name = "p-bfgs"

    def _build(self, subspace: Any) -> torch.optim.Optimizer:
        opt: torch.optim.Optimizer = self._dldr.SubspaceBFGS(
            self.model.parameters(), subspace, model=self.model, **self.optimizer_options
        )
        return opt
