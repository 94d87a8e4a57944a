"""Online CMD for PyTorch models: warm-up recording, online fit, swapped-in evaluation, embedding.

:class:`CMDTracker` follows a model through training, one call per epoch::

    cmd = CMDTracker(model, CMDConfig(warmup_epochs=20, max_modes=10))
    for epoch in range(epochs):
        train_one_epoch(model)
        cmd.after_epoch()                 # records (warm-up), fits once, then updates online
        with cmd.swapped():               # the CMD weights a * r(t) + b, only inside the block
            evaluate(model)

or, like :class:`torch.optim.swa_utils.AveragedModel` and Lightning's callbacks, one call per optimizer
step, with the cadence in the config (here one time point every 100 steps)::

    cmd = CMDTracker(model, CMDConfig(warmup_epochs=20, max_modes=10, every_n_steps=100))
    for x, y in loader:
        loss_fn(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        cmd.step()                        # every 100th call: what after_epoch() does

A CMD **time point** is one recorded snapshot of the weights, whichever cadence produced it: one
:meth:`CMDTracker.after_epoch` call, or every ``every_n_steps``-th :meth:`CMDTracker.step` call. The
counts in :class:`CMDConfig` (``warmup_epochs``, ``embed_every``) and :attr:`CMDTracker.epochs_seen`
count time points; the names come from the per-epoch cadence of the paper. With ``every_n_steps``
equal to the number of optimizer steps per epoch, ``step()`` gives exactly the state that
``after_epoch()`` at the end of each epoch gives. A tracker uses one cadence: ``after_epoch()`` refuses
a config with ``every_n_steps``, and ``step()`` one without.

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
:meth:`CMDTracker.after_epoch` (or :meth:`CMDTracker.step`) on every rank, no communication is needed.
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
from lowrank_core._array import check_device
from lowrank_core._validate import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_seed,
    describe,
)
from lowrank_core.errors import (
    CheckpointError,
    DeviceMismatchError,
    LowRankError,
    NonFiniteError,
    ParameterError,
    ParameterTypeError,
    RankError,
)

__all__ = ["CMDConfig", "CMDTracker", "NotFittedError"]


class NotFittedError(LowRankError, RuntimeError):
    """A result of :class:`CMDTracker` was asked for before the warm-up epochs were over."""


@dataclass(frozen=True)
class CMDConfig:
    """Settings of :class:`CMDTracker` (defaults from the paper where it has one).

    - ``warmup_epochs`` (``F``, 20): time points (epochs, or ``every_n_steps`` steps each) recorded
      before the modes are fitted (>= 2);
    - ``max_modes`` (``M``, 2: the paper's ResNet setting; measured best for the online shadow model
      on MNIST-1D, digits and the byte LM, where ``M = 10`` with reference profiles loses 0.3-3 points,
      see ``benchmarks/cmd_generalization.py``) or ``tol``: the number of modes, or the automatic
      choice (the smallest ``M`` whose relative error on the sample is <= ``tol``); ``tol`` wins when
      both are set. For more modes, ``profile='centroid'`` keeps the online error falling with ``M``;
    - ``num_samples`` (``K``, 1000), ``seed``, ``metric`` (``'euclidean'``, the default: the paper's
      distance between rows of ``|corr|``; ``'correlation'``: distance ``1 - |corr|``), ``chunk_size``:
      see :func:`lowrank_core.cmd.fit_cmd`;
    - ``warmup_device``: where the warm-up trajectory lives (``None``: the parameters' device);
    - ``dtype``: dtype of the CMD state (``None``: float64 for float64 parameters, else float32);
    - ``embed``, ``embed_every`` (``L``, 10), ``embed_fraction`` (``P``, 0.1): embedded CMD: every ``L``
      epochs after the fit, the ``ceil(P N)`` parameters whose ``(a, b)`` moved least since the last
      embedding are embedded; embedded parameters are overwritten by their model ``a r(t) + b`` at
      every time point (``L`` counts time points too);
    - ``profile`` (``'reference'``, the published method): where each mode's profile comes from:
      its reference parameter's values, or ``'centroid'``: the mean of its sampled members' warm-up
      standardised trajectories, a fixed linear function of the weights that one parameter's later
      quirks cannot take over (see :class:`lowrank_core.cmd.OnlineCMD`); every parameter is assigned
      to the centroid profile it correlates with most over the warm-up, and the sampled members, like
      the references, are never embedded;
    - ``every_n_steps`` (``None``): the per-step cadence: :meth:`CMDTracker.step`, called after every
      optimizer step, makes a time point of every ``every_n_steps``-th call. ``None`` (the default):
      one time point per :meth:`CMDTracker.after_epoch` call.

    Every field is validated at construction (``ParameterError`` / ``ParameterTypeError``, ``RankError``
    for ``max_modes`` and ``num_samples``): integers must be integers (NumPy integer scalars are accepted,
    ``2.5`` and ``True`` are not), fractions real numbers in range (NumPy floats accepted). Values are
    stored in plain Python form, so :func:`dataclasses.asdict` is what ``torch.save`` can write.
    """

    warmup_epochs: int = 20
    max_modes: int | None = 2
    tol: float | None = None
    num_samples: int = 1000
    seed: int = 0
    metric: core.Metric = core.DEFAULT_METRIC
    chunk_size: int = core.DEFAULT_CHUNK_SIZE
    warmup_device: str | None = "cpu"
    dtype: str | None = None
    embed: bool = False
    embed_every: int = 10
    embed_fraction: float = 0.1
    every_n_steps: int | None = None
    profile: str = "reference"

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)  # frozen: store the canonical form

        put("warmup_epochs", check_int("warmup_epochs", self.warmup_epochs, min=2))
        put(
            "max_modes",
            check_int(
                "max_modes",
                self.max_modes,
                min=1,
                optional=True,
                error=RankError,
                type_error=RankError,
            ),
        )
        put("tol", check_float("tol", self.tol, min=0.0, max=1.0, optional=True))
        if self.max_modes is None and self.tol is None:
            raise ParameterError("give `max_modes` or `tol`")
        put(
            "num_samples",
            check_int(
                "num_samples", self.num_samples, min=1, error=RankError, type_error=RankError
            ),
        )
        put("seed", check_seed("seed", self.seed))
        put("metric", check_choice("metric", self.metric, core.METRICS))
        put("profile", check_choice("profile", self.profile, core.PROFILES))
        put("chunk_size", check_int("chunk_size", self.chunk_size, min=1))
        device: object = self.warmup_device
        if isinstance(device, torch.device):
            device = str(device)
        if device is not None:
            if not isinstance(device, str):
                raise ParameterTypeError(
                    f"`warmup_device` must be None, a device string or a torch.device, got "
                    f"{describe(device)}"
                )
            try:
                torch.device(device)
            except (RuntimeError, ValueError) as exc:
                raise ParameterError(f"`warmup_device` {device!r} is not a device: {exc}") from None
        put("warmup_device", device)
        if self.dtype is not None:
            check_choice("dtype", self.dtype, ("float32", "float64"))
        put("embed", check_bool("embed", self.embed))
        put("embed_every", check_int("embed_every", self.embed_every, min=1))
        put(
            "embed_fraction",
            check_float("embed_fraction", self.embed_fraction, min=0.0, max=1.0, min_open=True),
        )
        put("every_n_steps", check_int("every_n_steps", self.every_n_steps, min=1, optional=True))


def _trainable(model: nn.Module | Iterable[nn.Parameter]) -> list[tuple[str, nn.Parameter]]:
    if isinstance(model, nn.Module):
        named = list(model.named_parameters())
    else:
        named = [(str(i), p) for i, p in enumerate(model)]
        for name, p in named:
            if not isinstance(p, torch.Tensor):
                raise ParameterTypeError(
                    f"`model` must yield parameters (tensors); item {name} is {describe(p)}"
                )
    return [(n, p) for n, p in named if p.requires_grad and torch.is_floating_point(p)]


class CMDTracker:
    """Online (and optionally embedded) CMD of a model's trainable parameters.

    ``model`` is an ``nn.Module`` (or an iterable of parameters; under DDP the wrapped module or the DDP
    wrapper, whose parameters are the same objects). See the module docstring for the life cycle.
    """

    def __init__(
        self, model: nn.Module | Iterable[nn.Parameter], config: CMDConfig | None = None
    ) -> None:
        if config is not None and not isinstance(config, CMDConfig):
            raise ParameterTypeError(
                f"`config` must be a CMDConfig or None, got {describe(config)}"
            )
        if isinstance(model, (str, bytes, torch.Tensor)) or not isinstance(
            model, (nn.Module, Iterable)
        ):
            raise ParameterTypeError(
                f"`model` must be an nn.Module or an iterable of parameters, got {describe(model)}"
            )
        named = _trainable(model)
        if not named:
            raise ParameterError("the model has no trainable floating-point parameters")
        params = [p for _, p in named]
        device = params[0].device
        if any(p.device != device for p in params):
            raise DeviceMismatchError("CMD needs every trainable parameter on one device")
        for name, p in named:
            check_device(p, f"model parameter {name}")
        self.config = config or CMDConfig()
        self._named = named
        self.params = params
        self.sizes = [p.numel() for p in self.params]
        self.num_params = sum(self.sizes)
        self.device = device
        if self.config.dtype is not None:
            self.dtype = getattr(torch, self.config.dtype)
        else:
            all64 = all(p.dtype == torch.float64 for p in self.params)
            self.dtype = torch.float64 if all64 else torch.float32
        #: CMD time points so far (one per ``after_epoch()``, or per ``every_n_steps`` steps)
        self.epochs_seen = 0
        #: :meth:`step` calls so far (0 in the per-epoch cadence)
        self.steps_seen = 0
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

    @property
    def time_points(self) -> int:
        """CMD time points recorded so far (the same count as :attr:`epochs_seen`, for either cadence)."""
        return self.epochs_seen

    def after_epoch(self, epoch: int | None = None) -> None:
        """Feed the weights at the end of an epoch (``epoch`` is accepted for hook use and ignored).

        One time point: recorded during the warm-up, the fit after the ``warmup_epochs``-th, an online
        update after that. Only for the per-epoch cadence (``every_n_steps=None``).
        """
        n = self.config.every_n_steps
        if n is not None:
            raise ParameterError(
                f"this tracker records every {n} optimizer steps (CMDConfig.every_n_steps={n}): call "
                "step() after each optimizer.step(), not after_epoch()"
            )
        self._time_point()

    def step(self) -> None:
        """Call after every ``optimizer.step()``: every ``every_n_steps``-th call is one time point.

        The per-step counterpart of :meth:`after_epoch` (as :meth:`AveragedModel.update_parameters
        <torch.optim.swa_utils.AveragedModel.update_parameters>` is called per step); the cadence is
        ``CMDConfig.every_n_steps``, and :attr:`steps_seen` counts the calls (saved by
        :meth:`state_dict`). A call that raises does not count.
        """
        n = self.config.every_n_steps
        if n is None:
            raise ParameterError(
                "step() needs the per-step cadence: CMDConfig(every_n_steps=n) makes a time point "
                "of every n-th call; for one time point per epoch call after_epoch() instead"
            )
        if (self.steps_seen + 1) % n == 0:
            self._time_point()
        self.steps_seen += 1

    def _time_point(self) -> None:
        cfg = self.config
        t = self.epochs_seen + 1
        if self.state is None:
            self._record(self._flat(), t - 1)
            if t == cfg.warmup_epochs:
                self._fit(t)
            self.epochs_seen = t
            return
        state = self.state
        flat = self._flat()
        if self.embedded is not None and bool(self.embedded.any()):
            model = self._model_weights(flat)
            flat = torch.where(self.embedded, model, flat)
            self._write(flat, self.embedded)
        state.update(flat, check_finite=True)
        self.epochs_seen = t
        if cfg.embed and (t - self._fit_epoch) % cfg.embed_every == 0:
            self._embed(flat)

    def _record(self, flat: Tensor, column: int) -> None:
        if not bool(torch.isfinite(flat).all()):
            raise NonFiniteError("the model's parameters contain NaN or Inf")
        if self._warmup is None:
            device = self.config.warmup_device or self.device
            # zeros, not empty: a checkpoint taken during the warm-up holds no uninitialized memory
            self._warmup = torch.zeros(
                (self.num_params, self.config.warmup_epochs), dtype=self.dtype, device=device
            )
        self._warmup[:, column] = flat.to(self._warmup.device)

    def _fit(self, time_point: int) -> None:
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
            profile=cfg.profile,
        )
        self._warmup = None
        self.state = _to_device(fitted, self.device)
        self._fit_epoch = time_point
        if cfg.embed:
            self.embedded = torch.zeros(self.num_params, dtype=torch.bool, device=self.device)
            self._prev = self.state.coefficients()

    def _model_weights(self, flat: Tensor) -> Tensor:
        """``a r + b`` with ``r`` read from ``flat`` (the profiles' current values)."""
        state = self._require()
        a, _ = state.coefficients()
        r = state.profile_values(flat)
        out: Tensor = state.w_mean + a * (r - state.r_mean)[state.assignment]
        return out

    def _embed(self, flat: Tensor) -> None:
        state = self._require()
        assert self.embedded is not None
        assert self._prev is not None
        a, b = state.coefficients()
        protect = state.references if state.mix_rows is None else state.protected()
        new = core.select_embedding(
            a, b, *self._prev, self.embedded, protect, self.config.embed_fraction
        )
        added = new & ~self.embedded
        self.embedded = new
        self._prev = (a, b)
        self._write(self._model_weights(flat), added)

    def _require(self) -> core.OnlineCMD:
        if self.state is None:
            raise NotFittedError(
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
            "steps_seen": self.steps_seen,
            "fit_epoch": self._fit_epoch,
            "warmup": self._warmup,
            "embedded": self.embedded,
            "prev": None if self._prev is None else list(self._prev),
            "core": None,
        }
        if self.state is not None:
            core_state = self.state.state_dict()
            core_state["references"] = torch.as_tensor(core_state["references"])
            if "mix_rows" in core_state:
                core_state["mix_rows"] = torch.as_tensor(core_state["mix_rows"])
            out["core"] = core_state
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (tensors are moved to this model's device).

        Everything is validated before anything is changed: a state that does not fit (another model,
        missing or unexpected keys, tensors of the wrong kind, an invalid config or core state) raises
        :class:`~lowrank_core.errors.CheckpointError` naming it (as ``lowrank_jax``'s tracker and the
        OIALR controllers do) and leaves the tracker exactly as it was.
        """
        try:
            fields = self._check_state(state)
        except CheckpointError:
            raise
        except LowRankError as exc:
            raise CheckpointError(f"the CMD state does not fit: {exc}") from exc
        # everything checked: apply
        self.config = fields["config"]
        self.epochs_seen = fields["epochs_seen"]
        self.steps_seen = fields["steps_seen"]
        self._fit_epoch = fields["fit_epoch"]
        self._warmup = fields["warmup"]
        embedded, prev = fields["embedded"], fields["prev"]
        self.embedded = None if embedded is None else embedded.to(self.device)
        self._prev = None if prev is None else (prev[0].to(self.device), prev[1].to(self.device))
        self.state = fields["state"]

    def _check_state(self, state: Any) -> dict[str, Any]:
        """The fields of a :meth:`state_dict`, every one checked (nothing is changed)."""
        if not isinstance(state, dict):
            raise ParameterTypeError(f"the CMD state must be a dict, got {describe(state)}")
        keys = {
            "config",
            "num_params",
            "epochs_seen",
            "steps_seen",
            "fit_epoch",
            "warmup",
            "embedded",
            "prev",
            "core",
        }
        missing = sorted(keys - set(state))
        if missing:
            raise ParameterError(f"the CMD state is missing {missing}")
        extra = sorted(str(k) for k in set(state) - keys)
        if extra:
            raise ParameterError(f"the CMD state has unexpected keys {extra}")
        num_params = check_int("num_params", state["num_params"], min=1)
        if num_params != self.num_params:
            raise ParameterError(
                f"the CMD state covers {num_params} parameters, this model has {self.num_params}"
            )
        if not isinstance(state["config"], dict):
            raise ParameterTypeError(f"`config` must be a dict, got {describe(state['config'])}")
        try:
            config = CMDConfig(**state["config"])
        except TypeError as exc:  # unknown field names
            raise ParameterError(f"the CMD state's config does not fit CMDConfig: {exc}") from None
        epochs_seen = check_int("epochs_seen", state["epochs_seen"], min=0)
        steps_seen = check_int("steps_seen", state["steps_seen"], min=0)
        fit_epoch = check_int("fit_epoch", state["fit_epoch"], min=0)
        warmup = state["warmup"]
        if warmup is not None and (
            not isinstance(warmup, Tensor)
            or warmup.shape != (self.num_params, config.warmup_epochs)
            or not torch.is_floating_point(warmup)
        ):
            raise ParameterError(
                f"`warmup` must be None or a floating ({self.num_params}, {config.warmup_epochs}) "
                f"tensor, got {describe(warmup)}"
            )
        embedded = state["embedded"]
        if embedded is not None and (
            not isinstance(embedded, Tensor)
            or embedded.shape != (self.num_params,)
            or embedded.dtype != torch.bool
        ):
            raise ParameterError(
                f"`embedded` must be None or a bool ({self.num_params},) tensor, got {describe(embedded)}"
            )
        prev = state["prev"]
        if prev is not None and (
            not isinstance(prev, (list, tuple))
            or len(prev) != 2
            or not all(
                isinstance(v, Tensor)
                and v.shape == (self.num_params,)
                and torch.is_floating_point(v)
                for v in prev
            )
        ):
            raise ParameterError(
                f"`prev` must be None or two floating ({self.num_params},) tensors, got {describe(prev)}"
            )
        new_state: core.OnlineCMD | None = None
        if state["core"] is not None:
            if not isinstance(state["core"], dict):
                raise ParameterTypeError(f"`core` must be a dict, got {describe(state['core'])}")
            core_state = dict(state["core"])
            for key in ("references", "mix_rows"):
                rows = core_state.get(key)
                if isinstance(rows, Tensor):
                    core_state[key] = np.asarray(rows.detach().cpu())
            new_state = _to_device(core.OnlineCMD.from_state_dict(core_state), self.device)
            if new_state.num_params != self.num_params:
                raise ParameterError(
                    f"the core CMD state covers {new_state.num_params} parameters, this model has "
                    f"{self.num_params}"
                )
        return {
            "config": config,
            "epochs_seen": epochs_seen,
            "steps_seen": steps_seen,
            "fit_epoch": fit_epoch,
            "warmup": warmup,
            "embedded": embedded,
            "prev": prev,
            "state": new_state,
        }


def _to_device(state: core.OnlineCMD, device: torch.device) -> core.OnlineCMD:
    arrays = state.state_dict()
    moved = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in arrays.items()}
    return core.OnlineCMD.from_state_dict(moved)
