"""OIALR on a model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

:class:`FSDPOIALR` runs the schedule of :class:`~lowrank_torch.oialr.OIALR` (same config, same
decisions, same optimizer-state transforms) on sharded weights:

* **Switch.** Each eligible layer must be its own FSDP unit (``fully_shard(layer)`` before
  ``fully_shard(model)``). Its weight is gathered (``unshard``: every rank gets the full tensor) for
  the SVD, the low-rank layer is built from the full weight, and ``fully_shard`` is applied to it, so
  ``sigma`` and the bias are sharded like every other parameter. The optimizer state of the weight is
  gathered, mapped into Sigma's coordinates by :func:`lowrank_torch.optim_state.dense_to_sigma_state`
  and re-sharded like ``sigma``.
* **Rank update.** ``sigma`` is gathered (``full_tensor``); :func:`lowrank_core.update_rank` runs on the
  full factors; the layer is rebuilt at the new rank and sharded again, its state rotated / truncated
  by :mod:`lowrank_torch.optim_state` on the gathered state and re-sharded.
* **Stability checks** gather one weight at a time.

Every rank computes the same SVDs of the same (all-gathered, bit-identical) matrices, so the factors
are identical on every rank, as under DDP; the tests check this. Everything of a low-rank layer is
sharded: ``sigma`` (``r x r``) and the bias, and the frozen bases ``U`` and ``V``, which become frozen
parameters of the FSDP unit (FSDP2 shards parameters, not buffers); they keep their names and
``state_dict`` keys. Gathering for an update costs one all-gather of ``U``, ``sigma`` and ``V``.

After a switch or update the module tree has new FSDP units; the root's lazy initialization (which
collects the units at the first forward) is reset so that the next forward sees them. This uses FSDP2's
internal state (``torch.distributed.fsdp._fully_shard``; tested with torch 2.13). The optimizer is
updated in place; :attr:`~lowrank_torch.oialr.OIALR.structure_changed` is ``True`` after such a step,
but nothing has to be rebuilt by the caller. Not supported here: ``nn.MultiheadAttention`` (its packed
in-projection is a parametrization; exclude it, e.g. with ``include=(nn.Linear,)``) and restoring an
FSDP OIALR state with ``load_state_dict``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

import lowrank_core as lc

from .convert import set_submodule, to_low_rank
from .layers import (
    LowRankConv1d,
    LowRankConv2d,
    LowRankConv3d,
    LowRankConvNd,
    LowRankLayer,
    LowRankLinear,
)
from .oialr import OIALR, OIALRConfig, dense_params
from .optim_state import (
    dense_to_sigma_state,
    find_parameter,
    rotate_sigma_state,
    swap_parameter,
    truncate_sigma_state,
)
from .sharded import ShardingError, is_dtensor

__all__ = ["FSDPOIALR"]


def _fsdp() -> Any:
    from torch.distributed import fsdp

    return fsdp


def _is_fsdp_unit(module: nn.Module) -> bool:
    return isinstance(module, _fsdp().FSDPModule)


def _full(t: Tensor) -> Tensor:
    """The whole tensor (all-gathered when it is a DTensor)."""
    if is_dtensor(t):
        out: Tensor = t.full_tensor()  # type: ignore[attr-defined]
        return out
    return t


def _state_to_full(optimizer: torch.optim.Optimizer, p: Tensor) -> dict[str, Any]:
    """``p``'s optimizer state with every DTensor entry gathered (removed from the optimizer)."""
    state = optimizer.state.pop(p, None) or {}
    return {k: _full(v) if isinstance(v, Tensor) else v for k, v in state.items()}


def _shard_state(optimizer: torch.optim.Optimizer, placeholder: Tensor, p: Tensor) -> None:
    """Move ``placeholder``'s (full) state to the sharded parameter ``p``, sharded like ``p``."""
    from torch.distributed.tensor import distribute_tensor

    state = optimizer.state.pop(placeholder, None)
    swap_parameter(optimizer, placeholder, p)  # type: ignore[arg-type]
    if not state:
        return
    mesh, placements = p.device_mesh, p.placements  # type: ignore[attr-defined]
    optimizer.state[p] = {
        k: distribute_tensor(v, mesh, placements)
        if isinstance(v, Tensor) and v.shape == p.shape and not is_dtensor(v)
        else v
        for k, v in state.items()
    }


