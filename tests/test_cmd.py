"""CMD (lowrank_core.cmd) over every backend, against the NumPy/SciPy reference (lowrank_reference.cmd)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from _helpers import assert_in_library, assert_unchanged, snapshot
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import lowrank_core.cmd as cmd
from lowrank_core.errors import (
    ArrayTypeError,
    DTypeError,
    NonFiniteError,
    RankError,
    ShapeError,
)
from lowrank_reference import cmd as ref

seeds = st.integers(0, 2**32 - 1)
FEW = settings(max_examples=15)


def partition(labels) -> set[frozenset[int]]:
    """A labelling as a set of blocks: equal partitions compare equal whatever the label numbers."""
    blocks: dict[int, set[int]] = {}
    for i, lab in enumerate(np.asarray(labels).tolist()):
        blocks.setdefault(int(lab), set()).add(i)
    return {frozenset(b) for b in blocks.values()}


def modal_trajectory(
    rng: np.random.Generator, n: int, t: int, modes: int, noise: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows ``a r_mode(t) + b (+ noise)`` with ``modes`` mutually orthogonal, non-constant profiles."""
    q, _ = np.linalg.qr(rng.standard_normal((t, modes)))
    prof = (q - q.mean(axis=0)).T * 3.0 + rng.standard_normal((modes, 1))
    mode = rng.integers(0, modes, size=n)
    mode[:modes] = np.arange(modes)  # every mode used
    a = rng.uniform(0.5, 2.0, n) * rng.choice([-1.0, 1.0], n)
    b = rng.standard_normal(n)
    x = a[:, None] * prof[mode] + b[:, None]
    if noise:
        x = x + noise * rng.standard_normal(x.shape)
    return x, prof, mode


def random_distance(rng: np.random.Generator, k: int) -> np.ndarray:
    d = rng.uniform(0.0, 1.0, (k, k))
    d = (d + d.T) / 2.0
    np.fill_diagonal(d, 0.0)
    return d


