"""The shared parameter checks of ``lowrank_core._validate`` (used by every module)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lowrank_core._validate import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_seed,
    check_shape,
    check_shape_pair,
)
from lowrank_core.errors import (
    LowRankError,
    ParameterError,
    ParameterTypeError,
    RankError,
    ShapeError,
)


def test_error_classes_derive_from_the_builtins() -> None:
    assert issubclass(ParameterError, LowRankError) and issubclass(ParameterError, ValueError)
    assert issubclass(ParameterTypeError, ParameterError) and issubclass(
        ParameterTypeError, TypeError
    )


@pytest.mark.parametrize("value", [3, np.int64(3), np.int8(3), np.uint16(3)])
def test_check_int_accepts_python_and_numpy_integers(value: object) -> None:
    out = check_int("k", value, min=1)
    assert out == 3 and type(out) is int


@pytest.mark.parametrize(
    "value", [True, np.True_, 2.5, 2.0, np.float64(2.0), "3", None, 1j, np.array(3), [3]]
)
def test_check_int_refuses_other_types(value: object) -> None:
    with pytest.raises(ParameterTypeError, match="`k` must be an integer"):
        check_int("k", value)


def test_check_int_bounds_and_custom_errors() -> None:
    with pytest.raises(ParameterError, match=">= 1, got 0"):
        check_int("k", 0, min=1)
    with pytest.raises(RankError, match=r"<= min\(m, n\) = 4, got 5"):
        check_int("rank", 5, min=1, max=4, max_name="min(m, n)", error=RankError)
    with pytest.raises(RankError):
        check_int("rank", 2.5, error=RankError, type_error=RankError)
    assert check_int("k", None, optional=True) is None


@pytest.mark.parametrize("value", [0.5, np.float32(0.5), np.float16(0.5), 1, np.int64(1)])
def test_check_float_accepts_numbers(value: object) -> None:
    out = check_float("f", value, min=0.0, max=1.0)
    assert type(out) is float and out == float(value)


@pytest.mark.parametrize("value", [True, "0.5", None, 1j, np.array(0.5), [0.5]])
def test_check_float_refuses_other_types(value: object) -> None:
    with pytest.raises(ParameterTypeError, match="`f` must be"):
        check_float("f", value)


def test_check_float_ranges_and_non_finite() -> None:
    with pytest.raises(ParameterError, match="NaN"):
        check_float("f", math.nan, finite=False)
    with pytest.raises(ParameterError):
        check_float("f", math.inf)
    assert check_float("f", math.inf, finite=False) == math.inf
    with pytest.raises(ParameterError, match=r"\(0, 1\]"):
        check_float("f", 0.0, min=0.0, max=1.0, min_open=True)
    assert check_float("f", 1.0, min=0.0, max=1.0, min_open=True) == 1.0
    with pytest.raises(ParameterError):
        check_float("f", 1.0, min=0.0, max=1.0, max_open=True)
    assert check_float("f", None, optional=True) is None


def test_shapes() -> None:
    assert check_shape_pair("shape", (2, 3)) == (2, 3)
    assert check_shape_pair("shape", [np.int64(2), 3]) == (2, 3)
    assert check_shape("shape", (2, 3, 4), min_ndim=2) == (2, 3, 4)
    for bad in [(8.5, 10), (True, 3), "ab", np.array([2, 3]), {2, 3}, None, 6]:
        with pytest.raises(ParameterTypeError):
            check_shape_pair("shape", bad)
    for bad_value in [(3,), (1, 2, 3), (0, 3), (-1, 2)]:
        with pytest.raises(ShapeError, match="`shape`"):
            check_shape_pair("shape", bad_value)


def test_bool_choice_seed() -> None:
    assert check_bool("flag", np.True_) is True
    with pytest.raises(ParameterTypeError):
        check_bool("flag", 1)
    assert check_choice("method", "a", ("a", "b")) == "a"
    with pytest.raises(ParameterError, match="one of"):
        check_choice("method", "c", ("a", "b"))
    with pytest.raises(ParameterTypeError):
        check_choice("method", 1, ("a", "b"))
    assert check_seed("seed", None) is None and check_seed("seed", np.int64(4)) == 4
    for bad in [-1, 1.5, "1", True]:
        with pytest.raises(ParameterError):
            check_seed("seed", bad)