def _placeholder(optimizer: torch.optim.Optimizer, p: Tensor) -> nn.Parameter:
    """A plain full-size parameter in ``p``'s optimizer slot, holding ``p``'s gathered state."""
    state = _state_to_full(optimizer, p)
    plain = nn.Parameter(_full(p.detach()), requires_grad=p.requires_grad)
    swap_parameter(optimizer, p, plain)  # type: ignore[arg-type]
    if state:
        optimizer.state[plain] = state
    return plain


def _rebuild(
    layer: LowRankLayer, U: Tensor, S: Tensor, V: Tensor, bias: Tensor | None
) -> LowRankLayer:
    """A new, unsharded layer of ``layer``'s kind and settings with the given factors and bias."""
    if isinstance(layer, LowRankLinear):
        return LowRankLinear(U, S, V, bias, forward_mode=layer.forward_mode)
    if isinstance(layer, LowRankConvNd):
        cls = next(
            c for c in type(layer).__mro__ if c in (LowRankConv1d, LowRankConv2d, LowRankConv3d)
        )
        return cls(
            U,
            S,
            V,
            bias,
            in_channels=layer.in_channels,
            kernel_size=layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            padding_mode=layer.padding_mode,
            forward_mode=layer.forward_mode,
        )
    raise ShardingError(f"FSDP OIALR cannot rebuild a {type(layer).__name__}")


