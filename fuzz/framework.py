"""Specs, variants and classification of the bad-input sweep.

A *spec* names one public callable (a function, a class constructor or a method on a built object),
how to build a valid call, and the kind of each argument. From the kinds, the sweep derives bad
variants (NaN, Inf, wrong dtypes, wrong dimensions, empty arrays, lists, mixed libraries, arrays on a
device that cannot compute or on another device, bad ranks, wrong types for every keyword, ...) and
*valid* variants that must succeed with the right value: the plain call, every float array scaled by
1e+-200 (alone, and all together for homogeneous functions), float32 / float16 / bfloat16 where the
library has them, Fortran order, non-contiguous views, batched stacks, NumPy integer scalars for every
int, and the inputs on a second device (array_api_strict's ``device1``; CUDA when present). Each valid
result is compared in float64 with the spec's oracle (``lowrank_reference`` where it has the function,
else the core itself on float64 NumPy inputs) within a tolerance scaled by the unit roundoff of the
variant's dtype. Everything is deterministic: the arrays come from fixed seeds, the variants from
fixed lists, in a fixed order.

The libraries are those of the test matrix: ``numpy``, ``array_api_strict``, ``torch``, ``jax``
(float64 enabled).
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
    libs: tuple[str, ...] = ("numpy", "array_api_strict", "torch", "jax")
    extra: list[
        tuple[str, Callable[[str], tuple[Callable[..., Any], list[Any], dict[str, Any]]]]
    ] = field(default_factory=list)
    extra_valid: list[
        tuple[str, Callable[[str], tuple[Callable[..., Any], list[Any], dict[str, Any]]]]
    ] = field(default_factory=list)
    skip_kinds: frozenset[str] = frozenset()
    inplace: bool = False  # a valid call changes its inputs by design (a model converted in place)
    scale_all: bool = False  # the result stays finite when every float input is scaled at once
    # the float64 oracle: ``oracle(args, kwargs)`` on NumPy float64 inputs (one matrix, no batch);
    # None: the core itself on float64 NumPy inputs when the spec runs on NumPy, else no comparison
    oracle: Callable[[list[Any], dict[str, Any]], Any] | None = None
    # what is compared: ``canon(result)`` -> list of float64 arrays (default: every array / number of
    # the result, flattened in order; objects without arrays are not compared)
    canon: Callable[[Any], list[Any]] | None = None
    # homogeneity of each canonical output when every float input is scaled by c together: output i
    # scales by c**degree[i]; None: not homogeneous (no joint-scaling variant)
    degree: tuple[int, ...] | None = None
    checked: bool = True  # False: the values are library-specific (random draws), only finite
    tol: float = 64.0  # allowed error in units of the variant dtype's eps, relative to max|oracle|
    half: bool = False  # takes float16 / bfloat16 (computed in float32, cast back)
    batch: bool = False  # a stack of inputs gives a stack of results (compared per slice)
    accepted: dict[str, str] = field(
        default_factory=dict
    )  # bad label -> why it is documented valid
    sweep_libs: tuple[str, ...] | None = None  # the libraries of this run (``--lib``); None: libs


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
    # valid cases: ``check(result)`` -> None when the value is right, else what is wrong
    check: Callable[[Any], str | None] | None = None
    accepted: str | None = None  # a bad-looking input that is documented as valid (the reason)


# --------------------------------------------------------------------------------------------------
# libraries
# --------------------------------------------------------------------------------------------------
LIBS = ("numpy", "array_api_strict", "torch", "jax")
CORE_LIBS = LIBS  # what a core function is swept with, unless its spec says otherwise


def _jax() -> Any:
    import jax

    jax.config.update("jax_enable_x64", True)  # float64 arrays stay float64
    return jax


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def to_lib(x: Any, lib: str, device: str | None = None, dtype: Any = None) -> Any:
    """Convert NumPy arrays (recursively in lists/tuples) to ``lib``; other values unchanged.

    ``device``: ``"meta"`` / ``"cuda"`` for torch, ``"device1"`` for array_api_strict. ``dtype``: a
    dtype name (``"float16"``, ``"bfloat16"``, ...) applied to floating arrays only.
    """
    if isinstance(x, np.ndarray):
        y = np.array(x, copy=True)
        floating = y.dtype.kind == "f"
        if lib == "numpy":
            return y.astype(dtype) if dtype and floating else y
        if lib == "torch":
            import torch

            t = torch.from_numpy(y)
            if dtype and floating:
                t = t.to(getattr(torch, dtype))
            return t.to(device) if device else t
        if lib == "array_api_strict":
            import array_api_strict as xps

            dev = xps.Device(device) if device else None
            out = xps.asarray(y, device=dev) if dev else xps.asarray(y)
            return xps.astype(out, getattr(xps, dtype)) if dtype and floating else out
        if lib == "jax":
            jnp = _jax().numpy
            return jnp.asarray(y, dtype=getattr(jnp, dtype) if dtype and floating else None)
        raise AssertionError(lib)
    if isinstance(x, list):
        return [to_lib(v, lib, device, dtype) for v in x]
    if isinstance(x, tuple) and not hasattr(x, "_fields"):
        return tuple(to_lib(v, lib, device, dtype) for v in x)
    return x


def host(x: Any) -> np.ndarray | None:
    """A NumPy copy of an array of any swept library (float64 for floating dtypes); None for values
    that are not arrays or have no values (torch meta)."""
    if isinstance(x, np.ndarray | np.generic):
        y = np.array(x, copy=True)
        return y.astype(np.float64) if y.dtype.kind == "f" else y
    mod = type(x).__module__.split(".")[0]
    if mod == "torch":
        import torch

        if not isinstance(x, torch.Tensor) or x.is_meta:
            return None
        t = x.detach().cpu()
        if t.is_floating_point():
            t = t.to(torch.float64)
        return np.array(t.numpy(), copy=True)
    if mod == "array_api_strict":
        import array_api_strict as xps

        y = np.array(np.from_dlpack(x.to_device(xps.asarray(0.0).device)), copy=True)
        return y.astype(np.float64) if y.dtype.kind == "f" else y
    if mod in ("jax", "jaxlib"):
        y = np.array(x, copy=True)
        return y.astype(np.float64) if y.dtype.kind == "f" or str(y.dtype) == "bfloat16" else y
    return None


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


def fortran_order(x: np.ndarray, lib: str) -> Any:
    """The same values as ``x`` laid out column-major (NumPy ``order="F"``, torch transposed strides)."""
    if lib == "numpy":
        return np.asfortranarray(x)
    import torch

    t = torch.from_numpy(np.array(x, copy=True))
    return t.mT.contiguous().mT if t.ndim >= 2 else t


# dtypes of the valid precision variants, per library (half precision only where the library has it)
HALF = {"numpy": ("float16",), "torch": ("float16", "bfloat16"), "jax": ("float16", "bfloat16")}
EPS = {"float64": 2.0**-52, "float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}
TOP = {"float64": 1.7976931348623157e308, "float32": 3.4028234663852886e38, "float16": 65504.0,
       "bfloat16": 3.3895313892515355e38}  # fmt: skip


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
    for lib in spec.libs if spec.sweep_libs is None else spec.sweep_libs:
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


# --------------------------------------------------------------------------------------------------
# comparison with the float64 oracle
# --------------------------------------------------------------------------------------------------
def flatten(result: Any) -> list[np.ndarray]:
    """Every array and number of ``result`` (tuples, lists, NamedTuples, in order) as NumPy arrays
    (floating ones in float64); objects without arrays contribute nothing."""
    if isinstance(result, (bool, np.bool_)):
        return [np.asarray(result)]
    if isinstance(result, (int, float, np.integer, np.floating)):
        return [np.asarray(result, dtype=np.float64 if isinstance(result, float) else None)]
    h = host(result)
    if h is not None:
        return [h]
    if isinstance(result, (tuple, list)):
        return [a for v in result for a in flatten(v)]
    return []


def _canon(spec: Spec, result: Any) -> list[np.ndarray]:
    out = spec.canon(result) if spec.canon is not None else flatten(result)
    return [np.asarray(host(v) if host(v) is not None else v) for v in out]


def compare(
    got: list[np.ndarray],
    want: list[np.ndarray],
    eps: float,
    tol: float,
    top_of_dtype: float = math.inf,
) -> str | None:
    """None when ``got`` matches ``want`` output by output, else what differs.

    Integer and boolean outputs must be equal. A floating output may differ by ``tol * eps`` times
    its largest magnitude (a zero output: times the largest magnitude of all outputs); non-finite
    entries must sit where the oracle's are.
    """
    if len(got) != len(want):
        return f"{len(got)} outputs, the oracle has {len(want)}"
    top = max((float(np.max(np.abs(w[np.isfinite(w)]), initial=0.0)) for w in want
               if w.dtype.kind == "f" and w.size), default=0.0)  # fmt: skip
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if g.shape != w.shape:
            return f"output {i}: shape {g.shape}, the oracle's {w.shape}"
        if w.dtype.kind in "biu" and g.dtype.kind in "biu":
            if not np.array_equal(g, w):
                return f"output {i}: {g.ravel()[:6]} != oracle {w.ravel()[:6]}"
            continue
        g = g.astype(np.float64)
        w = w.astype(np.float64)
        if np.isnan(g).any():
            return f"output {i}: NaN for a valid input"
        # beyond the variant dtype's range the right value is Inf of the same sign
        beyond = np.isfinite(w) & (np.abs(w) > top_of_dtype)
        if not np.array_equal(g[beyond], np.where(w[beyond] > 0, np.inf, -np.inf)):
            return f"output {i}: a finite value where the true one exceeds the dtype's range"
        fin = np.isfinite(w) & ~beyond
        if not np.all(np.isfinite(g[fin])):
            return f"output {i}: Inf where the float64 oracle's value is finite"
        # where the oracle is Inf / NaN (its float64 result overflows too) any non-NaN value passes
        if not fin.any():
            continue
        scale = float(np.max(np.abs(w[fin]), initial=0.0)) or top
        err = float(np.max(np.abs(g[fin] - w[fin]), initial=0.0))
        if err > tol * eps * scale:
            return f"output {i}: max error {err:.3g} > {tol:g} eps * {scale:.3g} (eps {eps:.3g})"
    return None


def finite_only(result: Any) -> str | None:
    """The check of a valid call without an oracle: every floating output finite."""
    for i, g in enumerate(flatten(result)):
        if g.dtype.kind == "f" and not np.all(np.isfinite(g)):
            return f"output {i} holds NaN or Inf"
    return None


def _round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` rounded to ``dtype`` and back to float64 (the values the variant really passes)."""
    if dtype == "bfloat16":
        import torch

        return torch.from_numpy(np.array(x, dtype=np.float32)).to(torch.bfloat16).double().numpy()
    return np.asarray(x, dtype=dtype).astype(np.float64)


