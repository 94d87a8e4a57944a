"""What the Lightning and Hugging Face callbacks share: drivers for OIALR, CMD and DLDR, state carriage.

The framework modules (:mod:`lowrank_torch.lightning`, :mod:`lowrank_torch.hf`) only translate their
trainer's events into the calls below; this module imports neither framework.

**Why the state travels in the model's ``state_dict``.** Both Lightning and the Hugging Face ``Trainer``
load a checkpoint's model weights *before* any callback sees the checkpoint (Lightning: the model, then
the callbacks' states, then the optimizer; the HF Trainer: the weights first of all, in ``train()``).
After an OIALR switch those weights are factors (``sigma``, ``U``, ``V``) that do not fit a freshly built
dense model, so the low-rank structure must be rebuilt *while* the model loads. :class:`StateCarrier`
does that: it registers an empty persistent buffer ``_lowrank_state`` on the model, fills it (in the
``state_dict`` only) with the callbacks' states (``torch.save`` bytes as a ``uint8`` tensor, so that
safetensors can hold it too), and a ``load_state_dict`` pre-hook hands the saved states to the callbacks
before the model's own tensors are loaded. The OIALR driver then rebuilds the structure exactly as
:meth:`lowrank_torch.oialr.OIALR.load_state_dict` does, with a stand-in optimizer that records the
training run's parameter order; when the trainer's real optimizer exists, its parameters are put in that
order, so the saved optimizer state fits position by position.
"""

from __future__ import annotations

import io
from contextlib import ExitStack
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from lowrank_core.dldr import Subspace
from lowrank_core.errors import (
    CheckpointError,
    IntegrationError,
    ParameterError,
    ParameterTypeError,
)

from .amp import full_precision
from .cmd import CMDConfig, CMDTracker
from .dldr import DLDRConfig, SnapshotRecorder, SubspaceParametrization
from .oialr import OIALR, OIALRConfig

__all__ = [
    "STATE_KEY",
    "CMDDriver",
    "DLDRConfig",
    "DLDRDriver",
    "OIALRDriver",
    "StateCarrier",
    "unwrap_optimizer",
]

#: name of the buffer (and ``state_dict`` key) that carries the callbacks' states
STATE_KEY = "_lowrank_state"


class _Client(Protocol):
    name: str

    def export_state(self) -> Any: ...

    def import_state(self, state: Any) -> None: ...


def _encode(obj: Any) -> Tensor:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def _decode(t: Tensor) -> Any:
    data = bytes(t.detach().cpu().to(torch.uint8).numpy().tobytes())
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


class StateCarrier:
    """Carries the states of the lowrank-core callbacks attached to ``model`` in its ``state_dict``.

    One carrier per model (:meth:`attach` returns the existing one). Each client (a driver below) has a
    unique ``name``, ``export_state()`` (called by ``model.state_dict()``) and ``import_state(state)``
    (called by ``model.load_state_dict()`` before any tensor is loaded; only for a saved state).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.clients: dict[str, _Client] = {}
        if STATE_KEY not in dict(model.named_buffers(recurse=False)):
            model.register_buffer(STATE_KEY, torch.zeros(0, dtype=torch.uint8), persistent=True)

        # plain functions: torch marks public-API hooks with an attribute, which a bound method refuses
        def save_hook(*args: Any) -> None:
            self._save_hook(*args)

        def load_hook(*args: Any) -> None:
            self._load_hook(*args)

        model.register_state_dict_post_hook(save_hook)  # type: ignore[no-untyped-call]
        model.register_load_state_dict_pre_hook(load_hook)  # type: ignore[no-untyped-call]

    @classmethod
    def attach(cls, model: nn.Module) -> StateCarrier:
        existing = getattr(model, "_lowrank_carrier", None)
        if isinstance(existing, StateCarrier):
            return existing
        carrier = cls(model)
        object.__setattr__(model, "_lowrank_carrier", carrier)
        return carrier

    def add(self, client: _Client) -> None:
        if client.name in self.clients and self.clients[client.name] is not client:
            raise ParameterError(
                f"a lowrank-core callback named {client.name!r} is already attached"
            )
        self.clients[client.name] = client

    def _save_hook(
        self, module: nn.Module, state_dict: Any, prefix: str, local_metadata: Any
    ) -> None:
        states = {name: c.export_state() for name, c in self.clients.items()}
        state_dict[prefix + STATE_KEY] = _encode({"format": "lowrank_torch.callbacks/1", **states})

    def _load_hook(
        self,
        module: nn.Module,
        state_dict: Any,
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + STATE_KEY
        blob = state_dict.get(key)
        if blob is None:
            return
        state_dict[key] = torch.zeros(0, dtype=torch.uint8)  # fits the (empty) buffer
        if blob.numel() == 0:
            return
        saved = _decode(blob)
        if not isinstance(saved, dict) or saved.get("format") != "lowrank_torch.callbacks/1":
            raise CheckpointError(
                f"the {STATE_KEY!r} entry of this state_dict is not a lowrank-core state"
            )
        for name, client in self.clients.items():
            if saved.get(name) is not None:
                client.import_state(saved[name])


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` inside a wrapper (Lightning's, accelerate's) or itself."""
    seen = 0
    while not isinstance(optimizer, torch.optim.Optimizer) and seen < 8:
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None:
            break
        optimizer, seen = inner, seen + 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ParameterTypeError(f"no torch.optim.Optimizer found in {type(optimizer).__name__}")
    return optimizer


