"""Convert a model's layers to OIALR form in place, and count what is left to train.

Eligibility (defaults after the OIALR reference, see ``/work/shared/ALGORITHMS.md`` section 1):

1. Candidates are the modules of the ``include`` types, in module registration order
   (``model.named_modules()``): ``nn.Linear``, transformers' ``Conv1D`` (:class:`~lowrank_torch.layers.
   TransformersConv1D`, detected without importing transformers), ``nn.Conv1d/2d/3d`` (every
   ``padding_mode``) and ``nn.MultiheadAttention``. Modules inside an ``nn.MultiheadAttention`` (its
   ``out_proj``) are never candidates on their own: an included attention is converted as a whole by
   :func:`~lowrank_torch.layers.low_rank_attention_`, an excluded one stays dense. Layers already in
   low-rank form are skipped.
2. ``keep_first`` / ``keep_last`` keep the first / last candidate dense (the network's first layer and its
   head), whatever the name and shape rules below say about them.
3. A candidate whose qualified name matches one of the ``fnmatch`` patterns in ``exclude_names`` stays dense.
4. A Linear or Conv1D ``(m, n)`` is converted only when ``min(m, n) > max(m, n) * min_aspect`` (very thin
   layers gain nothing from a basis/mixing split). Convolutions and attention are not subject to this rule.
5. **Rank-one layers** stay dense unless ``allow_rank_one=True``: a layer whose (per-group) matrix view has
   ``min(m, n) == 1``, above all a depthwise convolution (``groups == in_channels == out_channels``, one
   ``1 x prod(kernel)`` matrix per channel). Its factorization is one rank-1 term per group: the
   kernel's direction would be frozen at the switch and only its scale trained.
6. **Tied and shared weights** stay dense: a candidate one of whose parameters is also a parameter of
   another module (GPT-2's and Llama's ``lm_head`` tied to the token embedding, any Parameter shared by
   two modules). Converting it would move the shared tensor out of the optimizer and freeze every other
   use of it; dense, every use keeps training. Asking for such a layer by name (``to_low_rank(...,
   names=[...])``) raises :class:`ConversionError` before anything changes. A **module registered at
   several places** (one ``nn.Linear`` used twice) is converted once, and the new layer is put at every
   place, so the sharing stays exact; it is reported under its first name.
7. Layers torch itself cannot convert are not candidates: a weight under a parametrization
   (``torch.nn.utils.parametrize``, e.g. ``weight_norm``) or a lazy module not yet initialized. Asked
   for by name, they raise :class:`ConversionError`.

RNN weights (``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``: ``weight_ih_l*``, ``weight_hh_l*``) are refused by rule:
the fused cuDNN-style kernels read each weight as one dense tensor of gate blocks, so a factorization
saves nothing, and a weight parametrization breaks their flattened-weight fast path; an RNN in
``include`` raises :class:`UnsupportedLayerError`; by default RNNs stay dense (and are trained as such).

When a model has no eligible layer and none in low-rank form, :func:`eligible_names` and
:func:`to_low_rank` warn (:class:`NoEligibleLayerWarning`, naming the model's layer types): training would
be dense. :func:`to_low_rank` with an explicit ``include`` raises :class:`ConversionError` instead.

Conversion is linear in the number of modules: one pass over ``model.named_modules()`` per call.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

import lowrank_core as lc
from lowrank_core._validate import check_int, describe
from lowrank_core.oialr import Candidate, LayerSelection

from .layers import (
    LowRankLayer,
    LowRankLinear,
    LowRankTransformersConv1D,
    TransformersConv1D,
    attention_is_low_rank,
    conv_class,
    dense_matrix_shape,
    is_transformers_conv1d,
    low_rank_attention_,
)

__all__ = [
    "ConversionError",
    "NoEligibleLayerWarning",
    "UnsupportedLayerError",
    "count_trainable",
    "eligible_names",
    "layer_selection",
    "to_low_rank",
    "trainable_share",
]

SUPPORTED: tuple[type[Any], ...] = (
    nn.Linear,
    TransformersConv1D,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.MultiheadAttention,
)
DEFAULT_INCLUDE: tuple[type[Any], ...] = SUPPORTED
_RNN = (nn.RNNBase,)


class ConversionError(lc.LowRankError, ValueError):
    """A layer that was asked for cannot be converted (not eligible, tied, unsupported); nothing changed."""


class UnsupportedLayerError(ConversionError, TypeError):
    """A layer type in ``include`` that lowrank_torch cannot put into low-rank form."""


class NoEligibleLayerWarning(UserWarning):
    """The model has no layer that could be converted: OIALR / low-rank init would train it dense."""


def check_include(include: Iterable[Any]) -> tuple[type[Any], ...]:
    types = tuple(include)
    for t in types:
        if isinstance(t, type) and issubclass(t, _RNN):
            raise UnsupportedLayerError(
                f"to_low_rank cannot convert {t.__name__}: RNN weights (weight_ih_l*, weight_hh_l*) are "
                "refused by rule (the fused RNN kernels need each weight as one dense tensor); leave "
                "RNNs out of `include`, they stay dense and are trained as such"
            )
        if not (isinstance(t, type) and issubclass(t, SUPPORTED)):
            name = getattr(t, "__name__", repr(t))
            raise UnsupportedLayerError(
                f"to_low_rank cannot convert {name}: supported are nn.Linear, transformers Conv1D, "
                "nn.Conv1d, nn.Conv2d, nn.Conv3d and nn.MultiheadAttention (and their subclasses)"
            )
    return types


def _check_rank(rank: Any) -> int | None:
    """``None`` or an integer >= 1 (NumPy integer scalars included), as a Python ``int``."""
    checked: int | None = check_int(
        "rank", rank, min=1, optional=True, error=lc.RankError, type_error=lc.RankError
    )
    return checked


def _check_computable(chosen: list[tuple[str, nn.Module]]) -> None:
    """``DeviceError`` naming the first chosen layer with a parameter on the ``meta`` device."""
    for name, module in chosen:
        for p in _layer_params(module):
            if p.is_meta:
                raise lc.DeviceError(
                    f"layer {name or type(module).__name__!r} has its parameters on the device "
                    "'meta' (shapes without values): they cannot be factorized; materialize the "
                    "model first (model.to_empty(device=...), then initialize or load its weights)"
                )


def _layer_rank(rank: int | None, module: nn.Module) -> int | None:
    """A global rank, clipped to what the layer allows (``min(m, n)`` of its matrix view)."""
    if rank is None:
        return None
    if isinstance(module, nn.MultiheadAttention):
        return min(rank, int(module.embed_dim))
    m, n = dense_matrix_shape(module)
    return min(rank, m, n)


@dataclass
class _Scan:
    """One pass over the model: candidates (first name), every name of each, why some cannot convert."""

    candidates: list[tuple[str, nn.Module]] = field(default_factory=list)
    aliases: dict[int, list[str]] = field(default_factory=dict)  # id(module) -> all its names
    refused: dict[str, str] = field(default_factory=dict)  # candidate name -> reason
    types: Counter[str] = field(default_factory=Counter)  # layer type names of the whole model
    low_rank: int = 0  # modules already in low-rank form


def _own_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(k, p) for k, p in module._parameters.items() if p is not None]


def _scan(model: nn.Module, include: tuple[type[Any], ...]) -> _Scan:
    scan = _Scan()
    skipped: set[str] = (
        set()
    )  # names inside an attention or a low-rank layer (children not candidates)
    first: dict[int, str] = {}  # id(module) -> first name
    holders: dict[int, list[tuple[int, str]]] = {}  # id(parameter) -> (id(module), attribute)
    inside: set[int] = set()  # ids of modules seen inside a skipped subtree
    places: dict[int, int] = {}  # id(module) -> number of names it is registered under
    for name, module in model.named_modules(remove_duplicate=False):
        mid = id(module)
        places[mid] = places.get(mid, 0) + 1
        parent = name.rpartition(".")[0] if name else None
        in_skipped = parent is not None and parent in skipped
        if mid not in first:
            first[mid] = name
            scan.types[type(module).__name__] += 1
            for attr, p in _own_params(module):
                holders.setdefault(id(p), []).append((mid, attr))
            if isinstance(module, LowRankLayer):
                scan.low_rank += 1
        if in_skipped:
            skipped.add(name)
            inside.add(mid)
            continue
        if isinstance(module, nn.MultiheadAttention | LowRankLayer):
            skipped.add(name)
        if mid in scan.aliases:
            scan.aliases[mid].append(name)
            continue
        if isinstance(module, LowRankLayer) or not isinstance(module, include):
            continue
        if isinstance(module, nn.MultiheadAttention) and attention_is_low_rank(module):
            continue  # already converted
        scan.aliases[mid] = [name]
        scan.candidates.append((name, module))

    for name, module in scan.candidates:
        mid = id(module)
        if mid in inside:
            scan.refused[name] = "it is also used inside a MultiheadAttention or a low-rank layer"
            continue
        reason = _convertible(module)
        if isinstance(module, nn.MultiheadAttention) and places.get(id(module.out_proj), 0) > 1:
            reason = "its out_proj is also registered elsewhere in the model"
        if reason is None:
            mine = {mid}
            if isinstance(module, nn.MultiheadAttention):
                mine.add(id(module.out_proj))
            shared = sorted(
                {
                    f"{first[u]}.{attr}" if first[u] else attr
                    for p in _layer_params(module)
                    for u, attr in holders.get(id(p), ())
                    if u not in mine
                }
            )
            if shared:
                reason = (
                    f"its parameters are shared with {', '.join(shared)} (tied weights stay dense: "
                    "converting would move the shared tensor out of the optimizer and freeze its "
                    "other uses)"
                )
        if reason is not None:
            scan.refused[name] = reason
    return scan


def _layer_params(module: nn.Module) -> list[nn.Parameter]:
    """The parameters a conversion of ``module`` replaces or reuses (an attention's out_proj's too)."""
    found = [p for _, p in _own_params(module)]
    if isinstance(module, nn.MultiheadAttention):
        found += [p for _, p in _own_params(module.out_proj)]
    return found


def _convertible(module: nn.Module) -> str | None:
    """Why ``module`` cannot be converted (``None``: it can)."""
    if parametrize.is_parametrized(module):
        return "its weight is under a parametrization (torch.nn.utils.parametrize)"
    params = dict(_own_params(module))
    for p in params.values():
        if isinstance(p, nn.parameter.UninitializedParameter):
            return "it is a lazy module whose parameters are not initialized yet"
    return None


def _rank_one(module: nn.Module) -> bool:
    if isinstance(module, nn.MultiheadAttention):
        return int(module.embed_dim) == 1
    return min(dense_matrix_shape(module)) == 1


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def layer_selection(
    selection: LayerSelection | None = None,
    *,
    include: Iterable[type[Any]] = DEFAULT_INCLUDE,
    exclude_names: Iterable[str] = (),
    keep_first: bool = False,
    keep_last: bool = True,
    min_aspect: float = 0.1,
    allow_rank_one: bool = False,
) -> LayerSelection:
    """The :class:`~lowrank_core.oialr.LayerSelection` of a call: ``selection`` itself (its ``include``
    checked, ``None`` meaning every supported type), or one built from the flat keyword arguments.
    Giving both is refused (:class:`~lowrank_core.ParameterError`): which one would win is a surprise
    either way."""
    flat: dict[str, Any] = {
        "include": include,
        "exclude": exclude_names,
        "keep_first": keep_first,
        "keep_last": keep_last,
        "min_aspect": min_aspect,
        "allow_rank_one": allow_rank_one,
    }
    if selection is None:
        types = check_include(include)
        return LayerSelection(**{**flat, "include": types})
    if not isinstance(selection, LayerSelection):
        raise lc.ParameterTypeError(
            f"`selection` must be a lowrank_core.oialr.LayerSelection, got {describe(selection)}"
        )
    defaults = {
        "include": DEFAULT_INCLUDE,
        "exclude": (),
        "keep_first": False,
        "keep_last": True,
        "min_aspect": 0.1,
        "allow_rank_one": False,
    }
    given = [k for k, v in flat.items() if v is not defaults[k] and v != defaults[k]]
    if given:
        raise lc.ParameterError(
            f"pass the layer selection either as `selection` or as keyword arguments, not both "
            f"(got `selection` and {given})"
        )
    include = DEFAULT_INCLUDE if selection.include is None else selection.include
    return dataclasses.replace(selection, include=check_include(include))


def _select(
    model: nn.Module, selection: LayerSelection
) -> tuple[list[tuple[str, nn.Module]], _Scan, dict[str, str]]:
    """``(chosen, scan, why)``: the layers to convert, the scan, and why each other candidate is not."""
    if not isinstance(model, nn.Module):
        raise lc.ParameterTypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    scan = _scan(model, selection.include)
    candidates = []
    for name, module in scan.candidates:
        thin = isinstance(module, nn.Linear) or is_transformers_conv1d(type(module))
        candidates.append(
            Candidate(
                name,
                shape=dense_matrix_shape(module) if thin else None,
                rank_one=_rank_one(module),
                refused=scan.refused.get(name),
            )
        )
    names, why = selection.choose(candidates)
    modules = dict(scan.candidates)
    return [(n, modules[n]) for n in names], scan, why


def _no_eligible_message(model: nn.Module, scan: _Scan) -> str:
    kinds = ", ".join(f"{k} x{v}" if v > 1 else k for k, v in scan.types.most_common())
    return (
        f"no layer of {type(model).__name__} is eligible for low rank, so it would be trained dense "
        f"(its module types: {kinds}); supported are nn.Linear, transformers Conv1D, nn.Conv1d/2d/3d "
        "and nn.MultiheadAttention, see lowrank_torch.convert for the rules"
    )


def _warn_if_none(model: nn.Module, chosen: list[Any], scan: _Scan) -> None:
    if not chosen and scan.low_rank == 0:
        warnings.warn(_no_eligible_message(model, scan), NoEligibleLayerWarning, stacklevel=3)


def eligible_names(
    model: nn.Module,
    *,
    selection: LayerSelection | None = None,
    include: Iterable[type[Any]] = DEFAULT_INCLUDE,
    exclude_names: Iterable[str] = (),
    keep_first: bool = False,
    keep_last: bool = True,
    min_aspect: float = 0.1,
    allow_rank_one: bool = False,
) -> list[str]:
    """Qualified names of the layers :func:`to_low_rank` would convert, in registration order.

    Computed on the dense model; use the list to convert layers one at a time (``to_low_rank(model,
    names=[name])``), as OIALR's per-layer switch does. Warns (:class:`NoEligibleLayerWarning`) when the
    model has no eligible layer and none in low-rank form.
    """
    sel = layer_selection(
        selection,
        include=include,
        exclude_names=exclude_names,
        keep_first=keep_first,
        keep_last=keep_last,
        min_aspect=min_aspect,
        allow_rank_one=allow_rank_one,
    )
    chosen, scan, _ = _select(model, sel)
    _warn_if_none(model, chosen, scan)
    return [n for n, _ in chosen]


def to_low_rank(
    model: nn.Module,
    *,
    selection: LayerSelection | None = None,
    include: Iterable[type[Any]] = DEFAULT_INCLUDE,
    exclude_names: Iterable[str] = (),
    keep_first: bool = False,
    keep_last: bool = True,
    min_aspect: float = 0.1,
    allow_rank_one: bool = False,
    rank: int | None = None,
    names: Iterable[str] | None = None,
) -> dict[str, LowRankLayer]:
    """Replace the eligible layers of ``model`` by low-rank ones, in place (module docstring for the rules).

    ``rank=None`` keeps full rank (the converted model computes the same function); an int is clipped to
    each layer's ``min(m, n)``. ``names`` converts only those qualified names (each must be eligible, or
    :class:`ConversionError` saying why it is not): the eligibility rules are then applied as given, so
    ``keep_last`` still refers to the model's last candidate. Returns ``{qualified name: new layer}`` for
    every new :class:`~lowrank_torch.layers.LowRankLayer` (an attention contributes ``"<name>.out_proj"``
    and ``"<name>.parametrizations.in_proj_weight.0"``). Raises :class:`UnsupportedLayerError` for an
    ``include`` type that cannot be converted, ``RankError`` for a bad ``rank``; an explicit ``include``
    that finds nothing to convert raises :class:`ConversionError` (the default warns). Every check runs
    before the model changes: on any error it is as before.
    """
    r = _check_rank(rank)
    sel = layer_selection(
        selection,
        include=include,
        exclude_names=exclude_names,
        keep_first=keep_first,
        keep_last=keep_last,
        min_aspect=min_aspect,
        allow_rank_one=allow_rank_one,
    )
    chosen, scan, why = _select(model, sel)
    if names is not None:
        wanted = [names] if isinstance(names, str) else list(names)
        available = {n for n, _ in chosen}
        missing = [n for n in wanted if n not in available]
        if missing:
            reasons = "; ".join(
                f"{n!r}: {why.get(n, 'not a candidate (not an included layer type, or already converted)')}"
                for n in missing
            )
            raise ConversionError(f"cannot convert {reasons}")
        wanted_set = set(wanted)
        chosen = [(n, m) for n, m in chosen if n in wanted_set]
    elif not chosen:
        if sel.include is not DEFAULT_INCLUDE and scan.low_rank == 0:
            raise ConversionError(_no_eligible_message(model, scan))
        _warn_if_none(model, chosen, scan)

    _check_computable(chosen)
    # Build every new layer first, so that an error leaves the model untouched (attention excepted:
    # it is converted in place, after all other layers were built).
    built: list[tuple[str, nn.Module, LowRankLayer | None]] = []
    for name, module in chosen:
        if name == "":
            raise ConversionError(
                "to_low_rank cannot replace the model itself; wrap it in a container"
            )
        lr = _layer_rank(r, module)
        if isinstance(module, nn.MultiheadAttention):
            built.append((name, module, None))
        elif isinstance(module, nn.Linear):
            built.append((name, module, LowRankLinear.from_dense(module, lr)))
        elif is_transformers_conv1d(type(module)):
            built.append((name, module, LowRankTransformersConv1D.from_dense(module, lr)))
        else:
            cls = conv_class(module)
            if cls is None:  # pragma: no cover - excluded by check_include
                raise UnsupportedLayerError(f"cannot convert {name} ({type(module).__name__})")
            built.append((name, module, cls.from_dense(module, lr)))

    result: dict[str, LowRankLayer] = {}
    for name, module, new in built:
        if new is None:
            assert isinstance(module, nn.MultiheadAttention)
            parts = low_rank_attention_(module, _layer_rank(r, module))
            for sub, layer in parts.items():
                result[f"{name}.{sub}" if name else sub] = layer
        else:
            for alias in scan.aliases.get(id(module), [name]):
                set_submodule(model, alias, new)
            result[name] = new
    return result


def count_trainable(model: nn.Module) -> int:
    """Number of trainable scalars: the sizes of the parameters with ``requires_grad`` (each counted once)."""
    if not isinstance(model, nn.Module):
        raise lc.ParameterTypeError(f"`model` must be an nn.Module, got {describe(model)}")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def trainable_share(model: nn.Module, dense_count: int) -> float:
    """OIALR's reported trainable share: ``(sum_l g_l r_l^2 + other trainable) / dense_count``.

    ``dense_count`` is :func:`count_trainable` of the original (dense) model. A low-rank layer trains only
    its ``sigma`` (``r^2`` per group) and its bias; ``U`` and ``V`` are buffers, so this is
    ``count_trainable(model) / dense_count``.
    """
    dense_count = check_int("dense_count", dense_count, min=1)
    return count_trainable(model) / dense_count