# ---------------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------------
@given(
    sizes=st.lists(st.integers(0, 400), min_size=1, max_size=6).filter(lambda s: sum(s) > 0),
    k=st.integers(1, 600),
    seed=seeds,
)
def test_sample_indices_stratified_and_deterministic(sizes, k, seed):
    idx = cmd.sample_indices(sizes, k, seed=seed)
    np.testing.assert_array_equal(idx, cmd.sample_indices(sizes, k, seed=seed))
    np.testing.assert_array_equal(idx, ref.cmd_sample_indices(sizes, k, seed=seed))
    assert idx.dtype == np.int64
    assert len(np.unique(idx)) == idx.size and np.all(np.diff(idx) > 0)
    n = sum(sizes)
    assert idx.size <= min(k, n) or k >= n
    bounds = np.cumsum([0, *sizes])
    per = np.histogram(idx, bins=bounds)[0] if idx.size else np.zeros(len(sizes))
    for seg, (n_l, got) in enumerate(zip(sizes, per, strict=True)):
        if k >= n:
            assert got == n_l
        else:
            want = min(n_l, min(k // (2 * len(sizes)), n_l) + math.floor(n_l / n * k / 2))
            assert got == want, (seg, n_l, got, want)


def test_sample_indices_bad_input():
    with pytest.raises(RankError):
        cmd.sample_indices([10], 0)
    with pytest.raises(TypeError):
        cmd.sample_indices([1.5], 3)
    with pytest.raises(ValueError, match="positive total"):
        cmd.sample_indices([0, 0], 3)


# ---------------------------------------------------------------------------------------------------
# correlation and clustering
# ---------------------------------------------------------------------------------------------------
@FEW
@given(k=st.integers(2, 20), t=st.integers(2, 12), seed=seeds)
def test_abs_correlation_matches_reference(backend, dtype, k, t, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((k, t))
    x[0] = 1.5  # a constant row: correlation 0 with everything
    xa = backend.asarray(x, dtype)
    before = snapshot(backend, xa)
    c = cmd.abs_correlation(xa)
    assert_in_library(c, xa)
    assert_unchanged(backend, before, xa)
    tol = 1e-12 if dtype == "float64" else 1e-5
    np.testing.assert_allclose(backend.to_numpy(c), ref.cmd_abs_correlation(x), atol=tol)


@settings(max_examples=30)
@given(k=st.integers(1, 24), data=st.data(), seed=seeds)
def test_cluster_matches_scipy(backend, dtype, k, data, seed):
    m = data.draw(st.integers(1, k), label="max_clusters")
    d = backend.asarray(random_distance(np.random.default_rng(seed), k), dtype)
    d_host = backend.to_numpy(d).astype(np.float64)
    upper = d_host[np.triu_indices(k, 1)]
    assume(len(np.unique(upper)) == upper.size)  # no ties: the partition is then unique
    labels = cmd.cluster(d, m)
    assert_in_library(labels, d, dtype="int64")
    got = backend.to_numpy(labels)
    want = ref.cmd_cluster(d_host, m)
    assert partition(got) == partition(want)
    np.testing.assert_array_equal(got, want)  # same numbering too (by size, then smallest member)
    assert len(set(got.tolist())) == min(m, k)


@FEW
@given(k=st.integers(1, 16), seed=seeds, ties=st.booleans())
def test_linkage_is_array_api_code_with_identical_results_in_every_library(
    backend, dtype, k, seed, ties
):
    # the public functions run the loop on a host copy for speed; the loop itself is array-API code,
    # and in the backend's own namespace it gives the very same merges and heights
    d = random_distance(np.random.default_rng(seed), k)
    if ties:
        d = np.round(d * 3) / 3  # many exactly equal distances
    da = backend.asarray(d, dtype)
    merges, heights = cmd._linkage(backend.xp, da)
    host_merges, host_heights = cmd._host_linkage(da)
    np.testing.assert_array_equal(merges, host_merges)
    np.testing.assert_array_equal(heights, host_heights)
    assert np.all(np.diff(heights) >= 0)  # complete linkage: no inversions


def test_cluster_ties_are_deterministic_and_documented(backend):
    # all distances equal: every merge happens at the same height, so any cut below K merges them all
    d = np.ones((5, 5)) - np.eye(5)
    for m in (1, 2, 4):
        labels = backend.to_numpy(cmd.cluster(backend.asarray(d), m))
        np.testing.assert_array_equal(labels, np.zeros(5))
        np.testing.assert_array_equal(labels, ref.cmd_cluster(d, m))
    np.testing.assert_array_equal(
        backend.to_numpy(cmd.cluster(backend.asarray(d), 5)), np.arange(5)
    )
    # a chain 0-1-2 with d(0,1) == d(1,2): the first pair in row-major order, (0, 1), merges first
    d = np.array([[0.0, 1.0, 2.0], [1.0, 0.0, 1.0], [2.0, 1.0, 0.0]])
    got = backend.to_numpy(cmd.cluster(backend.asarray(d), 2))
    assert partition(got) == {frozenset({0, 1}), frozenset({2})}
    assert partition(got) == partition(ref.cmd_cluster(d, 2))


@FEW
@given(seed=seeds, modes=st.integers(1, 4), metric=st.sampled_from(["correlation", "euclidean"]))
def test_fit_cmd_matches_reference(backend, dtype, seed, modes, metric):
    rng = np.random.default_rng(seed)
    x, _, _ = modal_trajectory(rng, 60, 12, modes, noise=0.02)
    xa = backend.asarray(x, dtype)
    before = snapshot(backend, xa)
    fit = cmd.fit_cmd(xa, modes, sizes=[20, 40], num_samples=30, seed=seed, metric=metric)
    assert_unchanged(backend, before, xa)
    want = ref.cmd_fit(x, modes, sample=fit.sample, metric=metric)
    np.testing.assert_array_equal(fit.sample, ref.cmd_sample_indices([20, 40], 30, seed))
    labels = backend.to_numpy(fit.labels)
    assert partition(labels) == partition(want["labels"])
    # the reference of each cluster: the reference's choice, or (float32) one whose score ties it
    c = ref.cmd_abs_correlation(x[fit.sample])
    slack = 1e-9 if dtype == "float64" else 1e-4 * fit.sample.size
    pos = {int(g): i for i, g in enumerate(fit.sample)}
    for m, (got_ref, want_ref) in enumerate(zip(fit.references, want["references"], strict=True)):
        members = np.flatnonzero(labels == m)
        score = {int(i): c[i, members].sum() - c[i, i] for i in members}
        assert score[pos[int(got_ref)]] >= score[pos[int(want_ref)]] - slack
        top = sorted(score.values())
        if dtype == "float64" and (len(top) == 1 or top[-1] - top[-2] > 1e-12):
            assert got_ref == want_ref
    # assignment and coefficients given the chosen references
    refs = fit.references
    np.testing.assert_array_equal(backend.to_numpy(fit.assignment), ref.cmd_assign(x, x[refs]))
    ra, rb = ref.cmd_lstsq(x, x[refs], ref.cmd_assign(x, x[refs]))
    tol = 1e-10 if dtype == "float64" else 2e-4
    for name, desired in (("profiles", x[refs]), ("a", ra), ("b", rb)):
        arr = getattr(fit, name)
        assert_in_library(arr, xa, what=name)
        np.testing.assert_allclose(backend.to_numpy(arr), desired, rtol=tol, atol=tol)
    assert_in_library(fit.assignment, xa, dtype="int64")


# ---------------------------------------------------------------------------------------------------
# assignment, least squares, reconstruction
# ---------------------------------------------------------------------------------------------------
@FEW
@given(seed=seeds, n=st.integers(1, 80), t=st.integers(4, 10), modes=st.integers(1, 4),
       chunk=st.integers(1, 30))  # fmt: skip
def test_chunked_equals_unchunked(backend, dtype, seed, n, t, modes, chunk):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, t))
    p = rng.standard_normal((modes, t))
    xa, pa = backend.asarray(x, dtype), backend.asarray(p, dtype)
    whole = cmd.assign_modes(xa, pa, chunk_size=n)
    parts = cmd.assign_modes(xa, pa, chunk_size=chunk)
    # rows whose best and second-best |corr| are closer than rounding may legitimately differ
    corr = np.sort(np.abs(ref.cmd_abs_correlation(np.vstack([x, p]))[:n, n:]), axis=1)
    clear = corr[:, -1] - (corr[:, -2] if modes > 1 else 0.0) > 1e-4
    got_whole, got_parts = backend.to_numpy(whole), backend.to_numpy(parts)
    np.testing.assert_array_equal(got_parts[clear], got_whole[clear])
    np.testing.assert_array_equal(got_whole[clear], ref.cmd_assign(x, p)[clear])
    a1, b1 = cmd.fit_coefficients(xa, pa, whole, chunk_size=n)
    a2, b2 = cmd.fit_coefficients(xa, pa, whole, chunk_size=chunk)
    tol = 1e-12 if dtype == "float64" else 1e-5
    np.testing.assert_allclose(backend.to_numpy(a2), backend.to_numpy(a1), rtol=tol, atol=tol)
    np.testing.assert_allclose(backend.to_numpy(b2), backend.to_numpy(b1), rtol=tol, atol=tol)
    ra, rb = ref.cmd_lstsq(x, p, backend.to_numpy(whole))
    tol = 1e-9 if dtype == "float64" else 5e-3
    np.testing.assert_allclose(backend.to_numpy(a1), ra, rtol=tol, atol=tol)
    np.testing.assert_allclose(backend.to_numpy(b1), rb, rtol=tol, atol=tol)


@FEW
@given(seed=seeds, modes=st.integers(1, 5), t=st.integers(6, 15))
def test_reconstruction_exact_for_affine_trajectories(backend, dtype, seed, modes, t):
    rng = np.random.default_rng(seed)
    x, _, mode = modal_trajectory(rng, 50, t, modes)
    xa = backend.asarray(x, dtype)
    fit = cmd.fit_cmd(xa, modes, num_samples=50, seed=seed)
    assert fit.num_modes == modes
    assert partition(backend.to_numpy(fit.assignment)) == partition(mode)
    rec = fit.reconstruct()
    assert_in_library(rec, xa)
    tol = 1e-10 if dtype == "float64" else 2e-4
    scale = np.abs(x).max()
    np.testing.assert_allclose(backend.to_numpy(rec), x, atol=tol * scale)
    assert cmd.relative_error(xa, fit) <= 50 * tol
    # and the automatic choice finds exactly the true number of modes at any tolerance below the gap
    assert cmd.choose_num_modes(xa, 1e-3 if dtype == "float32" else 1e-8) == modes


@FEW
@given(seed=seeds, tols=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=5))
def test_auto_modes_monotone_in_tolerance(backend, dtype, seed, tols):
    rng = np.random.default_rng(seed)
    x, _, _ = modal_trajectory(rng, 25, 10, 4, noise=0.3)
    xa = backend.asarray(x, dtype)
    chosen = [cmd.choose_num_modes(xa, tol, max_modes=10) for tol in sorted(tols)]
    assert all(m1 >= m2 for m1, m2 in itertools.pairwise(chosen)), chosen
    assert cmd.choose_num_modes(xa, 1.0) == 1
    # the chosen M meets the tolerance (unless it is the cap)
    for tol, m in zip(sorted(tols), chosen, strict=True):
        if m < 10:
            fit = cmd.fit_cmd(xa, m, num_samples=25)
            assert cmd.relative_error(xa, fit) <= tol + 1e-5


