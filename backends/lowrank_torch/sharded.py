"""Sharded parameters (FSDP2 ``fully_shard``): DLDR and CMD that keep only each rank's shard.

With FSDP2 every parameter is a ``DTensor`` sharded on dim 0 over a 1-D device mesh: each rank holds a
block of rows of every parameter. Viewing the model's parameters as one flat vector of ``D`` scalars
(the full tensors concatenated in order), each rank holds a subset of its entries, described by a
:class:`ShardLayout` (the global flat index of every local entry). The methods then scale with the
shard, not the model:

* **DLDR** (:class:`ShardedSnapshotRecorder`, :class:`ShardedSubspaceSGD`,
  :class:`ShardedSubspaceBFGS`): each rank records and
  keeps only its shard of every snapshot. Dot products split over the entries, so the ``t x t`` Gram
  matrix is the all-reduced sum of the ranks' partial Grams (the same matrix on every rank, whose
  small eigenproblem every rank then solves identically); the basis stays sharded, each rank holding
  the columns of ``P`` of its own entries (:func:`lowrank_core.dldr.subspace_from_gram` with
  ``reduce``). Projections ``P g`` are sums over the entries as well: each rank projects its shard
  and the ``d``-dimensional result is all-reduced; lifting ``w = w0 + P^T c`` needs no communication.
* **CMD** (:class:`ShardedCMDTracker`): each rank keeps the warm-up trajectory and then the online
  state and coefficients of its own entries. The modes are found on the ``K`` sampled parameters,
  drawn from the *global* layout (the same draw as the single-process
  :class:`~lowrank_torch.cmd.CMDTracker`); their trajectories (``K x F``, small) are gathered by an
  all-reduce, so every rank finds the same modes, and each rank assigns and fits its own entries
  (:func:`lowrank_core.cmd.fit_cmd_shard`). After the fit, each epoch all-reduces the ``M``
  references' values (from whichever rank holds them).

Communication goes through ``torch.distributed`` on the parameters' process group (the mesh's group).
All math is :mod:`lowrank_core`'s. FSDP2 OIALR (switch and rank updates of sharded weights) is in
:mod:`lowrank_torch.fsdp_oialr`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from lowrank_core import cmd as core_cmd
from lowrank_core.dldr import SnapshotStore, Subspace, subspace_from_gram
from lowrank_core.errors import (
    CheckpointError,
    LowRankError,
    NonFiniteError,
    ParameterError,
    RankError,
    ShapeError,
)

from .cmd import CMDConfig, NotFittedError
from .dldr import SubspaceBFGS, SubspaceParametrization

__all__ = [
    "ShardLayout",
    "ShardedCMDTracker",
    "ShardedSnapshotRecorder",
    "ShardedSubspaceBFGS",
    "ShardedSubspaceParametrization",
    "ShardedSubspaceSGD",
    "ShardingError",
    "local_tensor",
]


class ShardingError(LowRankError, ValueError):
    """Parameters are not sharded in a layout the sharded methods understand."""


def is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed tensors
        return False
    return isinstance(t, DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """This rank's shard of ``t`` (a ``DTensor``'s local tensor; a plain tensor itself), detached.

    For an FSDP2 parameter the result shares its storage: writing into it (under ``no_grad``) writes
    the parameter's shard.
    """
    if is_dtensor(t):
        out: Tensor = t.to_local()  # type: ignore[attr-defined]
        return out.detach()
    return t.detach()


class ShardLayout:
    """Which entries of the flat parameter vector this rank holds, for ``DTensor`` parameters.

    Every parameter must be a ``DTensor`` sharded on dim 0 (``Shard(0)``) over one 1-D device mesh,
    as ``fully_shard`` makes them. ``sizes``: the full parameters' numbers of scalars (the segments of
    the global flat vector); ``index``: NumPy int64 global flat index of every local entry, in local
    flat order (the local shards concatenated); ``group``: the mesh's process group. Built with one
    ``all_gather`` of the ranks' row counts.
    """

    def __init__(self, params: Iterable[Tensor]) -> None:
        from torch.distributed.tensor import Shard

        self.params = list(params)
        if not self.params:
            raise ShardingError("no parameters given")
        if not (dist.is_available() and dist.is_initialized()):
            raise ShardingError(
                "sharded methods need an initialized torch.distributed process group"
            )
        meshes = []
        for i, p in enumerate(self.params):
            if not is_dtensor(p):
                raise ShardingError(
                    f"parameter {i} (shape {tuple(p.shape)}) is a plain tensor; the sharded methods "
                    "need every parameter sharded (a DTensor, e.g. after fully_shard of its module)"
                )
            placements = tuple(p.placements)  # type: ignore[attr-defined]
            mesh = p.device_mesh  # type: ignore[attr-defined]
            if mesh.ndim != 1 or placements != (Shard(0),):
                raise ShardingError(
                    f"parameter {i} has placements {placements} on a {mesh.ndim}-D mesh; only "
                    "Shard(0) on a 1-D mesh (FSDP2's layout) is supported"
                )
            meshes.append(mesh)
        if any(m != meshes[0] for m in meshes):
            raise ShardingError("all parameters must be sharded over the same device mesh")
        self.group: Any = meshes[0].get_group()
        self.world = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.device = local_tensor(self.params[0]).device
        self.sizes = [int(p.numel()) for p in self.params]
        self.local_sizes = [int(local_tensor(p).numel()) for p in self.params]
        rows = torch.tensor(
            [local_tensor(p).shape[0] if p.ndim else 0 for p in self.params],
            dtype=torch.int64,
            device=self.device,
        )
        gathered = [torch.zeros_like(rows) for _ in range(self.world)]
        dist.all_gather(gathered, rows, group=self.group)
        all_rows = torch.stack(gathered).cpu().numpy()  # (world, L)
        row_offset = all_rows[: self.rank].sum(axis=0)
        parts: list[np.ndarray] = []
        base = 0
        for j, p in enumerate(self.params):
            row_numel = int(np.prod(p.shape[1:])) if p.ndim > 1 else 1
            if p.ndim == 0:
                raise ShardingError(f"parameter {j} is a scalar; it cannot be sharded on dim 0")
            if int(all_rows[:, j].sum()) != int(p.shape[0]):
                raise ShardingError(f"parameter {j}: the ranks' shards do not cover its rows")
            start = base + int(row_offset[j]) * row_numel
            parts.append(start + np.arange(self.local_sizes[j], dtype=np.int64))
            base += self.sizes[j]
        self.index = np.concatenate(parts)
        self.num_global = base

    @property
    def num_local(self) -> int:
        """Entries this rank holds."""
        return int(self.index.shape[0])

    def locals(self) -> list[Tensor]:
        """The local shards (detached; sharing the parameters' storage)."""
        return [local_tensor(p) for p in self.params]

    def flat(self, dtype: torch.dtype | None = None) -> Tensor:
        """The local shards, flattened and concatenated: a copy."""
        return torch.cat([t.reshape(-1).to(dtype or t.dtype) for t in self.locals()])

    def flat_grad(self) -> Tensor:
        """The local shards' gradients, flattened (zeros where a gradient is None)."""
        out = []
        for p, t in zip(self.params, self.locals(), strict=True):
            g = p.grad
            out.append((local_tensor(g) if g is not None else torch.zeros_like(t)).reshape(-1))
        return torch.cat(out)

    def write(self, flat: Tensor) -> None:
        """Copy ``flat`` (local order) into the local shards."""
        with torch.no_grad():
            for t, v in zip(self.locals(), torch.split(flat, self.local_sizes), strict=True):
                t.copy_(v.reshape(t.shape))

    def all_reduce(self, t: Tensor) -> Tensor:
        """Sum of ``t`` over the ranks (in place, returned)."""
        dist.all_reduce(t, group=self.group)
        return t

    def reduce_host(self, a: np.ndarray) -> np.ndarray:
        """Sum of a float64 host array over the ranks (a :data:`lowrank_core.dldr.ShardReduce`)."""
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(self.device)
        return self.all_reduce(t).cpu().numpy()


def _layout(params: Iterable[Tensor] | nn.Module | ShardLayout) -> ShardLayout:
    if isinstance(params, ShardLayout):
        return params
    if isinstance(params, nn.Module):
        params = [p for p in params.parameters() if p.requires_grad]
    return ShardLayout(params)


# --------------------------------------------------------------------------------------------------
# DLDR
# --------------------------------------------------------------------------------------------------
class ShardedSnapshotRecorder:
    """Snapshots of this rank's shard of the trainable parameters; a sharded subspace from them.

    ``params``: a module (its trainable parameters), the parameters, or a :class:`ShardLayout`. Every
    rank must call :meth:`step` / :meth:`record` and :meth:`fit` at the same points. ``store``
    defaults to an in-memory :class:`~lowrank_core.dldr.SnapshotStore` (of the shard only).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | nn.Module | ShardLayout,
        store: SnapshotStore | None = None,
        *,
        every: int = 1,
    ) -> None:
        if every < 1:
            raise ParameterError(f"`every` must be >= 1, got {every}")
        self.layout = _layout(params)
        self.store = SnapshotStore() if store is None else store
        self.every = int(every)
        self._calls = 0

    def record(self) -> None:
        """Add this rank's shard of the current parameters."""
        self.store.add(self.layout.flat())

    def step(self) -> bool:
        """Count one call; record on every ``every``-th. Returns whether it recorded.

        A call whose recording raises does not count (as :meth:`SnapshotRecorder.step
        <lowrank_torch.dldr.SnapshotRecorder.step>`).
        """
        if (self._calls + 1) % self.every == 0:
            self.record()
            self._calls += 1
            return True
        self._calls += 1
        return False

    def __len__(self) -> int:
        return len(self.store)

    def gram(self) -> np.ndarray:
        """The global ``t x t`` Gram matrix: the all-reduced sum of the ranks' partial Grams."""
        return self.layout.reduce_host(self.store.gram())

    def fit(self, d: int, *, orthonormalize: bool = True) -> Subspace:
        """The top-``d`` PCA subspace of the (global) snapshots, sharded.

        The returned :class:`~lowrank_core.dldr.Subspace` holds this rank's columns of the basis
        (``(d, D_local)``) and entries of the centre, and the global explained / total variance.
        """
        if len(self.store) < 2:
            raise RankError(f"at least 2 snapshots are needed, got {len(self.store)}")
        return subspace_from_gram(
            self.gram(),
            d,
            self.store.blocks,
            centre=self.store.centre(),
            orthonormalize=orthonormalize,
            reduce=self.layout.reduce_host,
        )


class ShardedSubspaceParametrization(SubspaceParametrization):
    """Sharded parameters as ``w = w0 + P^T c``: each rank holds its shard of ``w``, ``w0`` and ``P``.

    The interface of :class:`~lowrank_torch.dldr.SubspaceParametrization` (``d``, :meth:`set`,
    :meth:`coordinates`, :meth:`coordinate_grad`), so the subspace optimizers run on it unchanged:
    ``c`` and ``P g`` are the same ``d`` numbers on every rank (this rank's ``P_shard v_shard``,
    all-reduced); :meth:`set` writes this rank's shard ``w0 + P_shard^T c`` (no communication).
    ``subspace``: a sharded one (:meth:`ShardedSnapshotRecorder.fit`); ``origin``: this rank's shard of
    ``w0`` (the current values by default).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | ShardLayout,
        subspace: Subspace,
        origin: Tensor | None = None,
    ) -> None:
        layout = _layout(params)
        if not isinstance(subspace, Subspace):
            raise ParameterError(
                f"`subspace` must be a lowrank_core.dldr.Subspace, got {subspace!r}"
            )
        if subspace.dim != layout.num_local:
            raise ShapeError(
                f"the subspace's basis has {subspace.dim} columns, but this rank holds "
                f"{layout.num_local} entries (is it the sharded subspace of these parameters?)"
            )
        self.layout = layout
        self.params = list(layout.params)
        first = layout.locals()[0]
        dev, dt = first.device, first.dtype
        self.basis = torch.as_tensor(subspace.basis).to(device=dev, dtype=dt)
        self.subspace = subspace
        self.origin = layout.flat().clone() if origin is None else origin.detach().to(dev, dt)
        if self.origin.shape != (layout.num_local,):
            raise ShapeError(
                f"`origin` must have shape ({layout.num_local},), got {tuple(self.origin.shape)}"
            )

    @property
    def d(self) -> int:
        return int(self.basis.shape[0])

    def project(self, v: Tensor) -> Tensor:
        """``P v`` of a sharded vector ``v`` (this rank's entries): the all-reduced ``d`` numbers."""
        return self.layout.all_reduce(self.basis @ v)

    def weights(self, c: Tensor) -> Tensor:
        """This rank's shard of ``w0 + P^T c``."""
        out: Tensor = self.origin + c @ self.basis
        return out

    def set(self, c: Tensor) -> None:
        """Write this rank's shard of ``w0 + P^T c`` into the parameters."""
        self.layout.write(self.weights(c))

    def coordinates(self) -> Tensor:
        """``P (w - w0)`` (all-reduced)."""
        return self.project(self.layout.flat() - self.origin)

    def coordinate_grad(self) -> Tensor:
        """``P g`` (all-reduced) from this rank's shard of the (already synchronized) gradients."""
        return self.project(self.layout.flat_grad())


class ShardedSubspaceSGD(torch.optim.Optimizer):
    """SGD with momentum in a sharded subspace: the sharded counterpart of
    :class:`~lowrank_torch.dldr.SubspaceSGD`.

    ``c`` (``d``, the same on every rank) moves by ``v <- m v + P g``, ``c <- c - lr v``; each rank
    writes its shard ``w0 + P_shard^T c``. ``P g`` is this rank's ``P_shard g_shard`` all-reduced
    (``d`` numbers per step). ``subspace`` is a sharded one (:meth:`ShardedSnapshotRecorder.fit`);
    ``origin`` (this rank's shard of ``w0``) defaults to the current values. The gradients must already
    be synchronized (FSDP reduce-scatters them).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | ShardLayout,
        subspace: Subspace,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        origin: Tensor | None = None,
    ) -> None:
        if not (lr > 0 and 0.0 <= momentum < 1.0 and weight_decay >= 0):
            raise ParameterError("need lr > 0, 0 <= momentum < 1, weight_decay >= 0")
        param = ShardedSubspaceParametrization(params, subspace, origin)
        super().__init__(
            param.params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        )
        self.param = param
        self.layout = param.layout
        self.nesterov = bool(nesterov)
        st = self.state[self.layout.params[0]]
        st["c"] = param.coordinates()
        st["momentum_buffer"] = None

    @property
    def coordinates(self) -> Tensor:
        """The current ``c``."""
        c: Tensor = self.state[self.layout.params[0]]["c"]
        return c

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """One step; ``closure`` (optional) recomputes the loss and gradients first."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        st = self.state[self.layout.params[0]]
        g = self.layout.flat_grad()
        if group["weight_decay"]:
            g = g + group["weight_decay"] * self.layout.flat()
        gc = self.param.project(g)
        buf = st["momentum_buffer"]
        mom = group["momentum"]
        buf = gc.clone() if buf is None else mom * buf + gc
        st["momentum_buffer"] = buf
        direction = gc + mom * buf if self.nesterov else buf
        st["c"] = st["c"] - group["lr"] * direction
        self.param.set(st["c"])
        return loss


class ShardedSubspaceBFGS(SubspaceBFGS):
    """:class:`~lowrank_torch.dldr.SubspaceBFGS` in a sharded subspace (same arguments and steps).

    The ``d x d`` inverse Hessian, the directions and the line search are the same on every rank: the
    coordinate gradients are all-reduced (:class:`ShardedSubspaceParametrization`) and the loss values
    averaged over the process group, as under DDP; each rank writes its own shard of every trial point.
    """

    def _parametrization(
        self, params: list[Tensor], subspace: Subspace, origin: Tensor | None
    ) -> SubspaceParametrization:
        return ShardedSubspaceParametrization(params, subspace, origin)


# --------------------------------------------------------------------------------------------------
# CMD
# --------------------------------------------------------------------------------------------------
class ShardedCMDTracker:
    """Online CMD of sharded parameters: each rank holds the CMD state of its own entries.

    The life cycle is :class:`~lowrank_torch.cmd.CMDTracker`'s (:meth:`after_epoch` on every rank once
    per epoch, :meth:`swapped` for evaluation with the CMD weights); the modes, references (global flat
    indices), profiles and the sampled parameters are the ones the single-process tracker finds on the
    unsharded model, while ``assignment``, ``a``, ``b`` and the running sums cover this rank's entries
    (in :attr:`ShardLayout.index` order). Embedded CMD (``embed=True``) is not supported here: its
    selection ranks the coefficient changes of all ``N`` parameters at once; nor is the per-step
    cadence (``every_n_steps``): call :meth:`after_epoch` at each time point instead.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | nn.Module | ShardLayout,
        config: CMDConfig | None = None,
    ) -> None:
        self.config = config or CMDConfig()
        if self.config.embed:
            raise ParameterError(
                "embedded CMD (embed=True) is not supported on sharded parameters; use embed=False"
            )
        if self.config.profile != "reference":
            raise ParameterError(
                f"profile={self.config.profile!r} is not supported on sharded parameters (its "
                "profiles read sampled rows spread over the ranks); use profile='reference'"
            )
        if self.config.every_n_steps is not None:
            raise ParameterError(
                "the per-step cadence (every_n_steps) is not supported on sharded parameters: call "
                "after_epoch() at each time point (e.g. every n-th optimizer step) instead"
            )
        self.layout = _layout(params)
        self.device = self.layout.device
        if self.config.dtype is not None:
            self.dtype = getattr(torch, self.config.dtype)
        else:
            all64 = all(t.dtype == torch.float64 for t in self.layout.locals())
            self.dtype = torch.float64 if all64 else torch.float32
        self.epochs_seen = 0
        self._warmup: Tensor | None = None
        self.state: core_cmd.OnlineCMD | None = None
        self.sample_index: np.ndarray | None = None
        self._ref_local: Tensor | None = None  # local position of each reference, -1 elsewhere

    @property
    def fitted(self) -> bool:
        """Whether the warm-up is over and the modes are fitted."""
        return self.state is not None

    def _flat(self) -> Tensor:
        with torch.no_grad():
            return self.layout.flat(self.dtype)

    def after_epoch(self, epoch: int | None = None) -> None:
        """Feed this rank's shard at the end of an epoch (every rank, the same epochs)."""
        self.epochs_seen += 1
        flat = self._flat()
        if self.state is None:
            if not bool(torch.isfinite(flat).all()):
                raise NonFiniteError("the model's parameters contain NaN or Inf")
            if self._warmup is None:
                dev = self.config.warmup_device or self.device
                self._warmup = torch.empty(
                    (self.layout.num_local, self.config.warmup_epochs), dtype=self.dtype, device=dev
                )
            self._warmup[:, self.epochs_seen - 1] = flat.to(self._warmup.device)
            if self.epochs_seen == self.config.warmup_epochs:
                self._fit()
            return
        self.state.update(flat, check_finite=True, reference_values=self._reference_values(flat))

    def _gather_rows(self, local: Tensor, wanted: np.ndarray) -> Tensor:
        """Rows (global flat indices ``wanted``, sorted) of a sharded ``(N_local, T)`` array, on every
        rank: each rank fills the rows it holds, the rest stay 0, and an all-reduce sums them."""
        index = self.layout.index
        held = np.isin(index, wanted)
        out = torch.zeros((wanted.shape[0], local.shape[1]), dtype=local.dtype, device=self.device)
        if held.any():
            pos = torch.as_tensor(np.searchsorted(wanted, index[held]), device=self.device)
            rows = torch.as_tensor(np.flatnonzero(held), device=local.device)
            out[pos] = local[rows].to(self.device)
        return self.layout.all_reduce(out)

    def _fit(self) -> None:
        cfg = self.config
        assert self._warmup is not None
        idx = core_cmd.sample_indices(self.layout.sizes, cfg.num_samples, seed=cfg.seed)
        sample = self._gather_rows(self._warmup, idx)
        fit = core_cmd.fit_cmd_shard(
            self._warmup.to(self.device),
            sample,
            idx,
            None if cfg.tol is not None else cfg.max_modes,
            tol=cfg.tol,
            metric=cfg.metric,
            chunk_size=cfg.chunk_size,
            check_finite=False,  # checked epoch by epoch while recording
        )
        self.state = core_cmd.OnlineCMD.from_fit(
            self._warmup.to(self.device), fit, chunk_size=cfg.chunk_size
        )
        self.sample_index = idx
        lookup = {int(g): i for i, g in enumerate(self.layout.index)}
        self._ref_local = torch.tensor(
            [lookup.get(int(r), -1) for r in fit.references], dtype=torch.int64, device=self.device
        )
        self._warmup = None

    def _reference_values(self, flat: Tensor) -> Tensor:
        """The ``M`` references' current values, from the ranks that hold them (an all-reduce)."""
        assert self._ref_local is not None
        held = self._ref_local >= 0
        r = torch.zeros(held.shape[0], dtype=flat.dtype, device=self.device)
        r[held] = flat[self._ref_local[held]]
        return self.layout.all_reduce(r)

    def _require(self) -> core_cmd.OnlineCMD:
        if self.state is None:
            raise NotFittedError(
                f"CMD is not fitted yet ({self.epochs_seen} of {self.config.warmup_epochs} "
                "warm-up epochs seen)"
            )
        return self.state

    def coefficients(self) -> tuple[Tensor, Tensor]:
        """``(a, b)`` of this rank's entries (local order, state dtype)."""
        out: tuple[Tensor, Tensor] = self._require().coefficients()
        return out

    def cmd_weights(self) -> Tensor:
        """This rank's shard of the CMD weights at the latest epoch (flat, local order)."""
        out: Tensor = self._require().weights()
        return out

    # ------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """This rank's part of the tracker's state (tensors and plain values only, loadable with
        ``torch.load(weights_only=True)``): save one file per rank, restore on the same sharding."""
        core_state = None
        if self.state is not None:
            core_state = self.state.state_dict()
            core_state["references"] = torch.as_tensor(core_state["references"])
        return {
            "format": "lowrank_torch.ShardedCMDTracker/1",
            "config": asdict(self.config),
            "index": torch.as_tensor(self.layout.index),
            "epochs_seen": self.epochs_seen,
            "warmup": self._warmup,
            "sample_index": None
            if self.sample_index is None
            else torch.as_tensor(self.sample_index),
            "reference_positions": self._ref_local,
            "core": core_state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore this rank's :meth:`state_dict`. The parameters must be sharded as when it was saved
        (the same global entries on this rank), else :class:`ShardingError` and nothing changes."""
        if (
            not isinstance(state, dict)
            or state.get("format") != "lowrank_torch.ShardedCMDTracker/1"
        ):
            raise CheckpointError("not a sharded CMD state (missing or unknown 'format' entry)")
        missing = [
            k
            for k in (
                "index",
                "config",
                "core",
                "sample_index",
                "reference_positions",
                "epochs_seen",
            )
            if k not in state
        ]
        if missing:
            raise CheckpointError(f"the sharded CMD state lacks the entries {missing}")
        index = np.asarray(torch.as_tensor(state["index"]).cpu(), dtype=np.int64)
        if not np.array_equal(index, self.layout.index):
            raise ShardingError(
                "the CMD state was saved for another sharding: this rank held "
                f"{index.shape[0]} entries then, {self.layout.num_local} now (or other ones)"
            )
        try:
            config = CMDConfig(**state["config"])
        except (LowRankError, TypeError) as exc:
            raise CheckpointError(f"the sharded CMD state's config is invalid: {exc}") from None
        core_state = state["core"]
        restored = None
        if core_state is not None:
            core_state = dict(core_state)
            core_state["references"] = np.asarray(core_state["references"].cpu(), dtype=np.int64)
            moved = {
                k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in core_state.items()
            }
            restored = core_cmd.OnlineCMD.from_state_dict(moved)
        sample = state["sample_index"]
        positions = state["reference_positions"]
        self.config = config
        self.epochs_seen = int(state["epochs_seen"])
        self._warmup = state["warmup"]
        self.state = restored
        self.sample_index = None if sample is None else np.asarray(sample.cpu(), dtype=np.int64)
        self._ref_local = None if positions is None else positions.to(self.device)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside the block the local shards hold the CMD weights; afterwards the trained ones again.

        (FSDP gathers the shards for the forward, so the whole model runs with the CMD weights.)
        Before the fit this does nothing.
        """
        if self.state is None:
            yield
            return
        new = self.cmd_weights()
        saved = self.layout.flat().clone()
        try:
            self.layout.write(new)
            yield
        finally:
            self.layout.write(saved)
