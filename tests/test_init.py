"""lowrank_core.init: spectral, nonlinear and random initialization, the closed form, Frobenius decay."""

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
    orthonormality_error,
    snapshot,
)
from _strategies import matrix_cases, seeds
from hypothesis import assume, given
from hypothesis import strategies as st

import lowrank_core as lc
import lowrank_core.init as li
import lowrank_reference.init as ref


def _np(backend, x):
    return backend.to_numpy(x).astype(np.float64)


def _product(backend, f):
    left, right = _np(backend, f.left), _np(backend, f.right)
    return left @ np.swapaxes(right, -1, -2)


def _oialr_product(backend, f):
    U, S, V = (_np(backend, x) for x in f)
    return U @ S @ np.swapaxes(V, -1, -2)


def _gaussian(rng, shape, scale=1.0):
    return rng.standard_normal(shape) * scale


# --------------------------------------------------------------------------------------------------
# closed form vs Monte Carlo
# --------------------------------------------------------------------------------------------------
def _closed_form_np(W, M, kernel):
    """The closed form with an exchangeable kernel (the right one, or deliberately wrong ones)."""
    nw, nm = np.linalg.norm(W, axis=1), np.linalg.norm(M, axis=1)
    t = np.arccos(np.clip(np.sum(W * M, axis=1) / (nw * nm), -1, 1))
    return float(np.sum(nw**2 / 2 + nm**2 / 2 - nw * nm * kernel(t)))


def test_closed_form_matches_monte_carlo(backend, dtype):
    rng = np.random.default_rng(1234)
    m, n, samples = 5, 4, 200_000
    W = _gaussian(rng, (m, n))
    M = W + 0.8 * _gaussian(rng, (m, n))  # rows at assorted angles, some beyond 90 degrees
    M[0] = -W[0] * 0.5  # opposite row: theta = pi
    x = rng.standard_normal((samples, n))
    per_sample = np.sum((np.maximum(x @ W.T, 0) - np.maximum(x @ M.T, 0)) ** 2, axis=1)
    mc, se = per_sample.mean(), per_sample.std(ddof=1) / math.sqrt(samples)
    a, b = backend.asarray(W, dtype), backend.asarray(M, dtype)
    before = snapshot(backend, a, b)
    value = li.relu_function_error(a, b)
    assert_unchanged(backend, before, a, b)
    assert_in_library(value, a)
    closed = float(backend.to_numpy(value))
    assert abs(closed - mc) < 4.5 * se + 50 * eps(dtype) * abs(mc), (closed, mc, se)
    # the test has the power to reject near-miss formulas (factor 2 in the cross term, the
    # linear-kernel / cosine-only variants, and the degree-0 kernel)
    wrong = {
        "J/(2 pi)": lambda t: (np.sin(t) + (np.pi - t) * np.cos(t)) / (2 * np.pi),
        "cos/2": lambda t: np.cos(t) / 2,
        "(pi-t)cos/pi": lambda t: (np.pi - t) * np.cos(t) / np.pi,
        "degree 0": lambda t: (np.pi - t) / np.pi,
    }
    for name, kernel in wrong.items():
        assert abs(_closed_form_np(W, M, kernel) - mc) > 10 * se, name
    # and the reference agrees with the core
    assert_close(ref.relu_function_error(W, M), closed, atol=0, rtol=100 * eps(dtype))
    rel = float(backend.to_numpy(li.relu_function_error(a, b, relative=True)))
    assert_close(rel, closed / (np.sum(W**2) / 2), atol=0, rtol=100 * eps(dtype))


def test_closed_form_special_cases(backend):
    W = np.array([[1.0, 2.0, -1.0], [0.0, 0.0, 0.0], [3.0, -1.0, 0.5]])
    a = backend.asarray(W)
    zero = backend.asarray(np.zeros_like(W))
    err_same = backend.to_numpy(li.relu_function_error(a, a))
    assert abs(float(err_same)) < 1e-12
    # against zero: E ReLU(w.x)^2 = |w|^2 / 2
    assert_close(backend.to_numpy(li.relu_function_error(a, zero)), np.sum(W**2) / 2, atol=1e-12)
    # scaling: E (ReLU(w.x) - ReLU(c w.x))^2 = (1 - c)^2 |w|^2 / 2 for c > 0
    half = backend.asarray(0.5 * W)
    assert_close(
        backend.to_numpy(li.relu_function_error(a, half)), 0.25 * np.sum(W**2) / 2, atol=1e-12
    )


