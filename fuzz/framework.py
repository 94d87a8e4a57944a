"""Specs, variants and classification of the bad-input sweep.

A *spec* names one public callable (a function, a class constructor or a method on a built object),
how to build a valid call, and the kind of each argument. From the kinds, the sweep derives bad
variants (NaN, Inf, wrong dtypes, wrong dimensions, empty arrays, lists, mixed libraries, bad
ranks, wrong types for every keyword, ...) and a few *valid* variants (non-contiguous views,
float32, NumPy scalars) that must succeed. Everything is deterministic: the arrays come from fixed
seeds, the variants from fixed lists, in a fixed order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# --------------------------------------------------------------------------------------------------
# arguments and specs
# --------------------------------------------------------------------------------------------------


@dataclass
class Arg:
    """One argument of a call.

    ``kind`` decides the bad variants (see :func:`bad_values`). ``value`` is the valid value; arrays
    are given as NumPy arrays and converted to the spec's library. ``keyword`` passes it by name.
    """

    name: str
    kind: str
    value: Any
    keyword: bool = False
    opts: dict[str, Any] = field(default_factory=dict)


@dataclass
class Spec:
    """A public callable and its valid call.

    ``target(lib)`` returns the callable (it may build an object first, for a method). ``args`` are
    its arguments. ``libs`` are the array libraries it is swept with. ``extra`` adds hand-written
    bad variants: ``(label, build)`` where ``build(lib)`` returns ``(callable, args, kwargs)``.
    """

    name: str
    owner: str
    target: Callable[[str], Callable[..., Any]]
    args: list[Arg]
    libs: tuple[str, ...] = ("numpy", "torch")
    extra: list[
        tuple[str, Callable[[str], tuple[Callable[..., Any], list[Any], dict[str, Any]]]]
    ] = field(default_factory=list)
    extra_valid: list[
        tuple[str, Callable[[str], tuple[Callable[..., Any], list[Any], dict[str, Any]]]]
    ] = field(default_factory=list)
    skip_kinds: frozenset[str] = frozenset()
    inplace: bool = False  # a valid call changes its inputs by design (a model converted in place)
    scale_all: bool = False  # the result stays finite when every float input is scaled at once


@dataclass
class Case:
    """One call of the sweep: ``valid`` cases must succeed, the others must raise LowRankError."""

    spec: str
    owner: str
    label: str
    lib: str
    valid: bool
    inplace: bool
    build: Callable[[], tuple[Callable[..., Any], list[Any], dict[str, Any]]]


# --------------------------------------------------------------------------------------------------
# libraries
# --------------------------------------------------------------------------------------------------
def to_lib(x: Any, lib: str) -> Any:
    """Convert NumPy arrays (recursively in lists/tuples) to ``lib``; other values unchanged."""
    if isinstance(x, np.ndarray):
        if lib == "numpy":
            return np.array(x, copy=True)
        import torch

        return torch.from_numpy(np.array(x, copy=True))
    if isinstance(x, list):
        return [to_lib(v, lib) for v in x]
    if isinstance(x, tuple) and not hasattr(x, "_fields"):
        return tuple(to_lib(v, lib) for v in x)
    return x


def other_lib(lib: str) -> str:
    return "torch" if lib == "numpy" else "numpy"


def non_contiguous(x: np.ndarray, lib: str) -> Any:
    """The same values as ``x`` in a non-contiguous view of ``lib`` (every other column)."""
    if x.ndim == 0:
        return to_lib(x, lib)
    wide = np.repeat(x, 2, axis=-1)
    wide[..., 1::2] = 12345.0 if np.issubdtype(x.dtype, np.floating) else 0
    if lib == "numpy":
        view = wide[..., ::2]
    else:
        import torch

        view = torch.from_numpy(wide)[..., ::2]
    return view


# --------------------------------------------------------------------------------------------------
# bad values per kind
# --------------------------------------------------------------------------------------------------
class Junk:
    """An object of no meaning to the library."""

    def __repr__(self) -> str:
        return "Junk()"


def _inject(x: np.ndarray, value: float, index: int = 0) -> np.ndarray:
    y = np.array(x, dtype=np.float64, order="C", copy=True)
    y.flat[min(index, y.size - 1)] = value
    return y


def array_bad_values(arg: Arg) -> Iterator[tuple[str, Any, bool]]:
    """``(label, value, is_numpy_template)`` for an array argument; numpy templates get converted."""
    x = np.asarray(arg.value)
    ndims = arg.opts.get("ndims", (2, 3))
    finite = arg.opts.get("finite", True)
    idx = arg.opts.get("nan_index", 0)
    if finite and x.size:
        yield "nan", _inject(x, math.nan, idx), True
        yield "inf", _inject(x, math.inf, idx), True
        yield "-inf", _inject(x, -math.inf, idx), True
    if arg.opts.get("float", True):
        yield "int64", x.astype(np.int64), True
        yield "bool", x.astype(bool), True
        yield "complex", x.astype(np.complex128), True
    for nd in (0, 1, 2, 3, 4):
        if nd in ndims:
            continue
        if nd == 0:
            yield "0-d", np.asarray(1.0), True
        elif nd == 1:
            yield "1-d", np.ones(3), True
        elif nd < x.ndim:
            yield f"{nd}-d", np.array(x[(0,) * (x.ndim - nd)], copy=True), True
        elif nd > x.ndim and nd <= x.ndim + 1:
            yield f"{nd}-d", np.stack([x, x]), True
    if x.ndim >= 1:
        empty = list(x.shape)
        empty[-1] = 0
        yield "empty-last", np.zeros(tuple(empty)), True
    if x.ndim >= 2:
        empty = list(x.shape)
        empty[-2] = 0
        yield "empty-rows", np.zeros(tuple(empty)), True
    if arg.opts.get("stack", x.ndim >= 2 and 3 in ndims):
        yield "empty-stack", np.zeros((0, *x.shape[-2:])), True
    yield "list", x.tolist(), False
    if not arg.opts.get("optional"):
        yield "None", None, False
    yield "str", "abc", False
    yield "float", 1.5, False
    for label, value in arg.opts.get("extra_bad", []):
        yield label, value, True


SCALAR_JUNK: list[tuple[str, Any]] = [
    ("str", "1"),
    ("complex", 1j),
    ("array0d", np.array(1)),
    ("list", [1]),
    ("junk", Junk()),
]


def scalar_bad_values(arg: Arg) -> Iterator[tuple[str, Any]]:
    skip = set(arg.opts.get("not_bad", ()))
    for label, value in _scalar_bad_values(arg):
        if label not in skip:
            yield label, value


def _scalar_bad_values(arg: Arg) -> Iterator[tuple[str, Any]]:
    k, o = arg.kind, arg.opts
    if k in ("rank", "int"):
        lo = o.get("min", 1)
        if o.get("upper") is not None:
            yield "too-big", o["upper"] + 1
        if lo is not None:
            yield "below-min", lo - 1
            yield "negative", -3 if lo > -3 else lo - 5
        yield "float-fraction", 2.5
        yield "float-integral", 2.0
        yield "bool", True
        yield "nan", math.nan
        if not o.get("optional"):
            yield "None", None
        yield from SCALAR_JUNK
    elif k == "float":
        lo, hi = o.get("min"), o.get("max")
        yield "nan", math.nan
        if o.get("finite", True):
            yield "inf", math.inf
        yield "-inf", -math.inf
        if lo is not None:
            yield "below-min", lo - 1.0 if o.get("min_open") is not True else lo
            if o.get("min_open"):
                yield "at-open-min", lo
        if hi is not None and math.isfinite(hi):
            yield "above-max", hi + 1.0
        yield "bool", True
        if not o.get("optional"):
            yield "None", None
        yield from SCALAR_JUNK
    elif k == "bool":
        yield "int", 1
        yield "str", "yes"
        yield "None", None
        yield "float", 0.0
        yield "junk", Junk()
    elif k == "seed":
        yield "negative", -1
        yield "float", 1.5
        yield "bool", True
        yield "str", "1"
        yield "junk", Junk()
    elif k == "shape2":
        yield "float-dims", (8.5, 10)
        yield "one-dim", (3,)
        yield "three-dims", (3, 4, 5)
        yield "zero", (0, 4)
        yield "negative", (-1, 4)
        yield "str", "ab"
        yield "int", 5
        yield "bool-dims", (True, 4)
        yield "junk", Junk()
    elif k == "shape":
        yield "float-dims", (8.5, 10)
        yield "zero", (0, 4)
        yield "negative", (-6, -2, 3)
        yield "str", "ab"
        yield "int", 5
        yield "bool-dims", (True, 4)
        yield "junk", Junk()
        yield "one-dim", (3,)
    elif k == "choice":
        yield "unknown", "bogus-choice"
        yield "int", 3
        yield "None", None
    elif k == "callable":
        yield "int", 3
        yield "None", None
        yield "str", "rule"
    elif k == "object":
        yield from o.get("bad", [("None", None), ("int", 3), ("junk", Junk())])
    elif k == "const":
        return
    else:
        raise AssertionError(f"unknown kind {k}")


ARRAY_KINDS = ("array",)


def expand(spec: Spec) -> Iterator[Case]:
    """Every case of ``spec``: one valid call, valid variants, and the bad variants."""
    for lib in spec.libs:
        yield from _expand_lib(spec, lib)


def _call_builder(
    spec: Spec, lib: str, replace: dict[int, Any] | None = None, drop: int | None = None
) -> Callable[[], tuple[Callable[..., Any], list[Any], dict[str, Any]]]:
    replace = replace or {}

    def build() -> tuple[Callable[..., Any], list[Any], dict[str, Any]]:
        fn = spec.target(lib)
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        for i, a in enumerate(spec.args):
            if i == drop:
                continue
            if i in replace:
                v = replace[i]
                v = v() if callable(v) and getattr(v, "_lazy", False) else v
            else:
                v = a.value() if callable(a.value) and a.opts.get("factory") else a.value
                v = to_lib(v, lib) if a.kind in ARRAY_KINDS or a.opts.get("convert") else v
            if a.keyword:
                kwargs[a.name] = v
            else:
                args.append(v)
        return fn, args, kwargs

    return build


def _lazy(f: Callable[[], Any]) -> Callable[[], Any]:
    f._lazy = True  # type: ignore[attr-defined]
    return f


def _expand_lib(spec: Spec, lib: str) -> Iterator[Case]:
    def case(label: str, valid: bool, build: Any) -> Case:
        return Case(spec.name, spec.owner, label, lib, valid, spec.inplace, build)

    yield case("valid", True, _call_builder(spec, lib))
    n_arrays = sum(1 for a in spec.args if a.kind in ARRAY_KINDS)
    floats = [
        i
        for i, a in enumerate(spec.args)
        if a.kind in ARRAY_KINDS
        and a.opts.get("float", True)
        and a.value is not None
        and np.asarray(a.value).dtype.kind == "f"
    ]
    if floats:
        # every float array in float32 together (no mixed precision), plainly and at a scale whose
        # squares overflow float32 (3e19^2 > 3.4e38): the float32 face of issue 9's defect 8
        for label, factor in (("all-float32", 1.0), ("all-float32-scaled-3e19", 3e19)):
            if factor != 1.0 and not all(spec.args[i].opts.get("scale", True) for i in floats):
                continue
            if factor != 1.0 and len(floats) > 1 and not spec.scale_all:
                continue  # a product of several scaled inputs may truly overflow
            if factor != 1.0 and not all(spec.args[i].opts.get("finite", True) for i in floats):
                continue
            replace = {
                i: _lazy(
                    lambda i=i, f=factor: to_lib(
                        (np.asarray(spec.args[i].value) * f).astype(np.float32), lib
                    )
                )
                for i in floats
            }
            yield case(label, True, _call_builder(spec, lib, replace))
    for i, a in enumerate(spec.args):
        if a.kind in ARRAY_KINDS:
            x = np.asarray(a.value)
            if x.ndim >= 1 and a.opts.get("noncontig", True):
                yield case(
                    f"{a.name}=non-contiguous",
                    True,
                    _call_builder(spec, lib, {i: _lazy(lambda x=x: non_contiguous(x, lib))}),
                )
            scalable = (
                a.opts.get("float", True)
                and a.opts.get("finite", True)
                and a.opts.get("scale", True)
            )
            if x.size and scalable:
                for factor in (1e160, 1e-160):
                    yield case(
                        f"{a.name}=scaled-{factor:g}",
                        True,
                        _call_builder(
                            spec, lib, {i: _lazy(lambda x=x, f=factor: to_lib(x * f, lib))}
                        ),
                    )
            for label, value, template in array_bad_values(a):
                v = (
                    (lambda value=value: to_lib(value, lib))
                    if template
                    else (lambda value=value: value)
                )
                yield case(f"{a.name}={label}", False, _call_builder(spec, lib, {i: _lazy(v)}))
            if n_arrays > 1 and a.opts.get("mix", True):
                yield case(
                    f"{a.name}=other-library",
                    False,
                    _call_builder(spec, lib, {i: _lazy(lambda x=x: to_lib(x, other_lib(lib)))}),
                )
        else:
            if spec.skip_kinds and a.kind in spec.skip_kinds:
                continue
            for label, value in scalar_bad_values(a):
                yield case(
                    f"{a.name}={label}",
                    False,
                    _call_builder(spec, lib, {i: _lazy(lambda value=value: value)}),
                )
            for label, value in a.opts.get("valid_alt", []):
                yield case(
                    f"{a.name}={label}",
                    True,
                    _call_builder(spec, lib, {i: _lazy(lambda value=value: value)}),
                )
    for label, build in spec.extra:
        yield case(label, False, lambda build=build: build(lib))
    for label, build in spec.extra_valid:
        yield case(label, True, lambda build=build: build(lib))
