"""weight_to_matrix / matrix_to_weight / matrix_shape."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _helpers import assert_in_library, assert_unchanged, snapshot
from _strategies import seeds
from hypothesis import given
from hypothesis import strategies as st

import lowrank_core as lc
import lowrank_reference as ref


@st.composite
def weight_shapes(draw):
    """(weight_shape, groups) for Linear, Conv1d/2d/3d (grouped or not) and packed attention."""
    kind = draw(st.sampled_from(["linear", "conv", "attention"]))
    if kind == "linear":
        return (draw(st.integers(1, 12)), draw(st.integers(1, 12))), 1
    if kind == "attention":
        e = draw(st.integers(1, 8))
        return (3 * e, e), draw(st.sampled_from([1, 3]))
    groups = draw(st.integers(1, 4))
    out = groups * draw(st.integers(1, 4))
    in_per_group = draw(st.integers(1, 3))
    kernel = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
    return (out, in_per_group, *kernel), groups


@given(data=st.data())
def test_weight_matrix_round_trip(backend, dtype, data):
    shape, groups = data.draw(weight_shapes(), label="weight")
    rng = np.random.default_rng(data.draw(seeds, label="seed"))
    w_np = rng.standard_normal(shape)
    w = backend.asarray(w_np, dtype)
    before = snapshot(backend, w)
    out = shape[0]
    cols = math.prod(shape[1:])
    want_shape = (out, cols) if groups == 1 else (groups, out // groups, cols)
    m = lc.weight_to_matrix(w, groups=groups)
    assert_in_library(m, w, what="weight_to_matrix")
    assert tuple(m.shape) == want_shape
    assert tuple(lc.matrix_shape(shape, groups=groups)) == want_shape
    ms = lc.matrix_shape(shape, groups=groups)
    assert isinstance(ms, tuple)
    assert all(isinstance(d, int) for d in ms)
    m_np = backend.to_numpy(m)
    w_seen = backend.to_numpy(w)
    flat = w_seen.reshape(out, cols)
    if groups == 1:
        np.testing.assert_array_equal(m_np, flat)
    else:
        o = out // groups
        for g in range(groups):
            np.testing.assert_array_equal(m_np[g], flat[g * o : (g + 1) * o], err_msg=f"block {g}")
    np.testing.assert_array_equal(m_np, ref.weight_to_matrix(w_seen, groups=groups))
    back = lc.matrix_to_weight(m, shape)
    assert_in_library(back, w, what="matrix_to_weight")
    assert tuple(back.shape) == tuple(shape)
    np.testing.assert_array_equal(backend.to_numpy(back), w_seen)
    np.testing.assert_array_equal(ref.matrix_to_weight(m_np, shape), w_seen)
    assert_unchanged(backend, before, w)


def test_packed_attention_blocks(backend, dtype):
    e = 4
    q, k, v = (np.full((e, e), float(i)) for i in (1, 2, 3))
    w = backend.asarray(np.concatenate([q, k, v]), dtype)
    m = backend.to_numpy(lc.weight_to_matrix(w, groups=3))
    assert m.shape == (3, e, e)
    np.testing.assert_array_equal(m[0], q)
    np.testing.assert_array_equal(m[1], k)
    np.testing.assert_array_equal(m[2], v)


def test_grouped_conv_blocks(backend, dtype):
    # Conv2d(in=4, out=6, kernel=(2, 3), groups=2): weight (6, 2, 2, 3) -> (2, 3, 12)
    w_np = np.arange(6 * 2 * 2 * 3, dtype=np.float64).reshape(6, 2, 2, 3)
    w = backend.asarray(w_np, dtype)
    m = backend.to_numpy(lc.weight_to_matrix(w, groups=2))
    assert m.shape == (2, 3, 12)
    np.testing.assert_array_equal(m[1, 0], w_np[3].reshape(-1))
    assert lc.matrix_shape((6, 2, 2, 3), groups=2) == (2, 3, 12)
    assert lc.matrix_shape((6, 2, 2, 3)) == (6, 12)
    assert lc.matrix_shape((5, 7)) == (5, 7)


@pytest.mark.parametrize(("shape", "groups"), [((6, 4), 4), ((5, 2, 3), 2), ((9, 3), 2)])
def test_weight_to_matrix_groups_must_divide_out(backend, shape, groups):
    w = backend.asarray(np.zeros(shape), "float32")
    before = snapshot(backend, w)
    with pytest.raises(lc.ShapeError, match=r"(?i)(group|divis)"):
        lc.weight_to_matrix(w, groups=groups)
    with pytest.raises(lc.ShapeError, match=r"(?i)(group|divis)"):
        lc.matrix_shape(shape, groups=groups)
    assert_unchanged(backend, before, w)


@pytest.mark.parametrize("shape", [(5,), ()])
def test_weight_to_matrix_needs_two_dims(backend, shape):
    w = backend.asarray(np.zeros(shape), "float32")
    with pytest.raises(lc.ShapeError, match=r"(?i)(dim|shape)"):
        lc.weight_to_matrix(w)


@pytest.mark.parametrize(
    ("matrix_shape", "weight_shape"),
    [((6, 5), (6, 4)), ((6, 4), (5, 2, 2)), ((2, 3, 4), (6, 5)), ((4,), (2, 2))],
    ids=["cols", "rows", "grouped", "1-D"],
)
def test_matrix_to_weight_size_mismatch(backend, matrix_shape, weight_shape):
    m = backend.asarray(np.zeros(matrix_shape), "float64")
    before = snapshot(backend, m)
    with pytest.raises(lc.ShapeError, match=r"(?i)(size|shape|dim)"):
        lc.matrix_to_weight(m, weight_shape)
    assert_unchanged(backend, before, m)


# --------------------------------------------------------------------------------------------------
# issue 9: validation of shapes and values
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("weight_shape", "error"),
    [((-6, -2, 3), lc.ShapeError), ((6, 0), lc.ShapeError), ((6,), lc.ShapeError),
     ((8.5, 10), lc.ParameterTypeError), ("ab", lc.ParameterTypeError), (6, lc.ParameterTypeError),
     ((True, 2), lc.ParameterTypeError)],
)  # fmt: skip
def test_matrix_shape_refuses_bad_shapes(weight_shape, error):
    with pytest.raises(error, match="`weight_shape"):
        lc.matrix_shape(weight_shape, groups=2)


def test_matrix_shape_accepts_numpy_ints_and_lists():
    assert lc.matrix_shape([np.int64(6), 2, 3], groups=np.int64(2)) == (2, 3, 6)


@pytest.mark.parametrize("groups", [2.0, True, "2", None, 0, -1])
def test_groups_must_be_a_positive_int(backend, groups):
    w = backend.asarray(np.ones((6, 2, 3)))
    with pytest.raises(lc.ParameterError, match="`groups`"):
        lc.weight_to_matrix(w, groups=groups)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_views_refuse_non_finite_values(backend, bad):
    w = np.ones((6, 2, 3))
    w[1, 1, 1] = bad
    x = backend.asarray(w)
    before = snapshot(backend, x)
    with pytest.raises(lc.NonFiniteError, match="`weight`"):
        lc.weight_to_matrix(x)
    m = backend.asarray(w.reshape(6, 6))
    with pytest.raises(lc.NonFiniteError, match="`matrix`"):
        lc.matrix_to_weight(m, (6, 2, 3))
    assert_unchanged(backend, before, x)
    # the hot path opts out explicitly
    out = lc.weight_to_matrix(x, check_finite=False)
    assert tuple(out.shape) == (6, 6)


@pytest.mark.parametrize("dtype", ["int64", "bool"])
def test_views_refuse_non_float_dtypes(backend, dtype):
    x = backend.asarray(np.ones((6, 6)), dtype)
    with pytest.raises(lc.DTypeError):
        lc.weight_to_matrix(x)
    with pytest.raises(lc.DTypeError):
        lc.matrix_to_weight(x, (6, 2, 3))


def test_matrix_to_weight_refuses_bad_weight_shapes(backend):
    m = backend.asarray(np.ones((6, 6)))
    for shape, error in [
        ((6.0, 6), lc.ParameterTypeError),
        ((-6, -6), lc.ShapeError),
        ((36,), lc.ShapeError),
    ]:
        with pytest.raises(error, match="`weight_shape"):
            lc.matrix_to_weight(m, shape)
