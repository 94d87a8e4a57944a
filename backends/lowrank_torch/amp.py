"""Mixed precision around lowrank-core: full-precision structure changes, skipped scaler steps.

Two rules keep OIALR, DLDR and CMD correct under ``torch.autocast`` and ``torch.amp.GradScaler``:

1. **Structure changes run in full precision.** The switch, the rank updates and the optimizer-state
   rotations are SVDs and matrix products. Inside an autocast region the products would run in
   float16/bfloat16 (autocast casts ``matmul`` inputs), and the new bases would lose orthogonality.
   :func:`full_precision` turns autocast off for the block; :meth:`lowrank_torch.oialr.OIALR.step` runs
   in it, so it is safe to call from inside an autocast region. Half-precision *parameters*
   (``model.half()`` / ``model.bfloat16()``) are handled by ``lowrank_core`` itself: the SVDs are computed
   in float32 and the factors cast back to the parameters' dtype.

2. **A step the scaler skipped is not a training step.** ``GradScaler.step`` does not call the optimizer
   when the scaled gradients hold inf/NaN, and ``GradScaler.update`` then lowers the scale (by its
   ``backoff_factor`` < 1); it never lowers it otherwise. :class:`SkippedStepMonitor` reads that signal:
   call :meth:`~SkippedStepMonitor.step_skipped` once after every ``scaler.update()`` and call the
   controller's ``step()`` only when it returns ``False``. The controller's step count then counts
   applied optimizer steps, and no stability check, switch or rank update is ever made from a step whose
   gradients overflowed. The Lightning and Hugging Face callbacks do this for you.

Plain loop::

    scaler = torch.amp.GradScaler("cpu")
    skips = SkippedStepMonitor(scaler)
    for x, y in data:
        with torch.autocast("cpu", dtype=torch.float16):
            loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if not skips.step_skipped():
            ctrl.step()
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["SkippedStepMonitor", "full_precision"]


def _device_types(module: nn.Module | None) -> list[str]:
    types = {"cpu"}
    if module is not None:
        types |= {p.device.type for p in module.parameters()}
        types |= {b.device.type for b in module.buffers()}
    return sorted(types)


@contextmanager
def full_precision(module: nn.Module | None = None) -> Iterator[None]:
    """Autocast off (for the CPU and every device type ``module`` lives on) inside the block."""
    with ExitStack() as stack:
        for device_type in _device_types(module):
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        yield


class SkippedStepMonitor:
    """Tells, after each ``scaler.update()``, whether the scaler skipped that optimizer step.

    ``scaler`` is a ``torch.amp.GradScaler`` (or anything with ``get_scale()`` and ``is_enabled()``;
    ``None`` or a disabled scaler never skips). The rule: the scale went down since the previous call.
    ``GradScaler.update`` lowers the scale exactly when the step found inf/NaN gradients (and so was
    skipped); growth after ``growth_interval`` clean steps raises it. Call :meth:`step_skipped` exactly
    once per optimizer step, after ``scaler.update()``.
    """

    def __init__(self, scaler: Any) -> None:
        self.scaler = scaler
        self._last = self._scale()
        #: number of skipped steps seen so far
        self.skipped = 0

    def _scale(self) -> float | None:
        s = self.scaler
        if s is None or not bool(s.is_enabled()):
            return None
        return float(s.get_scale())

    def step_skipped(self) -> bool:
        """Whether the step just finished was skipped (the scale fell since the last call)."""
        now = self._scale()
        skipped = now is not None and self._last is not None and now < self._last
        self._last = now
        self.skipped += int(skipped)
        return skipped

    def reset(self) -> None:
        """Forget the last seen scale (e.g. after the scaler's state was loaded from a checkpoint)."""
        self._last = self._scale()
