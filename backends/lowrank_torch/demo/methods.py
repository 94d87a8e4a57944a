"""Training methods the demo compares, as a registry of small objects that hook into one training loop.

A method is anything with the :class:`Method` protocol: :func:`~lowrank_torch.demo.train.train` builds
the model's optimizer, calls ``setup`` once, ``after_step`` after every ``optimizer.step()``, and
``trainable_share`` at the end (and after each epoch, for the history). A new method is one class and
one :func:`register_method` line::

    @register_method("my-method")
    class MyMethod:
        name = "my-method"
        def __init__(self, **options): ...
        def setup(self, model, optimizer, steps_per_epoch, epochs): ...
        def after_step(self, step): ...
        def trainable_share(self, model, dense_params): ...

Registered now: ``dense`` (plain training) and ``oialr`` (:mod:`lowrank_torch.oialr`, imported only
when an OIALR method is built, so ``dense`` works without it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
from torch import nn

from ..convert import count_trainable

__all__ = [
    "OIALR",
    "Dense",
    "Method",
    "MethodUnavailable",
    "available_methods",
    "make_method",
    "method_names",
    "register_method",
]


@runtime_checkable
class Method(Protocol):
    """What the training loop needs from a method."""

    name: str

    def setup(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        steps_per_epoch: int,
        epochs: int,
    ) -> None:
        """Called once, after the optimizer is built from ``model.parameters()``, before step 1."""

    def after_step(self, step: int) -> None:
        """Called after every ``optimizer.step()``; ``step`` counts from 1."""

    def trainable_share(self, model: nn.Module, dense_params: int) -> float:
        """Trainable scalars now, as a fraction of the dense model's ``dense_params``."""
        ...


# Optional hooks, looked up with getattr by the training loop (a method defines only what it needs):
#
#   take_step(self, step: int, closure: Callable[[], Tensor]) -> Tensor | None
#       Called instead of the plain step, before it. ``closure()`` zeroes the model's gradients,
#       computes this batch's loss, back-propagates and returns it (like torch.optim.LBFGS's
#       closure; it may be called several times, e.g. by a line search). Return None to let the loop
#       take the plain step (closure(); optimizer.step()), or the loss after taking a step yourself
#       (the closure must then have been called at least once).
#   after_epoch(self, epoch: int) -> None
#       Called after every epoch's last step, before the test-set evaluation.
#   evaluation(self, model: nn.Module) -> contextlib.AbstractContextManager[object]
#       The test set is evaluated inside this context (e.g. with averaged weights swapped in).


class MethodUnavailable(ImportError):
    """A registered method whose implementation cannot be imported here."""


_T = TypeVar("_T")
_REGISTRY: dict[str, Callable[..., Method]] = {}


def register_method(name: str) -> Callable[[_T], _T]:
    """Class decorator (or wrapper of any factory) adding a method to the registry under ``name``."""

    def deco(factory: _T) -> _T:
        if name in _REGISTRY:
            raise ValueError(f"a method named {name!r} is already registered")
        _REGISTRY[name] = factory  # type: ignore[assignment]
        return factory

    return deco


def method_names() -> list[str]:
    """Every registered method, in registration order (whether or not it can run here)."""
    return list(_REGISTRY)


def make_method(name: str, **options: Any) -> Method:
    """Build method ``name`` with ``options``; :class:`MethodUnavailable` when it cannot run here."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(_REGISTRY)}") from None
    return factory(**options)


def available_methods() -> list[str]:
    """The registered methods that can be built here with their default options."""
    names = []
    for name in _REGISTRY:
        try:
            make_method(name)
        except MethodUnavailable:
            continue
        names.append(name)
    return names


@register_method("dense")
class Dense:
    """Plain training: every parameter trains, nothing happens between steps."""

    name = "dense"

    def setup(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        steps_per_epoch: int,
        epochs: int,
    ) -> None:
        self._model = model

    def after_step(self, step: int) -> None:
        pass

    def trainable_share(self, model: nn.Module, dense_params: int) -> float:
        return count_trainable(model) / dense_params

    def __repr__(self) -> str:
        return "Dense()"


@register_method("oialr")
class OIALR:
    """OIALR (:class:`lowrank_torch.oialr.OIALR`): full-rank warm-up, switch, shrinking mixing matrices.

    The schedule is given relative to the run, so one setting serves every model and epoch count:

    - ``switch_at``: fraction of all training steps after which every eligible layer switches to
      ``U @ Sigma @ V.T`` form (``OIALRConfig.switch_step``);
    - ``update_every_epochs``: epochs between two rank updates (``OIALRConfig.update_every``, in steps,
      at least 1);
    - ``fraction``: the :class:`lowrank_core.SigmaCutoff` fraction of the rank rule;
    - ``config``: any further :class:`~lowrank_torch.oialr.OIALRConfig` fields (``keep_first``,
      ``keep_last``, ``min_aspect``, ``progressive``, ...), passed through unchanged.
    """

    name = "oialr"

    def __init__(
        self,
        switch_at: float = 0.5,
        update_every_epochs: float = 1.0,
        fraction: float = 0.1,
        **config: Any,
    ) -> None:
        try:
            from lowrank_torch.oialr import OIALR as Controller
            from lowrank_torch.oialr import OIALRConfig
        except ImportError as exc:
            raise MethodUnavailable(
                f"the 'oialr' method needs lowrank_torch.oialr, which cannot be imported: {exc}"
            ) from exc
        if not 0.0 <= switch_at < 1.0:
            raise ValueError(f"`switch_at` must lie in [0, 1), got {switch_at}")
        if update_every_epochs <= 0:
            raise ValueError(f"`update_every_epochs` must be > 0, got {update_every_epochs}")
        self._controller_cls = Controller
        self._config_cls = OIALRConfig
        self.switch_at = float(switch_at)
        self.update_every_epochs = float(update_every_epochs)
        self.fraction = float(fraction)
        self.config = dict(config)
        self.ctrl: Any = None

    def setup(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        steps_per_epoch: int,
        epochs: int,
    ) -> None:
        import lowrank_core

        total = steps_per_epoch * epochs
        cfg = self._config_cls(
            switch_step=max(1, round(self.switch_at * total)),
            update_every=max(1, round(self.update_every_epochs * steps_per_epoch)),
            rule=lowrank_core.SigmaCutoff(self.fraction),
            **self.config,
        )
        self.ctrl = self._controller_cls(model, optimizer, cfg)

    def after_step(self, step: int) -> None:
        self.ctrl.step()

    def trainable_share(self, model: nn.Module, dense_params: int) -> float:
        if self.ctrl is None:
            return count_trainable(model) / dense_params
        return float(self.ctrl.trainable_share(dense_params))

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.config.items())
        return (
            f"OIALR(switch_at={self.switch_at}, update_every_epochs={self.update_every_epochs}, "
            f"fraction={self.fraction}{extra})"
        )


# Methods of other modules register themselves when imported here: DLDR's p-sgd / p-bfgs, CMD's cmd,
# the low-rank initializations lowrank-spectral / lowrank-nonlinear.
from . import methods_cmd, methods_dldr, methods_init  # noqa: E402, F401