# ==================================================================================================
# OIALR
# ==================================================================================================
class OIALRDriver:
    """OIALR for a trainer: created on the trainer's optimizer, stepped after every applied step."""

    name = "oialr"

    def __init__(self, config: OIALRConfig | None = None) -> None:
        self.config = config or OIALRConfig()
        self.controller: OIALR | None = None
        self.model: nn.Module | None = None
        self._order: list[Tensor] | None = None  # training run's parameter order (after a resume)

    def attach(self, model: nn.Module) -> None:
        """Register on ``model`` (before any checkpoint is loaded into it)."""
        self.model = model
        StateCarrier.attach(model).add(self)

    def start(self, model: nn.Module, optimizer: Any, total_steps: int | None = None) -> OIALR:
        """Bind to the trainer's optimizer (a new controller, or the one rebuilt from a checkpoint).

        ``total_steps``: the trainer's number of optimizer steps; it sets
        :attr:`~lowrank_core.oialr.OIALRConfig.total_steps` unless the config has it, so that
        ``switch_fraction`` and a budget's ``reach_at`` are fractions of this run."""
        opt = unwrap_optimizer(optimizer)
        if self.controller is None:
            if self.config.total_steps is None and total_steps is not None and total_steps > 0:
                self.config = self.config.for_run(total_steps)
            self.controller = OIALR(model, opt, self.config)
            return self.controller
        ctrl = self.controller
        if ctrl.optimizer is not opt:
            _adopt_order(opt, self._order or [])
            ctrl.optimizer = opt
        return ctrl

    def after_step(self, skipped: bool = False) -> bool:
        """One applied optimizer step (``skipped=True``: the scaler skipped it, nothing is done)."""
        if self.controller is None:
            raise IntegrationError("the OIALR callback was not started (no optimizer bound yet)")
        if skipped:
            return False
        with full_precision(self.controller.model):
            self.controller.step()
        return self.controller.structure_changed

    def export_state(self) -> Any:
        if self.controller is None:
            return None
        return {**self.controller.state_dict(), "total_steps": self.controller.config.total_steps}

    def import_state(self, state: Any) -> None:
        if self.model is None:
            raise IntegrationError("the OIALR driver is not attached to a model")
        if self.controller is not None and self.controller.switched:
            # the model is already in low-rank form (e.g. a checkpoint loaded mid-run): keep it
            if self.controller.state_dict()["switched"] != state.get("switched"):
                raise ParameterError(
                    "cannot load an OIALR checkpoint into a model that already switched other layers"
                )
            return
        stand_in = torch.optim.SGD([p for p in self.model.parameters() if p.requires_grad], lr=0.0)
        total = state.get("total_steps") if isinstance(state, dict) else None
        if self.config.total_steps is None and isinstance(total, int) and total > 0:
            self.config = self.config.for_run(total)  # the run's length, as the saved run knew it
        ctrl = OIALR(self.model, stand_in, self.config)
        ctrl.load_state_dict(state)  # rebuilds the structure; checks the state first
        self._order = [p for g in stand_in.param_groups for p in g["params"]]
        self.controller = ctrl


def _adopt_order(optimizer: torch.optim.Optimizer, order: list[Tensor]) -> None:
    """Sort each param group of ``optimizer`` by the training run's parameter order."""
    index = {id(p): i for i, p in enumerate(order)}
    for group in optimizer.param_groups:
        params = list(group["params"])
        known = sorted((p for p in params if id(p) in index), key=lambda p: index[id(p)])
        group["params"] = known + [p for p in params if id(p) not in index]