# --------------------------------------------------------------------------------------------------
# spectral init = Eckart-Young; reference agreement
# --------------------------------------------------------------------------------------------------
@given(data=st.data())
def test_spectral_init_is_best_approximation(backend, dtype, data):
    case = data.draw(matrix_cases(dtype, max_side=12, gap=1.2), label="case")
    r = data.draw(st.integers(1, case.k), label="rank")
    a = backend.asarray(case.a, dtype)
    before = snapshot(backend, a)
    f = li.spectral_init(a, r)
    assert_unchanged(backend, before, a)
    for x in f:
        assert_in_library(x, a)
    assert tuple(f.left.shape) == (*case.batch, case.m, r)
    assert tuple(f.right.shape) == (*case.batch, case.n, r)
    smax = float(np.max(case.s))
    tol = 50 * eps(dtype) * smax * max(case.m, case.n)
    best = (case.U[..., :r] * case.s[..., None, :r]) @ np.swapaxes(case.V[..., :r], -1, -2)
    assert_close(_product(backend, f), best, atol=tol)
    # balanced: equal Gram matrices, diag(s_r)
    L, R = _np(backend, f.left), _np(backend, f.right)
    gram = np.swapaxes(L, -1, -2) @ L
    assert_close(gram, np.swapaxes(R, -1, -2) @ R, atol=tol)
    assert_close(gram, np.eye(r) * case.s[..., None, :r], atol=tol)
    # the OIALR form is the same product with orthonormal bases
    g = li.spectral_factors(a, r)
    assert_close(_oialr_product(backend, g), best, atol=tol)
    assert orthonormality_error(_np(backend, g.U)) < 50 * eps(dtype) * case.m
    # and the reference, one matrix at a time
    for idx in batch_indices(case.batch):
        rl, rr = ref.spectral_init(case.a[idx], r)
        assert_close(_product(backend, f)[idx], rl @ rr.T, atol=tol)
        assert_close(gram[idx], rl.T @ rl, atol=tol)


@given(data=st.data())
def test_nonlinear_matches_reference(backend, dtype, data):
    case = data.draw(matrix_cases(dtype, max_side=10, gap=1.5, max_cond=30.0), label="case")
    r = data.draw(st.integers(1, case.k), label="rank")
    a = backend.asarray(case.a, dtype)
    before = snapshot(backend, a)
    f = li.nonlinear_init(a, r)
    assert_unchanged(backend, before, a)
    for x in f:
        assert_in_library(x, a)
    got = _product(backend, f)
    smax = float(np.max(case.s))
    for idx in batch_indices(case.batch):
        W = case.a[idx]
        # conditioning: the rescaling divides by |P_S w_i| / |w_i|; skip nearly orthogonal rows
        P = case.V[idx][:, :r] @ case.V[idx][:, :r].T
        ratio = np.linalg.norm(W @ P, axis=1) / np.linalg.norm(W, axis=1)
        assume(np.min(ratio) > 1e-2)
        s = case.s[idx]
        rel_gap = 1.0 if r == case.k else (s[r - 1] - s[r]) / s[0]
        tol = 200 * eps(dtype) * smax * max(case.m, case.n) / (rel_gap * np.min(ratio))
        M = ref.nonlinear_matrix(W, r)
        assert_close(got[idx], M, atol=tol)
        rl, _ = ref.nonlinear_init(W, r)
        L = _np(backend, f.left)[idx]
        assert_close(L @ L.T, rl @ rl.T, atol=tol)  # sign-invariant form of the left factor
        err = float(backend.to_numpy(li.relu_function_error(a, backend.asarray(got, dtype)))[idx])
        assert_close(err, ref.relu_function_error(W, M), atol=tol * smax * case.m, rtol=1e-3)


