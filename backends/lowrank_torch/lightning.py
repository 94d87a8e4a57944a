"""Lightning callbacks for OIALR, CMD and DLDR (``pip install lowrank-core[lightning]``).

Importing this module imports Lightning (``lightning.pytorch``, or the standalone ``pytorch_lightning``);
``import lowrank_torch`` never does. Each callback configures itself from the Trainer's optimizer (one
optimizer, automatic or manual optimization) and runs on single-process strategies::

    trainer = lightning.Trainer(callbacks=[OIALRCallback(OIALRConfig(switch_step=500))])
    trainer.fit(module)

- :class:`OIALRCallback`: OIALR steps after every *applied* optimizer step (gradient accumulation:
  once per accumulated step; ``precision="16-mixed"``: never after a step the GradScaler skipped, see
  :mod:`lowrank_torch.amp`).
- :class:`CMDCallback`: one CMD ``after_epoch`` at the end of every training epoch (with
  ``CMDConfig(every_n_steps=n)``: ``CMDTracker.step`` after every applied optimizer step); during validation
  the CMD weights are swapped into the model and the trained ones put back afterwards (like Lightning's
  weight-averaging callbacks), so checkpoints always hold the trained weights.
- :class:`DLDRCallback`: snapshots during the first ``record_steps`` optimizer steps, then training
  inside the fitted subspace through the Trainer's optimizer (:class:`~lowrank_torch._callbacks.DLDRConfig`).

Checkpoints: the callbacks' states travel in the checkpoint's ``state_dict`` (entry ``_lowrank_state``):
Lightning restores the model's weights before any callback state, and after an OIALR switch those
weights only fit a model that is already in low-rank form, so the structure is rebuilt while the weights
load (see :mod:`lowrank_torch._callbacks`). ``trainer.fit(module, ckpt_path=...)`` with a freshly built
(dense) module and the same callbacks resumes exactly. (The callbacks' own ``state_dict()`` stays empty:
the state is kept once, with the weights.)
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import torch

from lowrank_core.errors import IntegrationError, ParameterError

from ._callbacks import CMDDriver, DLDRDriver, OIALRDriver, unwrap_optimizer
from .amp import SkippedStepMonitor
from .cmd import CMDConfig
from .dldr import DLDRConfig
from .oialr import OIALR, OIALRConfig


def _import_lightning() -> Any:
    """``lightning.pytorch`` (the unified package), else the standalone ``pytorch_lightning``."""
    try:
        return importlib.import_module("lightning.pytorch")
    except ImportError:  # pragma: no cover - depends on what is installed
        return importlib.import_module("pytorch_lightning")


pl = _import_lightning()
_Callback: Any = pl.Callback

__all__ = [
    "CMDCallback",
    "CMDConfig",
    "DLDRCallback",
    "DLDRConfig",
    "IntegrationError",
    "OIALRCallback",
    "OIALRConfig",
]


def _single_optimizer(trainer: Any) -> torch.optim.Optimizer:
    optimizers = list(trainer.optimizers)
    if len(optimizers) != 1:
        raise ParameterError(
            f"lowrank-core's Lightning callbacks need exactly one optimizer, the Trainer has "
            f"{len(optimizers)}"
        )
    return unwrap_optimizer(optimizers[0])


def _single_process(trainer: Any, what: str) -> None:
    if int(getattr(trainer, "world_size", 1)) > 1:
        raise IntegrationError(
            f"{what} runs on single-process strategies; for DDP use lowrank_torch.sharded, "
            "for FSDP lowrank_torch.fsdp_oialr, in a plain training loop"
        )


def _scaler(trainer: Any) -> Any:
    return getattr(getattr(trainer, "precision_plugin", None), "scaler", None)


class _StepWatch:
    """Tells on ``on_train_batch_end`` whether an optimizer step was applied since the last call."""

    def __init__(self) -> None:
        self.last_step = -1
        self.monitor = SkippedStepMonitor(None)

    def reset(self, trainer: Any) -> None:
        self.last_step = int(trainer.global_step)
        self.monitor = SkippedStepMonitor(_scaler(trainer))

    def stepped(self, trainer: Any) -> tuple[bool, bool]:
        """``(an optimizer step happened, it was skipped by the scaler)``."""
        now = int(trainer.global_step)
        if now == self.last_step:
            return False, False
        self.last_step = now
        return True, self.monitor.step_skipped()


class OIALRCallback(_Callback):
    """OIALR (:class:`lowrank_torch.oialr.OIALR`) driven by a Lightning Trainer."""

    def __init__(self, config: OIALRConfig | None = None) -> None:
        super().__init__()
        self.driver = OIALRDriver(config)
        self._watch = _StepWatch()

    @property
    def controller(self) -> OIALR:
        """The OIALR controller (exists from ``on_fit_start`` on)."""
        if self.driver.controller is None:
            raise IntegrationError("the OIALR controller exists once the fit has started")
        return self.driver.controller

    @property
    def state_key(self) -> str:
        return "lowrank_torch.OIALRCallback"

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            _single_process(trainer, "OIALRCallback")
        self.driver.attach(pl_module)  # every stage: a checkpoint may be loaded (validate, test)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        total = getattr(trainer, "estimated_stepping_batches", None)  # optimizer steps of the fit
        total = int(total) if isinstance(total, int | float) and math.isfinite(total) else None
        self.driver.start(pl_module, _single_optimizer(trainer), total)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._watch.reset(trainer)  # after the checkpoint's loops and scaler were restored

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stepped, skipped = self._watch.stepped(trainer)
        if stepped:
            self.driver.after_step(skipped)


class CMDCallback(_Callback):
    """Online CMD (:class:`lowrank_torch.cmd.CMDTracker`) with the CMD weights swapped in for validation."""

    def __init__(self, config: CMDConfig | None = None) -> None:
        super().__init__()
        self.driver = CMDDriver(config)
        self._watch = _StepWatch()

    @property
    def state_key(self) -> str:
        return "lowrank_torch.CMDCallback"

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            _single_process(trainer, "CMDCallback")
        self.driver.attach(pl_module)  # every stage: a checkpoint may be loaded (validate, test)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.driver.start(pl_module)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._watch.reset(trainer)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.driver.per_step:
            stepped, skipped = self._watch.stepped(trainer)
            if stepped:
                self.driver.after_step(skipped)
            return
        # the epoch's last batch: record before the end-of-epoch validation sees the weights
        total = trainer.num_training_batches
        if isinstance(total, int) and batch_idx + 1 == total:
            self.driver.after_epoch()

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self.driver.swap_in()

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.driver.swap_out()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.driver.swap_out()


class DLDRCallback(_Callback):
    """DLDR: snapshots, then training in the fitted subspace through the Trainer's optimizer."""

    def __init__(self, config: DLDRConfig | None = None) -> None:
        super().__init__()
        self.driver = DLDRDriver(config)
        self._watch = _StepWatch()

    @property
    def state_key(self) -> str:
        return "lowrank_torch.DLDRCallback"

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            _single_process(trainer, "DLDRCallback")
        self.driver.attach(pl_module)  # every stage: a checkpoint may be loaded (validate, test)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        _single_optimizer(trainer)
        self.driver.start(pl_module)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._watch.reset(trainer)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.driver.before_optimizer_step()

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stepped, skipped = self._watch.stepped(trainer)
        if stepped:
            self.driver.after_step(skipped)
