"""basis_stability, principal_angle_cosines and projector_distance."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _helpers import (
    assert_close,
    assert_in_library,
    assert_unchanged,
    batch_indices,
    eps,
    random_orthogonal,
    rotation_in_plane,
    snapshot,
)
from _strategies import MAX_COND, build_case, matrix_cases, seeds
from hypothesis import assume, given
from hypothesis import strategies as st

import lowrank_core as lc
import lowrank_reference as ref


def _conds(a: np.ndarray) -> np.ndarray:
    s = np.linalg.svd(a, compute_uv=False)
    with np.errstate(divide="ignore", invalid="ignore"):
        return s[..., 0] / s[..., -1]


def _stability_tol(dtype: str, cond: float, m: int, n: int) -> float:
    return 20 * eps(dtype) * cond * math.sqrt(max(m, n))


# --------------------------------------------------------------------------------------------------
# basis_stability
# --------------------------------------------------------------------------------------------------
@given(data=st.data())
def test_basis_stability_matches_reference(backend, dtype, data):
    prev_case = data.draw(matrix_cases(dtype, gap=None), label="previous")
    rng = np.random.default_rng(data.draw(seeds, label="seed"))
    noise = build_case(
        rng,
        prev_case.batch,
        prev_case.m,
        prev_case.n,
        max_cond=MAX_COND[dtype],
        gap=None,
        scale=float(np.max(prev_case.s)),
    )
    t = data.draw(st.sampled_from([0.0, 1e-3, 0.05, 0.3, 1.0, 10.0]), label="noise level")
    p = backend.asarray(prev_case.a, dtype)
    c = backend.asarray(prev_case.a + t * noise.a, dtype)
    before = snapshot(backend, p, c)
    out = lc.basis_stability(p, c)
    assert_in_library(out, p, what="basis_stability")
    assert tuple(out.shape) == prev_case.batch
    out_ = backend.to_numpy(out)
    p64 = backend.to_numpy(p).astype(np.float64)
    c64 = backend.to_numpy(c).astype(np.float64)
    m, n = prev_case.m, prev_case.n
    cond_p, cond_c = _conds(p64), _conds(c64)
    for idx in batch_indices(prev_case.batch):
        cond = max(cond_p[idx], cond_c[idx])
        if not np.isfinite(cond) or cond > 10 * MAX_COND[dtype]:
            continue  # the polar factor is ill-determined; nothing sharp to compare
        want = ref.basis_stability(p64[idx], c64[idx])
        assert_close(out_[idx], want, atol=_stability_tol(dtype, cond, m, n), err_msg=f"at {idx}")
    assert_unchanged(backend, before, p, c)


@given(data=st.data())
def test_polar_stability_equals_basis_stability_of_the_snapshots(backend, dtype, data):
    prev_case = data.draw(matrix_cases(dtype, gap=None), label="previous")
    rng = np.random.default_rng(data.draw(seeds, label="seed"))
    t = data.draw(st.sampled_from([0.0, 0.05, 1.0]), label="noise level")
    noise = rng.standard_normal(prev_case.a.shape) * float(np.max(prev_case.s))
    p = backend.asarray(prev_case.a, dtype)
    c = backend.asarray(prev_case.a + t * noise, dtype)
    qp, qc = lc.orthogonal_factor(p), lc.orthogonal_factor(c)
    before = snapshot(backend, qp, qc)
    out = lc.polar_stability(qp, qc)
    assert_in_library(out, p, what="polar_stability")
    assert tuple(out.shape) == prev_case.batch
    want = backend.to_numpy(lc.basis_stability(p, c))
    # the same polar factors and the same reduction: equal up to the rounding of one reduction
    assert_close(backend.to_numpy(out), want, atol=64 * eps(dtype))
    assert_unchanged(backend, before, qp, qc)


def test_polar_stability_rejects_mismatched_shapes(backend):
    a = backend.asarray(np.eye(4, 3), "float64")
    b = backend.asarray(np.eye(3, 4), "float64")
    with pytest.raises(lc.ShapeError, match="previous_polar"):
        lc.polar_stability(a, b)


@given(data=st.data())
def test_basis_stability_identical_is_one(backend, dtype, data):
    case = data.draw(matrix_cases(dtype, gap=None), label="case")
    a = backend.asarray(case.a, dtype)
    out = backend.to_numpy(lc.basis_stability(a, a))
    tol = _stability_tol(dtype, case.cond, case.m, case.n)
    assert_close(out, np.ones(case.batch), atol=tol)


@given(data=st.data())
def test_basis_stability_shared_singular_vectors_is_one(backend, dtype, data):
    """U diag(s1) V^T and (U D) diag(s2) (V D)^T (D random signs, s2 another positive spectrum, in any
    order) have the same polar factor U V^T: the stability is 1."""
    case = data.draw(matrix_cases(dtype, gap=None), label="case")
    rng = np.random.default_rng(data.draw(seeds, label="seed"))
    k = case.k
    D = rng.choice([-1.0, 1.0], size=(*case.batch, 1, k))
    cap = MAX_COND[dtype]
    s2 = np.exp(rng.uniform(-math.log(cap) / 2, math.log(cap) / 2, size=(*case.batch, k)))
    rebuilt = ((case.U * D) * s2[..., None, :]) @ np.swapaxes(case.V * D, -1, -2)
    p = backend.asarray(case.a, dtype)
    c = backend.asarray(rebuilt, dtype)
    out = backend.to_numpy(lc.basis_stability(p, c))
    tol = _stability_tol(dtype, max(case.cond, cap), case.m, case.n)
    assert_close(out, np.ones(case.batch), atol=tol)


@given(data=st.data())
def test_basis_stability_rotated_is_less_than_one(backend, dtype, data):
    """Rotate the polar factor's first column (m >= n) or row (m < n) by theta in some plane: the mean
    cosine drops by at least (1 - cos theta) / (number of columns or rows)."""
    case = data.draw(matrix_cases(dtype, gap=None, batch=False, min_side=2), label="case")
    theta = data.draw(st.floats(0.2, math.pi / 2), label="theta")
    rng = np.random.default_rng(data.draw(seeds, label="seed"))
    m, n = case.m, case.n
    Q = case.U @ case.V.T  # polar factor of case.a
    if m >= n:
        R = rotation_in_plane(m, Q[:, 0], rng, theta)
        cur = R @ case.a
        count = n
    else:
        R = rotation_in_plane(n, Q[0, :], rng, theta)
        cur = case.a @ R.T
        count = m
    p = backend.asarray(case.a, dtype)
    c = backend.asarray(cur, dtype)
    out = float(backend.to_numpy(lc.basis_stability(p, c)))
    bound = 1.0 - (1.0 - math.cos(theta)) / count
    tol = _stability_tol(dtype, case.cond, m, n)
    assert out <= bound + tol, f"stability {out} above the bound {bound}"
    assert out >= -1.0 - tol


@given(data=st.data())
def test_basis_stability_symmetric(backend, dtype, data):
    case = data.draw(matrix_cases(dtype, gap=None), label="a")
    rng = np.random.default_rng(data.draw(seeds, label="seed"))
    other = build_case(
        rng, case.batch, case.m, case.n, max_cond=MAX_COND[dtype], gap=None, scale=1.0
    )
    p = backend.asarray(case.a, dtype)
    c = backend.asarray(other.a, dtype)
    ab = backend.to_numpy(lc.basis_stability(p, c))
    ba = backend.to_numpy(lc.basis_stability(c, p))
    tol = _stability_tol(dtype, max(case.cond, other.cond), case.m, case.n)
    assert_close(ab, ba, atol=tol)


def test_basis_stability_hand_example(backend, dtype):
    # previous = I (2x2), current = rotation by 60 degrees: both columns have cos = 0.5
    c60, s60 = 0.5, math.sqrt(3) / 2
    p = backend.asarray(np.eye(2), dtype)
    c = backend.asarray(np.array([[c60, -s60], [s60, c60]]), dtype)
    out = float(backend.to_numpy(lc.basis_stability(p, c)))
    assert abs(out - 0.5) <= 50 * eps(dtype)
    # tall 3x2: previous = [e1, e2] * diag(5, 1); current = [e1, e3]: cosines 1 and 0 -> 0.5
    p = backend.asarray(np.array([[5.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), dtype)
    c = backend.asarray(np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]]), dtype)
    out = float(backend.to_numpy(lc.basis_stability(p, c)))
    assert abs(out - 0.5) <= 50 * eps(dtype)
    # wide 1x3: rows [0, 3, 4] and [0, -3, -4]: cos = -1
    p = backend.asarray(np.array([[0.0, 3.0, 4.0]]), dtype)
    c = backend.asarray(np.array([[0.0, -3.0, -4.0]]), dtype)
    out = float(backend.to_numpy(lc.basis_stability(p, c)))
    assert abs(out + 1.0) <= 50 * eps(dtype)


# --------------------------------------------------------------------------------------------------
# principal angles / projector distance
# --------------------------------------------------------------------------------------------------
@st.composite
def basis_pairs(draw, dtype):
    """Two bases a (*batch, m, ka), b (*batch, m, kb) with independent columns, and their conditions."""
    batch = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple))
    m = draw(st.integers(1, 20))
    ka = draw(st.integers(1, m))
    kb = draw(st.integers(1, m))
    rng = np.random.default_rng(draw(seeds))
    cap = MAX_COND[dtype]
    a = build_case(rng, batch, m, ka, max_cond=cap, gap=None, scale=1.0)
    b = build_case(rng, batch, m, kb, max_cond=cap, gap=None, scale=10.0 ** rng.uniform(-1, 1))
    share = draw(st.integers(0, min(ka, kb)))
    b_arr = b.a.copy()
    if share:
        # make the subspaces share a few directions, so that some cosines are 1
        b_arr[..., :, :share] = a.a[..., :, :share] * 2.0
    cond = float(np.max(_conds(b_arr), initial=1.0))
    assume(np.isfinite(cond) and cond <= 10 * cap)
    return a.a, b_arr, max(a.cond, cond)


def _pa_tol(dtype, cond, m):
    return 30 * eps(dtype) * cond * math.sqrt(max(m, 1))


@given(data=st.data())
def test_principal_angles_and_projector_distance_match_reference(backend, dtype, data):
    a_np, b_np, cond = data.draw(basis_pairs(dtype), label="bases")
    a = backend.asarray(a_np, dtype)
    b = backend.asarray(b_np, dtype)
    before = snapshot(backend, a, b)
    cos = lc.principal_angle_cosines(a, b)
    dist = lc.projector_distance(a, b)
    assert_in_library(cos, a, what="principal_angle_cosines")
    assert_in_library(dist, a, what="projector_distance")
    batch, m = a_np.shape[:-2], a_np.shape[-2]
    ka, kb = a_np.shape[-1], b_np.shape[-1]
    assert tuple(cos.shape) == (*batch, min(ka, kb))
    assert tuple(dist.shape) == batch
    cos_, dist_ = backend.to_numpy(cos), backend.to_numpy(dist)
    assert np.all((cos_ >= 0) & (cos_ <= 1)), f"cosines outside [0, 1]: {cos_}"
    assert np.all(np.diff(cos_, axis=-1) <= 0), f"cosines not descending: {cos_}"
    a64 = backend.to_numpy(a).astype(np.float64)
    b64 = backend.to_numpy(b).astype(np.float64)
    tol = _pa_tol(dtype, cond, m)
    for idx in batch_indices(batch):
        want_cos = ref.principal_angle_cosines(a64[idx], b64[idx])
        assert_close(cos_[idx], want_cos, atol=tol, err_msg=f"cosines at {idx}")
        want_d = ref.projector_distance(a64[idx], b64[idx])
        # compare squares: the distance is a square root of a difference that cancels
        assert abs(float(dist_[idx]) ** 2 - want_d**2) <= tol * (ka + kb), (
            f"distance at {idx}: {dist_[idx]} vs {want_d}"
        )
    assert_unchanged(backend, before, a, b)


@given(data=st.data())
def test_same_subspace_other_basis(backend, dtype, data):
    """B = A G (G invertible) spans the same subspace: all cosines 1, distance 0; and column sign flips
    change nothing."""
    case = data.draw(matrix_cases(dtype, gap=None, orientation="tall"), label="basis")
    rng = np.random.default_rng(data.draw(seeds, label="seed"))
    k = case.n
    G = build_case(rng, case.batch, k, k, max_cond=10.0, gap=None, scale=1.0).a
    signs = rng.choice([-1.0, 1.0], size=(*case.batch, 1, k))
    a = backend.asarray(case.a, dtype)
    b = backend.asarray(case.a @ G, dtype)
    a_flipped = backend.asarray(case.a * signs, dtype)
    cond = case.cond * 10
    tol = _pa_tol(dtype, cond, case.m)
    cos = backend.to_numpy(lc.principal_angle_cosines(a, b))
    assert_close(cos, np.ones((*case.batch, k)), atol=tol)
    dist = backend.to_numpy(lc.projector_distance(a, b))
    assert np.all(dist <= math.sqrt(tol * 2 * k)), dist
    cos_f = backend.to_numpy(lc.principal_angle_cosines(a_flipped, b))
    assert_close(cos_f, cos, atol=tol)
    dist_f = backend.to_numpy(lc.projector_distance(a_flipped, b))
    assert np.all(dist_f <= math.sqrt(tol * 2 * k)), dist_f


@given(data=st.data())
def test_principal_angles_sign_flip_invariance(backend, dtype, data):
    a_np, b_np, cond = data.draw(basis_pairs(dtype), label="bases")
    rng = np.random.default_rng(data.draw(seeds, label="seed"))
    da = rng.choice([-1.0, 1.0], size=(*a_np.shape[:-2], 1, a_np.shape[-1]))
    db = rng.choice([-1.0, 1.0], size=(*b_np.shape[:-2], 1, b_np.shape[-1]))
    tol = _pa_tol(dtype, cond, a_np.shape[-2])
    c1 = backend.to_numpy(
        lc.principal_angle_cosines(backend.asarray(a_np, dtype), backend.asarray(b_np, dtype))
    )
    c2 = backend.to_numpy(
        lc.principal_angle_cosines(
            backend.asarray(a_np * da, dtype), backend.asarray(b_np * db, dtype)
        )
    )
    assert_close(c2, c1, atol=tol)
    d1 = backend.to_numpy(
        lc.projector_distance(backend.asarray(a_np, dtype), backend.asarray(b_np, dtype))
    )
    d2 = backend.to_numpy(
        lc.projector_distance(backend.asarray(a_np * da, dtype), backend.asarray(b_np * db, dtype))
    )
    k = a_np.shape[-1] + b_np.shape[-1]
    assert_close(d2**2, d1**2, atol=tol * k)


def test_principal_angles_hand_examples(backend, dtype):
    theta = 0.3
    a = backend.asarray(np.array([[1.0], [0.0], [0.0]]), dtype)
    b = backend.asarray(np.array([[math.cos(theta)], [math.sin(theta)], [0.0]]), dtype)
    cos = backend.to_numpy(lc.principal_angle_cosines(a, b))
    np.testing.assert_allclose(cos, [math.cos(theta)], atol=20 * eps(dtype))
    dist = float(backend.to_numpy(lc.projector_distance(a, b)))
    # ||P_a - P_b||_F^2 = 2 - 2 cos^2 = 2 sin^2
    assert abs(dist - math.sqrt(2) * math.sin(theta)) <= math.sqrt(100 * eps(dtype))
    # orthogonal subspaces: cosines 0, distance sqrt(ka + kb)
    q = random_orthogonal(np.random.default_rng(0), 5, 5)
    a = backend.asarray(q[:, :2] * 3.0, dtype)
    b = backend.asarray(q[:, 2:5], dtype)
    cos = backend.to_numpy(lc.principal_angle_cosines(a, b))
    np.testing.assert_allclose(cos, [0.0, 0.0], atol=50 * eps(dtype))
    dist = float(backend.to_numpy(lc.projector_distance(a, b)))
    assert abs(dist - math.sqrt(5)) <= 50 * eps(dtype)
    # nested subspaces: span(e1) in span(e1, e2): one cosine, 1; distance 1
    a = backend.asarray(np.array([[2.0], [0.0], [0.0]]), dtype)
    b = backend.asarray(np.array([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]), dtype)
    cos = backend.to_numpy(lc.principal_angle_cosines(a, b))
    np.testing.assert_allclose(cos, [1.0], atol=50 * eps(dtype))
    dist = float(backend.to_numpy(lc.projector_distance(a, b)))
    assert abs(dist - 1.0) <= math.sqrt(100 * eps(dtype))
