"""Online CMD for PyTorch models: warm-up recording, online fit, swapped-in evaluation, embedding.

:class:`CMDTracker` follows a model through training, one call per epoch::

    cmd = CMDTracker(model, CMDConfig(warmup_epochs=20, max_modes=10))
    for epoch in range(epochs):
        train_one_epoch(model)
        cmd.after_epoch()                 # records (warm-up), fits once, then updates online
        with cmd.swapped():               # the CMD weights a * r(t) + b, only inside the block
            evaluate(model)

All math is :mod:`lowrank_core.cmd` (the modes, the least squares, the exact recursive updates, the
embedding selection); this module only moves tensors. The parameters covered are the model's trainable
floating parameters in ``named_parameters()`` order, viewed as one flat vector of ``N`` scalars (each
tensor a segment for the stratified sampling). Buffers (e.g. BatchNorm running statistics) are not
modelled and stay as they are.

Memory: during the ``F`` warm-up epochs the trajectory ``(N, F)`` is kept (on ``warmup_device``, the CPU
by default, never a copy of whole state_dicts); after the fit only ``2 N`` floats, the int64 assignment
and ``M`` numbers per epoch remain (plus ``2 N`` more with ``embed=True``, for the coefficient change since
the last embedding). Nothing grows with the epochs but the ``M x t`` profiles.

Distributed data parallel: the CMD state is a deterministic function of the weights and the seed, so when
the weights are identical on every rank (as DDP keeps them) the state is identical too; call
:meth:`CMDTracker.after_epoch` on every rank, no communication is needed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lowrank_core import cmd as core
from lowrank_core.errors import NonFiniteError

__all__ = ["CMDConfig", "CMDTracker"]


@dataclass(frozen=True)
class CMDConfig:
    """Settings of :class:`CMDTracker` (defaults from the paper where it has one).

    - ``warmup_epochs`` (``F``, 20): epochs recorded before the modes are fitted (>= 2);
    - ``max_modes`` (``M``, 10) or ``tol``: the number of modes, or the automatic choice (the smallest
      ``M`` whose relative error on the sample is <= ``tol``); ``tol`` wins when both are set;
    - ``num_samples`` (``K``, 1000), ``seed``, ``metric`` (``'correlation'``: distance ``1 - |corr|``;
      ``'euclidean'``: the paper's distance between rows of ``|corr|``), ``chunk_size``: see
      :func:`lowrank_core.cmd.fit_cmd`;
    - ``warmup_device``: where the warm-up trajectory lives (``None``: the parameters' device);
    - ``dtype``: dtype of the CMD state (``None``: float64 for float64 parameters, else float32);
    - ``embed``, ``embed_every`` (``L``, 10), ``embed_fraction`` (``P``, 0.1): embedded CMD: every ``L``
      epochs after the fit, the ``ceil(P N)`` parameters whose ``(a, b)`` moved least since the last
      embedding are embedded; embedded parameters are overwritten by their model ``a r(t) + b`` after
      every epoch.
    """

    warmup_epochs: int = 20
    max_modes: int | None = 10
    tol: float | None = None
    num_samples: int = 1000
    seed: int = 0
    metric: core.Metric = "correlation"
    chunk_size: int = core.DEFAULT_CHUNK_SIZE
    warmup_device: str | None = "cpu"
    dtype: str | None = None
    embed: bool = False
    embed_every: int = 10
    embed_fraction: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.warmup_epochs, bool) or int(self.warmup_epochs) < 2:
            raise ValueError(f"`warmup_epochs` must be an int >= 2, got {self.warmup_epochs!r}")
        if self.max_modes is None and self.tol is None:
            raise ValueError("give `max_modes` or `tol`")
        if int(self.embed_every) < 1:
            raise ValueError(f"`embed_every` must be >= 1, got {self.embed_every}")
        if not 0.0 < float(self.embed_fraction) <= 1.0:
            raise ValueError(f"`embed_fraction` must lie in (0, 1], got {self.embed_fraction}")
        if self.dtype not in (None, "float32", "float64"):
            raise ValueError(f"`dtype` must be None, 'float32' or 'float64', got {self.dtype!r}")


def _trainable(model: nn.Module | Iterable[nn.Parameter]) -> list[tuple[str, nn.Parameter]]:
    if isinstance(model, nn.Module):
        named = list(model.named_parameters())
    else:
        named = [(str(i), p) for i, p in enumerate(model)]
    return [(n, p) for n, p in named if p.requires_grad and torch.is_floating_point(p)]


class CMDTracker:
    """Online (and optionally embedded) CMD of a model's trainable parameters.

    ``model`` is an ``nn.Module`` (or an iterable of parameters; under DDP the wrapped module or the DDP
    wrapper, whose parameters are the same objects). See the module docstring for the life cycle.
    """

    def __init__(
        self, model: nn.Module | Iterable[nn.Parameter], config: CMDConfig | None = None
    ) -> None:
        self.config = config or CMDConfig()
        self._named = _trainable(model)
        if not self._named:
            raise ValueError("the model has no trainable floating-point parameters")
        self.params = [p for _, p in self._named]
        self.sizes = [p.numel() for p in self.params]
        self.num_params = sum(self.sizes)
        self.device = self.params[0].device
        if any(p.device != self.device for p in self.params):
            raise ValueError("CMD needs every trainable parameter on one device")
        if self.config.dtype is not None:
            self.dtype = getattr(torch, self.config.dtype)
        else:
            all64 = all(p.dtype == torch.float64 for p in self.params)
            self.dtype = torch.float64 if all64 else torch.float32
        self.epochs_seen = 0
        self._warmup: Tensor | None = None
        self.state: core.OnlineCMD | None = None
        self.embedded: Tensor | None = None
        self._prev: tuple[Tensor, Tensor] | None = None
        self._fit_epoch = 0

    # ------------------------------------------------------------------------------ flat views
    def _flat(self) -> Tensor:
        """The current parameters as one flat vector (state dtype, parameters' device); a copy."""
        with torch.no_grad():
            return torch.cat([p.detach().reshape(-1).to(self.dtype) for p in self.params])

    def _split(self, flat: Tensor) -> list[Tensor]:
        out = []
        for p, chunk in zip(self.params, torch.split(flat, self.sizes), strict=True):
            out.append(chunk.reshape(p.shape).to(dtype=p.dtype, device=p.device))
        return out

    def _write(self, flat: Tensor, mask: Tensor) -> None:
        """Overwrite the parameter entries where ``mask`` is True with ``flat``'s values."""
        with torch.no_grad():
            for p, v, m in zip(
                self.params, self._split(flat), torch.split(mask, self.sizes), strict=True
            ):
                m = m.reshape(p.shape)
                if bool(m.any()):
                    p.copy_(torch.where(m, v, p))

    # ------------------------------------------------------------------------------ life cycle
    @property
    def fitted(self) -> bool:
        """Whether the warm-up is over and the modes are fitted."""
        return self.state is not None

    def after_epoch(self, epoch: int | None = None) -> None:
        """Feed the weights at the end of an epoch (``epoch`` is accepted for hook use and ignored)."""
        cfg = self.config
        self.epochs_seen += 1
        if self.state is None:
            self._record(self._flat())
            if self.epochs_seen == cfg.warmup_epochs:
                self._fit()
            return
        state = self.state
        flat = self._flat()
        if self.embedded is not None and bool(self.embedded.any()):
            model = self._model_weights(flat)
            flat = torch.where(self.embedded, model, flat)
            self._write(flat, self.embedded)
        state.update(flat, check_finite=True)
        if cfg.embed and (self.epochs_seen - self._fit_epoch) % cfg.embed_every == 0:
            self._embed(flat)

    def _record(self, flat: Tensor) -> None:
        if not bool(torch.isfinite(flat).all()):
            raise NonFiniteError("the model's parameters contain NaN or Inf")
        if self._warmup is None:
            device = self.config.warmup_device or self.device
            self._warmup = torch.empty(
                (self.num_params, self.config.warmup_epochs), dtype=self.dtype, device=device
            )
        self._warmup[:, self.epochs_seen - 1] = flat.to(self._warmup.device)

    def _fit(self) -> None:
        cfg = self.config
        assert self._warmup is not None
        fitted = core.OnlineCMD.from_trajectory(
            self._warmup,
            None if cfg.tol is not None else cfg.max_modes,
            tol=cfg.tol,
            sizes=self.sizes,
            num_samples=cfg.num_samples,
            seed=cfg.seed,
            metric=cfg.metric,
            chunk_size=cfg.chunk_size,
            check_finite=False,  # checked epoch by epoch while recording
        )
        self._warmup = None
        self.state = _to_device(fitted, self.device)
        self._fit_epoch = self.epochs_seen
        if cfg.embed:
            self.embedded = torch.zeros(self.num_params, dtype=torch.bool, device=self.device)
            self._prev = self.state.coefficients()

    def _model_weights(self, flat: Tensor) -> Tensor:
        """``a r + b`` with ``r`` read from ``flat`` (the current values of the references)."""
        state = self._require()
        a, _ = state.coefficients()
        r = flat[torch.as_tensor(state.references, device=flat.device)]
        out: Tensor = state.w_mean + a * (r - state.r_mean)[state.assignment]
        return out

    def _embed(self, flat: Tensor) -> None:
        state = self._require()
        assert self.embedded is not None
        assert self._prev is not None
        a, b = state.coefficients()
        new = core.select_embedding(
            a, b, *self._prev, self.embedded, state.references, self.config.embed_fraction
        )
        added = new & ~self.embedded
        self.embedded = new
        self._prev = (a, b)
        self._write(self._model_weights(flat), added)

    def _require(self) -> core.OnlineCMD:
        if self.state is None:
            raise RuntimeError(
                f"CMD is not fitted yet ({self.epochs_seen} of {self.config.warmup_epochs} "
                "warm-up epochs seen)"
            )
        return self.state

    # ------------------------------------------------------------------------------ results
    def cmd_weights(self) -> list[Tensor]:
        """The CMD weights at the latest epoch, one tensor per parameter (shape and dtype of each)."""
        return self._split(self._require().weights())

    def coefficients(self) -> tuple[Tensor, Tensor]:
        """``(a, b)`` of every scalar parameter (flat, state dtype)."""
        return self._require().coefficients()

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside the block the parameters hold the CMD weights; afterwards exactly the trained ones.

        The trained tensors are not copied: each parameter's ``.data`` is pointed at a CMD tensor and
        back, so only the CMD weights themselves are allocated. Before the fit this does nothing.
        """
        if self.state is None:
            yield
            return
        new = self.cmd_weights()
        saved = [p.data for p in self.params]
        try:
            for p, v in zip(self.params, new, strict=True):
                p.data = v
            yield
        finally:
            for p, old in zip(self.params, saved, strict=True):
                p.data = old

    def state_nbytes(self) -> int:
        """Bytes of the CMD state (warm-up trajectory while warming up; embedding extras included)."""
        total = 0
        if self._warmup is not None:
            total += self._warmup.numel() * self._warmup.element_size()
        if self.state is not None:
            total += self.state.nbytes()
        for t in (self.embedded, *(self._prev or ())):
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    # ------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (tensors and plain values only: ``torch.load(weights_only=True)``)."""
        out: dict[str, Any] = {
            "config": asdict(self.config),
            "num_params": self.num_params,
            "epochs_seen": self.epochs_seen,
            "fit_epoch": self._fit_epoch,
            "warmup": self._warmup,
            "embedded": self.embedded,
            "prev": None if self._prev is None else list(self._prev),
            "core": None,
        }
        if self.state is not None:
            core_state = self.state.state_dict()
            core_state["references"] = torch.as_tensor(core_state["references"])
            out["core"] = core_state
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (tensors are moved to this model's device)."""
        if int(state["num_params"]) != self.num_params:
            raise ValueError(
                f"the CMD state covers {state['num_params']} parameters, this model has "
                f"{self.num_params}"
            )
        self.config = CMDConfig(**state["config"])
        self.epochs_seen = int(state["epochs_seen"])
        self._fit_epoch = int(state["fit_epoch"])
        self._warmup = state["warmup"]
        self.embedded = None if state["embedded"] is None else state["embedded"].to(self.device)
        prev = state["prev"]
        self._prev = None if prev is None else (prev[0].to(self.device), prev[1].to(self.device))
        if state["core"] is None:
            self.state = None
        else:
            core_state = dict(state["core"])
            core_state["references"] = np.asarray(core_state["references"].cpu(), dtype=np.int64)
            self.state = _to_device(core.OnlineCMD.from_state_dict(core_state), self.device)


def _to_device(state: core.OnlineCMD, device: torch.device) -> core.OnlineCMD:
    arrays = state.state_dict()
    moved = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in arrays.items()}
    return core.OnlineCMD.from_state_dict(moved)