def _oracle_of(spec: Spec) -> Callable[[list[Any], dict[str, Any]], Any] | None:
    if not spec.checked:
        return None
    if spec.oracle is not None:
        return spec.oracle
    if "numpy" not in spec.libs:
        return None
    return lambda args, kwargs: spec.target("numpy")(*args, **kwargs)


def _oracle_inputs(spec: Spec, np_replace: dict[int, Any]) -> tuple[list[Any], dict[str, Any]]:
    """The float64 NumPy arguments of the valid call, with ``np_replace`` substituted."""
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for i, a in enumerate(spec.args):
        if i in np_replace:
            v = np_replace[i]
        else:
            v = a.value() if callable(a.value) and a.opts.get("factory") else a.value
        if isinstance(v, np.ndarray):
            v = np.array(v, dtype=np.float64 if v.dtype.kind == "f" else v.dtype, copy=True)
        if a.keyword:
            kwargs[a.name] = v
        else:
            args.append(v)
    return args, kwargs


def _checker(
    spec: Spec,
    eps: float,
    np_replace: dict[int, Any] | None = None,
    factor: float = 1.0,
    slices: list[dict[int, Any]] | None = None,
) -> Callable[[Any], str | None] | None:
    top = {EPS[k]: v for k, v in TOP.items()}.get(eps, math.inf)
    """``check(result)`` against the oracle on the same values (``np_replace``), scaled by
    ``factor ** degree`` (joint scaling), or slice by slice (``slices``: a batched stack)."""
    oracle = _oracle_of(spec)
    if oracle is None:
        return finite_only

    def want_of(replace: dict[int, Any]) -> list[np.ndarray] | None:
        args, kwargs = _oracle_inputs(spec, replace)
        try:
            with np.errstate(all="ignore"):
                out = _canon(spec, oracle(args, kwargs))
        except Exception:
            return None  # the oracle cannot evaluate it (e.g. its own squares overflow)
        return out

    def check(result: Any) -> str | None:
        got = _canon(spec, result)
        if slices is not None:
            parts = [want_of(r) for r in slices]
            if any(p is None for p in parts):
                return finite_only(result)
            for k, part in enumerate(parts):
                assert part is not None
                msg = compare([g[k] for g in got], part, eps, spec.tol, top)
                if msg:
                    return f"slice {k}: {msg}"
            return None
        want = want_of(np_replace or {})
        if want is None:
            return finite_only(result)
        if factor != 1.0:
            assert spec.degree is not None
            with np.errstate(all="ignore"):
                want = [w * factor**d if w.dtype.kind == "f" else w
                        for w, d in zip(want, spec.degree, strict=False)]  # fmt: skip
        return compare(got, want, eps, spec.tol, top)

    return check