# ==================================================================================================
# CMD
# ==================================================================================================
class CMDDriver:
    """Online CMD for a trainer: one ``after_epoch`` per epoch (or ``step`` per applied optimizer step
    with ``CMDConfig.every_n_steps``), CMD weights swapped in for evaluation."""

    name = "cmd"

    def __init__(self, config: CMDConfig | None = None) -> None:
        self.config = config or CMDConfig()
        self.tracker: CMDTracker | None = None
        self._pending: dict[str, Any] | None = None
        self._swap: ExitStack | None = None

    def attach(self, model: nn.Module) -> None:
        StateCarrier.attach(model).add(self)

    def start(self, model: nn.Module) -> CMDTracker:
        if self.tracker is None:
            self.tracker = CMDTracker(model, self.config)
        if self._pending is not None:
            self.tracker.load_state_dict(self._pending)
            self._pending = None
        return self.tracker

    @property
    def per_step(self) -> bool:
        """Whether the config asks for the per-step cadence (``CMDConfig.every_n_steps``)."""
        return self.config.every_n_steps is not None

    def after_epoch(self) -> None:
        """End of a training epoch: one time point in the per-epoch cadence, else nothing."""
        if self.tracker is None:
            raise IntegrationError("the CMD callback was not started")
        if not self.per_step:
            with full_precision():
                self.tracker.after_epoch()

    def after_step(self, skipped: bool = False) -> None:
        """After an applied optimizer step: :meth:`CMDTracker.step` in the per-step cadence.

        A step the GradScaler skipped changed no weight and is not counted.
        """
        if self.tracker is None:
            raise IntegrationError("the CMD callback was not started")
        if self.per_step and not skipped:
            with full_precision():
                self.tracker.step()

    @property
    def swapped_in(self) -> bool:
        return self._swap is not None

    def swap_in(self) -> bool:
        """Put the CMD weights into the model (until :meth:`swap_out`); ``False`` before the fit."""
        if self._swap is not None or self.tracker is None or not self.tracker.fitted:
            return False
        stack = ExitStack()
        with full_precision():
            stack.enter_context(self.tracker.swapped())
        self._swap = stack
        return True

    def swap_out(self) -> None:
        """Put the trained weights back (a no-op when the CMD weights are not in)."""
        if self._swap is not None:
            stack, self._swap = self._swap, None
            stack.close()

    def export_state(self) -> Any:
        if self.tracker is None:
            return self._pending
        return self.tracker.state_dict()

    def import_state(self, state: Any) -> None:
        if self.tracker is not None:
            self.tracker.load_state_dict(state)
        else:
            self._pending = state


# ==================================================================================================
# DLDR
# ==================================================================================================
class DLDRDriver:
    """DLDR for a trainer: snapshots during ``record_steps`` steps, then projected (subspace) training."""

    name = "dldr"

    def __init__(self, config: DLDRConfig | None = None) -> None:
        self.config = config or DLDRConfig()
        self.model: nn.Module | None = None
        self.recorder: SnapshotRecorder | None = None
        self.subspace: SubspaceParametrization | None = None
        self.steps = 0
        self._pending: dict[str, Any] | None = None

    def attach(self, model: nn.Module) -> None:
        StateCarrier.attach(model).add(self)

    @property
    def phase(self) -> str:
        """``"record"`` or ``"subspace"``."""
        return "record" if self.subspace is None else "subspace"

    def start(self, model: nn.Module) -> None:
        self.model = model
        if self.recorder is None:
            self.recorder = SnapshotRecorder(model, every=self.config.every)
        if self._pending is not None:
            self._restore(self._pending)
            self._pending = None
        elif self.steps == 0 and len(self.recorder) == 0:
            self.recorder.record()  # w_0

    def before_optimizer_step(self) -> None:
        """Project the gradients onto the subspace (subspace phase only)."""
        sp = self.subspace
        if sp is None:
            return
        with torch.no_grad(), full_precision():
            g = sp.subspace.lift_direction(sp.coordinate_grad())
            offset = 0
            for p in sp.params:
                n = p.numel()
                if p.grad is not None:
                    p.grad.copy_(g[offset : offset + n].view_as(p))
                offset += n

    def after_step(self, skipped: bool = False) -> None:
        """One applied optimizer step: record / fit (recording), or project the weights back."""
        if self.recorder is None:
            raise IntegrationError("the DLDR callback was not started")
        if skipped:
            return
        if self.subspace is not None:
            with torch.no_grad(), full_precision():
                self.subspace.set(self.subspace.coordinates())
            return
        self.steps += 1
        self.recorder.step()
        if self.steps >= self.config.record_steps:
            with full_precision():
                fitted = self.recorder.fit(self.config.dim)
            self.subspace = SubspaceParametrization(self.recorder.params, fitted)
            self.recorder.store.close()

    def export_state(self) -> Any:
        if self.recorder is None:
            return self._pending
        out: dict[str, Any] = {"steps": self.steps, "calls": self.recorder._calls}
        if self.subspace is None:
            store = self.recorder.store
            out["snapshots"] = (
                torch.stack([torch.as_tensor(store.snapshot(i)) for i in range(len(store))])
                if len(store)
                else None
            )
        else:
            out["subspace"] = {
                **self.subspace.subspace.state_dict(),
                "origin": self.subspace.origin,
            }
        return out

    def import_state(self, state: Any) -> None:
        if self.recorder is not None:
            self._restore(state)
        else:
            self._pending = state

    def _restore(self, state: dict[str, Any]) -> None:
        assert self.recorder is not None
        self.steps = int(state["steps"])
        self.recorder = SnapshotRecorder(self.recorder.model, every=self.config.every)
        self.recorder._calls = int(state["calls"])
        self.subspace = None
        if "subspace" in state:
            s = dict(state["subspace"])
            origin = s.pop("origin")
            sub = Subspace.from_state_dict(s)  # checked: CheckpointError for a damaged entry
            self.subspace = SubspaceParametrization(self.recorder.params, sub, origin)
        elif state.get("snapshots") is not None:
            for row in state["snapshots"]:
                self.recorder.store.add(row)