@given(
    m=st.integers(1, 16),
    n=st.integers(1, 16),
    batch=st.lists(st.integers(1, 2), max_size=1).map(tuple),
    seed=seeds,
    data=st.data(),
)
def test_nonlinear_error_never_exceeds_spectral(backend, dtype, m, n, batch, seed, data):
    r = data.draw(st.integers(1, min(m, n)), label="rank")
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.uniform(-2, 2)
    W = _gaussian(rng, (*batch, m, n), scale)
    if rng.uniform() < 0.3:  # low-rank-ish spectra and shifted rows too
        W = W @ np.diag(np.exp(-rng.uniform(0, 4, n))) + rng.standard_normal(n) * scale
    a = backend.asarray(W, dtype)
    spec = li.spectral_init(a, r)
    non = li.nonlinear_init(a, r)
    ref_steps = li.nonlinear_init(a, r, refine_steps=3)

    def err(f):
        prod = backend.asarray(_product(backend, f), "float64")
        return backend.to_numpy(li.relu_function_error(backend.asarray(W, "float64"), prod))

    e_spec, e_non, e_ref = err(spec), err(non), err(ref_steps)
    base = 0.5 * np.sum(W**2, axis=(-2, -1))
    slack = 100 * eps(dtype) * base * max(m, n)
    assert np.all(e_non <= e_spec + slack), (e_non, e_spec)
    assert np.all(e_ref <= e_non + slack), (e_ref, e_non)