# --------------------------------------------------------------------------------------------------
# expansion
# --------------------------------------------------------------------------------------------------
def _float_args(spec: Spec) -> list[int]:
    return [
        i
        for i, a in enumerate(spec.args)
        if a.kind in ARRAY_KINDS
        and a.opts.get("float", True)
        and a.value is not None
        and np.asarray(a.value).dtype.kind == "f"
    ]


def _joint_factor_ok(spec: Spec, factor: float) -> bool:
    """Whether every output of the valid call stays representable (and nonzero) after scaling."""
    oracle = _oracle_of(spec)
    if spec.degree is None or oracle is None:
        return False
    try:
        with np.errstate(all="ignore"):
            want = _canon(spec, oracle(*_oracle_inputs(spec, {})))
            for w, d in zip(want, spec.degree, strict=False):
                if w.dtype.kind != "f" or d == 0:
                    continue
                scaled = w * factor**d
                if not np.all(np.isfinite(scaled)) or np.any((scaled == 0) & (w != 0)):
                    return False
                if np.any(np.abs(scaled[w != 0]) < np.finfo(np.float64).tiny):
                    return False
    except Exception:
        return False
    return True


def _expand_lib(spec: Spec, lib: str) -> Iterator[Case]:
    def case(
        label: str,
        valid: bool,
        build: Any,
        check: Callable[[Any], str | None] | None = None,
    ) -> Case:
        accepted = None if valid else spec.accepted.get(label)
        return Case(spec.name, spec.owner, label, lib, valid, spec.inplace, build, check, accepted)

    eps64 = EPS["float64"]
    yield case("valid", True, _call_builder(spec, lib), _checker(spec, eps64))
    n_arrays = sum(1 for a in spec.args if a.kind in ARRAY_KINDS)
    floats = _float_args(spec)
    arrays = [i for i, a in enumerate(spec.args) if a.kind in ARRAY_KINDS and a.value is not None]
    if floats:
        # every float array in one lower precision together (no mixed precision)
        for dt in ("float32", *(HALF.get(lib, ()) if spec.half else ())):
            replace = {
                i: _lazy(lambda i=i, dt=dt: to_lib(np.asarray(spec.args[i].value), lib, dtype=dt))
                for i in floats
            }
            rounded = {i: _round_to(np.asarray(spec.args[i].value), dt) for i in floats}
            yield case(f"all-{dt}", True, _call_builder(spec, lib, replace),
                       _checker(spec, EPS[dt], rounded))  # fmt: skip
        # float32 at a scale whose squares overflow float32 (3e19^2 > 3.4e38)
        factor = 3e19
        if (
            all(spec.args[i].opts.get("scale", True) for i in floats)
            and (len(floats) == 1 or spec.scale_all)
            and all(spec.args[i].opts.get("finite", True) for i in floats)
        ):
            replace = {
                i: _lazy(lambda i=i, f=factor: to_lib(
                    (np.asarray(spec.args[i].value) * f).astype(np.float32), lib))
                for i in floats
            }  # fmt: skip
            rounded = {i: _round_to(np.asarray(spec.args[i].value) * factor, "float32")
                       for i in floats}  # fmt: skip
            yield case("all-float32-scaled-3e19", True, _call_builder(spec, lib, replace),
                       _checker(spec, EPS["float32"], rounded))  # fmt: skip
        # every float array scaled together: outputs scale by factor**degree
        for factor in (1e200, 1e-200):
            if not _joint_factor_ok(spec, factor):
                continue
            replace = {
                i: _lazy(lambda i=i, f=factor: to_lib(np.asarray(spec.args[i].value) * f, lib))
                for i in floats
            }
            yield case(f"all-scaled-{factor:g}", True, _call_builder(spec, lib, replace),
                       _checker(spec, eps64, {}, factor))  # fmt: skip
    if arrays and spec.batch:
        # a stack of two: the valid inputs and their rows reversed; each slice against the oracle
        def stacked(i: int) -> np.ndarray:
            x = np.asarray(spec.args[i].value)
            return np.stack([x, x[::-1].copy()])

        replace = {i: _lazy(lambda i=i: to_lib(stacked(i), lib)) for i in arrays}
        slices = [{i: stacked(i)[k] for i in arrays} for k in (0, 1)]
        yield case("batched-stack", True, _call_builder(spec, lib, replace),
                   _checker(spec, eps64, slices=slices))  # fmt: skip
    # a second device: every array there (a valid call, results compared)
    second = {"array_api_strict": "device1", "torch": "cuda" if cuda_available() else None}
    dev = second.get(lib)
    # a method of an object built on the default device: its arrays there are a mismatch (checked
    # as a bad input), so the second-device variant is for functions only
    if arrays and dev and not getattr(spec.target, "bound_object", False):
        replace = {
            i: _lazy(lambda i=i: to_lib(np.asarray(spec.args[i].value), lib, device=dev))
            for i in arrays
        }
        yield case(f"all-on-{dev}", True, _call_builder(spec, lib, replace),
                   _checker(spec, eps64))  # fmt: skip
    for i, a in enumerate(spec.args):
        if a.kind in ARRAY_KINDS:
            x = np.asarray(a.value)
            if x.ndim >= 1 and a.opts.get("noncontig", True) and lib in ("numpy", "torch"):
                yield case(
                    f"{a.name}=non-contiguous",
                    True,
                    _call_builder(spec, lib, {i: _lazy(lambda x=x: non_contiguous(x, lib))}),
                    _checker(spec, eps64),
                )
            if x.ndim >= 2 and a.opts.get("noncontig", True) and lib in ("numpy", "torch"):
                yield case(
                    f"{a.name}=fortran-order",
                    True,
                    _call_builder(spec, lib, {i: _lazy(lambda x=x: fortran_order(x, lib))}),
                    _checker(spec, eps64),
                )
            scalable = (
                a.opts.get("float", True)
                and a.opts.get("finite", True)
                and a.opts.get("scale", True)
            )
            if x.size and scalable:
                for factor in (1e200, 1e-200):
                    yield case(
                        f"{a.name}=scaled-{factor:g}",
                        True,
                        _call_builder(
                            spec, lib, {i: _lazy(lambda x=x, f=factor: to_lib(x * f, lib))}
                        ),
                        _checker(spec, eps64, {i: x * factor}),
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
            if lib == "torch" and a.value is not None:
                yield case(
                    f"{a.name}=meta-device",
                    False,
                    _call_builder(spec, lib, {i: _lazy(lambda x=x: to_lib(x, lib, "meta"))}),
                )
            if lib == "array_api_strict" and n_arrays > 1 and a.value is not None:
                yield case(
                    f"{a.name}=other-device",
                    False,
                    _call_builder(spec, lib, {i: _lazy(lambda x=x: to_lib(x, lib, "device1"))}),
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
            alts = list(a.opts.get("valid_alt", []))
            if (
                a.kind in ("rank", "int")
                and isinstance(a.value, int)
                and not isinstance(a.value, bool)
                and not any(label.startswith("np.int") for label, _ in alts)
            ):
                alts.append(("np.int64", np.int64(a.value)))  # NumPy integer scalars are ints
            for label, value in alts:
                yield case(
                    f"{a.name}={label}",
                    True,
                    _call_builder(spec, lib, {i: _lazy(lambda value=value: value)}),
                    _checker(spec, eps64, {i: value}),
                )
    for label, build in spec.extra:
        yield case(label, False, lambda build=build: build(lib))
    for label, build in spec.extra_valid:
        yield case(label, True, lambda build=build: build(lib), finite_only)