def test_fit_cmd_with_tol_picks_m(backend):
    x, _, _ = modal_trajectory(np.random.default_rng(3), 40, 10, 3)
    fit = cmd.fit_cmd(backend.asarray(x), tol=1e-6, num_samples=40)
    assert fit.num_modes == 3
    with pytest.raises(ValueError, match="not both"):
        cmd.fit_cmd(backend.asarray(x), 3, tol=0.1)


# ---------------------------------------------------------------------------------------------------
# online CMD
# ---------------------------------------------------------------------------------------------------
@FEW
@given(seed=seeds, warm=st.integers(2, 6), extra=st.integers(1, 8), modes=st.integers(1, 3))
def test_online_update_equals_batch_least_squares(backend, dtype, seed, warm, extra, modes):
    rng = np.random.default_rng(seed)
    x, _, _ = modal_trajectory(rng, 40, warm + extra, modes, noise=0.1)
    x = x + np.linspace(0.0, 1.0, warm + extra)  # a common drift, so the means move
    xa = backend.asarray(x, dtype)
    online = cmd.OnlineCMD.from_trajectory(xa[:, :warm], modes, num_samples=40, seed=seed)
    refs = online.references
    assignment = backend.to_numpy(online.assignment)
    for t in range(warm, warm + extra + 1):
        if t > warm:
            online.update(xa[:, t - 1])
        assert online.epochs == t
        a, b = online.coefficients()
        assert_in_library(a, xa)
        ra, rb = ref.cmd_lstsq(x[:, :t], x[refs, :t], assignment)
        scale = 1.0 + np.abs(ra)
        tol = 1e-8 if dtype == "float64" else 2e-2
        np.testing.assert_allclose(backend.to_numpy(a), ra, atol=tol * scale.max())
        np.testing.assert_allclose(backend.to_numpy(b), rb, atol=tol * (1 + np.abs(rb).max()))
        np.testing.assert_allclose(
            backend.to_numpy(online.weights()),
            ref.cmd_reconstruct(x[refs, :t], assignment, ra, rb)[:, -1],
            atol=tol * (1 + np.abs(x).max()),
        )
    np.testing.assert_allclose(backend.to_numpy(online.profiles), x[refs], atol=0)


