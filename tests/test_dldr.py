"""DLDR core (lowrank_core.dldr) against the NumPy reference (lowrank_reference.dldr), every backend."""

from __future__ import annotations

import functools
import gc
import math
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from _helpers import assert_in_library, assert_unchanged, eps, examples, random_orthogonal, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

import lowrank_core.dldr as dl
import lowrank_reference.dldr as ref
from lowrank_core.errors import (
    ArrayTypeError,
    DTypeError,
    LowRankError,
    NonFiniteError,
    ParameterError,
    ParameterTypeError,
    RankError,
    ShapeError,
    SnapshotStoreError,
)

# 12 examples per property (derandomized in CI, see conftest); the fuzz profile explores ten times more
FAST = settings(
    max_examples=120 if os.environ.get("HYPOTHESIS_PROFILE") == "fuzz" else examples(12),
    deadline=None,
)
seeds = st.integers(0, 2**32 - 1)


def trajectory(seed: int, t: int, D: int, d: int, gap: float = 10.0, offset: float = 3.0):
    """Snapshots ``offset * w + Xc`` whose centred part has a spectrum with a gap after ``d``."""
    rng = np.random.default_rng(seed)
    r = min(t - 1, D)
    s = np.geomspace(10.0, 1.0, num=d) if d > 1 else np.array([10.0])
    tail = np.geomspace(1.0 / gap, 1.0 / (gap * 4), num=max(r - d, 1))[: r - d]
    spectrum = np.concatenate([s, tail])
    U = random_orthogonal(rng, t, r + 1)
    U = U - U.mean(axis=0)  # columns orthogonal to 1 after centring: take QR of centred
    Q, _ = np.linalg.qr(U)
    Q = Q[:, :r]
    Q = Q - Q.mean(axis=0)
    Q, _ = np.linalg.qr(Q)
    V = random_orthogonal(rng, D, r)
    Xc = (Q * spectrum) @ V.T
    base = offset * rng.standard_normal(D)
    return base + Xc


def to_np(backend, x) -> np.ndarray:
    return backend.to_numpy(x).astype(np.float64)


def min_cosine(P: np.ndarray, Q: np.ndarray) -> float:
    Qa, _ = np.linalg.qr(P.T)
    Qb, _ = np.linalg.qr(Q.T)
    return float(np.linalg.svd(Qa.T @ Qb, compute_uv=False).min())


sizes = st.tuples(st.integers(4, 16), st.integers(20, 120), st.integers(1, 4)).filter(
    lambda x: x[2] <= x[0] - 2
)


# --------------------------------------------------------------------------------------------------
# PCA: exact (matrix), store (streamed Gram, memory and disk), randomized
# --------------------------------------------------------------------------------------------------
@FAST
@given(seed=seeds, size=sizes)
def test_fit_subspace_matches_exact_pca(backend, dtype, seed, size):
    t, D, d = size
    X = trajectory(seed, t, D, d)
    Xb = backend.asarray(X, dtype)
    before = snapshot(backend, Xb)
    sub = dl.fit_subspace(Xb, d)
    assert_unchanged(backend, before, Xb)
    for name in ("centre", "basis", "explained_variance"):
        assert_in_library(getattr(sub, name), Xb, what=name)
    c_ref, P_ref, ev_ref = ref.pca(X, d)
    P = to_np(backend, sub.basis)
    bound = 0.999 if dtype == "float64" else 0.99
    assert min_cosine(P, P_ref) >= bound
    tol = 200 * eps(dtype) * math.sqrt(D) * ev_ref[0] + (0 if dtype == "float64" else 1e-3)
    np.testing.assert_allclose(to_np(backend, sub.explained_variance), ev_ref, rtol=1e-4, atol=tol)
    np.testing.assert_allclose(to_np(backend, sub.centre), c_ref, atol=100 * eps(dtype) * 10)
    assert np.abs(P @ P.T - np.eye(d)).max() <= 100 * eps(dtype)


@FAST
@given(seed=seeds, size=sizes, on_disk=st.booleans(), shift=st.booleans())
def test_store_streamed_fit_matches_reference(backend, seed, size, on_disk, shift, tmp_path):
    t, D, d = size
    X = trajectory(seed, t, D, d)
    Xb = backend.asarray(X, "float64")
    with dl.SnapshotStore(path=(tmp_path / f"s{seed}.dat") if on_disk else None, shift=shift) as s:
        for i in range(t):
            s.add(Xb[i, :])
        assert len(s) == t
        assert s.dim == D
        Y = X - X[0] if shift else X
        np.testing.assert_allclose(
            s.gram(), ref.gram(Y), rtol=1e-12, atol=1e-10 * np.abs(Y).max() ** 2 * D
        )
        sub = s.fit(d)
    _, P_ref, ev_ref = ref.pca(X, d)
    assert min_cosine(to_np(backend, sub.basis), P_ref) >= 0.999
    np.testing.assert_allclose(to_np(backend, sub.explained_variance), ev_ref, rtol=1e-8)
    assert_in_library(sub.basis, Xb)


