"""Validation of scalar and shape parameters, shared by every module (and by the integrations).

Not public API, but stable for use inside this repository (``lowrank_torch``, ``lowrank_cupy``, ...).
Every helper returns the value in canonical Python form (``int``, ``float``, ``bool``, a ``tuple`` of
``int``) or raises an error of the :class:`~lowrank_core.errors.LowRankError` hierarchy whose message names
the argument, says what was expected and shows what was given.

Accepted forms (one rule everywhere):

- integers: Python ``int`` and NumPy integer scalars (``np.int64(3)``); refused: ``bool`` / ``np.bool_``
  (``True`` is not 1), floats even when integral (``2.0``, ``2.5``: no silent truncation), strings,
  ``None`` (unless ``optional=True``), complex numbers and arrays of any library, 0-d included (pass
  ``int(x)``; reading a 0-d tensor would synchronize a device behind the caller's back);
- floats: Python ``int`` / ``float`` and NumPy integer / floating scalars (``np.float32(0.5)``), returned
  as ``float``; refused: ``bool``, ``complex``, strings, ``None`` (unless ``optional=True``), arrays (0-d
  included, pass ``float(x)``), and NaN / infinity unless ``finite=False``;
- shapes: a ``tuple`` or ``list`` (``torch.Size`` is a tuple) of integers by the rule above; refused:
  strings, sets, dicts, arrays, generators (they would be consumed).

Errors: a value of the wrong *type* raises :class:`~lowrank_core.errors.ParameterTypeError` (a
``TypeError``), a value out of range :class:`~lowrank_core.errors.ParameterError` (a ``ValueError``).
Since ``ParameterTypeError`` subclasses ``ParameterError``, ``except ParameterError`` catches both.
Callers may pass ``error=`` to raise a more specific value error (``RankError`` for ranks,
``ShapeError`` for shapes); wrong types always raise ``ParameterTypeError``.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import LowRankError, ParameterError, ParameterTypeError, ShapeError

__all__ = [
    "check_bool",
    "check_choice",
    "check_float",
    "check_int",
    "check_seed",
    "check_shape",
    "check_shape_pair",
    "describe",
]


def describe(value: object) -> str:
    """A short description of ``value`` for messages: its repr (capped) and type."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _is_array(value: object) -> bool:
    """An array object of some library (NumPy ndarray, torch.Tensor, ...), not a scalar."""
    if isinstance(value, np.ndarray):
        return True
    if isinstance(value, (np.generic, numbers.Number, str, bytes)):
        return False
    return hasattr(value, "__array_namespace__") or hasattr(value, "__dlpack__")


def _as_int(
    name: str, value: object, expected: str, type_error: type[LowRankError] = ParameterTypeError
) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise type_error(f"`{name}` must be {expected}, got a bool ({value})")
    if _is_array(value):
        raise type_error(
            f"`{name}` must be {expected} (a Python or NumPy scalar; use int(x) for a 0-d array), "
            f"got an array ({type(value).__name__})"
        )
    if isinstance(value, (numbers.Integral, np.integer)):
        return operator.index(value)
    if isinstance(value, (float, np.floating)) and math.isfinite(float(value)):
        raise type_error(
            f"`{name}` must be {expected}, got the float {value!r} (not truncated; pass an int)"
        )
    raise type_error(f"`{name}` must be {expected}, got {describe(value)}")


def check_int(
    name: str,
    value: object,
    *,
    min: int | None = None,
    max: int | None = None,
    max_name: str | None = None,
    optional: bool = False,
    error: type[LowRankError] = ParameterError,
    type_error: type[LowRankError] = ParameterTypeError,
) -> Any:
    """``value`` as an ``int`` in ``[min, max]`` (bounds inclusive, ``None`` = unbounded).

    ``optional=True`` lets ``None`` through (returned as ``None``). ``max_name`` names the upper bound
    in the message (``"min(m, n)"``). Out-of-range values raise ``error`` (default ``ParameterError``;
    pass ``RankError`` for ranks); values of the wrong type raise ``type_error`` (default
    ``ParameterTypeError``; ranks pass ``RankError`` for both, as the SPEC documents).
    """
    if value is None and optional:
        return None
    expected = "an integer" if min is None else f"an integer >= {min}"
    if optional:
        expected += " or None"
    v = _as_int(name, value, expected, type_error)
    if min is not None and v < min:
        raise error(f"`{name}` must be >= {min}, got {v}")
    if max is not None and v > max:
        bound = f"{max_name} = {max}" if max_name else str(max)
        raise error(f"`{name}` must be <= {bound}, got {v}")
    return v


