"""DLDR for PyTorch: record snapshots of a model, train in the subspace with P-SGD or P-BFGS.

Every piece of math (the snapshot store and its Gram matrix, PCA, projection and lifting, the BFGS
update, the Armijo line search, the P-BFGS step policy of :mod:`lowrank_core.dldr.pbfgs`) is
:mod:`lowrank_core.dldr`, called on torch tensors. This module
adds what touches ``nn.Module`` and ``torch.optim``:

* :class:`SnapshotRecorder`: flattens the trainable parameters (BatchNorm buffers only on request)
  into a :class:`~lowrank_core.dldr.SnapshotStore` every ``every`` calls of :meth:`~SnapshotRecorder.step`
  (or on demand with :meth:`~SnapshotRecorder.record`, e.g. once per epoch);
* :class:`SubspaceParametrization`: the parameters as ``w = w0 + P^T c``; :meth:`set` writes them from
  ``c``, :meth:`coordinate_grad` is ``P g``;
* :class:`SubspaceSGD` and :class:`SubspaceBFGS`: ``torch.optim.Optimizer`` subclasses over the model's parameters
  and a subspace. ``P`` lives in memory as one tensor on the parameters' device: there is no disk I/O
  per step or per line-search trial. :class:`SubspaceBFGS` keeps BatchNorm running statistics exactly as
  they were after the step's first (real) forward: trial forwards are undone (pass ``model=``).

Under DistributedDataParallel every rank holds the same ``P`` and DDP averages the gradients, so the
P-SGD steps are identical on every rank. P-BFGS's line search also compares loss values, which differ
per rank; they are averaged over the process group (``all_reduce``) before each comparison, so every
rank accepts the same step length and the steps stay identical.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lowrank_core._array import check_device
from lowrank_core._validate import check_bool, check_float, check_int, describe
from lowrank_core.dldr import (
    BFGSState,
    SnapshotStore,
    Subspace,
    armijo_backtracking,
    bfgs_step_direction,
    bfgs_step_finish,
)
from lowrank_core.errors import (
    DeviceMismatchError,
    DTypeError,
    NonFiniteError,
    ParameterError,
    ParameterTypeError,
    ShapeError,
)

__all__ = [
    "DLDRConfig",
    "SnapshotRecorder",
    "SubspaceBFGS",
    "SubspaceParametrization",
    "SubspaceSGD",
    "batchnorm_buffers",
    "flat_grad",
    "flatten",
    "preserve_batchnorm",
]


def _tensors(tensors: Any, name: str) -> list[Tensor]:
    if isinstance(tensors, Tensor):
        raise ParameterTypeError(
            f"`{name}` must be an iterable of tensors, got a single tensor; wrap it in a list"
        )
    try:
        out = list(tensors)
    except TypeError:
        raise ParameterTypeError(
            f"`{name}` must be an iterable of tensors, got {describe(tensors)}"
        ) from None
    if not out:
        raise ParameterError(f"`{name}` is empty: nothing to flatten")
    for i, t in enumerate(out):
        if not isinstance(t, Tensor):
            raise ParameterTypeError(f"`{name}[{i}]` must be a tensor, got {describe(t)}")
    return out


def flatten(tensors: Iterable[Tensor]) -> Tensor:
    """One detached 1-D tensor of all ``tensors``' entries, in order."""
    return torch.cat([t.detach().reshape(-1) for t in _tensors(tensors, "tensors")])


def flat_grad(params: Iterable[Tensor]) -> Tensor:
    """The parameters' gradients as one 1-D tensor (zeros where a gradient is None)."""
    return torch.cat(
        [
            (p.grad.detach() if p.grad is not None else torch.zeros_like(p)).reshape(-1)
            for p in _tensors(params, "params")
        ]
    )


def _assign(params: list[Tensor], vec: Tensor) -> None:
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(vec[offset : offset + n].view_as(p))
            offset += n


