"""svd, qr and polar: against the reference, the canonical signs, and their defining identities."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import (
    assert_close,
    assert_columns_match,
    assert_in_library,
    assert_sign_canonical,
    assert_unchanged,
    batch_indices,
    eps,
    orthonormality_error,
    product,
    sign_is_ambiguous,
    snapshot,
    value_tolerance,
    vector_tolerances,
)
from _strategies import matrix_cases
from hypothesis import given
from hypothesis import strategies as st

import lowrank_core as lc
import lowrank_reference as ref


def _seen(backend, a):
    """What the core actually received, in float64 (the input after rounding to its dtype)."""
    return backend.to_numpy(a).astype(np.float64)


def _orth_tol(dtype, m, n):
    return 20 * eps(dtype) * max(m, n, 1)


def _recon_tol(dtype, smax, m, n):
    return 20 * eps(dtype) * float(np.max(smax, initial=0.0)) * max(m, n, 1)


# --------------------------------------------------------------------------------------------------
# svd
# --------------------------------------------------------------------------------------------------
def _np_svd(backend, a):
    """``lc.svd(a)`` as NumPy ``(U, S, V)`` with the right singular vectors as columns."""
    U, S, Vh = lc.svd(a)
    return backend.to_numpy(U), backend.to_numpy(S), np.swapaxes(backend.to_numpy(Vh), -1, -2)


def test_svd_unpacks_like_the_standard(backend):
    """``U, S, Vh = svd(a)`` has the layout of ``xp.linalg.svd(a, full_matrices=False)``."""
    x = np.array([[3.0, 1.0, 0.5], [1.0, 2.0, 0.0]])
    U, S, Vh = (backend.to_numpy(t) for t in lc.svd(backend.asarray(x, "float64")))
    assert Vh.shape == (2, 3)
    np.testing.assert_allclose((U * S) @ Vh, x, atol=1e-12)
    _, _, vh_np = np.linalg.svd(x, full_matrices=False)
    np.testing.assert_allclose(np.abs(Vh), np.abs(vh_np), atol=1e-12)


@given(data=st.data())
def test_svd_matches_reference(backend, dtype, data):
    case = data.draw(matrix_cases(dtype), label="case")
    a = backend.asarray(case.a, dtype)
    before = snapshot(backend, a)
    res = lc.svd(a)
    assert isinstance(res, lc.SVDResult)
    U, S, Vh = res
    assert res.U is U
    assert res.S is S
    assert res.Vh is Vh
    assert res._fields == ("U", "S", "Vh")  # the array API standard's field names and order
    for name, x in (("U", U), ("S", S), ("Vh", Vh)):
        assert_in_library(x, a, what=f"svd {name}")
    m, n, k = case.m, case.n, case.k
    assert tuple(U.shape) == (*case.batch, m, k)
    assert tuple(S.shape) == (*case.batch, k)
    assert tuple(Vh.shape) == (*case.batch, k, n)
    U_, S_ = backend.to_numpy(U), backend.to_numpy(S)
    V_ = np.swapaxes(backend.to_numpy(Vh), -1, -2)
    seen = _seen(backend, a)
    for idx in batch_indices(case.batch):
        Ur, Sr, Vhr = ref.svd(seen[idx])
        Vr = Vhr.T
        assert_close(S_[idx], Sr, atol=value_tolerance(Sr[0], m, n, dtype), err_msg=f"S at {idx}")
        vt = vector_tolerances(Sr, m, n, dtype)
        flips = sign_is_ambiguous(Ur, vt)
        signs = assert_columns_match(U_[idx], Ur, vt, allow_flip=flips, err_msg=f"U at {idx}")
        # V's columns are flipped together with U's
        assert_columns_match(V_[idx], Vr * signs, vt, err_msg=f"V at {idx}")
    assert_unchanged(backend, before, a)


@given(data=st.data())
def test_svd_identities(backend, dtype, data):
    """Orthonormal factors, descending non-negative S, exact reconstruction, canonical signs.

    No spectral gap and possibly exact zero singular values: the identities hold anyway."""
    case = data.draw(
        matrix_cases(dtype, gap=None, rank_deficient=data.draw(st.booleans(), label="deficient")),
        label="case",
    )
    a = backend.asarray(case.a, dtype)
    U_, S_, V_ = _np_svd(backend, a)
    m, n = case.m, case.n
    assert orthonormality_error(U_) <= _orth_tol(dtype, m, n)
    assert orthonormality_error(V_) <= _orth_tol(dtype, m, n)
    assert np.all(S_ >= 0), S_
    assert np.all(np.diff(S_, axis=-1) <= 0), f"S is not non-increasing: {S_}"
    seen = _seen(backend, a)
    assert_close(product(U_, S_, V_), seen, atol=_recon_tol(dtype, case.s, m, n))
    assert_sign_canonical(U_, err_msg=f"svd U, dtype {dtype}")


def test_svd_sign_rule_hand_examples(backend, dtype):
    # a = [[0, 2], [3, 0]]: s = (3, 2); u1 = +e2, v1 = +e1; u2 = +e1, v2 = +e2
    a = backend.asarray(np.array([[0.0, 2.0], [3.0, 0.0]]), dtype)
    U, S, V = _np_svd(backend, a)
    np.testing.assert_allclose(S, [3.0, 2.0], rtol=10 * eps(dtype))
    np.testing.assert_allclose(U, [[0.0, 1.0], [1.0, 0.0]], atol=10 * eps(dtype))
    np.testing.assert_allclose(V, [[1.0, 0.0], [0.0, 1.0]], atol=10 * eps(dtype))
    # a = [[0, -2], [-3, 0]]: u's largest entry made positive, the sign goes to v
    a = backend.asarray(np.array([[0.0, -2.0], [-3.0, 0.0]]), dtype)
    U, S, V = _np_svd(backend, a)
    np.testing.assert_allclose(U, [[0.0, 1.0], [1.0, 0.0]], atol=10 * eps(dtype))
    np.testing.assert_allclose(V, [[-1.0, 0.0], [0.0, -1.0]], atol=10 * eps(dtype))
    # a column vector with a negative dominant entry: u = a / |a| flipped to make -4 positive
    a = backend.asarray(np.array([[3.0], [-4.0]]), dtype)
    U, S, V = _np_svd(backend, a)
    np.testing.assert_allclose(S, [5.0], rtol=10 * eps(dtype))
    np.testing.assert_allclose(U, [[-0.6], [0.8]], atol=10 * eps(dtype))
    np.testing.assert_allclose(V, [[-1.0]], atol=10 * eps(dtype))


def test_svd_zero_matrix(backend, dtype):
    a = backend.asarray(np.zeros((2, 4, 3)), dtype)
    U, S, V = _np_svd(backend, a)
    assert U.shape == (2, 4, 3)
    assert S.shape == (2, 3)
    assert V.shape == (2, 3, 3)
    np.testing.assert_array_equal(S, 0.0)
    assert orthonormality_error(U) <= _orth_tol(dtype, 4, 3)
    assert orthonormality_error(V) <= _orth_tol(dtype, 4, 3)


# --------------------------------------------------------------------------------------------------
# qr
# --------------------------------------------------------------------------------------------------
@given(data=st.data())
def test_qr(backend, dtype, data):
    case = data.draw(matrix_cases(dtype), label="case")
    a = backend.asarray(case.a, dtype)
    before = snapshot(backend, a)
    res = lc.qr(a)
    assert isinstance(res, lc.QRResult)
    Q, R = res
    assert res.Q is Q
    assert res.R is R
    assert_in_library(Q, a, what="qr Q")
    assert_in_library(R, a, what="qr R")
    m, n, k = case.m, case.n, case.k
    assert tuple(Q.shape) == (*case.batch, m, k)
    assert tuple(R.shape) == (*case.batch, k, n)
    Q_, R_ = backend.to_numpy(Q), backend.to_numpy(R)
    seen = _seen(backend, a)
    assert orthonormality_error(Q_) <= _orth_tol(dtype, m, n)
    below = np.tril(np.ones((k, n), dtype=bool), -1)
    assert np.all(R_[..., below] == 0), "R is not upper triangular"
    diag = np.diagonal(R_, axis1=-2, axis2=-1)
    assert np.all(diag >= 0), f"diag(R) has negative entries: {diag}"
    assert_close(Q_ @ R_, seen, atol=_recon_tol(dtype, case.s, m, n))
    # against the reference where the factorization is unique and well conditioned
    for idx in batch_indices(case.batch):
        lead = seen[idx][:, :k]
        cond = np.linalg.cond(lead)
        if not np.isfinite(cond) or cond > 1e3:
            continue
        Qr, Rr = ref.qr(seen[idx])
        tol = 20 * eps(dtype) * cond * np.sqrt(max(m, n))
        assert_close(Q_[idx], Qr, atol=tol, err_msg=f"Q at {idx}")
        assert_close(R_[idx], Rr, atol=tol * case.s[idx][0], err_msg=f"R at {idx}")
    assert_unchanged(backend, before, a)


def test_qr_sign_hand_example(backend, dtype):
    # a = -I: Q = I, R = -I before the canonical flip; after it Q = -I, R = I.
    a = backend.asarray(-np.eye(3), dtype)
    Q, R = (backend.to_numpy(x) for x in lc.qr(a))
    np.testing.assert_allclose(Q, -np.eye(3), atol=10 * eps(dtype))
    np.testing.assert_allclose(R, np.eye(3), atol=10 * eps(dtype))
    # wide: a = [[2, 1, 5]] -> Q = [[1]], R = [[2, 1, 5]]; a = [[-2, 1, 5]] -> Q = [[-1]], R = [[2, -1, -5]]
    a = backend.asarray(np.array([[-2.0, 1.0, 5.0]]), dtype)
    Q, R = (backend.to_numpy(x) for x in lc.qr(a))
    np.testing.assert_allclose(Q, [[-1.0]], atol=10 * eps(dtype))
    np.testing.assert_allclose(R, [[2.0, -1.0, -5.0]], atol=50 * eps(dtype))


# --------------------------------------------------------------------------------------------------
# polar
# --------------------------------------------------------------------------------------------------
@given(data=st.data())
def test_orthogonal_factor(backend, dtype, data):
    case = data.draw(matrix_cases(dtype, gap=None), label="case")
    a = backend.asarray(case.a, dtype)
    before = snapshot(backend, a)
    P = lc.orthogonal_factor(a)
    assert_in_library(P, a, what="orthogonal_factor")
    m, n = case.m, case.n
    assert tuple(P.shape) == (*case.batch, m, n)
    P_ = backend.to_numpy(P)
    if m >= n:
        assert orthonormality_error(P_) <= _orth_tol(dtype, m, n)
    else:
        assert orthonormality_error(np.swapaxes(P_, -1, -2)) <= _orth_tol(dtype, m, n)
    # the polar factor of a full-rank matrix is unique: it equals U V^T of the construction
    tol = 20 * eps(dtype) * case.cond * np.sqrt(max(m, n))
    assert_close(P_, case.U @ np.swapaxes(case.V, -1, -2), atol=tol + 20 * eps(dtype))
    seen = _seen(backend, a)
    for idx in batch_indices(case.batch):
        assert_close(P_[idx], ref.orthogonal_factor(seen[idx]), atol=tol, err_msg=f"at {idx}")
    assert_unchanged(backend, before, a)


def test_orthogonal_factor_hand_example(backend, dtype):
    # a = diag(3, -2) -> U V^T = diag(1, -1)
    a = backend.asarray(np.diag([3.0, -2.0]), dtype)
    np.testing.assert_allclose(
        backend.to_numpy(lc.orthogonal_factor(a)), np.diag([1.0, -1.0]), atol=10 * eps(dtype)
    )
    # a = [[0, 5]] (1 x 2) -> [[0, 1]]
    a = backend.asarray(np.array([[0.0, 5.0]]), dtype)
    np.testing.assert_allclose(
        backend.to_numpy(lc.orthogonal_factor(a)), [[0.0, 1.0]], atol=10 * eps(dtype)
    )


@given(data=st.data(), side=st.sampled_from(["right", "left"]))
def test_polar_matches_scipy_convention(backend, dtype, data, side):
    """``polar(a, side)`` is ``(u, p)`` with ``a = u p`` (right) or ``a = p u`` (left), ``p`` PSD,
    and ``u`` the orthogonal factor; compared with the reference and with ``scipy.linalg.polar``."""
    import scipy.linalg

    case = data.draw(matrix_cases(dtype, gap=None), label="case")
    a = backend.asarray(case.a, dtype)
    before = snapshot(backend, a)
    res = lc.polar(a, side)
    assert isinstance(res, lc.PolarResult)
    u, p = res
    assert_in_library(u, a, what="polar u")
    assert_in_library(p, a, what="polar p")
    m, n = case.m, case.n
    k = n if side == "right" else m
    assert tuple(u.shape) == (*case.batch, m, n)
    assert tuple(p.shape) == (*case.batch, k, k)
    u_, p_ = backend.to_numpy(u), backend.to_numpy(p)
    seen = _seen(backend, a)
    tol = 20 * eps(dtype) * case.cond * np.sqrt(max(m, n))
    scale = float(np.max(case.s, initial=0.0))
    for idx in batch_indices(case.batch):
        ur, pr = ref.polar(seen[idx], side)
        assert_close(u_[idx], ur, atol=tol, err_msg=f"u at {idx}")
        assert_close(p_[idx], pr, atol=tol * max(scale, 1.0), err_msg=f"p at {idx}")
        np.testing.assert_allclose(p_[idx], np.swapaxes(p_[idx], -1, -2), atol=0)
        # p = (a^T a)^(1/2) (right) or (a a^T)^(1/2) (left) is unique for every shape
        _, ps = scipy.linalg.polar(seen[idx], side=side)
        assert_close(p_[idx], ps, atol=tol * max(scale, 1.0), err_msg=f"p vs scipy at {idx}")
        recon = u_[idx] @ p_[idx] if side == "right" else p_[idx] @ u_[idx]
        assert_close(recon, seen[idx], atol=_recon_tol(dtype, case.s, m, n))
    assert_unchanged(backend, before, a)


def test_polar_rejects_a_bad_side(backend):
    a = backend.asarray(np.eye(3), "float64")
    with pytest.raises(lc.ParameterError, match="side"):
        lc.polar(a, "up")


@given(data=st.data())
def test_check_finite_false_same_result(backend, data):
    case = data.draw(matrix_cases("float64", batch=False), label="case")
    a = backend.asarray(case.a, "float64")
    for fn in (lc.svd, lc.qr, lc.polar, lc.orthogonal_factor):
        r1 = fn(a)
        r2 = fn(a, check_finite=False)
        r1 = r1 if isinstance(r1, tuple) else (r1,)
        r2 = r2 if isinstance(r2, tuple) else (r2,)
        for x, y in zip(r1, r2, strict=True):
            np.testing.assert_allclose(backend.to_numpy(x), backend.to_numpy(y), atol=1e-12)


@pytest.mark.parametrize(
    "fn",
    [lc.svd, lc.qr, lc.polar, lc.orthogonal_factor],
    ids=["svd", "qr", "polar", "orthogonal_factor"],
)
def test_check_finite_false_skips_the_check(backend, fn):
    """check_finite=False must not raise NonFiniteError (the backend may do anything else)."""
    a = np.ones((3, 3))
    a[1, 1] = np.nan
    a = backend.asarray(a, "float64")
    try:
        fn(a, check_finite=False)
    except lc.NonFiniteError:  # pragma: no cover - that is the failure
        pytest.fail("check_finite=False still checked finiteness")
    except Exception:  # LAPACK may refuse NaN: not our concern here
        pass


# --------------------------------------------------------------------------------------------------
# wide matrices are decomposed as their (tall) transpose
# --------------------------------------------------------------------------------------------------
class _ShapeSpy:
    """A backend that records the shapes its SVD driver is given and delegates to ``inner``."""

    def __init__(self, inner):
        self.inner = inner
        self.name = "spy"
        self.shapes = []

    def svd(self, a):
        self.shapes.append(tuple(a.shape))
        return self.inner.svd(a)


@pytest.mark.parametrize(
    "fn",
    [
        lambda a, b: lc.svd(a),
        lambda a, b: lc.polar(a),
        lambda a, b: lc.orthogonal_factor(a),
        lambda a, b: lc.factorize(a, 2),
        lambda a, b: lc.basis_stability(a, b),
    ],
    ids=["svd", "polar", "orthogonal_factor", "factorize", "basis_stability"],
)
def test_wide_matrices_reach_the_svd_driver_tall(backend, fn):
    """The SVD driver only ever sees ``m >= n`` (LAPACK is up to 2x faster on the tall layout)."""
    rng = np.random.default_rng(3)
    a = backend.asarray(rng.standard_normal((2, 3, 7)), "float64")
    b = backend.asarray(rng.standard_normal((2, 3, 7)), "float64")
    inner = lc.get_backend(a)
    spy = _ShapeSpy(inner)
    lc.register_backend(backend.module_name, spy)
    try:
        fn(a, b)
    finally:
        lc.register_backend(backend.module_name, None)
    assert spy.shapes, "the SVD driver was not called"
    assert all(s[-2] >= s[-1] for s in spy.shapes), spy.shapes


@given(data=st.data())
def test_wide_matrices_match_the_reference(backend, dtype, data):
    """Every example wide (the transposed path): svd, orthogonal_factor, basis_stability vs float64."""
    case = data.draw(matrix_cases(dtype, orientation="wide"), label="case")
    a = backend.asarray(case.a, dtype)
    m, n = case.m, case.n
    U_, S_, V_ = _np_svd(backend, a)
    P_ = backend.to_numpy(lc.orthogonal_factor(a))
    seen = _seen(backend, a)
    tol = 20 * eps(dtype) * case.cond * np.sqrt(max(m, n))
    for idx in batch_indices(case.batch):
        Ur, Sr, Vhr = ref.svd(seen[idx])
        assert_close(S_[idx], Sr, atol=value_tolerance(Sr[0], m, n, dtype), err_msg=f"S at {idx}")
        vt = vector_tolerances(Sr, m, n, dtype)
        flips = sign_is_ambiguous(Ur, vt)
        signs = assert_columns_match(U_[idx], Ur, vt, allow_flip=flips, err_msg=f"U at {idx}")
        assert_columns_match(V_[idx], Vhr.T * signs, vt, err_msg=f"V at {idx}")
        assert_close(P_[idx], ref.orthogonal_factor(seen[idx]), atol=tol, err_msg=f"at {idx}")
    assert_sign_canonical(U_, err_msg=f"svd U, dtype {dtype}")


def test_polar_stability_is_scale_free(backend):
    """Cosines do not depend on the length of the vectors: no overflow of their squared norms."""
    import lowrank_core as lc

    rng = np.random.default_rng(2)
    q = np.linalg.qr(rng.standard_normal((6, 3)))[0]
    p = np.linalg.qr(q + 0.1 * rng.standard_normal((6, 3)))[0]
    for dtype, scale in (("float32", 3e19), ("float32", 1e-25), ("float64", 1e160)):
        base = lc.polar_stability(backend.asarray(q, dtype), backend.asarray(p, dtype))
        big = lc.polar_stability(
            backend.asarray(q * scale, dtype), backend.asarray(p * scale, dtype)
        )
        b0, b1 = float(backend.to_numpy(base)), float(backend.to_numpy(big))
        assert b1 == pytest.approx(b0, rel=1e-5), (dtype, scale)


class _GramSVDBackend(lc.StandardBackend):
    """An SVD driver that forms ``a^T a`` (as some GPU and iterative drivers do): it overflows for
    entries whose squares exceed the dtype's range, whatever the singular values are."""

    def svd(self, a):
        xp = self.xp
        w, V = xp.linalg.eigh(xp.matrix_transpose(a) @ a)
        w, V = xp.flip(w, axis=-1), xp.flip(V, axis=-1)
        S = xp.sqrt(xp.clip(w, 0.0, None))
        U = (a @ V) / xp.where(S > 0, S, xp.ones_like(S))[..., None, :]
        return U, S, xp.matrix_transpose(V)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_svd_scales_before_the_driver(dtype):
    """The largest singular value of [[c, c, c]] is sqrt(3) c: representable for c = 0.577 max, though
    c^2 is not. The decomposition must not depend on the driver's handling of overflow."""
    import array_api_compat

    big = float(np.finfo(dtype).max) * 0.577
    a = np.full((1, 3), big, dtype=dtype)
    lc.register_backend("numpy", _GramSVDBackend(array_api_compat.array_namespace(a)))
    try:
        _, S, Vh = lc.svd(a)
        u = lc.orthogonal_factor(a)
    finally:
        lc.register_backend("numpy", None)
    expected = np.sqrt(3.0) * np.float64(a[0, 0])
    assert np.isfinite(S).all()
    np.testing.assert_allclose(np.float64(S[0]), expected, rtol=8 * np.finfo(dtype).eps)
    np.testing.assert_allclose(Vh, np.full((1, 3), 1 / np.sqrt(3.0)), rtol=8 * np.finfo(dtype).eps)
    np.testing.assert_allclose(u, np.full((1, 3), 1 / np.sqrt(3.0)), rtol=8 * np.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_svd_refuses_a_singular_value_beyond_the_dtype(backend, dtype):
    """[[c, c, c], [c, c, c]] has sigma = sqrt(6) c: for c = 0.577 max it exceeds the dtype's range. The
    result cannot be represented: a clear error, not an Inf singular value beside garbage vectors."""
    big = float(np.finfo(dtype).max) * 0.577
    a = backend.asarray(np.full((2, 3), big), dtype)
    before = snapshot(backend, a)
    with pytest.raises(lc.NonFiniteError, match=r"(?i)overflow"):
        lc.svd(a)
    assert_unchanged(backend, before, a)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_polar_p_at_the_top_of_the_range(backend, dtype):
    """For a column [c, c, c]^T, ``p`` is the 1x1 matrix [sqrt(3) c]: representable, so finite (the
    symmetrization (p + p^T) / 2 must not overflow on the way)."""
    big = float(np.finfo(dtype).max) * 0.577
    a = backend.asarray(np.full((3, 1), big), dtype)
    u, p = lc.polar(a)
    p64 = backend.to_numpy(p).astype(np.float64)
    np.testing.assert_allclose(p64, [[np.sqrt(3.0) * big]], rtol=16 * np.finfo(dtype).eps)
    np.testing.assert_allclose(
        backend.to_numpy(u).astype(np.float64), np.full((3, 1), 1 / np.sqrt(3.0)), rtol=1e-6
    )