def check_float(
    name: str,
    value: object,
    *,
    min: float | None = None,
    max: float | None = None,
    min_open: bool = False,
    max_open: bool = False,
    finite: bool = True,
    optional: bool = False,
    error: type[LowRankError] = ParameterError,
) -> Any:
    """``value`` as a ``float`` within the given bounds (closed unless ``min_open`` / ``max_open``).

    NaN is always refused; infinities unless ``finite=False``. ``optional=True`` lets ``None`` through.
    """
    if value is None and optional:
        return None
    lo = "(" if min_open else "["
    hi = ")" if max_open else "]"
    if min is None and max is None:
        expected = "a finite real number" if finite else "a real number"
    else:
        a = "-inf" if min is None else f"{min:g}"
        b = "inf" if max is None else f"{max:g}"
        expected = f"a real number in {lo}{a}, {b}{hi}"
    if optional:
        expected += " or None"
    if isinstance(value, (bool, np.bool_)):
        raise ParameterTypeError(f"`{name}` must be {expected}, got a bool ({value})")
    if _is_array(value):
        raise ParameterTypeError(
            f"`{name}` must be {expected} (a Python or NumPy scalar; use float(x) for a 0-d array), "
            f"got an array ({type(value).__name__})"
        )
    if not isinstance(value, (numbers.Real, np.integer, np.floating)):
        raise ParameterTypeError(f"`{name}` must be {expected}, got {describe(value)}")
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ParameterTypeError(f"`{name}` must be {expected}, got {describe(value)}") from exc
    if math.isnan(v):
        raise error(f"`{name}` must be {expected}, got NaN")
    if finite and math.isinf(v):
        raise error(f"`{name}` must be {expected}, got {v}")
    if min is not None and (v < min or (min_open and v == min)):
        raise error(f"`{name}` must be {expected}, got {v!r}")
    if max is not None and (v > max or (max_open and v == max)):
        raise error(f"`{name}` must be {expected}, got {v!r}")
    return v


def check_bool(name: str, value: object) -> bool:
    """A real ``bool`` (or ``np.bool_``); ints such as 0/1 are refused."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ParameterTypeError(f"`{name}` must be True or False, got {describe(value)}")


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """One of the strings ``choices``."""
    if not isinstance(value, str):
        raise ParameterTypeError(f"`{name}` must be one of {tuple(choices)}, got {describe(value)}")
    if value not in choices:
        raise ParameterError(f"`{name}` must be one of {tuple(choices)}, got {value!r}")
    return value


def check_seed(name: str, value: object) -> int | None:
    """A random seed: ``None`` or a non-negative integer (NumPy's rule)."""
    result: int | None = check_int(name, value, min=0, optional=True)
    return result


def check_shape(
    name: str,
    value: object,
    *,
    ndim: int | None = None,
    min_ndim: int = 0,
    min: int = 1,
    error: type[LowRankError] = ShapeError,
) -> tuple[int, ...]:
    """A shape: a tuple or list of integers ``>= min`` (default 1: no empty or negative dimension).

    ``ndim`` fixes the length, ``min_ndim`` bounds it below. Wrong types raise ``ParameterTypeError``;
    wrong lengths and sizes raise ``error`` (default ``ShapeError``).
    """
    if ndim is not None:
        expected = f"a tuple of {ndim} integers"
    else:
        expected = f"a tuple of at least {min_ndim} integers" if min_ndim else "a tuple of integers"
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
        raise ParameterTypeError(f"`{name}` must be {expected}, got {describe(value)}")
    dims = tuple(_as_int(f"{name}[{i}]", d, "an integer") for i, d in enumerate(value))
    if ndim is not None and len(dims) != ndim:
        raise error(f"`{name}` must be {expected}, got {dims} ({len(dims)} dimensions)")
    if len(dims) < min_ndim:
        raise error(f"`{name}` must be {expected}, got {dims} ({len(dims)} dimensions)")
    bad = [d for d in dims if d < min]
    if bad:
        raise error(f"`{name}` must have every dimension >= {min}, got {dims}")
    return dims


def check_shape_pair(
    name: str, value: object, *, min: int = 1, error: type[LowRankError] = ShapeError
) -> tuple[int, int]:
    """An ``(m, n)`` pair of integers ``>= min`` (a tuple or list of two)."""
    dims = check_shape(name, value, ndim=2, min=min, error=error)
    return dims[0], dims[1]