@FAST
@given(seed=seeds, size=sizes)
def test_memmap_store_equals_memory_store(backend, seed, size, tmp_path):
    """Both stores hold the same float32 vectors; their Gram entries are float64 sums of exact
    float32 x float32 products taken in different orders (per-row dots in memory, slab products on
    disk), so they agree to float64 rounding: |dG_ij| <= 2 gamma_D^(64) |y_i| |y_j| (gamma_D =
    D eps64, the worst-case bound on a length-D float64 dot product), whatever the machine's BLAS."""
    t, D, d = size
    X = trajectory(seed, t, D, d)
    Xb = backend.asarray(X, "float32")
    mem = dl.SnapshotStore()
    with dl.SnapshotStore(path=tmp_path / f"m{seed}.dat") as disk:
        for i in range(t):
            mem.add(Xb[i, :])
            disk.add(Xb[i, :])
        Gm, Gd = mem.gram(), disk.gram()
        norms = np.sqrt(np.diag(Gm))
        bound = 2 * D * np.finfo(np.float64).eps * np.outer(norms, norms)
        assert np.all(np.abs(Gm - Gd) <= bound)
        # the stored vectors themselves are bit-identical (both keep the same float32 rows)
        for i in (0, t // 2, t - 1):
            np.testing.assert_array_equal(
                to_np(backend, mem.snapshot(i)), to_np(backend, disk.snapshot(i))
            )
            assert_in_library(disk.vector(i), Xb[0, :])
        a, b = mem.fit(d), disk.fit(d)
        # same stored data, Grams equal to ~1e-13: the bases agree to float32 working precision
        np.testing.assert_allclose(
            to_np(backend, a.basis), to_np(backend, b.basis), atol=100 * eps("float32")
        )
        assert disk.nbytes == mem.nbytes == t * D * 4


def test_streaming_gram_equals_xxt_unshifted(backend):
    X = np.random.default_rng(1).standard_normal((7, 33))
    Xb = backend.asarray(X, "float64")
    s = dl.SnapshotStore(shift=False)
    for i in range(7):
        s.add(Xb[i, :])
        np.testing.assert_allclose(s.gram(), X[: i + 1] @ X[: i + 1].T, rtol=1e-13, atol=1e-12)
    np.testing.assert_allclose(to_np(backend, dl.gram_matrix(Xb)), ref.gram(X), rtol=1e-13)
    G = dl.centred_gram(dl.gram_matrix(Xb))
    Xc = X - X.mean(axis=0)
    np.testing.assert_allclose(to_np(backend, G), Xc @ Xc.T, atol=1e-11)


@FAST
@given(seed=seeds, t=st.integers(30, 60))
def test_randomized_matches_exact(backend, seed, t):
    d, D = 3, 150
    X = trajectory(seed, t, D, d, gap=20.0)
    Xb = backend.asarray(X, "float64")
    sub = dl.fit_subspace(Xb, d, method="randomized", seed=seed % 1000)
    _, P_ref, ev_ref = ref.pca(X, d)
    assert min_cosine(to_np(backend, sub.basis), P_ref) >= 0.999
    np.testing.assert_allclose(to_np(backend, sub.explained_variance), ev_ref, rtol=1e-6)
    store = dl.SnapshotStore()
    for i in range(t):
        store.add(Xb[i, :])
    sub2 = store.fit(d, method="randomized")
    assert min_cosine(to_np(backend, sub2.basis), P_ref) >= 0.999
    assert sub2.total_variance == pytest.approx(sub.total_variance, rel=1e-9)
    ratio = to_np(backend, sub.explained_variance_ratio)
    assert 0 < ratio.sum() <= 1 + 1e-12


def test_cancellation_is_avoided_in_float32(backend):
    """Large common offset, tiny trajectory: the shifted Gram keeps the subspace in float32."""
    X = trajectory(7, 12, 4000, 3, offset=300.0)
    Xb = backend.asarray(X, "float32")
    store = dl.SnapshotStore()
    for i in range(12):
        store.add(Xb[i, :])
    _, P_ref, _ = ref.pca(X.astype(np.float32).astype(np.float64), 3)
    assert min_cosine(to_np(backend, store.fit(3).basis), P_ref) >= 0.999


# --------------------------------------------------------------------------------------------------
# project / lift
# --------------------------------------------------------------------------------------------------
@FAST
@given(seed=seeds, size=sizes)
def test_project_lift_round_trip(backend, dtype, seed, size):
    t, D, d = size
    X = trajectory(seed, t, D, d)
    Xb = backend.asarray(X, dtype)
    sub = dl.fit_subspace(Xb, d)
    c = backend.asarray(np.random.default_rng(seed).standard_normal(d), dtype)
    w = sub.lift(c)
    assert_in_library(w, Xb[0, :])
    tol = 1000 * eps(dtype) * (1 + np.abs(X).max())
    np.testing.assert_allclose(to_np(backend, sub.project(w)), to_np(backend, c), atol=tol)
    P, cen = to_np(backend, sub.basis), to_np(backend, sub.centre)
    np.testing.assert_allclose(to_np(backend, w), ref.lift(P, cen, to_np(backend, c)), atol=tol)
    origin = Xb[0, :]
    w2 = sub.lift(c, origin=origin)
    np.testing.assert_allclose(
        to_np(backend, sub.project(w2, origin=origin)), to_np(backend, c), atol=tol
    )
    wx = Xb[1, :]
    np.testing.assert_allclose(
        to_np(backend, sub.project(wx)), ref.project(P, cen, X[1]), atol=tol * 10
    )
    # a stack projects row by row
    stack = sub.project(Xb)
    assert tuple(stack.shape) == (t, d)


# --------------------------------------------------------------------------------------------------
# BFGS and Armijo
# --------------------------------------------------------------------------------------------------
def _spd(rng: np.random.Generator, d: int) -> np.ndarray:
    A = rng.standard_normal((d, d))
    return A @ A.T + d * np.eye(d)


@FAST
@given(seed=seeds, d=st.integers(1, 8))
def test_bfgs_update_secant_spd_and_reference(backend, dtype, seed, d):
    rng = np.random.default_rng(seed)
    H = _spd(rng, d)
    H /= np.linalg.norm(H)
    s = rng.standard_normal(d)
    y = _spd(rng, d) @ s  # y = A s with A SPD: curvature s.y > 0
    Hb, sb, yb = (backend.asarray(a, dtype) for a in (H, s, y))
    before = snapshot(backend, Hb, sb, yb)
    Hn, updated = dl.bfgs_update(Hb, sb, yb)
    assert updated
    assert_unchanged(backend, before, Hb, sb, yb)
    assert_in_library(Hn, Hb)
    Hn_np = to_np(backend, Hn)
    cond = np.linalg.cond(_spd(np.random.default_rng(seed), d)) * 10
    tol = 100 * eps(dtype) * cond * (1 + np.abs(Hn_np).max())
    np.testing.assert_allclose(Hn_np @ y, s, atol=tol * (1 + np.abs(y).max()))  # secant: H y = s
    np.testing.assert_allclose(Hn_np, Hn_np.T, atol=tol)
    H_ref, ok = ref.bfgs_update(H, s, y)
    assert ok
    np.testing.assert_allclose(Hn_np, H_ref, atol=tol, rtol=1e-4 if dtype == "float32" else 1e-9)
    if dtype == "float64":
        assert np.linalg.eigvalsh(0.5 * (Hn_np + Hn_np.T)).min() > 0


@given(seed=seeds, d=st.integers(2, 6), scale=st.floats(1e-6, 1e6))
@FAST
def test_curvature_guard_skips_bad_pairs(backend, seed, d, scale):
    rng = np.random.default_rng(seed)
    H = np.eye(d)
    s = rng.standard_normal(d)
    y_bad = -s * scale + 0.0  # s.y < 0
    y_orth = rng.standard_normal(d)
    y_orth -= (y_orth @ s) / (s @ s) * s  # s.y = 0 (up to rounding): below eps |s||y|
    for y in (y_bad, y_orth):
        Hb = backend.asarray(H, "float64")
        Hn, updated = dl.bfgs_update(
            Hb, backend.asarray(s, "float64"), backend.asarray(y, "float64")
        )
        assert not updated
        assert Hn is Hb
        assert not dl.curvature_ok(backend.asarray(s, "float64"), backend.asarray(y, "float64"))
        assert ref.bfgs_update(H, s, y)[1] is False
    y_good = s * scale
    assert dl.curvature_ok(backend.asarray(s, "float64"), backend.asarray(y_good, "float64"))


@FAST
@given(
    a=st.floats(0.1, 50.0),
    x0=st.floats(-5.0, 5.0).filter(lambda v: abs(v) > 1e-3),
    alpha0=st.floats(0.5, 4.0),
)
def test_armijo_condition_holds_at_accepted_step(a, x0, alpha0):
    def f(x: float) -> float:
        return 0.5 * a * x * x + math.sin(x) * 0.1

    g = a * x0 + 0.1 * math.cos(x0)
    p = -g
    slope = g * p
    res = dl.armijo_backtracking(lambda al: f(x0 + al * p), f(x0), slope, alpha0=alpha0)
    alpha, _value, trials = ref.armijo_backtracking(lambda al: f(x0 + al * p), f(x0), slope, alpha0)
    assert res.trials == trials
    assert res.alpha == pytest.approx(alpha, rel=1e-12)
    if res.accepted:
        assert res.value <= f(x0) + 0.4 * res.alpha * slope
        assert dl.armijo_condition(res.value, f(x0), res.alpha, slope)
        if res.trials > 1:  # the step before failed the condition
            prev = res.alpha / 0.4
            assert not dl.armijo_condition(f(x0 + prev * p), f(x0), prev, slope)


def test_armijo_gives_up_and_rejects_ascent():
    res = dl.armijo_backtracking(lambda al: 1.0 + al, 1.0, -1.0, max_trials=5)
    assert not res.accepted
    assert res.alpha == 0.0
    assert res.trials == 5
    with pytest.raises(ParameterError, match="descent"):
        dl.armijo_backtracking(lambda al: 0.0, 1.0, 0.5)
    with pytest.raises(NonFiniteError):
        dl.armijo_backtracking(lambda al: 0.0, float("nan"), -1.0)
    # a NaN trial value is a rejection, not an acceptance
    assert not dl.armijo_condition(float("nan"), 1.0, 1.0, -1.0)


def test_bfgs_direction(backend):
    H = backend.asarray(np.diag([1.0, 2.0]), "float64")
    g = backend.asarray([1.0, 1.0], "float64")
    np.testing.assert_allclose(to_np(backend, dl.bfgs_direction(H, g)), [-1.0, -2.0])


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------
def test_errors(backend, tmp_path):
    X = trajectory(0, 6, 30, 2)
    Xb = backend.asarray(X, "float64")
    bad = X.copy()
    bad[2, 3] = np.nan
    with pytest.raises(NonFiniteError, match="snapshots"):
        dl.fit_subspace(backend.asarray(bad, "float64"), 2)
    with pytest.raises(DTypeError):
        dl.fit_subspace(backend.asarray(np.ones((4, 5)), "int64"), 1)
    with pytest.raises(ShapeError):
        dl.fit_subspace(Xb[0, :], 1)
    with pytest.raises(ArrayTypeError):
        dl.fit_subspace([[1.0, 2.0]], 1)  # type: ignore[arg-type]
    for d in (0, 6, 2.5, True):
        with pytest.raises(RankError):
            dl.fit_subspace(Xb, d)  # type: ignore[arg-type]
    store = dl.SnapshotStore(path=tmp_path / "e.dat")
    with pytest.raises(RankError, match="at least 2"):
        store.fit(1)
    store.add(Xb[0, :])
    with pytest.raises(ShapeError, match="length mismatch"):
        store.add(backend.asarray(np.ones(31), "float64"))
    with pytest.raises(NonFiniteError):
        store.add(backend.asarray(np.full(30, np.inf), "float64"))
    with pytest.raises(DTypeError):
        store.add(backend.asarray(np.ones(30), "int32"))
    with pytest.raises(ShapeError):
        store.add(Xb)
    if backend.name != "numpy":
        with pytest.raises(ArrayTypeError, match="library"):
            store.add(np.ones(30))
    store.add(Xb[0, :])  # a duplicate: no variance to fit
    with pytest.raises(RankError, match="non-zero variance that the snapshots resolve"):
        store.fit(1)
    store.close()
    sub = dl.fit_subspace(Xb, 2)
    with pytest.raises(ShapeError):
        sub.project(backend.asarray(np.ones(29), "float64"))
    with pytest.raises(ShapeError):
        sub.lift(backend.asarray(np.ones(3), "float64"))
    with pytest.raises(DTypeError):
        sub.lift(backend.asarray(np.ones(2), "int64"))
    H = backend.asarray(np.eye(3), "float64")
    v = backend.asarray(np.ones(3), "float64")
    with pytest.raises(ShapeError):
        dl.bfgs_update(backend.asarray(np.eye(2), "float64"), v, v)
    with pytest.raises(ShapeError):
        dl.bfgs_update(H, v, backend.asarray(np.ones(2), "float64"))
    with pytest.raises(NonFiniteError):
        dl.bfgs_update(H, v, backend.asarray([1.0, np.nan, 1.0], "float64"))
    if backend.name != "numpy":
        with pytest.raises(ArrayTypeError):
            dl.bfgs_update(H, v, np.ones(3))
    with pytest.raises(ValueError, match="method"):
        dl.fit_subspace(Xb, 1, method="nope")  # type: ignore[arg-type]
    assert issubclass(RankError, LowRankError)


# --------------------------------------------------------------------------------------------------
# defect 1: float32 subspaces the data resolve are not refused
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _digits_snapshots() -> np.ndarray:
    """59 float32 snapshots of a 64-32-10 ReLU MLP trained by SGD (lr 0.1, batch 64) on scikit-learn's
    digits (bundled with scikit-learn, no download): every 10th of 590 steps. The old cutoff found 28
    directions here and refused d = 30."""
    datasets = pytest.importorskip("sklearn.datasets")
    X, y = datasets.load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    rng = np.random.default_rng(0)
    W1 = (rng.uniform(-1, 1, (64, 32)) / 8).astype(np.float32)
    b1 = (rng.uniform(-1, 1, 32) / 8).astype(np.float32)
    W2 = (rng.uniform(-1, 1, (32, 10)) / np.sqrt(32)).astype(np.float32)
    b2 = (rng.uniform(-1, 1, 10) / np.sqrt(32)).astype(np.float32)
    onehot = np.eye(10, dtype=np.float32)[y]
    snaps = []
    for step in range(590):
        idx = rng.integers(0, len(X), 64)
        xb, yb = X[idx], onehot[idx]
        a = xb @ W1 + b1
        h = np.maximum(a, 0)
        z = h @ W2 + b2
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        gz = (p - yb) / len(idx)
        gh = (gz @ W2.T) * (a > 0)
        W2 -= 0.1 * h.T @ gz
        b2 -= 0.1 * gz.sum(0)
        W1 -= 0.1 * xb.T @ gh
        b1 -= 0.1 * gh.sum(0)
        if step % 10 == 9:
            snaps.append(np.concatenate([W1.ravel(), b1, W2.ravel(), b2]))
    return np.stack(snaps).astype(np.float32)


def _check_against_float64_pca(backend, sub, X32: np.ndarray, d: int) -> None:
    """The fit of float32 snapshots against exact PCA of the same float32 numbers in float64.

    The store keeps y_i = fl32(w_i - w_1): a perturbation E of the snapshot matrix with
    |E|_2 <= u sqrt(trace), trace = sum |w_i - w_1|^2, so (Weyl on singular values) each variance moves
    by at most (2 u sqrt(trace / lam) + u^2 trace / lam) lam; twice that is the tolerance."""
    _, P_ref, ev_ref = ref.pca(X32.astype(np.float64), d)
    P = to_np(backend, sub.basis)
    assert np.abs(P @ P.T - np.eye(d)).max() <= 20 * eps("float32")
    u = eps("float32") / 2
    Y = X32.astype(np.float64) - X32[0].astype(np.float64)
    lam = ev_ref * (X32.shape[0] - 1)
    ratio = float((Y * Y).sum()) / lam
    rtol = 2 * (2 * u * np.sqrt(ratio) + u * u * ratio) + 1e-12
    ev = to_np(backend, sub.explained_variance)
    assert np.all(np.abs(ev - ev_ref) <= rtol * ev_ref)
    assert min_cosine(P, P_ref) >= 0.99


def test_float32_digits_mlp_subspace_is_not_refused(backend):
    """Issue 9, defect 1: d = 30 and the paper's d = 40 of 59 float32 MLP snapshots were refused as
    "zero variance" although the data resolve them (all 58 centred directions are real)."""
    X32 = _digits_snapshots().copy()
    Xb = backend.asarray(X32, "float32")
    store = dl.SnapshotStore()
    for i in range(X32.shape[0]):
        store.add(Xb[i, :])
    for d in (30, 40):
        _check_against_float64_pca(backend, dl.fit_subspace(Xb, d), X32, d)
        _check_against_float64_pca(backend, store.fit(d), X32, d)


def test_float32_wide_spectrum_is_not_refused(backend):
    """The same property, synthetic: singular values from 10 down to 1e-2 (variance ratio 1e-6,
    below the old cutoff max(t, sqrt(D)) eps32 lambda_1 = 6.5e-6 lambda_1, far above what float32
    data resolve)."""
    t, D, d = 40, 3000, 30
    rng = np.random.default_rng(3)
    U, _ = np.linalg.qr(rng.standard_normal((t, t - 1)) - 0.0)
    U -= U.mean(axis=0)
    U, _ = np.linalg.qr(U)
    V = random_orthogonal(rng, D, t - 1)
    X = 5.0 + (U * np.geomspace(10.0, 1e-2, t - 1)) @ V.T
    X32 = X.astype(np.float32)
    sub = dl.fit_subspace(backend.asarray(X32, "float32"), d)
    _check_against_float64_pca(backend, sub, X32, d)


def test_rank_deficient_float32_snapshots_are_still_refused(backend):
    """What the data cannot resolve stays refused, with a message that says why."""
    rng = np.random.default_rng(0)
    few = rng.standard_normal((12, 5)).astype(np.float32)  # 12 snapshots in R^5: rank 5
    Xb = backend.asarray(few, "float32")
    dl.fit_subspace(Xb, 5)
    with pytest.raises(RankError, match="rounding-error level"):
        dl.fit_subspace(Xb, 6)
    line = np.outer(np.arange(6.0), rng.standard_normal(50)) + 3.0  # collinear: one direction
    Lb = backend.asarray(line.astype(np.float32), "float32")
    dl.fit_subspace(Lb, 1)
    with pytest.raises(RankError, match=r"resolve \(1\)"):
        dl.fit_subspace(Lb, 2)
    store = dl.SnapshotStore()
    for i in range(6):
        store.add(Lb[i, :])
    with pytest.raises(RankError, match=r"resolve \(1\)"):
        store.fit(2)


# --------------------------------------------------------------------------------------------------
# defect 9: P P^T = I to working precision for long float32 vectors
# --------------------------------------------------------------------------------------------------
def test_float32_basis_is_orthonormal_for_long_vectors(backend):
    """Issue 9, defect 9: long float32 reductions (torch's full-length dot products for the Gram rows,
    one (d, D) x (D, d) GEMM for P P^T) lost accuracy in proportion to D: max|P P^T - I| = 4.8e-3 at
    D = 20M, 7e-6 (60 eps) at D = 200k. Chunked float64 sums keep it at a few eps at any D."""
    t, D, d = 24, 200_000, 10
    rng = np.random.default_rng(0)
    w = rng.standard_normal(D)
    X = np.empty((t, D), np.float32)
    for i in range(t):
        w = w + rng.standard_normal(D) / (1 + i)
        X[i] = w
    Xb = backend.asarray(X, "float32")
    store = dl.SnapshotStore()
    for i in range(t):
        store.add(Xb[i, :])
    for sub in (store.fit(d), dl.fit_subspace(Xb, d)):
        P = to_np(backend, sub.basis)
        assert np.abs(P @ P.T - np.eye(d)).max() <= 4 * eps("float32")


# --------------------------------------------------------------------------------------------------
# defect 7: the store on disk
# --------------------------------------------------------------------------------------------------
_ROOT = Path(__file__).resolve().parents[1]


def _run_isolated(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (a crash such as SIGBUS cannot take pytest down)."""
    env = dict(os.environ)
    paths = [str(_ROOT), str(_ROOT / "backends"), str(_ROOT / "reference")]
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.mark.parametrize("keep_rows", [0, 2])
def test_truncated_file_raises_instead_of_crashing(tmp_path, keep_rows):
    """Issue 9, defect 7: truncating the file under a live store killed the process (SIGBUS)."""
    proc = _run_isolated(
        f"""
        import os, sys
        import numpy as np
        from lowrank_core.dldr import SnapshotStore
        from lowrank_core.errors import SnapshotStoreError
        path = os.path.join(sys.argv[1], "s.dat")
        store = SnapshotStore(path=path)
        X = np.random.default_rng(0).standard_normal((5, 5000))
        for x in X:
            store.add(x)
        os.truncate(path, {keep_rows} * 5000 * 8)
        for call in (lambda: store.add(X[0]), lambda: store.fit(2), lambda: store.vector(4),
                     lambda: list(store.blocks()), lambda: store.snapshot(0)):
            try:
                call()
            except SnapshotStoreError as exc:
                assert "truncated" in str(exc), exc
            else:
                raise SystemExit("no error")
        assert len(store) == 5 and store.gram().shape == (5, 5)  # nothing half-added
        print("OK")
        """,
        tmp_path,
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.strip() == "OK"


def test_two_stores_on_one_path_are_refused(tmp_path):
    path = tmp_path / "shared.dat"
    first = dl.SnapshotStore(path=path)
    first.add(np.ones(10))
    with pytest.raises(SnapshotStoreError, match="in use by another SnapshotStore"):
        dl.SnapshotStore(path=path)
    first.add(np.arange(10.0))
    np.testing.assert_array_equal(first.snapshot(1), np.arange(10.0))  # not corrupted
    first.close()
    with dl.SnapshotStore(path=path) as again:  # the lock is released at close
        again.add(np.ones(10))


def test_deleted_file_loses_nothing_when_the_store_grows(backend, tmp_path):
    """Deleting the file's name under a store that then grows lost every snapshot."""
    X = trajectory(2, 20, 300, 3)
    Xb = backend.asarray(X, "float64")
    path = tmp_path / "gone.dat"
    mem = dl.SnapshotStore()
    with dl.SnapshotStore(path=path) as disk:
        for i in range(6):
            disk.add(Xb[i, :])
            mem.add(Xb[i, :])
        os.remove(path)
        for i in range(6, 20):  # grows from 8 to 16 to 32 rows
            disk.add(Xb[i, :])
            mem.add(Xb[i, :])
        for i in range(20):
            np.testing.assert_array_equal(
                to_np(backend, disk.snapshot(i)), to_np(backend, mem.snapshot(i))
            )
        np.testing.assert_allclose(
            to_np(backend, disk.fit(3).basis), to_np(backend, mem.fit(3).basis), atol=1e-10
        )


def test_closed_store_raises_a_library_error(tmp_path):
    for path in (None, tmp_path / "c.dat", True):
        store = dl.SnapshotStore(path=path)
        store.add(np.ones(4))
        store.add(np.arange(4.0))
        store.close()
        store.close()  # idempotent
        for call in (
            lambda s=store: s.add(np.ones(4)),
            lambda s=store: s.fit(1),
            lambda s=store: s.vector(0),
            lambda s=store: s.gram(),
            lambda s=store: s.centre(),
            lambda s=store: list(s.blocks()),
        ):
            with pytest.raises(SnapshotStoreError, match="closed"):
                call()
        assert store.closed


def test_temporary_store_deletes_its_file_when_dropped():
    store = dl.SnapshotStore(path=True)
    store.add(np.ones(100))
    path = store.path
    assert path is not None and os.path.exists(path)
    del store
    gc.collect()
    assert not os.path.exists(path)


@pytest.mark.parametrize("on_disk", [False, True])
def test_concurrent_adds_lose_nothing(tmp_path, on_disk):
    """Issue 9, defect 7: two threads adding at once lost snapshots (and mixed up Gram rows)."""
    n_threads, per_thread, D = 4, 8, 20_000
    rng = np.random.default_rng(0)
    data = rng.standard_normal((n_threads, per_thread, D))
    store = dl.SnapshotStore(path=(tmp_path / "th.dat") if on_disk else None, shift=False)
    barrier = threading.Barrier(n_threads)

    def work(k: int) -> None:
        barrier.wait()
        for x in data[k]:
            store.add(x)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(store) == n_threads * per_thread
    stored = np.stack([store.snapshot(i) for i in range(len(store))])
    key = lambda a: sorted(map(tuple, np.round(a[:, :4], 12)))  # noqa: E731
    assert key(stored) == key(data.reshape(-1, D))
    norms = np.linalg.norm(stored, axis=1)
    bound = 2 * D * np.finfo(np.float64).eps * np.outer(norms, norms)  # float64 dots, any order
    assert np.all(np.abs(store.gram() - stored @ stored.T) <= bound)
    store.close()


def test_store_path_and_option_errors(tmp_path):
    with pytest.raises(SnapshotStoreError, match="directory"):
        dl.SnapshotStore(path=tmp_path)
    with pytest.raises(SnapshotStoreError, match="cannot open"):
        dl.SnapshotStore(path=tmp_path / "missing" / "s.dat")
    for bad in (2.5, True, 0, "3", None):
        with pytest.raises(ParameterError):
            dl.SnapshotStore(block_rows=bad)  # type: ignore[arg-type]
    assert dl.SnapshotStore(block_rows=np.int64(3)).block_rows == 3
    for bad in (3, 1.5, b"x"):
        with pytest.raises(ParameterTypeError):
            dl.SnapshotStore(path=bad)  # type: ignore[arg-type]
    with pytest.raises(ParameterTypeError):
        dl.SnapshotStore(shift=1)  # type: ignore[arg-type]
    s = dl.SnapshotStore()
    s.add(np.ones(3))
    s.add(np.arange(3.0))
    for bad_i in (0.5, True, "0"):
        with pytest.raises(ParameterTypeError):
            s.vector(bad_i)  # type: ignore[arg-type]
    for bad_i in (2, -3):
        with pytest.raises(ParameterError, match="out of range"):
            s.vector(bad_i)
    np.testing.assert_array_equal(s.vector(np.int64(1)), np.arange(3.0) - 1.0)
    for kw in ({"method": "nope"}, {"oversample": -1}, {"power_iterations": 1.5}, {"seed": -3}):
        with pytest.raises(ParameterError):
            s.fit(1, **kw)  # type: ignore[arg-type]
    assert len(s) == 2


def test_hypothesis_profiles():
    """Issue 9, defect 11: CI draws the same examples on every machine; random seeds are a separate,
    larger session."""
    ci, fuzz = settings.get_profile("ci"), settings.get_profile("fuzz")
    assert ci.derandomize is True
    assert fuzz.derandomize is False
    assert fuzz.max_examples > ci.max_examples


# --------------------------------------------------------------------------------------------------
# validation gaps: clear library errors, nothing mutated
# --------------------------------------------------------------------------------------------------
def test_subspace_from_gram_validates_its_inputs(backend):
    X = trajectory(1, 8, 40, 2)
    Y = X - X[0]
    G, centre = Y @ Y.T, X.mean(axis=0)
    Yb, cb = backend.asarray(Y, "float64"), backend.asarray(centre, "float64")

    def rows():
        yield 0, Yb

    before = snapshot(backend, Yb, cb)
    sub = dl.subspace_from_gram(G, 2, rows, centre=cb)
    assert sub.d == 2
    bad_g = G.copy()
    bad_g[1, 2] = np.nan
    asym = G.copy()
    asym[0, 1] += 1.0
    cases = [
        ({"gram": bad_g}, NonFiniteError),
        ({"gram": asym}, ParameterError),
        ({"gram": G[:3]}, ShapeError),
        ({"gram": G.astype(np.int64)}, DTypeError),
        ({"gram": "G"}, ArrayTypeError),
        ({"d": 2.5}, RankError),
        ({"d": True}, RankError),
        ({"d": 8}, RankError),
        ({"rows": [(0, Yb)]}, ParameterTypeError),
        ({"rows": lambda: iter([(0, Yb[:3, :])])}, ShapeError),
        ({"rows": lambda: iter([(1, Yb)])}, ShapeError),
        ({"rows": lambda: iter([(0, Yb[:, :5])])}, ShapeError),
        ({"rows": lambda: iter([Yb])}, ParameterTypeError),
        ({"centre": backend.asarray(np.full(40, np.inf), "float64")}, NonFiniteError),
        ({"centre": cb[:5]}, ShapeError),
        ({"orthonormalize": 1}, ParameterTypeError),
        ({"reduce": 3}, ParameterTypeError),
    ]
    for change, error in cases:
        kw: dict = {"gram": G, "d": 2, "rows": rows, "centre": cb, **change}
        with pytest.raises(error):
            dl.subspace_from_gram(kw.pop("gram"), kw.pop("d"), kw.pop("rows"), **kw)
    assert_unchanged(backend, before, Yb, cb)
    assert dl.subspace_from_gram(G, np.int64(2), rows, centre=cb).d == 2


def test_bfgs_with_mixed_dtypes_promotes(backend):
    """Mixed float32 / float64 arrays (a generic library error before) compute in float64."""
    H = backend.asarray(np.eye(3), "float32")
    g = backend.asarray([1.0, 2.0, 3.0], "float64")
    p = dl.bfgs_direction(H, g)
    assert str(p.dtype).endswith("float64")
    np.testing.assert_allclose(to_np(backend, p), [-1.0, -2.0, -3.0])
    s = backend.asarray([1.0, 0.0, 0.0], "float32")
    y = backend.asarray([2.0, 0.5, 0.0], "float64")
    Hn, ok = dl.bfgs_update(H, s, y)
    assert ok
    np.testing.assert_allclose(to_np(backend, Hn) @ [2.0, 0.5, 0.0], [1.0, 0.0, 0.0], atol=1e-6)
    with pytest.raises(NonFiniteError):
        dl.bfgs_direction(backend.asarray(np.full((3, 3), np.nan), "float64"), g)
    with pytest.raises(DTypeError):
        dl.bfgs_direction(backend.asarray(np.eye(3), "int64"), g)
    with pytest.raises(ShapeError):
        dl.bfgs_direction(backend.asarray(np.eye(3)[:2], "float64"), g)
    for bad in (float("nan"), -1.0, "1e-8", None, True):
        with pytest.raises(ParameterError):
            dl.bfgs_update(H, s, y, eps=bad)  # type: ignore[arg-type]


def test_armijo_refuses_non_numbers():
    for bad in ("1.0", None, 1j, True, [1.0], np.array([1.0, 2.0]), np.array(1.0)):
        with pytest.raises(ParameterTypeError):
            dl.armijo_condition(bad, 1.0, 1.0, -1.0)  # type: ignore[arg-type]
        with pytest.raises(ParameterError):
            dl.armijo_condition(0.5, bad, 1.0, -1.0)  # type: ignore[arg-type]
        with pytest.raises(ParameterError):
            dl.armijo_backtracking(lambda a: 0.0, 1.0, bad)  # type: ignore[arg-type]
        with pytest.raises(ParameterTypeError):
            dl.armijo_backtracking(lambda a, b=bad: b, 1.0, -1.0)  # type: ignore[misc]
    for bad_alpha in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ParameterError):
            dl.armijo_condition(0.5, 1.0, bad_alpha, -1.0)
    with pytest.raises(NonFiniteError):
        dl.armijo_condition(0.5, float("nan"), 1.0, -1.0)
    with pytest.raises(NonFiniteError):
        dl.armijo_condition(0.5, 1.0, 1.0, float("inf"))
    for kw in ({"c1": 1.5}, {"shrink": 0.0}, {"alpha0": float("nan")}, {"max_trials": 2.5},
               {"max_trials": True}, {"max_trials": 0}):  # fmt: skip
        with pytest.raises(ParameterError):
            dl.armijo_backtracking(lambda a: 0.0, 1.0, -1.0, **kw)  # type: ignore[arg-type]
    with pytest.raises(ParameterTypeError):
        dl.armijo_backtracking(3.0, 1.0, -1.0)  # type: ignore[arg-type]
    # NumPy scalars and 0-d arrays are numbers; a NaN trial is a rejection
    res = dl.armijo_backtracking(
        lambda a: np.float32(0.0) if a < 0.5 else np.float64(np.nan), np.float64(1.0),
        np.float32(-1.0), max_trials=np.int64(5), c1=np.float32(0.4),
    )  # fmt: skip
    assert res.accepted and res.trials == 2 and res.alpha == pytest.approx(0.4)
    assert dl.armijo_condition(np.float32(0.0), 1.0, np.float64(1.0), -1.0)
    assert not dl.armijo_condition(float("inf"), 1.0, 1.0, -1.0)


def test_centred_gram_and_subspace_refuse_non_finite(backend):
    X = trajectory(4, 6, 30, 2)
    Xb = backend.asarray(X, "float64")
    bad = np.eye(4)
    bad[0, 0] = np.inf
    with pytest.raises(NonFiniteError):
        dl.centred_gram(backend.asarray(bad, "float64"))
    sub = dl.fit_subspace(Xb, 2)
    w_nan = X[1].copy()
    w_nan[3] = np.nan
    wb = backend.asarray(w_nan, "float64")
    cb = backend.asarray([np.nan, 1.0], "float64")
    before = snapshot(backend, wb, cb)
    for call in (
        lambda: sub.project(wb),
        lambda: sub.project_direction(wb),
        lambda: sub.project(Xb[1, :], origin=wb),
        lambda: sub.lift(cb),
        lambda: sub.lift_direction(cb),
        lambda: sub.lift(backend.asarray([1.0, 1.0], "float64"), origin=wb),
    ):
        with pytest.raises(NonFiniteError):
            call()
    assert_unchanged(backend, before, wb, cb)
    for call in (
        lambda: sub.project(Xb[:, :5]),
        lambda: sub.project_direction(backend.asarray(np.ones((2, 3, 30)), "float64")),
        lambda: sub.lift(backend.asarray(np.ones((2, 3)), "float64")),
        lambda: sub.lift_direction(backend.asarray(np.ones(()), "float64")),
        lambda: sub.project(Xb[1, :], origin=Xb),
    ):
        with pytest.raises(ShapeError):
            call()
    # opting out of the check keeps the old pass-through (for hot loops that check elsewhere)
    assert np.isnan(to_np(backend, sub.project_direction(wb, check_finite=False))).all()
    with pytest.raises(ParameterTypeError):
        sub.project(Xb[1, :], check_finite="no")  # type: ignore[arg-type]


def test_counts_refuse_floats_and_bools_accept_numpy_integers(backend):
    X = trajectory(5, 10, 40, 2)
    Xb = backend.asarray(X, "float64")
    for d in (2.5, True, 2.0, "2", None):
        with pytest.raises(RankError):
            dl.fit_subspace(Xb, d)  # type: ignore[arg-type]
    assert dl.fit_subspace(Xb, np.int64(2)).d == 2
    for kw in ({"oversample": 2.5}, {"power_iterations": True}, {"seed": 1.5},
               {"check_finite": 1}, {"orthonormalize": None}):  # fmt: skip
        with pytest.raises(ParameterError):
            dl.fit_subspace(Xb, 2, method="randomized", **kw)  # type: ignore[arg-type]
    sub = dl.fit_subspace(
        Xb, np.int32(2), method="randomized", oversample=np.int64(3), power_iterations=np.int8(1)
    )
    assert sub.d == 2
    assert dl.curvature_ok(Xb[0, :], Xb[0, :], eps=np.float32(1e-6))


# --------------------------------------------------------------------------------------------------
# JAX readiness: immutable arrays, float64 only with jax_enable_x64
# --------------------------------------------------------------------------------------------------
def test_fit_subspace_and_store_run_on_jax_arrays():
    """Issue 9 (for issue 11): fit_subspace wrote into its result in place, which JAX arrays refuse."""
    jnp = pytest.importorskip("jax.numpy")
    X = trajectory(0, 10, 300, 3).astype(np.float32)
    Xj = jnp.asarray(X)
    want = dl.fit_subspace(X, 3)
    store = dl.SnapshotStore()
    for i in range(10):
        store.add(Xj[i])
    for sub in (dl.fit_subspace(Xj, 3), store.fit(3)):
        for name in ("centre", "basis", "explained_variance"):
            assert type(getattr(sub, name)).__module__.startswith("jax"), name
        np.testing.assert_allclose(np.asarray(sub.basis), want.basis, atol=1e-6)
        np.testing.assert_allclose(np.asarray(sub.centre), want.centre, rtol=1e-6)
        c = sub.project(Xj[1])
        assert type(c).__module__.startswith("jax")
        np.testing.assert_allclose(
            np.asarray(sub.lift(c)), want.lift(want.project(X[1])), atol=1e-5
        )
    rnd = dl.fit_subspace(Xj, 3, method="randomized")
    assert min_cosine(np.asarray(rnd.basis, np.float64), want.basis.astype(np.float64)) >= 0.999


def test_extreme_scales_fit_or_refuse_clearly(backend):
    """Scale invariance where the numbers allow it; a clear error where variances cannot be
    represented (|w| ~ 1e160 squares beyond float64), never NaN or a LinAlgError."""
    X = trajectory(6, 8, 60, 2)
    want = dl.fit_subspace(backend.asarray(X, "float64"), 2)
    for scale, dtype in (
        (1e-150, "float64"),
        (1e100, "float64"),
        (1e15, "float32"),
        (1e-15, "float32"),
    ):
        Xb = backend.asarray(X * scale, dtype)
        sub = dl.fit_subspace(Xb, 2)
        assert min_cosine(to_np(backend, sub.basis), to_np(backend, want.basis)) >= 0.999
        assert np.all(np.isfinite(to_np(backend, sub.explained_variance)))
    huge = backend.asarray(X * 1e160, "float64")
    before = snapshot(backend, huge)
    for call in (
        lambda: dl.fit_subspace(huge, 2),
        lambda: dl.fit_subspace(huge, 2, method="randomized"),
        lambda: dl.gram_matrix(huge),
        lambda: dl.fit_subspace(backend.asarray(X * 1e20, "float32"), 2),  # variance > float32 max
    ):
        with pytest.raises(NonFiniteError, match="overflow in"):
            call()
    assert_unchanged(backend, before, huge)
    store = dl.SnapshotStore()
    store.add(huge[0, :])
    with pytest.raises(NonFiniteError, match="overflow in"):
        store.add(huge[1, :])
    assert len(store) == 1


@pytest.mark.parametrize("factor", [1e-200, 1e-150, 1.0, 1e150])
@pytest.mark.parametrize("scaled", ["s", "y"])
def test_bfgs_update_at_extreme_scales_of_the_step(backend, factor, scaled):
    """A valid pair with a tiny step s: rho = 1/(s.y) is huge, rho^2 overflowed while s s^T underflowed
    (Inf * 0 = NaN in every entry); a tiny y makes t t^T (t = s / s.y) overflow although the result
    s s^T / s.y is representable. The update equals the reference's at every scale where it is
    representable."""
    H = np.eye(3)
    s = np.array([1.0, 0.5, -0.25]) * (factor if scaled == "s" else 1.0)
    y = np.array([2.0, 1.0, 0.5]) * (factor if scaled == "y" else 1.0)
    Hn, updated = dl.bfgs_update(backend.asarray(H), backend.asarray(s), backend.asarray(y))
    assert updated is True
    got = backend.to_numpy(Hn)
    assert np.all(np.isfinite(got))
    # the reference in units where s is O(1): H+ is affine in the scale of s (H+ = H + O(s/s.y))
    with np.errstate(all="ignore"):
        want, _ = ref.bfgs_update(H, s, y)
    if np.all(np.isfinite(want)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.max(np.abs(want)))
    # secant equation, up to the rounding of the product H+ y (eps |H+| |y|, not relative to s)
    bound = 1e-13 * np.max(np.abs(got)) * np.max(np.abs(y))
    np.testing.assert_allclose(got @ y, s, rtol=1e-10, atol=bound)
