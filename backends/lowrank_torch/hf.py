"""Hugging Face ``Trainer`` callbacks for OIALR, CMD and DLDR (``pip install lowrank-core[transformers]``).

Importing this module imports ``transformers``; ``import lowrank_torch`` never does. Pass the callbacks
to the Trainer when you build it (``Trainer(..., callbacks=[OIALRTrainerCallback(config)])``): they
register on the model in ``on_init_end``, before the Trainer can load a checkpoint into it. Each one
configures itself from the Trainer's optimizer (accelerate's wrapper is looked through) on
``on_train_begin``::

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[OIALRTrainerCallback(OIALRConfig(switch_step=500))])
    trainer.train()                                  # or trainer.train(resume_from_checkpoint=True)

- :class:`OIALRTrainerCallback`: OIALR steps after every optimizer step the Trainer applied
  (``on_step_end``: once per gradient-accumulation cycle; never after a step the fp16 GradScaler
  skipped, read from accelerate's ``optimizer.step_was_skipped``).
- :class:`CMDTrainerCallback`: one CMD ``after_epoch`` per epoch (``on_epoch_end``; with
  ``CMDConfig(every_n_steps=n)``: ``CMDTracker.step`` in every ``on_step_end``); when the Trainer is
  about to evaluate, the CMD weights are swapped in, and the trained ones put back when the evaluation
  ends (``on_evaluate``), before any checkpoint is written.
- :class:`DLDRTrainerCallback`: snapshots during the first ``record_steps`` optimizer steps, then the
  Trainer's optimizer trains inside the fitted subspace (gradients projected in
  ``on_pre_optimizer_step``, weights projected back in ``on_step_end``;
  :class:`~lowrank_torch._callbacks.DLDRConfig`).

Checkpoints: the callbacks' states are saved inside the model's weights file (entry ``_lowrank_state``,
a ``uint8`` tensor, so safetensors holds it): the Trainer loads the weights first of all when it resumes,
and after an OIALR switch those only fit a model in low-rank form, so the structure is rebuilt while the
weights load (:mod:`lowrank_torch._callbacks`). ``trainer.train(resume_from_checkpoint=...)`` on a
freshly built dense model resumes exactly. Single-process training only (no DDP/FSDP/DeepSpeed here).
"""

from __future__ import annotations

import importlib
from typing import Any

from lowrank_core.errors import IntegrationError

from ._callbacks import CMDDriver, DLDRDriver, OIALRDriver
from .cmd import CMDConfig
from .dldr import DLDRConfig
from .oialr import OIALR, OIALRConfig

__all__ = [
    "CMDConfig",
    "CMDTrainerCallback",
    "DLDRConfig",
    "DLDRTrainerCallback",
    "IntegrationError",
    "OIALRConfig",
    "OIALRTrainerCallback",
]

_TrainerCallback: Any = importlib.import_module("transformers").TrainerCallback


def _skipped(optimizer: Any) -> bool:
    return bool(getattr(optimizer, "step_was_skipped", False))


def _single_process(args: Any, what: str) -> None:
    if int(getattr(args, "world_size", 1)) > 1:
        raise IntegrationError(
            f"{what} runs on single-process training; for DDP use lowrank_torch.sharded, "
            "for FSDP lowrank_torch.fsdp_oialr, in a plain training loop"
        )


class _Base(_TrainerCallback):
    driver: Any

    def __init__(self) -> None:
        super().__init__()
        self._attached = False

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs.get("model")
        if model is not None:
            self.driver.attach(model)
            self._attached = True

    def _begin(self, args: Any, state: Any, model: Any) -> None:
        _single_process(args, type(self).__name__)
        if not self._attached:
            if int(getattr(state, "global_step", 0)) > 0:
                raise IntegrationError(
                    f"{type(self).__name__} was added after the Trainer was built and the run resumes "
                    "from a checkpoint: pass it in Trainer(callbacks=[...]) so that it sees the "
                    "checkpoint's weights load"
                )
            self.driver.attach(model)
            self._attached = True


class OIALRTrainerCallback(_Base):
    """OIALR (:class:`lowrank_torch.oialr.OIALR`) driven by a Hugging Face Trainer."""

    def __init__(self, config: OIALRConfig | None = None) -> None:
        super().__init__()
        self.driver = OIALRDriver(config)

    @property
    def controller(self) -> OIALR:
        """The OIALR controller (exists from ``on_train_begin`` on, or once a checkpoint loaded)."""
        driver: OIALRDriver = self.driver
        if driver.controller is None:
            raise IntegrationError("the OIALR controller exists once training has begun")
        return driver.controller

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._begin(args, state, kwargs["model"])
        total = getattr(state, "max_steps", None)  # the Trainer's optimizer steps of this run
        self.driver.start(
            kwargs["model"], kwargs["optimizer"], total if isinstance(total, int) else None
        )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.driver.after_step(_skipped(kwargs.get("optimizer")))


class CMDTrainerCallback(_Base):
    """Online CMD with the CMD weights swapped in for the Trainer's evaluations."""

    def __init__(self, config: CMDConfig | None = None) -> None:
        super().__init__()
        self.driver = CMDDriver(config)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._begin(args, state, kwargs["model"])
        self.driver.start(kwargs["model"])

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.driver.after_step(_skipped(kwargs.get("optimizer")))
        if getattr(control, "should_evaluate", False):
            self.driver.swap_in()

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.driver.swap_out()
        self.driver.after_epoch()
        if getattr(control, "should_evaluate", False):
            self.driver.swap_in()

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.driver.swap_out()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.driver.swap_out()


class DLDRTrainerCallback(_Base):
    """DLDR: snapshots, then training in the fitted subspace through the Trainer's optimizer."""

    def __init__(self, config: DLDRConfig | None = None) -> None:
        super().__init__()
        self.driver = DLDRDriver(config)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._begin(args, state, kwargs["model"])
        self.driver.start(kwargs["model"])

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.driver.before_optimizer_step()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.driver.after_step(_skipped(kwargs.get("optimizer")))