def test_online_memory_is_constant_but_for_the_profiles(backend):
    x, _, _ = modal_trajectory(np.random.default_rng(0), 100, 40, 3, noise=0.1)
    xa = backend.asarray(x)
    online = cmd.OnlineCMD.from_trajectory(xa[:, :5], 3, num_samples=50)
    sizes = []
    for t in range(5, 40):
        online.update(xa[:, t])
        sizes.append(online.nbytes() - online.num_modes * online.epochs * 8)
    assert len(set(sizes)) == 1
    # 2N float64 + N int32 assignment + O(M)
    assert sizes[0] <= (2 * 8 + 4) * 100 + 64 * online.num_modes


def test_online_state_dict_roundtrip(backend):
    x, _, _ = modal_trajectory(np.random.default_rng(1), 30, 12, 2, noise=0.1)
    xa = backend.asarray(x)
    online = cmd.OnlineCMD.from_trajectory(xa[:, :6], 2, num_samples=30)
    online.update(xa[:, 6])
    again = cmd.OnlineCMD.from_state_dict(online.state_dict())
    for t in range(7, 12):
        online.update(xa[:, t])
        again.update(xa[:, t])
    for u, v in zip(online.coefficients(), again.coefficients(), strict=True):
        np.testing.assert_array_equal(backend.to_numpy(u), backend.to_numpy(v))
    with pytest.raises(KeyError, match="missing"):
        cmd.OnlineCMD.from_state_dict({"profiles": online.profiles})