def batchnorm_buffers(model: nn.Module) -> list[Tensor]:
    """The running statistics (mean, var, batch count) of every BatchNorm layer of ``model``."""
    out: list[Tensor] = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            out += [
                b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None
            ]
    return out


@contextmanager
def preserve_batchnorm(model: nn.Module | None) -> Iterator[Callable[[], None]]:
    """Save BatchNorm buffers now; yield a ``restore()`` callable; restore on exit too."""
    buffers = batchnorm_buffers(model) if model is not None else []
    saved = [b.detach().clone() for b in buffers]

    def restore() -> None:
        with torch.no_grad():
            for b, s in zip(buffers, saved, strict=True):
                b.copy_(s)

    try:
        yield restore
    finally:
        restore()


@dataclass(frozen=True)
class DLDRConfig:
    """Settings of the DLDR trainer callbacks (``lowrank_torch.lightning.DLDRCallback``,
    ``lowrank_torch.hf.DLDRTrainerCallback``).

    - ``record_steps``: optimizer steps of ordinary training during which snapshots are recorded;
    - ``every``: a snapshot every ``every`` steps (plus one at the start);
    - ``dim``: dimension ``d`` of the subspace fitted at the end of the recording (at most the number
      of snapshots minus one).

    After the recording, training continues inside the affine subspace ``w_T + span(P^T)`` through the
    trainer's own optimizer: each gradient is projected, ``g <- P^T P g``, before the optimizer step and
    each step's result is projected back onto the subspace afterwards, so the iterates stay in the
    subspace whatever the optimizer. With SGD and momentum the steps are P-SGD's
    (:class:`lowrank_torch.dldr.SubspaceSGD`) except for the momentum carried over from the recording
    phase, whose out-of-subspace part the projection of the weights removes; with another optimizer
    (Adam, weight decay) it is that optimizer projected onto the subspace.
    """

    record_steps: int = 100
    every: int = 1
    dim: int = 10

    def __post_init__(self) -> None:
        for name in ("record_steps", "every", "dim"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), min=1))
        snapshots = 1 + self.record_steps // self.every
        if self.dim > snapshots - 1:
            raise ParameterError(
                f"`dim`={self.dim} needs at least {self.dim + 1} snapshots; record_steps="
                f"{self.record_steps} and every={self.every} give {snapshots}"
            )


