"""Namespace discovery and input validation shared by every public function.

Nothing here is public API; it keeps the checks (and their messages) identical everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import array_api_compat

from ._validate import check_bool, check_int
from .errors import (
    ArrayTypeError,
    DeviceError,
    DeviceMismatchError,
    DTypeError,
    NonFiniteError,
    RankError,
    ShapeError,
)

Array = Any
"""Any array of an array-API-compatible library (NumPy, PyTorch, CuPy, array_api_strict, ...)."""
Namespace = Any


def _library_name(x: object) -> str:
    return type(x).__module__.split(".")[0]


def check_device(x: Array, name: str) -> None:
    """Raise ``DeviceError`` when ``x`` lives on a device that cannot compute.

    PyTorch's ``meta`` device (``tensor.is_meta``) holds shapes and dtypes but no values: nothing can
    be read from it, so every computation would fail deep inside PyTorch. No other library has such a
    device; arrays without ``is_meta`` (NumPy, JAX, CuPy, traced values) pass untouched.
    """
    if getattr(x, "is_meta", False) is True:
        raise DeviceError(
            f"`{name}` is on the device 'meta' (shapes without values), where nothing can be "
            "computed; materialize it on a real device first (for a model built under "
            "torch.device('meta'): model.to_empty(device=...) and initialize or load its weights)"
        )


def namespace(**arrays: Array) -> Namespace:
    """Return the array namespace shared by ``arrays`` (given by argument name).

    Raises ``ArrayTypeError`` for non-arrays or a mix of libraries, ``DeviceError`` for an array on a
    device that cannot compute (PyTorch's ``meta``) and ``DeviceMismatchError`` for a mix of devices.
    The names are only used in the messages.
    """
    for name, x in arrays.items():
        if not array_api_compat.is_array_api_obj(x) or isinstance(x, (bool, int, float, complex)):
            raise ArrayTypeError(
                f"`{name}` must be an array (NumPy, PyTorch, CuPy, ...), got {type(x).__name__}"
            )
        check_device(x, name)
    values = list(arrays.values())
    try:
        xp = array_api_compat.array_namespace(*values)
    except TypeError as exc:
        libs = ", ".join(f"`{n}`: {_library_name(x)}" for n, x in arrays.items())
        raise ArrayTypeError(
            f"arrays from different libraries cannot be combined ({libs}); "
            "convert them to one library first"
        ) from exc
    if len(values) > 1:
        devices = [array_api_compat.device(x) for x in values]
        # a traced JAX value (inside jit / vmap) has no device (None): it goes where its inputs are
        placed = [d for d in devices if d is not None]
        first = placed[0] if placed else None
        if any(d != first for d in placed[1:]):
            where = ", ".join(f"`{n}`: {d}" for n, d in zip(arrays, devices, strict=True))
            raise DeviceMismatchError(
                f"arrays on different devices cannot be combined ({where}); move them to one device"
            )
    return xp


def check_floating(xp: Namespace, x: Array, name: str) -> None:
    if not xp.isdtype(x.dtype, "real floating"):
        raise DTypeError(
            f"`{name}` must have a real floating dtype (float16/bfloat16/float32/float64), "
            f"got {x.dtype}"
        )


def check_finite(xp: Namespace, x: Array, name: str) -> None:
    from .backend import get_backend  # late: backend.py imports this module

    if not get_backend(x).all_finite(x):
        raise NonFiniteError(f"`{name}` contains NaN or Inf")


def check_matrix(
    xp: Namespace, x: Array, name: str, *, finite: bool = True, allow_empty: bool = False
) -> None:
    """A real floating array of shape ``(..., m, n)``, optionally all finite.

    Unless ``allow_empty``, every dimension must be >= 1: ``m, n >= 1`` and no empty stack such as
    ``(0, 4, 4)``. ``finite`` is the caller's ``check_finite`` argument and must be a bool.
    """
    finite = check_bool("check_finite", finite)
    if x.ndim < 2:
        raise ShapeError(
            f"`{name}` must be a matrix or a stack of matrices (..., m, n), got shape {tuple(x.shape)}"
        )
    check_floating(xp, x, name)
    if not allow_empty and any(int(d) == 0 for d in x.shape):
        what = "an empty stack" if x.ndim > 2 and min(x.shape[-2:]) > 0 else "m, n >= 1"
        raise ShapeError(
            f"`{name}` must have every dimension >= 1 (got {what}), shape {tuple(x.shape)}"
        )
    if finite:
        check_finite(xp, x, name)


def compute_dtype(xp: Namespace, dtype: Any) -> Any:
    """The dtype math is done in: float32/float64 as given, anything narrower upcast to float32."""
    if dtype == xp.float64 or dtype == xp.float32:
        return dtype
    return xp.float32


def upcast(xp: Namespace, x: Array) -> Array:
    target = compute_dtype(xp, x.dtype)
    return x if x.dtype == target else xp.astype(x, target)


def cast_to(xp: Namespace, x: Array, dtype: Any) -> Array:
    return x if x.dtype == dtype else xp.astype(x, dtype)


def result_dtype(xp: Namespace, *arrays: Array) -> Any:
    return xp.result_type(*arrays)


def check_rank(rank: object, upper: int, *, name: str = "rank", what: str = "min(m, n)") -> int:
    """A rank must be a true integer (not bool, not a float such as 2.0 or 2.5) in ``1..upper``.

    NumPy integer scalars are accepted. Both a wrong type and a value out of range raise ``RankError``
    (the SPEC's rule for ranks).
    """
    result: int = check_int(
        name, rank, min=1, max=upper, max_name=what, error=RankError, type_error=RankError
    )
    return result


def diag_embed(xp: Namespace, d: Array) -> Array:
    """Stack of diagonal matrices from a stack of vectors ``(..., r) -> (..., r, r)``."""
    r = d.shape[-1]
    eye = xp.eye(r, dtype=xp.bool, device=array_api_compat.device(d))
    # where, not d * eye: an infinite d must not put inf * 0 = NaN off the diagonal
    return xp.where(eye, d[..., None], xp.zeros_like(d[..., None]))


def power_of_two_near(xp: Namespace, top: Array) -> Array:
    """``2^floor(log2 top)`` element-wise (1 where ``top`` is 0), clipped so that the power and its
    reciprocal are both normal numbers of the dtype: dividing by it is exact, and stays exact where a
    library divides by multiplying with the reciprocal and flushes subnormals to zero (XLA on CPU)."""
    limit = math.floor(-math.log2(float(xp.finfo(top.dtype).smallest_normal)))
    one = xp.ones_like(top)
    positive = top > 0
    power = xp.clip(xp.floor(xp.log2(xp.where(positive, top, one))), -float(limit), float(limit))
    return xp.where(positive, 2.0**power, one)


def batch_shape(x: Array) -> tuple[int, ...]:
    return tuple(x.shape[:-2])


def shape_tuple(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(s) for s in shape)
