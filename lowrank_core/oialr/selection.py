"""Which layers OIALR puts into low-rank form: one selection object for every framework.

A framework lists its *candidates* (the layers of the kinds it can factorize, in the model's order) and
what it knows of each (its matrix shape, whether it is rank one, why it cannot be converted at all);
:meth:`LayerSelection.choose` applies the user's rules to that list, the same way for PyTorch modules
and for JAX pytree leaves:

1. ``keep_first`` / ``keep_last`` keep the first / last candidate dense (the network's input layer and
   its head), whatever the rules below say about them;
2. a candidate whose name matches one of the ``exclude`` patterns (``fnmatch`` globs, case-sensitive;
   a framework may offer several spellings of one name, e.g. JAX's ``"['l1']['kernel']"`` and
   ``"l1.kernel"``) stays dense;
3. a candidate the framework refuses (tied weights, a parametrization, ...) stays dense;
4. a candidate whose matrix view ``(m, n)`` is subject to the aspect rule is kept only when
   ``min(m, n) > max(m, n) * min_aspect`` (very thin layers gain nothing from a basis/mixing split);
5. a rank-one candidate (``min(m, n) == 1`` per group, e.g. a depthwise convolution) stays dense unless
   ``allow_rank_one``.

``include`` says which *kinds* of layer are candidates at all; its meaning is the framework's (PyTorch:
a tuple of module types; JAX: a predicate ``include(path, leaf)``), ``None`` means the framework's
default.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from .._validate import check_bool, check_float, describe
from ..errors import ParameterTypeError

__all__ = ["UNSET", "Candidate", "LayerSelection"]


class _Unset:
    """The default of a framework config's flat selection fields: not given (take ``selection``'s)."""

    def __repr__(self) -> str:
        return "<from selection>"


#: Marks a flat selection field of a framework's config as not given.
UNSET: Any = _Unset()


class Candidate(NamedTuple):
    """One layer a framework could put into low-rank form.

    - ``name``: the layer's name as the framework reports it (eligible lists and histories use it);
    - ``shape``: its matrix view ``(m, n)`` when the aspect rule applies to it, else ``None``;
    - ``rank_one``: whether its (per-group) matrix view has ``min(m, n) == 1``;
    - ``refused``: why the framework cannot convert it (``None``: it can);
    - ``aliases``: further spellings of the name that ``exclude`` patterns are matched against.
    """

    name: str
    shape: tuple[int, int] | None = None
    rank_one: bool = False
    refused: str | None = None
    aliases: tuple[str, ...] = ()


def _patterns(value: object) -> tuple[str, ...]:
    names: Any = (value,) if isinstance(value, str) else value
    if not isinstance(names, tuple | list) or not all(isinstance(n, str) for n in names):
        raise ParameterTypeError(
            f"`exclude` must be a tuple of name patterns (strings), got {describe(value)}"
        )
    return tuple(names)


@dataclass(frozen=True)
class LayerSelection:
    """The user's rules for which layers OIALR (and low-rank conversion or init) factorizes.

    See the module docstring for the order in which the rules apply. Every field is validated at
    construction (a wrong type raises :class:`~lowrank_core.ParameterTypeError`, a value out of range
    :class:`~lowrank_core.ParameterError`); ``exclude`` may be one pattern or a sequence of them, and
    is stored as a tuple.
    """

    include: Any = None
    exclude: tuple[str, ...] = ()
    keep_first: bool = False
    keep_last: bool = True
    min_aspect: float = 0.1
    allow_rank_one: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "exclude", _patterns(self.exclude))
        set_(self, "keep_first", check_bool("keep_first", self.keep_first))
        set_(self, "keep_last", check_bool("keep_last", self.keep_last))
        set_(self, "min_aspect", check_float("min_aspect", self.min_aspect, min=0.0, max=1.0))
        set_(self, "allow_rank_one", check_bool("allow_rank_one", self.allow_rank_one))

    def excludes(self, *names: str) -> bool:
        """Whether any of ``names`` (spellings of one layer's name) matches an ``exclude`` pattern."""
        return any(fnmatch.fnmatchcase(n, p) for n in names for p in self.exclude)

    def choose(self, candidates: Sequence[Candidate]) -> tuple[list[str], dict[str, str]]:
        """``(chosen, why)``: the names to factorize, in the candidates' order, and why each other
        candidate stays dense."""
        keep: set[str] = set()
        if candidates and self.keep_first:
            keep.add(candidates[0].name)
        if candidates and self.keep_last:
            keep.add(candidates[-1].name)
        chosen: list[str] = []
        why: dict[str, str] = {}
        for c in candidates:
            if c.name in keep:
                why[c.name] = "kept dense by keep_first / keep_last"
            elif self.excludes(c.name, *c.aliases):
                why[c.name] = "excluded by an `exclude` pattern"
            elif c.refused is not None:
                why[c.name] = c.refused
            elif c.shape is not None and not min(c.shape) > max(c.shape) * self.min_aspect:
                m, n = c.shape
                why[c.name] = f"too thin for min_aspect={self.min_aspect} ({m} x {n})"
            elif c.rank_one and not self.allow_rank_one:
                why[c.name] = (
                    "its (per-group) matrix has rank at most 1, e.g. a depthwise convolution: only "
                    "the scale of each kernel would train (pass allow_rank_one=True to convert it "
                    "anyway)"
                )
            else:
                chosen.append(c.name)
        return chosen, why