class FSDPOIALR(OIALR):
    """OIALR on a model sharded with ``fully_shard`` (see the module docstring).

    ``model``: the root FSDP module; every eligible layer must be an FSDP unit of its own.
    ``optimizer``: built from ``model.parameters()`` (the sharded DTensors). ``fsdp_kwargs``: passed to
    ``fully_shard`` for every new low-rank layer (``mesh`` defaults to the replaced weight's mesh).
    Call :meth:`step` on every rank after every optimizer step.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: OIALRConfig | None = None,
        *,
        fsdp_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ShardingError("FSDPOIALR needs an initialized torch.distributed process group")
        if not _is_fsdp_unit(model):
            raise ShardingError("FSDPOIALR needs the root module sharded with fully_shard")
        super().__init__(model, optimizer, config)
        for name in self.eligible:
            module = self.model.get_submodule(name)
            if isinstance(module, nn.MultiheadAttention):
                raise ShardingError(
                    f"{name}: nn.MultiheadAttention is not supported under FSDP OIALR; leave it dense "
                    "(include=(nn.Linear, nn.Conv2d, ...) or exclude_names)"
                )
            if not _is_fsdp_unit(module):
                raise ShardingError(
                    f"{name} is eligible for OIALR but not an FSDP unit of its own; apply "
                    f"fully_shard to it before fully_shard of the model (or exclude it)"
                )
        self.fsdp_kwargs = dict(fsdp_kwargs or {})

    # ------------------------------------------------------------------ FSDP plumbing
    def _shard(self, layer: LowRankLayer, like: Tensor) -> None:
        """``fully_shard`` a new low-rank layer, its frozen bases included.

        ``U`` and ``V`` are buffers of a :class:`~lowrank_torch.layers.LowRankLayer`, and FSDP2 shards
        parameters only; they become frozen parameters (``requires_grad=False``, same names, same
        ``state_dict`` keys) so that each rank holds ``1/world`` of them between forwards, like every
        other weight. (At the switch a full-rank ``U`` and ``V`` together hold ``(m + n) min(m, n)``
        numbers, more than the dense ``m n``: kept whole on every rank they would outgrow the dense
        shard.)
        """
        for name in ("U", "V"):
            value = layer._buffers.pop(name)
            assert value is not None
            layer.register_parameter(name, nn.Parameter(value, requires_grad=False))
        kwargs = dict(self.fsdp_kwargs)
        kwargs.setdefault("mesh", like.device_mesh)  # type: ignore[attr-defined]
        _fsdp().fully_shard(layer, **kwargs)

    def _reset_lazy_init(self) -> None:
        """Let the root collect its (new) FSDP units again at the next forward."""
        try:
            from torch.distributed.fsdp._fully_shard._fsdp_state import (
                FSDPStateContext,
                _get_module_fsdp_state,
            )
        except ImportError as exc:  # pragma: no cover - another torch's FSDP2 internals
            raise ShardingError(
                f"this torch ({torch.__version__}) lays out FSDP2's internal state differently; "
                "FSDPOIALR needs it to register new FSDP units (tested with torch 2.13)"
            ) from exc

        for module in self.model.modules():
            state = _get_module_fsdp_state(module)
            if state is not None:
                state._is_root = None
                state._state_ctx = FSDPStateContext()

    # ------------------------------------------------------------------ OIALR's hooks, sharded
    def stability_matrices(self, name: str) -> list[Tensor]:
        """The layer's weight matrix, gathered from its shards (every rank gets the full tensor)."""
        module = self.model.get_submodule(name)
        weight: Any = module.weight
        groups = int(getattr(module, "groups", 1))
        matrix: Tensor = lc.weight_to_matrix(_full(weight.detach()), groups=groups)
        return [matrix]

    def convert_layers(self, names: list[str], t: int) -> dict[str, dict[str, LowRankLayer]]:
        """Each layer is gathered, converted from its full weight and sharded again; its optimizer
        state is gathered, mapped into Sigma's coordinates and sharded like ``sigma``."""
        opt = self.optimizer
        out: dict[str, dict[str, LowRankLayer]] = {}
        for name in names:
            module: Any = self.model.get_submodule(name)
            old = dense_params(module)  # the sharded DTensors the optimizer holds
            weight, bias = old["weight"], old.get("bias")
            module.unshard()  # every rank: the full weight, for the SVD
            try:
                parts = to_low_rank(self.model, selection=self.config.selection, names=[name])
            finally:
                module.reshard()
            layer = parts[name]
            trained = find_parameter(opt, weight) is not None
            w_plain = _placeholder(opt, weight) if trained else None
            sigma_plain = layer.sigma
            if w_plain is not None:
                dense_to_sigma_state(
                    opt,
                    w_plain,
                    sigma_plain,
                    layer.U,
                    layer.V,
                    groups=layer.groups,
                    kinds=self.config.moment_kinds,
                )
            b_state = opt.state.pop(bias, None) if bias is not None else None
            self._shard(layer, weight)
            if w_plain is not None:
                _shard_state(opt, sigma_plain, layer.sigma)
            if (
                bias is not None
                and layer.bias is not None
                and find_parameter(opt, bias) is not None
            ):
                swap_parameter(opt, bias, layer.bias)  # same shape, same sharding: state as it is
                if b_state is not None:
                    opt.state[layer.bias] = b_state
            out[name] = {name: layer}
        self._reset_lazy_init()
        return out

    def full_factors(self, layer: LowRankLayer) -> tuple[Tensor, Tensor, Tensor]:
        """The layer's factors gathered from their shards (every rank gets the same full tensors)."""
        U, S, V = (_full(t.detach()) for t in (layer.U, layer.sigma, layer.V))
        return U, S, V

    def apply_rank_update(self, part: str, update: lc.RankUpdate) -> bool:
        """The layer is rebuilt at its new rank and sharded again; its state follows (gathered,
        rotated / truncated, sharded again). Always a new FSDP unit with new parameters."""
        opt = self.optimizer
        layer = self.layers[part]
        old_rank = layer.rank
        sigma_sh = layer.sigma
        rd = update.rediagonalized
        bias = layer.bias
        U, S, V = update.factors
        new = _rebuild(layer, U, S, V, _full(bias.detach()) if bias is not None else None)
        trained = find_parameter(opt, sigma_sh) is not None
        if trained:
            plain = _placeholder(opt, sigma_sh)
            rotate_sigma_state(opt, plain, rd.left, rd.right, kinds=self.config.moment_kinds)
            if update.rank < old_rank:
                truncate_sigma_state(opt, plain, update.rank)
        b_state = opt.state.pop(bias, None) if bias is not None else None
        self._shard(new, sigma_sh)
        set_submodule(self.model, part, new)
        if trained:
            _shard_state(opt, plain, new.sigma)
        if bias is not None and new.bias is not None and find_parameter(opt, bias) is not None:
            swap_parameter(opt, bias, new.bias)
            if b_state is not None:
                opt.state[new.bias] = b_state
        self.layers[part] = new
        self._reset_lazy_init()
        return True

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Not supported under FSDP (restore a dense checkpoint and switch again, or use DDP)."""
        raise ShardingError(
            "restoring an OIALR state into an FSDP model is not supported: restore a dense "
            "checkpoint and switch again, or use DDP"
        )
