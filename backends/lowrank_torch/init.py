"""Low-rank initialization of PyTorch models: spectral, nonlinear (ReLU-aware) or random factors.

Turns the eligible layers of a model (the rules of :mod:`lowrank_torch.convert`) into the factorized layers
of :mod:`lowrank_torch.layers` at a *fixed* rank and initializes their factors with
:func:`lowrank_core.init.init_weight_factors` (all the math lives in ``lowrank_core.init``):

- ``"spectral"``: the best rank-``r`` approximation of the layer's weight (Khodak et al., 2021);
- ``"nonlinear"``: the rank-``r`` weight whose ReLU response is closest to the dense layer's for Gaussian
  inputs (closed form, see :func:`lowrank_core.init.relu_function_error`); never worse than spectral in
  that sense, optionally refined further (``refine_steps``);
- ``"random"``: Gaussian factors whose product has the variance of PyTorch's default dense init.

The source weight is the layer's current weight: a pretrained layer is approximated, a freshly built
model gives "from scratch" low-rank training (``from_scratch=True`` re-draws the default dense init first).

Two layouts (``train_bases``):

- ``True`` (default, for training a low-rank network from step 0): the balanced factors are stored as
  ``U = left``, ``sigma = I_r``, ``V = right`` and ``U`` and ``V`` become trainable ``nn.Parameter`` s
  (:func:`train_bases_`), so every factor trains: ``(m + n + r) r`` scalars per layer (plus the bias).
- ``False``: OIALR's layout, ``U`` and ``V`` orthonormal frozen buffers and ``sigma = diag(s)`` the only
  trained factor (``r^2`` per layer).

The dense layer's bias ``nn.Parameter`` is reused as is (same object). When an ``optimizer`` is passed, each
replaced weight's slot in its param group is taken by the new layer's trainable factors (same group, so the
same ``lr`` / ``weight_decay``), which makes the conversion safe after the optimizer was built.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from lowrank_core._array import check_device
from lowrank_core._validate import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_seed,
    check_shape_pair,
    describe,
)
from lowrank_core.errors import (
    ArrayTypeError,
    DTypeError,
    NonFiniteError,
    ParameterError,
    ParameterTypeError,
    RankError,
    ShapeError,
)
from lowrank_core.init import (
    INIT_METHODS,
    default_init_std,
    frobenius_decay,
    init_weight_factors,
)
from lowrank_core.oialr import LayerSelection

from .convert import DEFAULT_INCLUDE, eligible_names, layer_selection, to_low_rank
from .layers import LowRankLayer, LowRankWeight, dense_matrix_shape
from .optim_state import find_parameter
from .undo import Undo

__all__ = [
    "INIT_METHODS",
    "frobenius_decay_penalty",
    "init_low_rank_layer_",
    "layer_rank",
    "low_rank_model",
    "train_bases_",
]


def layer_rank(shape: Sequence[int], rank_fraction: float) -> int:
    """``round(rank_fraction * min(m, n))``, at least 1 and at most ``min(m, n)`` (ALGORITHMS.md §4)."""
    m, n = check_shape_pair("shape", shape)
    fraction: float = check_float("rank_fraction", rank_fraction, min=0.0, max=1.0, min_open=True)
    k = min(m, n)
    return max(1, min(k, round(fraction * k)))


def train_bases_(layer: LowRankLayer) -> LowRankLayer:
    """Make ``layer.U`` and ``layer.V`` trainable ``nn.Parameter`` s (in place; returns ``layer``).

    The values and the ``state_dict`` keys are unchanged (``U``, ``V``), only their kind: a buffer becomes a
    parameter, so ``model.parameters()`` and an optimizer see it. Meant for fixed-rank training: OIALR's
    rank changes (``set_factors`` with a new rank) expect buffers.
    """
    if not isinstance(layer, LowRankLayer):
        raise ParameterTypeError(f"train_bases_ needs a LowRankLayer, got {describe(layer)}")
    for name in ("U", "V"):
        value = getattr(layer, name)
        if isinstance(value, nn.Parameter):
            continue
        delattr(layer, name)  # drop the buffer
        setattr(layer, name, nn.Parameter(value.detach()))
    return layer


def _random_std(layer: LowRankLayer) -> float:
    """The dense default init's std: PyTorch's Linear/ConvNd rule, Xavier for an attention in_proj."""
    if isinstance(layer, LowRankWeight):
        return math.sqrt(2.0 / (layer.weight_shape[0] + layer.weight_shape[1]))
    return default_init_std(layer.cols)


@torch.no_grad()
def init_low_rank_layer_(
    layer: LowRankLayer,
    weight: Tensor,
    *,
    init: str = "nonlinear",
    train_bases: bool = True,
    refine_steps: int = 0,
    seed: int | None = None,
) -> LowRankLayer:
    """Set ``layer``'s factors (at its current rank) from the dense ``weight`` it replaces; in place.

    ``weight`` has the layer's ``weight_shape``. ``init`` is ``"spectral"``, ``"nonlinear"`` or
    ``"random"`` (then only ``weight``'s shape is used; the product's std is the dense default init's).
    With ``train_bases`` the balanced factors go to ``U`` and ``V`` (``sigma = I``) and all three train
    (:func:`train_bases_`); otherwise the OIALR form (orthonormal frozen ``U``, ``V``, diagonal ``sigma``).
    """
    if not isinstance(layer, LowRankLayer):
        raise ParameterTypeError(f"`layer` must be a LowRankLayer, got {describe(layer)}")
    if not isinstance(weight, Tensor):
        raise ArrayTypeError(f"`weight` must be a torch.Tensor, got {describe(weight)}")
    init = check_choice("init", init, INIT_METHODS)
    train_bases = check_bool("train_bases", train_bases)
    refine_steps = check_int("refine_steps", refine_steps, min=0)
    seed = check_seed("seed", seed)
    if tuple(weight.shape) != tuple(layer.weight_shape):
        raise ShapeError(
            f"`weight` has shape {tuple(weight.shape)}, the layer needs {layer.weight_shape}"
        )
    if not weight.is_floating_point():
        raise DTypeError(f"`weight` must be a floating tensor, got {weight.dtype}")
    check_device(weight, "weight")
    if init != "random" and not bool(torch.isfinite(weight).all()):
        raise NonFiniteError("`weight` contains NaN or Inf")
    w = weight.detach().to(device=layer.sigma.device, dtype=layer.sigma.dtype)
    if init != "random" and w.dtype != weight.dtype and not bool(torch.isfinite(w).all()):
        raise NonFiniteError(
            f"`weight` ({weight.dtype}) has entries too large for the layer's dtype {w.dtype} "
            f"(max |w| = {float(weight.detach().abs().max()):.3g}); convert the layer first"
        )
    f = init_weight_factors(
        w,
        layer.rank,
        method=init,
        groups=layer.groups,
        balanced=train_bases,
        refine_steps=refine_steps,
        std=_random_std(layer) if init == "random" else None,
        seed=seed,
    )
    layer.set_factors(f.U, f.Sigma, f.V)
    if train_bases:
        train_bases_(layer)
    return layer


def _reset(module: nn.Module) -> None:
    if isinstance(module, nn.MultiheadAttention):
        module._reset_parameters()
    else:
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()


def _dense_sources(name: str, module: nn.Module) -> dict[str, tuple[Tensor, nn.Parameter | None]]:
    """``{new layer name: (dense weight, dense bias Parameter)}`` for what ``to_low_rank`` creates."""
    if isinstance(module, nn.MultiheadAttention):
        out_proj = module.out_proj
        sources: dict[str, tuple[Tensor, nn.Parameter | None]] = {
            f"{name}.out_proj": (out_proj.weight, out_proj.bias)
        }
        if module._qkv_same_embed_dim and module.in_proj_weight is not None:
            sources[f"{name}.parametrizations.in_proj_weight.0"] = (module.in_proj_weight, None)
        return sources
    weight = module.weight
    bias = getattr(module, "bias", None)
    assert isinstance(weight, Tensor)
    return {name: (weight, bias if isinstance(bias, nn.Parameter) else None)}


def _module_rank(module: nn.Module, rank_fraction: float, rank: int | None) -> int:
    if isinstance(module, nn.MultiheadAttention):
        k = int(module.embed_dim)
        shape: tuple[int, int] = (k, k)
    else:
        shape = dense_matrix_shape(module)
        k = min(shape)
    if rank is not None:
        return min(int(rank), k)
    return layer_rank(shape, rank_fraction)


def _swap_into_optimizer(optimizer: torch.optim.Optimizer, old: Tensor, new: list[Tensor]) -> None:
    """Replace ``old`` by the parameters ``new`` at its place in its param group; drop its state."""
    where = find_parameter(optimizer, old)
    if where is None:
        raise ParameterError(
            f"a replaced weight of shape {tuple(old.shape)} is not in the optimizer; pass the "
            "optimizer that was built from this model's parameters (or none)"
        )
    gi, pi = where
    params = optimizer.param_groups[gi]["params"]
    params[pi : pi + 1] = new
    optimizer.state.pop(old, None)


def low_rank_model(
    model: nn.Module,
    rank_fraction: float = 0.25,
    *,
    init: str = "nonlinear",
    rank: int | None = None,
    train_bases: bool = True,
    refine_steps: int = 0,
    from_scratch: bool = False,
    seed: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    include: Iterable[type[nn.Module]] = DEFAULT_INCLUDE,
    exclude_names: Iterable[str] = (),
    keep_first: bool = False,
    keep_last: bool = True,
    min_aspect: float = 0.1,
    allow_rank_one: bool = False,
    selection: LayerSelection | None = None,
) -> dict[str, LowRankLayer]:
    """Convert ``model``'s eligible layers to fixed-rank factorized layers and initialize them; in place.

    Eligibility is :func:`lowrank_torch.convert.eligible_names` with the same keyword arguments (or a
    :class:`lowrank_core.oialr.LayerSelection` as ``selection``). Each layer
    gets rank ``round(rank_fraction * min(m, n))`` (at least 1) of its matrix view, or ``min(rank, m, n)``
    when ``rank`` is given. ``init`` / ``train_bases`` / ``refine_steps`` as in :func:`init_low_rank_layer_`;
    ``from_scratch=True`` first re-draws each converted layer's default dense init (torch's global RNG), so
    the factors approximate a fresh dense layer instead of the current weights. ``seed`` (random init only)
    makes the factors reproducible (layer ``i`` uses ``seed + i``); without it they come from torch's global
    generator. ``optimizer``: see the module docstring. Returns ``{qualified name: new layer}`` as
    :func:`~lowrank_torch.convert.to_low_rank` does.
    """
    if not isinstance(model, nn.Module):
        raise ParameterTypeError(f"`model` must be an nn.Module, got {describe(model)}")
    init = check_choice("init", init, INIT_METHODS)
    if rank is None:
        check_float("rank_fraction", rank_fraction, min=0.0, max=1.0, min_open=True)
    rank = check_int("rank", rank, min=1, optional=True, error=RankError, type_error=RankError)
    train_bases = check_bool("train_bases", train_bases)
    from_scratch = check_bool("from_scratch", from_scratch)
    refine_steps = check_int("refine_steps", refine_steps, min=0)
    seed = check_seed("seed", seed)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ParameterTypeError(
            f"`optimizer` must be a torch.optim.Optimizer or None, got {describe(optimizer)}"
        )
    sel = layer_selection(
        selection,
        include=include,
        exclude_names=exclude_names,
        keep_first=keep_first,
        keep_last=keep_last,
        min_aspect=min_aspect,
        allow_rank_one=allow_rank_one,
    )
    names = eligible_names(model, selection=sel)
    if optimizer is not None:  # checked before anything changes
        for name in names:
            for sub, (weight, _) in _dense_sources(name, model.get_submodule(name)).items():
                if find_parameter(optimizer, weight) is None:
                    raise ParameterError(
                        f"the weight of {sub!r} is not in the optimizer; pass the optimizer that "
                        "was built from this model's parameters (or none)"
                    )
    undo = Undo(model, optimizer)
    redrawn: list[tuple[Tensor, Tensor]] = []  # (tensor, its value before from_scratch re-drew it)
    try:
        return _convert_all(
            model,
            names,
            rank_fraction=rank_fraction,
            init=init,
            rank=rank,
            train_bases=train_bases,
            refine_steps=refine_steps,
            from_scratch=from_scratch,
            seed=seed,
            optimizer=optimizer,
            selection=sel,
            redrawn=redrawn,
        )
    except BaseException:
        undo.restore()
        with torch.no_grad():
            for tensor, value in redrawn:
                tensor.copy_(value)
        raise


def _convert_all(
    model: nn.Module,
    names: list[str],
    *,
    rank_fraction: float,
    init: str,
    rank: int | None,
    train_bases: bool,
    refine_steps: int,
    from_scratch: bool,
    seed: int | None,
    optimizer: torch.optim.Optimizer | None,
    selection: LayerSelection,
    redrawn: list[tuple[Tensor, Tensor]],
) -> dict[str, LowRankLayer]:
    result: dict[str, LowRankLayer] = {}
    index = 0
    for name in names:
        module = model.get_submodule(name)
        if from_scratch:
            redrawn += [(t, t.detach().clone()) for t in module.parameters(recurse=True)]
            _reset(module)
        sources = _dense_sources(name, module)
        # keep the dense tensors alive (the conversion detaches them from the module)
        kept = {k: (w.detach().clone(), w, b) for k, (w, b) in sources.items()}
        new_layers = to_low_rank(
            model,
            names=[name],
            rank=_module_rank(module, rank_fraction, rank),
            selection=selection,
        )
        for sub, layer in new_layers.items():
            dense, old_weight, old_bias = kept[sub]
            init_low_rank_layer_(
                layer,
                dense,
                init=init,
                train_bases=train_bases,
                refine_steps=refine_steps,
                seed=None if seed is None else seed + index,
            )
            index += 1
            if old_bias is not None and layer.bias is not None:
                layer.bias = old_bias  # the dense layer's own Parameter: an optimizer keeps it
            if optimizer is not None:
                trainable = [p for p in (layer.U, layer.sigma, layer.V) if p.requires_grad]
                _swap_into_optimizer(optimizer, old_weight, trainable)
            result[sub] = layer
    return result


def frobenius_decay_penalty(model: nn.Module, coefficient: float = 1.0) -> Tensor:
    """``coefficient / 2 * sum_l ||U_l sigma_l V_l^T||_F^2`` over the model's low-rank layers.

    Frobenius decay (Khodak et al., 2021): penalize the product, not each factor. The value is
    :func:`lowrank_core.init.frobenius_decay` of ``(U @ sigma, V)`` per layer (summed over groups), built
    from torch operations, so it is differentiable: add it to the loss (and leave the factors out of the
    optimizer's weight decay). A zero tensor when the model has no low-rank layer.
    """
    if not isinstance(model, nn.Module):
        raise ParameterTypeError(f"`model` must be an nn.Module, got {describe(model)}")
    coefficient = check_float("coefficient", coefficient, min=0.0)
    total: Tensor | None = None
    for module in model.modules():
        if isinstance(module, LowRankLayer):
            value = frobenius_decay(
                module.U @ module.sigma, module.V, coefficient=coefficient, check_finite=False
            ).sum()
            total = value if total is None else total + value
    if total is None:
        p = next(iter(model.parameters()), None)
        return torch.zeros((), device=None if p is None else p.device)
    return total
