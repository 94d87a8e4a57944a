"""Convert a model's layers to OIALR form in place, and count what is left to train.

Eligibility (defaults after the OIALR reference, see ``/work/shared/ALGORITHMS.md`` section 1):

1. Candidates are the modules of the ``include`` types, in module registration order
   (``model.named_modules()``). Modules inside an ``nn.MultiheadAttention`` (its ``out_proj``) are never
   candidates on their own: an included attention is converted as a whole by
   :func:`~lowrank_torch.layers.low_rank_attention_`, an excluded one stays dense. Layers already in
   low-rank form are skipped.
2. ``keep_first`` / ``keep_last`` keep the first / last candidate dense (the network's first layer and its
   head), whatever the name and shape rules below say about them.
3. A candidate whose qualified name matches one of the ``fnmatch`` patterns in ``exclude_names`` stays dense.
4. A Linear ``(m, n)`` is converted only when ``min(m, n) > max(m, n) * min_aspect`` (very thin layers
   gain nothing from a basis/mixing split). Convolutions and attention are not subject to this rule.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any

from torch import nn

import lowrank_core as lc

from .layers import (
    LowRankLayer,
    LowRankLinear,
    _conv_class,
    attention_is_low_rank,
    dense_matrix_shape,
    low_rank_attention_,
)

__all__ = ["count_trainable", "eligible_names", "to_low_rank", "trainable_share"]

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)
DEFAULT_INCLUDE: tuple[type[nn.Module], ...] = SUPPORTED


def _check_include(include: Iterable[Any]) -> tuple[type[nn.Module], ...]:
    types = tuple(include)
    for t in types:
        if not (isinstance(t, type) and issubclass(t, SUPPORTED)):
            name = getattr(t, "__name__", repr(t))
            raise TypeError(
                f"to_low_rank cannot convert {name}: supported are nn.Linear, nn.Conv1d, nn.Conv2d, "
                "nn.Conv3d and nn.MultiheadAttention (and their subclasses)"
            )
    return types


def _check_rank(rank: Any) -> int | None:
    if rank is None:
        return None
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise lc.RankError(f"`rank` must be None or a positive int, got {rank!r}")
    if rank < 1:
        raise lc.RankError(f"`rank` must be >= 1, got {rank}")
    return rank


def _layer_rank(rank: int | None, module: nn.Module) -> int | None:
    """A global rank, clipped to what the layer allows (``min(m, n)`` of its matrix view)."""
    if rank is None:
        return None
    if isinstance(module, nn.MultiheadAttention):
        return min(rank, int(module.embed_dim))
    m, n = dense_matrix_shape(module)
    return min(rank, m, n)


def _candidates(
    model: nn.Module, include: tuple[type[nn.Module], ...]
) -> list[tuple[str, nn.Module]]:
    found: list[tuple[str, nn.Module]] = []
    inside: list[str] = []  # prefixes of attentions and low-rank layers: their children are skipped
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, nn.MultiheadAttention | LowRankLayer):
            inside.append(name)
        if isinstance(module, LowRankLayer) or not isinstance(module, include):
            continue
        if isinstance(module, nn.MultiheadAttention) and attention_is_low_rank(module):
            continue  # already converted
        found.append((name, module))
    return found


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _select(
    model: nn.Module,
    include: Iterable[type[nn.Module]],
    exclude_names: Iterable[str],
    keep_first: bool,
    keep_last: bool,
    min_aspect: float,
) -> list[tuple[str, nn.Module]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    types = _check_include(include)
    patterns = (exclude_names,) if isinstance(exclude_names, str) else tuple(exclude_names)
    if not 0.0 <= float(min_aspect) <= 1.0:
        raise ValueError(f"`min_aspect` must lie in [0, 1], got {min_aspect}")

    cands = _candidates(model, types)
    keep: set[str] = set()
    if cands and keep_first:
        keep.add(cands[0][0])
    if cands and keep_last:
        keep.add(cands[-1][0])

    chosen: list[tuple[str, nn.Module]] = []
    for name, module in cands:
        if name in keep or any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        if isinstance(module, nn.Linear):
            m, n = dense_matrix_shape(module)
            if not min(m, n) > max(m, n) * min_aspect:
                continue
        chosen.append((name, module))
    return chosen


def eligible_names(
    model: nn.Module,
    *,
    include: Iterable[type[nn.Module]] = DEFAULT_INCLUDE,
    exclude_names: Iterable[str] = (),
    keep_first: bool = False,
    keep_last: bool = True,
    min_aspect: float = 0.1,
) -> list[str]:
    """Qualified names of the layers :func:`to_low_rank` would convert, in registration order.

    Computed on the dense model; use the list to convert layers one at a time (``to_low_rank(model,
    names=[name])``), as OIALR's per-layer switch does.
    """
    return [n for n, _ in _select(model, include, exclude_names, keep_first, keep_last, min_aspect)]


def to_low_rank(
    model: nn.Module,
    *,
    include: Iterable[type[nn.Module]] = DEFAULT_INCLUDE,
    exclude_names: Iterable[str] = (),
    keep_first: bool = False,
    keep_last: bool = True,
    min_aspect: float = 0.1,
    rank: int | None = None,
    names: Iterable[str] | None = None,
) -> dict[str, LowRankLayer]:
    """Replace the eligible layers of ``model`` by low-rank ones, in place (module docstring for the rules).

    ``rank=None`` keeps full rank (the converted model computes the same function); an int is clipped to
    each layer's ``min(m, n)``. ``names`` converts only those qualified names (each must be eligible, or
    ``ValueError``): the eligibility rules are then applied as given, so ``keep_last`` still refers to the
    model's last candidate. Returns ``{qualified name: new layer}`` for every new
    :class:`~lowrank_torch.layers.LowRankLayer` (an attention contributes ``"<name>.out_proj"`` and
    ``"<name>.parametrizations.in_proj_weight.0"``). Raises ``TypeError`` for an ``include`` type that
    cannot be converted, ``RankError`` for a bad ``rank``, ``NotImplementedError`` for a ConvNd with a
    ``padding_mode`` other than ``'zeros'`` (exclude it by name to keep it dense).
    """
    r = _check_rank(rank)
    chosen = _select(model, include, exclude_names, keep_first, keep_last, min_aspect)
    if names is not None:
        wanted = [names] if isinstance(names, str) else list(names)
        available = {n for n, _ in chosen}
        missing = [n for n in wanted if n not in available]
        if missing:
            raise ValueError(
                f"not eligible for conversion (or already converted): {missing}; "
                f"eligible now: {sorted(available)}"
            )
        chosen = [(n, m) for n, m in chosen if n in set(wanted)]

    # Build every new layer first, so that an error leaves the model untouched (attention excepted:
    # it is converted in place, after all other layers were built).
    built: list[tuple[str, nn.Module, LowRankLayer | None]] = []
    for name, module in chosen:
        if name == "" and not isinstance(module, nn.MultiheadAttention):
            raise TypeError("to_low_rank cannot replace the model itself; wrap it in a container")
        if isinstance(module, nn.MultiheadAttention):
            built.append((name, module, None))
        elif isinstance(module, nn.Linear):
            built.append((name, module, LowRankLinear.from_dense(module, _layer_rank(r, module))))
        else:
            cls = _conv_class(module)
            if cls is None:  # pragma: no cover - excluded by _check_include
                raise TypeError(f"cannot convert {name} ({type(module).__name__})")
            built.append((name, module, cls.from_dense(module, _layer_rank(r, module))))

    result: dict[str, LowRankLayer] = {}
    for name, module, new in built:
        if new is None:
            assert isinstance(module, nn.MultiheadAttention)
            parts = low_rank_attention_(module, _layer_rank(r, module))
            for sub, layer in parts.items():
                result[f"{name}.{sub}" if name else sub] = layer
        else:
            _set_submodule(model, name, new)
            result[name] = new
    return result


def count_trainable(model: nn.Module) -> int:
    """Number of trainable scalars: the sizes of the parameters with ``requires_grad`` (each counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def trainable_share(model: nn.Module, dense_count: int) -> float:
    """OIALR's reported trainable share: ``(sum_l g_l r_l^2 + other trainable) / dense_count``.

    ``dense_count`` is :func:`count_trainable` of the original (dense) model. A low-rank layer trains only
    its ``sigma`` (``r^2`` per group) and its bias; ``U`` and ``V`` are buffers, so this is
    ``count_trainable(model) / dense_count``.
    """
    if isinstance(dense_count, bool) or not isinstance(dense_count, int) or dense_count <= 0:
        raise ValueError(f"`dense_count` must be a positive int, got {dense_count!r}")
    return count_trainable(model) / dense_count
