"""CMD's constants, argument checks and index helpers (shared by every step of the pipeline)."""

from __future__ import annotations

from typing import Any, Literal

import array_api_compat
import numpy as np

from .._array import Array, Namespace, check_floating
from .._validate import check_choice, check_float, check_int, describe
from ..backend import get_backend
from ..errors import DTypeError, NonFiniteError, ParameterError, ParameterTypeError, ShapeError

__all__ = ["CONSTANT_TOLERANCE", "DEFAULT_CHUNK_SIZE", "DEFAULT_METRIC", "METRICS", "Metric"]


DEFAULT_CHUNK_SIZE = 1 << 16
"""Rows of the trajectory processed at once by the chunked functions."""


CONSTANT_TOLERANCE = 8.0
"""A row is constant when its centred norm is <= this many ``eps sqrt(T)`` times its magnitude."""


Metric = Literal["correlation", "euclidean"]


METRICS: tuple[str, ...] = ("euclidean", "correlation")


DEFAULT_METRIC: Metric = "euclidean"
"""The paper's distance (Euclidean between rows of ``|corr|``); chosen by measurement, see the docs."""


def _check_trajectory(xp: Namespace, x: Array, name: str, *, min_epochs: int = 2) -> None:
    if x.ndim != 2:
        raise ShapeError(
            f"`{name}` must be a 2-D trajectory (parameters, epochs), got shape {tuple(x.shape)}"
        )
    check_floating(xp, x, name)
    if x.shape[0] < 1:
        raise ShapeError(
            f"`{name}` must hold at least one parameter (row), got shape {tuple(x.shape)}"
        )
    if x.shape[1] < min_epochs:
        raise ShapeError(
            f"`{name}` must hold at least {min_epochs} epochs (columns) to fit CMD, "
            f"got shape {tuple(x.shape)}"
        )


def _check_finite(x: Array, name: str) -> None:
    if not get_backend(x).all_finite(x):
        raise NonFiniteError(f"`{name}` contains NaN or Inf")


def _check_chunk(chunk_size: object) -> int:
    result: int = check_int("chunk_size", chunk_size, min=1)
    return result


def _check_fraction(value: object, name: str, *, open_low: bool = True) -> float:
    result: float = check_float(name, value, min=0.0, max=1.0, min_open=open_low)
    return result


def _check_metric(metric: object) -> Metric:
    return "euclidean" if check_choice("metric", metric, METRICS) == "euclidean" else "correlation"


def _check_vector(xp: Namespace, v: Array, name: str, n: int, *, finite: bool = True) -> None:
    """A real floating ``(n,)`` array, finite unless told otherwise."""
    if v.ndim != 1 or int(v.shape[0]) != n:
        raise ShapeError(f"`{name}` must have shape ({n},), got {tuple(v.shape)}")
    check_floating(xp, v, name)
    if finite:
        _check_finite(v, name)


def _check_modes_index(
    xp: Namespace, v: Array, name: str, n: int, n_modes: int, *, values: bool = True
) -> None:
    """An integer ``(n,)`` array of mode ids in ``0 .. n_modes - 1`` (the range only with ``values``)."""
    if v.ndim != 1 or int(v.shape[0]) != n:
        raise ShapeError(f"`{name}` must have shape ({n},), got {tuple(v.shape)}")
    if not xp.isdtype(v.dtype, "integral"):
        raise DTypeError(f"`{name}` must have an integer dtype, got {v.dtype}")
    if values and n and (int(xp.min(v)) < 0 or int(xp.max(v)) >= n_modes):
        raise ParameterError(
            f"`{name}` values must lie in 0..{n_modes - 1} (one per mode), got "
            f"{int(xp.min(v))}..{int(xp.max(v))}"
        )


def _host_indices(value: object, name: str, n: int | None) -> np.ndarray:
    """A 1-D NumPy int64 array of distinct indices in ``0 .. n-1`` (``n=None``: any ``>= 0``), from
    integer array-likes only."""
    if isinstance(value, (str, bytes)) or value is None:
        raise ParameterTypeError(
            f"`{name}` must be a 1-D array of integer indices, got {describe(value)}"
        )
    try:
        arr = np.asarray(value)
    except Exception as exc:
        raise ParameterTypeError(
            f"`{name}` must be a 1-D array of integer indices, got {describe(value)}"
        ) from exc
    if arr.ndim != 1:
        raise ShapeError(f"`{name}` must be 1-D, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise DTypeError(f"`{name}` must hold integers, got dtype {arr.dtype}")
    idx = arr.astype(np.int64)
    if idx.size and int(idx.min()) < 0:
        raise ParameterError(f"`{name}` must be >= 0, got {int(idx.min())}")
    if n is not None and idx.size and int(idx.max()) >= n:
        raise ParameterError(
            f"`{name}` must lie in 0..{n - 1}, got {int(idx.min())}..{int(idx.max())}"
        )
    if np.unique(idx).size != idx.size:
        raise ParameterError(f"`{name}` must not repeat an index")
    return idx


def _device(x: Array) -> Any:
    return array_api_compat.device(x)


def _index_dtype(xp: Namespace, like: Array) -> Any:
    """The namespace's default index dtype (int64; int32 in JAX without x64)."""
    try:
        return xp.__array_namespace_info__().default_dtypes(device=_device(like))["indexing"]
    except (AttributeError, TypeError, KeyError):  # pragma: no cover - pre-2023.12 namespaces
        return xp.int64


def _index_array(xp: Namespace, idx: np.ndarray, like: Array) -> Array:
    host = np.asarray(idx, dtype=np.int64)
    dtype = _index_dtype(xp, like)
    if dtype != xp.int64:
        host = host.astype(np.int32)
    return xp.asarray(host, device=_device(like))


def _to_host(x: Array) -> np.ndarray:
    return np.asarray(get_backend(x).to_numpy(x))


def _eps(xp: Namespace, dtype: Any) -> float:
    return float(xp.finfo(dtype).eps)