class SnapshotRecorder:
    """Snapshots of ``model``'s trainable parameters, flattened, into ``store``.

    ``every``: :meth:`step` records on every ``every``-th call (call it after each optimizer step);
    :meth:`record` records now (e.g. at the end of each epoch). ``include_buffers=True`` appends the
    floating BatchNorm running statistics (excluded by default: they are not trained, and a subspace
    for P-SGD / P-BFGS must cover exactly the parameters). ``store`` defaults to an in-memory
    :class:`~lowrank_core.dldr.SnapshotStore`; pass ``SnapshotStore(path=...)`` to keep them on disk.
    """

    def __init__(
        self,
        model: nn.Module,
        store: SnapshotStore | None = None,
        *,
        every: int = 1,
        include_buffers: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ParameterTypeError(f"`model` must be an nn.Module, got {describe(model)}")
        if store is not None and not isinstance(store, SnapshotStore):
            raise ParameterTypeError(
                f"`store` must be a SnapshotStore or None, got {describe(store)}"
            )
        self.every = check_int("every", every, min=1)
        self.include_buffers = check_bool("include_buffers", include_buffers)
        for name, p in model.named_parameters():
            check_device(p, f"model parameter {name}")
        self.model = model
        self.store = SnapshotStore() if store is None else store
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._calls = 0

    def tensors(self) -> list[Tensor]:
        """What one snapshot is made of, in order."""
        out: list[Tensor] = list(self.params)
        if self.include_buffers:
            out += [b for b in batchnorm_buffers(self.model) if b.is_floating_point()]
        return out

    def record(self) -> None:
        """Add a snapshot now."""
        self.store.add(flatten(self.tensors()))

    def step(self) -> bool:
        """Count one call; record on every ``every``-th. Returns whether it recorded.

        A call whose recording raises (a NaN weight, a closed store) does not count, so the cadence
        continues where it was once the cause is fixed.
        """
        if (self._calls + 1) % self.every == 0:
            self.record()
            self._calls += 1
            return True
        self._calls += 1
        return False

    def __len__(self) -> int:
        return len(self.store)

    def fit(self, d: int, **options: Any) -> Subspace:
        """The top-``d`` subspace of the recorded snapshots (:meth:`SnapshotStore.fit`)."""
        return self.store.fit(d, **options)


class SubspaceParametrization:
    """Parameters ``params`` as ``w = origin + P^T c`` (``origin``: their current values by default).

    ``P`` (the subspace's basis) is moved once to the parameters' device and dtype. :meth:`set` writes
    the parameters from coordinates ``c``; :meth:`coordinate_grad` is ``P g`` from their gradients.
    """

    def __init__(
        self, params: Iterable[Tensor], subspace: Subspace, origin: Tensor | None = None
    ) -> None:
        self.params = _tensor_list(params)
        if not isinstance(subspace, Subspace):
            raise ParameterTypeError(
                f"`subspace` must be a lowrank_core.dldr.Subspace, got {describe(subspace)}"
            )
        total = sum(p.numel() for p in self.params)
        if subspace.dim != total:
            raise ShapeError(
                f"the subspace has dimension D = {subspace.dim}, but the parameters have {total} "
                "entries (was it recorded with include_buffers=True, or from another model?)"
            )
        first = self.params[0]
        dev, dt = first.device, first.dtype
        basis = torch.as_tensor(subspace.basis).to(device=dev, dtype=dt)
        centre = torch.as_tensor(subspace.centre).to(device=dev, dtype=dt)
        ev = torch.as_tensor(subspace.explained_variance).to(device=dev, dtype=dt)
        for name, x in (("basis", basis), ("centre", centre)):
            if not bool(torch.isfinite(x).all()):
                raise NonFiniteError(f"the subspace's `{name}` contains NaN or Inf")
        self.subspace = Subspace(centre, basis, ev, subspace.total_variance, subspace.num_snapshots)
        if origin is None:
            self.origin = flatten(self.params).clone()
        else:
            if not isinstance(origin, Tensor):
                raise ParameterTypeError(
                    f"`origin` must be a tensor or None, got {describe(origin)}"
                )
            if tuple(origin.shape) != (total,):
                raise ShapeError(f"`origin` must have shape ({total},), got {tuple(origin.shape)}")
            if not origin.is_floating_point():
                raise DTypeError(f"`origin` must be a floating tensor, got {origin.dtype}")
            if not bool(torch.isfinite(origin).all()):
                raise NonFiniteError("`origin` contains NaN or Inf")
            self.origin = origin.detach().to(dev, dt)

    @property
    def d(self) -> int:
        return self.subspace.d

    def weights(self, c: Tensor) -> Tensor:
        """``origin + P^T c``."""
        out: Tensor = self.subspace.lift(c, origin=self.origin)
        return out

    def set(self, c: Tensor) -> None:
        """Write ``origin + P^T c`` into the parameters."""
        _assign(self.params, self.weights(c))

    def coordinates(self) -> Tensor:
        """``P (w - origin)`` of the parameters' current values."""
        out: Tensor = self.subspace.project(flatten(self.params), origin=self.origin)
        return out

    def coordinate_grad(self) -> Tensor:
        """``P g``: the gradient with respect to ``c``."""
        out: Tensor = self.subspace.project_direction(flat_grad(self.params))
        return out


def _param_input(params: Any) -> list[Any]:
    """What ``torch.optim.Optimizer`` takes (tensors, or one param-group dict), as a list."""
    if isinstance(params, Tensor):
        raise ParameterTypeError(
            "`params` must be an iterable of tensors (e.g. model.parameters()), got a single tensor; "
            "wrap it in a list"
        )
    try:
        out = list(params)
    except TypeError:
        raise ParameterTypeError(
            f"`params` must be an iterable of tensors, got {describe(params)}"
        ) from None
    if not out:
        raise ParameterError("`params` is empty: no parameters given")
    return out


def _tensor_list(params: Any) -> list[Tensor]:
    """``params`` as a list of floating tensors on one device (refusing what the subspace cannot hold)."""
    out = _param_input(params)
    for i, p in enumerate(out):
        if not isinstance(p, Tensor):
            raise ParameterTypeError(f"`params[{i}]` must be a tensor, got {describe(p)}")
        if not p.is_floating_point():
            raise DTypeError(f"`params[{i}]` must be a floating tensor, got {p.dtype}")
        if p.device != out[0].device:
            raise DeviceMismatchError(
                f"every parameter must live on one device: `params[0]` is on {out[0].device}, "
                f"`params[{i}]` on {p.device}"
            )
    return out


def _single_group(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    if len(optimizer.param_groups) != 1:
        raise ParameterError(
            f"{type(optimizer).__name__} takes a single parameter group, got "
            f"{len(optimizer.param_groups)}"
        )
    return list(optimizer.param_groups[0]["params"])


def _check_sgd_group(group: dict[str, Any]) -> None:
    """The hyper-parameters of a SubspaceSGD group (also when changed later, e.g. by a scheduler)."""
    check_float("lr", group["lr"], min=0.0)
    check_float("momentum", group["momentum"], min=0.0, max=1.0, max_open=True)
    check_float("weight_decay", group["weight_decay"], min=0.0)


def _check_bfgs_group(group: dict[str, Any]) -> None:
    check_float("alpha0 (the group's lr)", group["lr"], min=0.0, min_open=True)
    check_float("shrink", group["shrink"], min=0.0, max=1.0, min_open=True, max_open=True)
    check_float("c1", group["c1"], min=0.0, max=1.0, min_open=True, max_open=True)
    check_int("max_trials", group["max_trials"], min=1)


class SubspaceSGD(torch.optim.Optimizer):
    """SGD with momentum inside the subspace: ``v <- m v + P g``, ``c <- c - lr v``, ``w = w0 + P^T c``.

    (Equal to the published ``g_P = P^T P g`` with momentum in weight space, as momentum is linear,
    with a ``d``-dimensional buffer.) ``weight_decay`` adds ``wd * w`` to ``g`` before projecting.
    ``origin``: the point ``w0`` the subspace is attached to (the parameters' values by default).
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        subspace: Subspace,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        origin: Tensor | None = None,
    ) -> None:
        defaults = {
            "lr": check_float("lr", lr, min=0.0, min_open=True),
            "momentum": check_float("momentum", momentum, min=0.0, max=1.0, max_open=True),
            "weight_decay": check_float("weight_decay", weight_decay, min=0.0),
        }
        self.nesterov = check_bool("nesterov", nesterov)
        if self.nesterov and defaults["momentum"] == 0.0:
            raise ParameterError("`nesterov=True` needs a momentum > 0")
        super().__init__(_param_input(params), defaults)
        plist = _tensor_list(_single_group(self))
        _check_sgd_group(self.param_groups[0])
        self.param = SubspaceParametrization(plist, subspace, origin)
        st = self.state[plist[0]]
        st["c"] = self.param.coordinates()
        st["momentum_buffer"] = None

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """One step; ``closure`` (optional) recomputes the loss and gradients first."""
        group = self.param_groups[0]
        _check_sgd_group(group)
        if closure is not None and not callable(closure):
            raise ParameterTypeError(f"`closure` must be callable or None, got {describe(closure)}")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        st = self.state[group["params"][0]]
        g = flat_grad(self.param.params)
        if group["weight_decay"]:
            g = g + group["weight_decay"] * flatten(self.param.params)
        gc = self.param.subspace.project_direction(g)
        buf = st["momentum_buffer"]
        mom = group["momentum"]
        buf = gc.clone() if buf is None else mom * buf + gc
        st["momentum_buffer"] = buf
        direction = gc + mom * buf if self.nesterov else buf
        st["c"] = st["c"] - group["lr"] * direction
        self.param.set(st["c"])
        return loss


class SubspaceBFGS(torch.optim.Optimizer):
    """Quasi-Newton (inverse-Hessian BFGS) in the subspace with Armijo backtracking, per minibatch.

    Each :meth:`step(closure) <step>` (``closure`` zeroes the gradients, computes the minibatch loss,
    back-propagates and returns the loss, as for ``torch.optim.LBFGS``): ``g = P grad``; the pair
    (previous step ``s``, ``y = g - g_prev``) updates ``H`` unless it fails the curvature guard;
    ``p = -H g``; step lengths ``alpha0 * shrink^m`` are tried on the same minibatch until
    ``L(w + alpha P^T p) <= L(w) + c1 alpha g.p``. If ``p`` is not a descent direction ``H`` is reset
    to the identity; if no step length passes, no step is taken and ``H`` is reset.

    ``model``: the module whose BatchNorm running statistics must not be disturbed by line-search
    trials (they are saved after the first forward and restored after the trials). Loss values are
    averaged over the default process group when ``torch.distributed`` is initialized
    (``average_loss=None``: automatic), so every DDP rank takes the same step.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        subspace: Subspace,
        *,
        alpha0: float = 1.0,
        shrink: float = 0.4,
        c1: float = 0.4,
        max_trials: int = 20,
        curvature_eps: float = 1e-8,
        model: nn.Module | None = None,
        average_loss: bool | None = None,
        origin: Tensor | None = None,
    ) -> None:
        defaults = {
            "lr": check_float("alpha0", alpha0, min=0.0, min_open=True),
            "shrink": check_float("shrink", shrink, min=0.0, max=1.0, min_open=True, max_open=True),
            "c1": check_float("c1", c1, min=0.0, max=1.0, min_open=True, max_open=True),
            "max_trials": check_int("max_trials", max_trials, min=1),
        }
        self.curvature_eps = check_float("curvature_eps", curvature_eps, min=0.0)
        if model is not None and not isinstance(model, nn.Module):
            raise ParameterTypeError(f"`model` must be an nn.Module or None, got {describe(model)}")
        if average_loss is not None:
            average_loss = check_bool("average_loss", average_loss)
        super().__init__(_param_input(params), defaults)
        plist = _tensor_list(_single_group(self))
        _check_bfgs_group(self.param_groups[0])
        self.param = self._parametrization(plist, subspace, origin)
        self.model = model
        self.average_loss = average_loss
        first = plist[0]
        d = self.param.d
        st = self.state[first]
        st["c"] = self.param.coordinates()
        st["H"] = torch.eye(d, device=first.device, dtype=first.dtype)
        st["g_prev"] = None
        st["s_prev"] = None
        st["updates"] = 0
        st["skipped"] = 0
        st["failed_searches"] = 0
        st["trials"] = 0

    def _parametrization(
        self, params: list[Tensor], subspace: Subspace, origin: Tensor | None
    ) -> SubspaceParametrization:
        """``w = origin + P^T c`` over ``params`` (a sharded optimizer supplies its own here)."""
        return SubspaceParametrization(params, subspace, origin)

    def _value(self, loss: Any, what: str = "closure") -> float:
        if isinstance(loss, Tensor):
            if loss.numel() != 1:
                raise ShapeError(
                    f"the {what} must return the loss as a scalar, got shape {tuple(loss.shape)}"
                )
            loss = loss.detach().reshape(())
        elif isinstance(loss, int | float) and not isinstance(loss, bool):
            loss = torch.tensor(float(loss))
        else:
            raise ParameterTypeError(f"the {what} must return the loss, got {describe(loss)}")
        average = self.average_loss
        if average is None:
            average = dist.is_available() and dist.is_initialized()
        if average:
            v = loss.clone().to(torch.float64)
            dist.all_reduce(v)
            return float(v) / dist.get_world_size()
        return float(loss)

    @staticmethod
    def _commit(st: dict[str, Any], new: BFGSState) -> None:
        """Write a core P-BFGS state into this optimizer's state (no pair: ``s_prev`` is None)."""
        st["c"], st["H"], st["g_prev"] = new.c, new.H, new.g_prev
        st["s_prev"] = new.s_prev if new.has_prev else None
        st["updates"], st["skipped"] = int(new.updates), int(new.skipped)
        st["failed_searches"], st["trials"] = int(new.failed_searches), int(new.trials)

    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Tensor] | None = None,
        *,
        evaluate: Callable[[], Tensor] | None = None,
    ) -> Tensor:
        """One P-BFGS step; returns the loss at the weights before the step.

        ``closure`` zeroes the gradients, computes the minibatch loss, back-propagates and returns the
        loss (it gives the gradient at the current point). ``evaluate`` (optional) computes the same
        minibatch loss *without* back-propagating: the line-search trials need only the loss, so with it
        they run under ``torch.no_grad()`` and a step costs one backward pass instead of one per trial.
        Without it every trial calls ``closure`` (one backward pass each).
        """
        if closure is None:
            raise ParameterError(
                "SubspaceBFGS.step needs a closure (loss and gradients of the minibatch)"
            )
        if not callable(closure):
            raise ParameterTypeError(f"`closure` must be callable, got {describe(closure)}")
        if evaluate is not None and not callable(evaluate):
            raise ParameterTypeError(
                f"`evaluate` must be callable or None, got {describe(evaluate)}"
            )
        group = self.param_groups[0]
        _check_bfgs_group(group)
        st = self.state[group["params"][0]]
        with torch.enable_grad():
            loss0 = closure()
        f0 = self._value(loss0)
        g = self.param.coordinate_grad()
        if not math.isfinite(f0) or not bool(torch.isfinite(g).all()):
            raise NonFiniteError(
                f"the loss ({f0}) or its gradient in the subspace contains NaN or Inf; no step taken"
            )
        # the step policy is the core's (lowrank_core.dldr.pbfgs); here: the state in
        # self.state, the line search over closures
        zeros = torch.zeros_like(g)
        prev = BFGSState(
            c=st["c"],
            H=st["H"],
            g_prev=zeros if st["g_prev"] is None else st["g_prev"],
            s_prev=zeros if st["s_prev"] is None else st["s_prev"],
            has_prev=st["g_prev"] is not None and st["s_prev"] is not None,
            updates=st["updates"],
            skipped=st["skipped"],
            failed_searches=st["failed_searches"],
            trials=st["trials"],
        )
        direction = bfgs_step_direction(prev, g, eps=self.curvature_eps)
        if not direction.searchable:  # a zero gradient: nothing to search along
            self._commit(
                st, bfgs_step_finish(prev, direction, g, alpha=0.0, accepted=False, trials=0)
            )
            return loss0
        c, p = st["c"], direction.p

        with preserve_batchnorm(self.model) as restore:

            def trial(alpha: float) -> float:
                self.param.set(c + alpha * p)
                if evaluate is not None:
                    value = self._value(evaluate(), "evaluate function")  # no_grad: the loss only
                else:
                    with torch.enable_grad():
                        value = self._value(closure())
                restore()
                return value

            res = armijo_backtracking(
                trial,
                f0,
                float(direction.slope),
                alpha0=group["lr"],
                shrink=group["shrink"],
                c1=group["c1"],
                max_trials=group["max_trials"],
            )
        self._commit(
            st,
            bfgs_step_finish(
                prev, direction, g, alpha=res.alpha, accepted=res.accepted, trials=res.trials
            ),
        )
        self.param.set(st["c"])
        return loss0
