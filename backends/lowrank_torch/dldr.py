"""DLDR for PyTorch: record snapshots of a model, train in the subspace with P-SGD or P-BFGS.

Every piece of math (the snapshot store and its Gram matrix, PCA, projection and lifting, the BFGS
update, the Armijo line search) is :mod:`lowrank_core.dldr`, called on torch tensors. This module
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

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lowrank_core.dldr import (
    SnapshotStore,
    Subspace,
    armijo_backtracking,
    bfgs_direction,
    bfgs_update,
)

__all__ = [
    "SnapshotRecorder",
    "SubspaceBFGS",
    "SubspaceParametrization",
    "SubspaceSGD",
    "batchnorm_buffers",
    "flat_grad",
    "flatten",
    "preserve_batchnorm",
]


def flatten(tensors: Iterable[Tensor]) -> Tensor:
    """One detached 1-D tensor of all ``tensors``' entries, in order."""
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def flat_grad(params: Iterable[Tensor]) -> Tensor:
    """The parameters' gradients as one 1-D tensor (zeros where a gradient is None)."""
    return torch.cat(
        [
            (p.grad.detach() if p.grad is not None else torch.zeros_like(p)).reshape(-1)
            for p in params
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
        if every < 1:
            raise ValueError(f"`every` must be >= 1, got {every}")
        self.model = model
        self.store = SnapshotStore() if store is None else store
        self.every = int(every)
        self.include_buffers = bool(include_buffers)
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
        """Count one call; record on every ``every``-th. Returns whether it recorded."""
        self._calls += 1
        if self._calls % self.every == 0:
            self.record()
            return True
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
        self.params = list(params)
        if not self.params:
            raise ValueError("no parameters given")
        total = sum(p.numel() for p in self.params)
        if subspace.dim != total:
            raise ValueError(
                f"the subspace has dimension D = {subspace.dim}, but the parameters have {total} "
                "entries (was it recorded with include_buffers=True, or from another model?)"
            )
        first = self.params[0]
        dev, dt = first.device, first.dtype
        basis = torch.as_tensor(subspace.basis).to(device=dev, dtype=dt)
        centre = torch.as_tensor(subspace.centre).to(device=dev, dtype=dt)
        ev = torch.as_tensor(subspace.explained_variance).to(device=dev, dtype=dt)
        self.subspace = Subspace(centre, basis, ev, subspace.total_variance, subspace.num_snapshots)
        self.origin = flatten(self.params).clone() if origin is None else origin.to(dev, dt)
        if self.origin.shape != (total,):
            raise ValueError(f"`origin` must have shape ({total},), got {tuple(self.origin.shape)}")

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


def _single_group(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    if len(optimizer.param_groups) != 1:
        raise ValueError("P-SGD / P-BFGS take a single parameter group")
    return list(optimizer.param_groups[0]["params"])


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
        if lr <= 0 or not 0.0 <= momentum < 1.0 or weight_decay < 0:
            raise ValueError("need lr > 0, 0 <= momentum < 1, weight_decay >= 0")
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.nesterov = bool(nesterov)
        plist = _single_group(self)
        self.param = SubspaceParametrization(plist, subspace, origin)
        st = self.state[plist[0]]
        st["c"] = self.param.coordinates()
        st["momentum_buffer"] = None

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """One step; ``closure`` (optional) recomputes the loss and gradients first."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
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
        defaults = {"lr": alpha0, "shrink": shrink, "c1": c1, "max_trials": max_trials}
        super().__init__(params, defaults)
        plist = _single_group(self)
        self.param = SubspaceParametrization(plist, subspace, origin)
        self.model = model
        self.curvature_eps = float(curvature_eps)
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

    def _value(self, loss: Tensor) -> float:
        average = self.average_loss
        if average is None:
            average = dist.is_available() and dist.is_initialized()
        if average:
            v = loss.detach().clone().to(torch.float64)
            dist.all_reduce(v)
            return float(v) / dist.get_world_size()
        return float(loss.detach())

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        """One P-BFGS step; returns the loss at the weights before the step."""
        if closure is None:
            raise ValueError(
                "SubspaceBFGS.step needs a closure (loss and gradients of the minibatch)"
            )
        group = self.param_groups[0]
        st = self.state[group["params"][0]]
        with torch.enable_grad():
            loss0 = closure()
        f0 = self._value(loss0)
        g = self.param.coordinate_grad()
        H = st["H"]
        if st["g_prev"] is not None and st["s_prev"] is not None:
            H, updated = bfgs_update(H, st["s_prev"], g - st["g_prev"], eps=self.curvature_eps)
            st["updates" if updated else "skipped"] += 1
        p = bfgs_direction(H, g)
        slope = float(g @ p)
        if not slope < 0:  # not a descent direction (or zero gradient): restart from the identity
            H = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
            p = -g
            slope = float(g @ p)
        st["g_prev"] = g
        st["H"] = H
        if not slope < 0:
            st["s_prev"] = None
            return loss0
        c = st["c"]

        with preserve_batchnorm(self.model) as restore:

            def trial(alpha: float) -> float:
                self.param.set(c + alpha * p)
                with torch.enable_grad():
                    value = self._value(closure())
                restore()
                return value

            res = armijo_backtracking(
                trial,
                f0,
                slope,
                alpha0=group["lr"],
                shrink=group["shrink"],
                c1=group["c1"],
                max_trials=group["max_trials"],
            )
        st["trials"] += res.trials
        if res.accepted:
            s = res.alpha * p
            st["c"] = c + s
            st["s_prev"] = s
        else:
            st["failed_searches"] += 1
            st["s_prev"] = None
            st["H"] = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
        self.param.set(st["c"])
        return loss0