def test_select_embedding(backend):
    rng = np.random.default_rng(0)
    n = 20
    a, b = rng.standard_normal(n), rng.standard_normal(n)
    d = rng.uniform(0.1, 1.0, n)
    a_prev = a - d  # |change| = d exactly along a
    embedded = np.zeros(n, dtype=bool)
    embedded[3] = True
    refs = np.array([int(np.argmin(d))])  # the most settled parameter is a reference: never chosen
    args = [backend.asarray(v) for v in (a, b, a_prev, b)]
    mask = cmd.select_embedding(*args, backend.asarray(embedded, "bool"), refs, 0.2)
    got = backend.to_numpy(mask)
    order = [i for i in np.argsort(d, kind="stable") if i not in (3, refs[0])]
    want = embedded.copy()
    want[order[:4]] = True  # ceil(0.2 * 20) = 4 new ones
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="fraction"):
        cmd.select_embedding(*args, backend.asarray(embedded, "bool"), refs, 0.0)


# ---------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------
def test_errors(backend):
    rng = np.random.default_rng(0)
    x = backend.asarray(rng.standard_normal((8, 5)))
    for bad in (np.nan, np.inf):
        y = rng.standard_normal((8, 5))
        y[2, 3] = bad
        with pytest.raises(NonFiniteError, match="NaN or Inf"):
            cmd.fit_cmd(backend.asarray(y), 2)
        with pytest.raises(NonFiniteError):
            cmd.abs_correlation(backend.asarray(y))
        with pytest.raises(NonFiniteError):
            cmd.assign_modes(backend.asarray(y), x[:2, :], chunk_size=3)
    with pytest.raises(ShapeError, match="2-D"):
        cmd.fit_cmd(x[0, :], 2)
    with pytest.raises(ShapeError, match="at least 2 epochs"):
        cmd.fit_cmd(x[:, :1], 2)
    with pytest.raises(ShapeError, match="same number of epochs"):
        cmd.assign_modes(x, x[:2, :3])
    with pytest.raises(ShapeError, match="sum to"):
        cmd.fit_cmd(x, 2, sizes=[3, 3])
    with pytest.raises(DTypeError, match="floating"):
        cmd.fit_cmd(backend.asarray(np.ones((8, 5)), "int64"), 2)
    with pytest.raises(RankError, match="max_modes"):
        cmd.fit_cmd(x, 0)
    with pytest.raises(RankError, match="max_modes"):
        cmd.fit_cmd(x, 9)  # K = 8 sampled rows
    with pytest.raises(RankError):
        cmd.fit_cmd(x, True)  # type: ignore[arg-type]
    with pytest.raises(RankError):
        cmd.cluster(backend.asarray(np.zeros((3, 3))), 4)
    with pytest.raises(ShapeError, match="square"):
        cmd.cluster(x, 2)
    with pytest.raises(ValueError, match="metric"):
        cmd.find_modes(x, 2, metric="cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_size"):
        cmd.assign_modes(x, x[:2, :], chunk_size=0)
    with pytest.raises(ValueError, match="tol"):
        cmd.choose_num_modes(x, 1.5)
    other = np.ones((2, 5)) if backend.name != "numpy" else None
    if other is None:
        xps = pytest.importorskip("array_api_strict")
        other = xps.ones((2, 5), dtype=xps.float64)
    with pytest.raises(ArrayTypeError, match="different libraries"):
        cmd.assign_modes(x, other)
    with pytest.raises(ArrayTypeError, match="must be an array"):
        cmd.fit_cmd([[1.0, 2.0], [3.0, 4.0]], 1)
    online = cmd.OnlineCMD.from_trajectory(x, 2)
    with pytest.raises(ShapeError, match="weights"):
        online.update(x[:3, 0])
    with pytest.raises(NonFiniteError):
        online.update(backend.asarray(np.full(8, np.nan)))
    with pytest.raises(IndexError):
        online.weights(epoch=5)