def test_published_numbers(backend):
    """ALGORITHMS.md section 4: W ~ N(0, 2/d), m=1024, d=256, r=4: relative error 0.887 vs 0.830."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((1024, 256)) * math.sqrt(2 / 256)
    a = backend.asarray(W)
    rel = {}
    for name, fn in (("spectral", li.spectral_init), ("nonlinear", li.nonlinear_init)):
        f = fn(a, 4)
        prod = f.left @ backend.xp.matrix_transpose(f.right)
        rel[name] = float(backend.to_numpy(li.relu_function_error(a, prod, relative=True)))
    assert abs(rel["spectral"] - 0.887) < 0.01, rel
    assert abs(rel["nonlinear"] - 0.830) < 0.01, rel
    refined = li.nonlinear_init(a, 4, refine_steps=2)
    prod = refined.left @ backend.xp.matrix_transpose(refined.right)
    assert (
        float(backend.to_numpy(li.relu_function_error(a, prod, relative=True))) < rel["nonlinear"]
    )


def test_refinement_lowers_the_error(backend):
    """A non-Gaussian, shifted weight, where the top singular subspace is clearly suboptimal."""
    rng = np.random.default_rng(5)
    W = rng.standard_normal((40, 12)) + 2.0 * rng.standard_normal(12)
    W[:20] *= 5.0
    a = backend.asarray(W)
    errs = []
    for steps in (0, 1, 10):
        f = li.nonlinear_init(a, 2, refine_steps=steps)
        errs.append(float(np.sum(backend.to_numpy(li.relu_function_error(a, _to(backend, f))))))
    assert errs[1] < errs[0] and errs[2] < errs[1], errs


def _to(backend, f):
    return backend.asarray(_product(backend, f), "float64")


def test_oialr_forms(backend, dtype):
    rng = np.random.default_rng(3)
    W = rng.standard_normal((2, 9, 7))
    a = backend.asarray(W, dtype)
    tol = 200 * eps(dtype) * 10
    for bal, fac in (
        (li.nonlinear_init(a, 3, refine_steps=2), li.nonlinear_factors(a, 3, refine_steps=2)),
        (li.random_init(a, 3, seed=1), li.random_factors(a, 3, seed=1)),
    ):
        for x in fac:
            assert_in_library(x, a)
        P = _product(backend, bal)
        assert_close(_oialr_product(backend, fac), P, atol=tol * max(1.0, np.abs(P).max()))
        U, S, V = (_np(backend, x) for x in fac)
        assert orthonormality_error(U) < tol and orthonormality_error(V) < tol
        assert np.all(np.abs(S - np.eye(3) * np.diagonal(S, axis1=-2, axis2=-1)[..., None, :]) == 0)
        back = li.factors_to_balanced(*fac)
        assert_close(_product(backend, back), P, atol=tol * max(1.0, np.abs(P).max()))
        L, R = _np(backend, back.left), _np(backend, back.right)
        assert_close(np.swapaxes(L, -1, -2) @ L, np.swapaxes(R, -1, -2) @ R, atol=tol)


# --------------------------------------------------------------------------------------------------
# random init: variance
# --------------------------------------------------------------------------------------------------
def test_random_init_variance(backend, dtype):
    m, n, r, draws = 60, 40, 4, 40
    like = backend.asarray(np.zeros((m, n)), dtype)
    std = 0.05
    est = []
    for seed in range(draws):
        f = li.random_init(like, r, std=std, seed=seed)
        assert_in_library(f.left, like)
        P = _product(backend, f)
        est.append(np.mean(P**2) / std**2)  # E = 1 exactly (mean zero entries)
    est_arr = np.asarray(est)
    z = (est_arr.mean() - 1.0) / (est_arr.std(ddof=1) / math.sqrt(draws))
    assert abs(z) < 4.5, (est_arr.mean(), z)
    # power: the two natural mistakes (variance std^2 / r or r std^2) are far outside the bound
    assert abs(est_arr.mean() - 1 / r) > 10 * est_arr.std(ddof=1) / math.sqrt(draws)
    # default std: PyTorch's default Linear init, 1 / sqrt(3 fan_in)
    assert li.default_init_std(n) == pytest.approx(1 / math.sqrt(3 * n))
    d = li.random_init(like, r, seed=0)
    assert_close(
        _product(backend, d),
        _product(backend, li.random_init(like, r, std=1 / math.sqrt(3 * n), seed=0)),
        atol=0,
    )
    # reproducible per seed, different across seeds, shape option, batch
    a1, a2 = li.random_init(like, r, seed=7), li.random_init(like, r, seed=7)
    np.testing.assert_array_equal(_np(backend, a1.left), _np(backend, a2.left))
    b = li.random_init(like, r, seed=8)
    assert not np.array_equal(_np(backend, a1.left), _np(backend, b.left))
    s = li.random_init(like, 2, shape=(3, 5, 6), seed=0)
    assert tuple(s.left.shape) == (3, 5, 2) and tuple(s.right.shape) == (3, 6, 2)


# --------------------------------------------------------------------------------------------------
# Frobenius decay
# --------------------------------------------------------------------------------------------------
@given(seed=seeds, m=st.integers(1, 8), n=st.integers(1, 8), r=st.integers(1, 4))
def test_frobenius_decay_gradients(backend, seed, m, n, r):
    rng = np.random.default_rng(seed)
    L, R = rng.standard_normal((m, r)), rng.standard_normal((n, r))
    c = 0.3
    value = float(
        backend.to_numpy(li.frobenius_decay(backend.asarray(L), backend.asarray(R), coefficient=c))
    )
    assert_close(value, ref.frobenius_decay(L, R, c), atol=1e-12, rtol=1e-10)
    gl, gr = li.frobenius_decay_grad(backend.asarray(L), backend.asarray(R), coefficient=c)
    gl, gr = _np(backend, gl), _np(backend, gr)
    rl, rr = ref.frobenius_decay_grad(L, R, c)
    assert_close(gl, rl, atol=1e-10, rtol=1e-10)
    assert_close(gr, rr, atol=1e-10, rtol=1e-10)
    # central finite differences on the reference value (independent of both gradient formulas)
    h = 1e-6
    for X, G, which in ((L, gl, 0), (R, gr, 1)):
        fd = np.zeros_like(X)
        for idx in np.ndindex(X.shape):
            Xp, Xm = X.copy(), X.copy()
            Xp[idx] += h
            Xm[idx] -= h
            args_p = (Xp, R) if which == 0 else (L, Xp)
            args_m = (Xm, R) if which == 0 else (L, Xm)
            fd[idx] = (ref.frobenius_decay(*args_p, c) - ref.frobenius_decay(*args_m, c)) / (2 * h)
        assert_close(G, fd, atol=1e-5 * (1 + np.abs(fd).max()))


def test_frobenius_decay_dtypes(backend, dtype):
    rng = np.random.default_rng(0)
    L = backend.asarray(rng.standard_normal((2, 5, 3)), dtype)
    R = backend.asarray(rng.standard_normal((2, 4, 3)), dtype)
    v = li.frobenius_decay(L, R)
    assert_in_library(v, L)
    assert tuple(v.shape) == (2,)
    for g, x in zip(li.frobenius_decay_grad(L, R), (L, R), strict=True):
        assert_in_library(g, x)
        assert tuple(g.shape) == tuple(x.shape)


# --------------------------------------------------------------------------------------------------
# batched == looped; conv kernels
# --------------------------------------------------------------------------------------------------
def test_batched_equals_looped(backend, dtype):
    rng = np.random.default_rng(11)
    W = rng.standard_normal((2, 3, 8, 6))
    M = rng.standard_normal((2, 3, 8, 6))
    a, b = backend.asarray(W, dtype), backend.asarray(M, dtype)
    tol = 500 * eps(dtype) * 10
    calls = {
        "spectral": lambda x: _product(backend, li.spectral_init(x, 3)),
        "nonlinear": lambda x: _product(backend, li.nonlinear_init(x, 3)),
        "refined": lambda x: _product(backend, li.nonlinear_init(x, 3, refine_steps=2)),
        "factors": lambda x: _oialr_product(backend, li.nonlinear_factors(x, 2)),
    }
    for name, call in calls.items():
        batched = call(a)
        for idx in batch_indices((2, 3)):
            assert_close(batched[idx], call(backend.asarray(W[idx], dtype)), atol=tol, err_msg=name)
    err = backend.to_numpy(li.relu_function_error(a, b))
    assert err.shape == (2, 3)
    for idx in batch_indices((2, 3)):
        one = backend.to_numpy(
            li.relu_function_error(backend.asarray(W[idx], dtype), backend.asarray(M[idx], dtype))
        )
        assert_close(err[idx], one, atol=0, rtol=tol)
    # batch dimensions broadcast
    err_b = backend.to_numpy(li.relu_function_error(a, backend.asarray(M[0, 0], dtype)))
    assert err_b.shape == (2, 3)


def test_conv_kernel_and_groups(backend):
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((8, 3, 3, 3))  # conv2d (out=8, in/groups=3, 3x3), groups=2
    w = backend.asarray(weight)
    f = li.init_weight_factors(w, 2, method="nonlinear", groups=2)
    for x in f:
        assert_in_library(x, w)
    assert tuple(f.U.shape) == (2, 4, 2) and tuple(f.V.shape) == (2, 27, 2)
    mats = weight.reshape(2, 4, 27)
    for g in range(2):
        assert_close(_oialr_product(backend, f)[g], ref.nonlinear_matrix(mats[g], 2), atol=1e-10)
    bal = li.init_weight_factors(w, 2, method="spectral", balanced=True)
    assert_close(_np(backend, bal.Sigma), np.eye(2), atol=0)
    L, R = _np(backend, bal.U), _np(backend, bal.V)
    rl, rr = ref.spectral_init(weight.reshape(8, 27), 2)
    assert_close(L @ R.T, rl @ rr.T, atol=1e-10)
    rnd = li.init_weight_factors(w, 2, method="random", seed=0)
    assert tuple(rnd.U.shape) == (8, 2) and tuple(rnd.V.shape) == (27, 2)


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------
def _calls():
    return {
        "spectral_init": lambda a, r=2: li.spectral_init(a, r),
        "spectral_factors": lambda a, r=2: li.spectral_factors(a, r),
        "nonlinear_init": lambda a, r=2: li.nonlinear_init(a, r),
        "nonlinear_factors": lambda a, r=2: li.nonlinear_factors(a, r),
        "init_weight_factors": lambda a, r=2: li.init_weight_factors(a, r, method="nonlinear"),
    }


@pytest.mark.parametrize("name", list(_calls()))
def test_errors(backend, name):
    call = _calls()[name]
    good = np.random.default_rng(0).standard_normal((4, 3))
    for bad in (np.nan, np.inf):
        a_np = good.copy()
        a_np[1, 2] = bad
        a = backend.asarray(a_np)
        with pytest.raises(lc.NonFiniteError, match="NaN or Inf"):
            call(a)
    with pytest.raises(lc.DTypeError, match="floating"):
        call(backend.asarray(np.ones((4, 3)), "int64"))
    with pytest.raises(lc.ShapeError):
        call(backend.asarray(np.ones(4)))
    a = backend.asarray(good)
    for rank in (0, 4, -1):
        with pytest.raises(lc.RankError, match="rank"):
            call(a, rank)
    for rank in (True, 1.5, None):
        with pytest.raises(lc.RankError, match="integer"):
            call(a, rank)
    with pytest.raises(lc.ArrayTypeError):
        call(good.tolist())


def test_more_errors(backend):
    rng = np.random.default_rng(0)
    a = backend.asarray(rng.standard_normal((4, 3)))
    with pytest.raises(ValueError, match="refine_steps"):
        li.nonlinear_init(a, 2, refine_steps=-1)
    with pytest.raises(ValueError, match="method"):
        li.init_weight_factors(a, 2, method="svd")
    with pytest.raises(lc.ShapeError):
        li.relu_function_error(a, backend.asarray(np.ones((3, 4))))
    with pytest.raises(lc.ShapeError):
        li.relu_function_error(
            backend.asarray(np.ones((2, 4, 3))), backend.asarray(np.ones((3, 4, 3)))
        )
    with pytest.raises(lc.ShapeError):
        li.frobenius_decay(a, backend.asarray(np.ones((5, 2))))
    with pytest.raises(lc.ShapeError):
        li.balanced_to_factors(backend.asarray(np.ones((2, 3))), backend.asarray(np.ones((5, 3))))
    with pytest.raises(lc.RankError):
        li.random_init(a, 4)
    with pytest.raises(lc.DTypeError):
        li.random_init(backend.asarray(np.ones((4, 3)), "int64"), 2)
    with pytest.raises(ValueError, match="std"):
        li.random_init(a, 2, std=float("nan"))
    with pytest.raises(lc.ShapeError):
        li.random_init(a, 1, shape=(3,))
    with pytest.raises(lc.ShapeError):
        li.init_weight_factors(backend.asarray(np.ones((6, 3))), 1, groups=4)
    if backend.name != "numpy":  # mixed libraries
        with pytest.raises(lc.ArrayTypeError, match="different libraries"):
            li.relu_function_error(a, np.ones((4, 3)))
        with pytest.raises(lc.ArrayTypeError, match="different libraries"):
            li.frobenius_decay_grad(a, np.ones((3, 3)))
    # no in-place change of inputs on success either
    before = snapshot(backend, a)
    li.nonlinear_factors(a, 2, refine_steps=2)
    assert_unchanged(backend, before, a)


def test_reference_rejects_bad_input():
    with pytest.raises(ValueError, match="rank"):
        ref.spectral_init(np.ones((3, 2)), 3)
    with pytest.raises(ValueError, match="NaN"):
        ref.nonlinear_init(np.full((3, 2), np.nan), 1)
    with pytest.raises(ValueError, match="shapes"):
        ref.relu_function_error(np.ones((3, 2)), np.ones((2, 3)))


# --------------------------------------------------------------------------------------------------
# issue 9, defect 8: extreme but finite scales; parameter validation
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1.34e154, 1e200, 1e-170, 1e-300])
@pytest.mark.parametrize("refine_steps", [0, 3])
def test_nonlinear_init_is_homogeneous_at_extreme_scales(backend, scale, refine_steps):
    """nonlinear_init(c a) = c nonlinear_init(a): the closed form is evaluated on a / max|a|."""
    rng = np.random.default_rng(7)
    a = rng.standard_normal((6, 5))
    base = li.nonlinear_factors(backend.asarray(a), 2, refine_steps=refine_steps)
    big = li.nonlinear_factors(backend.asarray(a * scale), 2, refine_steps=refine_steps)
    s0 = np.diagonal(backend.to_numpy(base.Sigma))
    s1 = np.diagonal(backend.to_numpy(big.Sigma))
    assert np.isfinite(s1).all() and (s1 > 0).all()
    np.testing.assert_allclose(s1 / scale, s0, rtol=1e-10)
    np.testing.assert_allclose(backend.to_numpy(big.U), backend.to_numpy(base.U), atol=1e-10)


def test_nonlinear_init_one_by_one_huge(backend):
    f = lc.nonlinear_init(backend.asarray(np.array([[1.34e154]])), 1)
    prod = backend.to_numpy(f.left) * backend.to_numpy(f.right)
    np.testing.assert_allclose(prod, [[1.34e154]], rtol=1e-12)


@pytest.mark.parametrize("scale", [1e150, 1e-160])
def test_relu_error_and_frobenius_decay_scale_exactly(backend, scale):
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((5, 4)), rng.standard_normal((5, 4))
    e0 = float(backend.to_numpy(lc.relu_function_error(backend.asarray(a), backend.asarray(b))))
    e1 = float(
        backend.to_numpy(
            lc.relu_function_error(backend.asarray(a * scale), backend.asarray(b * scale))
        )
    )
    assert e1 == pytest.approx(e0 * scale * scale, rel=1e-12)
    rel = lc.relu_function_error(
        backend.asarray(a * scale), backend.asarray(b * scale), relative=True
    )
    rel0 = lc.relu_function_error(backend.asarray(a), backend.asarray(b), relative=True)
    assert float(backend.to_numpy(rel)) == pytest.approx(float(backend.to_numpy(rel0)), rel=1e-12)
    left, right = rng.standard_normal((5, 2)), rng.standard_normal((4, 2))
    d0 = float(backend.to_numpy(li.frobenius_decay(backend.asarray(left), backend.asarray(right))))
    d1 = li.frobenius_decay(backend.asarray(left * scale), backend.asarray(right / scale))
    assert float(backend.to_numpy(d1)) == pytest.approx(d0, rel=1e-12)
    g0 = li.frobenius_decay_grad(backend.asarray(left), backend.asarray(right))
    g1 = li.frobenius_decay_grad(backend.asarray(left * scale), backend.asarray(right / scale))
    np.testing.assert_allclose(backend.to_numpy(g1[0]) * scale, backend.to_numpy(g0[0]), rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(g1[1]) / scale, backend.to_numpy(g0[1]), rtol=1e-12)


@pytest.mark.parametrize("coefficient", [float("nan"), float("inf"), -1.0, "1", None, True])
def test_frobenius_decay_refuses_bad_coefficients(backend, coefficient):
    left, right = backend.asarray(np.ones((3, 2))), backend.asarray(np.ones((4, 2)))
    for fn in (li.frobenius_decay, li.frobenius_decay_grad):
        with pytest.raises(lc.ParameterError, match="`coefficient`"):
            fn(left, right, coefficient=coefficient)


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [({"shape": (8.5, 10)}, lc.ParameterTypeError, "shape"),
     ({"shape": (3,)}, lc.ShapeError, "shape"),
     ({"shape": (0, 4)}, lc.ShapeError, "shape"),
     ({"shape": "ab"}, lc.ParameterTypeError, "shape"),
     ({"seed": -1}, lc.ParameterError, "seed"),
     ({"seed": 1.5}, lc.ParameterTypeError, "seed"),
     ({"seed": "1"}, lc.ParameterTypeError, "seed"),
     ({"std": float("nan")}, lc.ParameterError, "std"),
     ({"std": "1"}, lc.ParameterTypeError, "std"),
     ({"std": -1.0}, lc.ParameterError, "std")],
)  # fmt: skip
def test_random_init_validates_keywords(backend, kwargs, error, name):
    like = backend.asarray(np.zeros((4, 5)))
    with pytest.raises(error, match=f"`{name}"):
        lc.random_init(like, 2, **kwargs)


def test_random_init_accepts_numpy_scalars(backend):
    like = backend.asarray(np.zeros((4, 5)))
    a = lc.random_init(
        like, np.int64(2), shape=(np.int64(4), 5), std=np.float32(0.5), seed=np.int64(3)
    )
    b = lc.random_init(like, 2, shape=(4, 5), std=0.5, seed=3)
    np.testing.assert_array_equal(backend.to_numpy(a.left), backend.to_numpy(b.left))


@pytest.mark.parametrize("rank", [2.5, 2.0, True, "2", None])
def test_init_ranks_are_never_coerced(backend, rank):
    a = backend.asarray(np.random.default_rng(0).standard_normal((4, 5)))
    for fn in (lc.spectral_init, lc.nonlinear_init, lc.random_init):
        with pytest.raises(lc.RankError, match="`rank`"):
            fn(a, rank)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [({"method": 3}, lc.ParameterTypeError), ({"method": "svd"}, lc.ParameterError),
     ({"balanced": 1}, lc.ParameterTypeError), ({"refine_steps": 1.5}, lc.ParameterTypeError),
     ({"refine_steps": -1}, lc.ParameterError), ({"check_finite": "yes"}, lc.ParameterTypeError),
     ({"groups": 2.0}, lc.ParameterTypeError), ({"groups": 0}, lc.ParameterError)],
)  # fmt: skip
def test_init_weight_factors_validates_keywords(backend, kwargs, error):
    w = backend.asarray(np.random.default_rng(0).standard_normal((4, 2, 3)))
    with pytest.raises(error):
        li.init_weight_factors(w, 2, **kwargs)


@pytest.mark.parametrize(("kwargs", "error"), [({"std": "1"}, lc.ParameterTypeError),
                                               ({"std": float("nan")}, lc.ParameterError),
                                               ({"seed": -1}, lc.ParameterError)])  # fmt: skip
@pytest.mark.parametrize("method", ["spectral", "nonlinear"])
def test_init_weight_factors_validates_unused_random_options(backend, method, kwargs, error):
    """std/seed only matter for method='random', but a bad value is refused whatever the method."""
    w = backend.asarray(np.random.default_rng(0).standard_normal((4, 6)))
    with pytest.raises(error):
        li.init_weight_factors(w, 2, method=method, **kwargs)


@pytest.mark.parametrize(
    ("dtype", "scale"), [("float32", 3e19), ("float32", 1e-25), ("float64", 1e160)]
)
def test_balanced_to_factors_at_extreme_scales(backend, dtype, scale):
    """QR factors are scale-free; R1 R2^T of two huge factors overflows unless normalized first."""
    rng = np.random.default_rng(5)
    left, right = rng.standard_normal((6, 2)), rng.standard_normal((5, 2))
    base = li.balanced_to_factors(backend.asarray(left, dtype), backend.asarray(right, dtype))
    with np.errstate(over="ignore"):  # a singular value may truly exceed the dtype's range
        big = li.balanced_to_factors(
            backend.asarray(left * scale, dtype), backend.asarray(right * scale, dtype)
        )
    U0, U1 = backend.to_numpy(base.U), backend.to_numpy(big.U)
    assert np.isfinite(U1).all() and np.isfinite(backend.to_numpy(big.V)).all()
    tol = 1e-4 if dtype == "float32" else 1e-10
    np.testing.assert_allclose(U1, U0, atol=tol)
    s0 = np.diagonal(backend.to_numpy(base.Sigma)).astype(np.float64)
    s1 = np.diagonal(backend.to_numpy(big.Sigma)).astype(np.float64)
    with np.errstate(over="ignore"):
        expected = s0 * scale * scale
    info = np.finfo(dtype)
    finite = np.abs(expected) < info.max
    normal = finite & (np.abs(expected) >= info.tiny)  # not under/overflowing in this dtype
    np.testing.assert_allclose(s1[normal], expected[normal], rtol=tol)
    assert np.isinf(s1[~finite]).all()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("exponent", [0, 150, -150, 160, 300])
def test_closed_form_is_scale_invariant(backend, dtype, exponent):
    """``relu_function_error(c a, c b) = c^2 relu_function_error(a, b)``: in particular ``(a, a)`` is
    exactly 0 at every scale (the old form ``|a|^2/2 + |b|^2/2 - |a||b| J/pi`` left a rounding residue
    of eps |a|^2, which became Inf or 1.8e308 when |a|^2 itself exceeds the range)."""
    info = np.finfo(dtype)
    scale = 10.0 ** (exponent * (info.maxexp / 1024))  # the same place in float32's smaller range
    rows = np.array([[0.0, 1.0, 1.0], [3.0, -1.0, 0.5]])
    a = backend.asarray(rows * scale, dtype)
    assert float(backend.to_numpy(li.relu_function_error(a, a)).astype(np.float64)) == 0.0
    assert float(backend.to_numpy(li.relu_function_error(a, a, relative=True))) == 0.0
    # a true, non-zero error scales by c^2 (relative: not at all)
    other = np.array([[0.0, 1.0, 0.9], [3.0, -1.0, -0.5]])
    b = backend.asarray(other * scale, dtype)
    unit = ref.relu_function_error(rows, other)
    rel = float(backend.to_numpy(li.relu_function_error(a, b, relative=True)))
    assert_close(rel, unit / (np.sum(rows**2) / 2), atol=0, rtol=100 * eps(dtype))
    c = float(np.asarray(scale, dtype))  # the scale as the dtype holds it
    if math.log10(unit) + 2 * math.log10(c) < math.log10(float(info.max)) - 1:  # representable
        got = float(backend.to_numpy(li.relu_function_error(a, b)).astype(np.float64))
        assert_close(got / c / c, unit, atol=0, rtol=100 * eps(dtype))


def test_closed_form_issue_example(backend):
    """The reported input: a single row [0, 6.36e161, 6.36e161] against itself."""
    a = backend.asarray(np.array([[0.0, 6.36e161, 6.36e161]]))
    assert float(backend.to_numpy(li.relu_function_error(a, a))) == 0.0
