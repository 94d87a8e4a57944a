"""DLDR core (lowrank_core.dldr) against the NumPy reference (lowrank_reference.dldr), every backend."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _helpers import assert_in_library, assert_unchanged, eps, random_orthogonal, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

import lowrank_core.dldr as dl
import lowrank_reference.dldr as ref
from lowrank_core.errors import (
    ArrayTypeError,
    DTypeError,
    LowRankError,
    NonFiniteError,
    RankError,
    ShapeError,
)

FAST = settings(max_examples=12, deadline=None)
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
    t, D, d = size
    X = trajectory(seed, t, D, d)
    Xb = backend.asarray(X, "float32")
    mem = dl.SnapshotStore()
    disk = dl.SnapshotStore(path=tmp_path / f"m{seed}.dat")
    for i in range(t):
        mem.add(Xb[i, :])
        disk.add(Xb[i, :])
    np.testing.assert_array_equal(mem.gram(), disk.gram())
    for i in (0, t // 2, t - 1):
        np.testing.assert_array_equal(
            to_np(backend, mem.snapshot(i)), to_np(backend, disk.snapshot(i))
        )
        assert_in_library(disk.vector(i), Xb[0, :])
    a, b = mem.fit(d), disk.fit(d)
    np.testing.assert_array_equal(to_np(backend, a.basis), to_np(backend, b.basis))
    assert disk.nbytes == mem.nbytes == t * D * 4
    disk.close()


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
    with pytest.raises(ValueError, match="descent"):
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
    with pytest.raises(RankError, match="non-zero variance"):
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
