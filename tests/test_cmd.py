"""CMD (lowrank_core.cmd) over every backend, against the NumPy/SciPy reference (lowrank_reference.cmd)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from _helpers import assert_in_library, assert_unchanged, examples, snapshot
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import lowrank_core.cmd as cmd
from lowrank_core.cmd.linkage import _host_linkage, _linkage_scan
from lowrank_core.errors import (
    ArrayTypeError,
    DTypeError,
    LowRankError,
    NonFiniteError,
    ParameterError,
    ParameterTypeError,
    RankError,
    ShapeError,
)
from lowrank_reference import cmd as ref

seeds = st.integers(0, 2**32 - 1)
FEW = settings(max_examples=examples(15))


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
    assert idx.size == min(k, n)  # exactly K (topped up), or everything
    bounds = np.cumsum([0, *sizes])
    per = np.histogram(idx, bins=bounds)[0] if idx.size else np.zeros(len(sizes))
    for seg, (n_l, got) in enumerate(zip(sizes, per, strict=True)):
        if k >= n:
            assert got == n_l
        else:
            # at least the paper's share; the top-up only adds
            paper = min(n_l, min(k // (2 * len(sizes)), n_l) + math.floor(n_l / n * k / 2))
            assert paper <= got <= n_l, (seg, n_l, got, paper)


@pytest.mark.parametrize(
    "sizes", [[4096, 64, 640, 10], [6400, 10, 1000, 10], [2048, 32, 512, 16, 160, 10], [5000]]
)
def test_sample_indices_tops_up_to_exactly_k(sizes):
    # regression: flooring and small tensors left the paper's counts short (815 of 1000 for an MLP)
    idx = cmd.sample_indices(sizes, 1000, seed=3)
    assert idx.size == 1000
    assert np.unique(idx).size == 1000 and idx.min() >= 0 and idx.max() < sum(sizes)


def test_sample_indices_bad_input():
    with pytest.raises(RankError):
        cmd.sample_indices([10], 0)
    with pytest.raises(ParameterTypeError):
        cmd.sample_indices([1.5], 3)
    with pytest.raises(ParameterError, match="positive total"):
        cmd.sample_indices([0, 0], 3)
    for bad_k in (2.5, True, "3", None, np.float64(3.0)):
        with pytest.raises(RankError):
            cmd.sample_indices([10], bad_k)
    for bad_seed in (-1, 1.5, "0", True):
        with pytest.raises(ParameterError, match="seed"):
            cmd.sample_indices([10], 3, seed=bad_seed)
    for bad_sizes in ("10", [], [3, -1], [True, 2], {3}, np.array([3, 4])):
        with pytest.raises(ParameterError):
            cmd.sample_indices(bad_sizes, 3)
    # NumPy integer scalars are integers
    np.testing.assert_array_equal(
        cmd.sample_indices([np.int64(10), 20], np.int64(7), seed=np.int64(2)),
        cmd.sample_indices([10, 20], 7, seed=2),
    )


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


@settings(max_examples=examples(30))
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


@settings(max_examples=examples(60))
@given(k=st.integers(1, 40), seed=seeds, ties=st.booleans())
def test_linkage_equals_the_plain_scan_in_every_library(backend, dtype, k, seed, ties):
    # the public functions run the loop on a host copy for speed; the loop itself is array-API code,
    # and in the backend's own namespace it gives the very same merges and heights
    # the linkage runs on a private host copy: the same merges and heights from every library, and the
    # caller's array is not written
    d = random_distance(np.random.default_rng(seed), k)
    if ties:
        d = np.round(d * 3) / 3  # many exactly equal distances
    da = backend.asarray(d, dtype)
    before = snapshot(backend, da)
    merges, heights = _linkage_scan(backend.to_numpy(da))  # the plain O(K^3) definition
    host_merges, host_heights = _host_linkage(da)  # the O(K^2) one the library uses
    assert_unchanged(backend, before, da)
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
@given(
    seed=seeds,
    modes=st.integers(1, 4),
    metric=st.sampled_from(["correlation", "euclidean"]),
    frozen=st.booleans(),
)
def test_fit_cmd_matches_reference(backend, dtype, seed, modes, metric, frozen):
    rng = np.random.default_rng(seed)
    x, _, _ = modal_trajectory(rng, 60, 12, modes, noise=0.02)
    if frozen:  # never-moving parameters: out of the clustering, a = 0, b = their value
        x[[7, 30, 45]] = rng.standard_normal((3, 1))
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


def centroid_reference(x: np.ndarray, fit: cmd.CMDFit, warm: int) -> np.ndarray:
    """The centroid profiles ``(M, T)`` of ``fit``'s sample clusters (float64, independent of the
    library): per cluster, the mean of its sampled members' rows, each minus its warm-up mean, divided
    by its warm-up centred norm and signed by its warm-up correlation with the cluster's reference."""
    labels = np.asarray(fit.labels)
    out = np.zeros((fit.num_modes, x.shape[1]))
    for m, r in enumerate(np.asarray(fit.references)):
        rw = x[r, :warm] - x[r, :warm].mean()
        for j in fit.sample[labels == m]:
            d = x[j] - x[j, :warm].mean()
            norm = np.linalg.norm(d[:warm])
            out[m] += (-1.0 if d[:warm] @ rw < 0 else 1.0) * d / norm
        out[m] /= max(1, int((labels == m).sum()))
    return out


@FEW
@given(seed=seeds, warm=st.integers(3, 6), extra=st.integers(1, 8), modes=st.integers(1, 3))
def test_online_centroid_update_equals_batch_least_squares(
    backend, dtype, seed, warm, extra, modes
):
    rng = np.random.default_rng(seed)
    x, _, _ = modal_trajectory(rng, 40, warm + extra, modes, noise=0.1)
    x = x + np.linspace(0.0, 1.0, warm + extra)  # a common drift, so the means move
    xa = backend.asarray(x, dtype)
    fit = cmd.fit_cmd(xa[:, :warm], modes, num_samples=40, seed=seed)
    online = cmd.OnlineCMD.from_fit(xa[:, :warm], fit, profile="centroid")
    assert online.profile == "centroid"
    np.testing.assert_array_equal(online.references, fit.references)
    x64 = backend.to_numpy(xa).astype(np.float64)  # the data the library saw (float32 rounded)
    prof = centroid_reference(x64, fit, warm)
    tol = 1e-8 if dtype == "float64" else 2e-2
    # the assignment: largest warm-up |corr| with the centroid profiles, unless two modes nearly tie
    assignment = backend.to_numpy(online.assignment)
    u = x64[:, :warm] - x64[:, :warm].mean(axis=1, keepdims=True)
    p = prof[:, :warm] - prof[:, :warm].mean(axis=1, keepdims=True)
    c = np.abs(u @ p.T) / np.outer(np.linalg.norm(u, axis=1), np.linalg.norm(p, axis=1))
    best = c.max(axis=1)
    assert np.all(c[np.arange(40), assignment] >= best - 10 * tol)
    for t in range(warm, warm + extra + 1):
        if t > warm:
            online.update(xa[:, t - 1])
        assert online.epochs == t
        # the profiles are the centroids up to one offset per mode (which no fit depends on)
        got = backend.to_numpy(online.profiles).astype(np.float64)
        off = (got - prof[:, :t]).mean(axis=1, keepdims=True)
        np.testing.assert_allclose(got, prof[:, :t] + off, atol=tol * (1 + np.abs(prof).max()))
        a, b = online.coefficients()
        assert_in_library(a, xa)
        ra, rb = ref.cmd_lstsq(x64[:, :t], got, assignment)
        scale = 1.0 + np.abs(ra)
        np.testing.assert_allclose(backend.to_numpy(a), ra, atol=tol * scale.max())
        np.testing.assert_allclose(backend.to_numpy(b), rb, atol=tol * (1 + np.abs(rb).max()))
        np.testing.assert_allclose(
            backend.to_numpy(online.weights()),
            ref.cmd_reconstruct(got, assignment, ra, rb)[:, -1],
            atol=tol * (1 + np.abs(x).max()),
        )
    # a state dict round trip keeps the centroid state, and the next update is the same
    again = cmd.OnlineCMD.from_state_dict(online.state_dict())
    assert again.profile == "centroid"
    w = xa[:, -1] * 1.5
    online.update(w)
    again.update(w)
    np.testing.assert_array_equal(backend.to_numpy(online.c_wr), backend.to_numpy(again.c_wr))


def _online_error(x: np.ndarray, online: cmd.OnlineCMD, backend) -> float:
    model = backend.to_numpy(online.reconstruct()).astype(np.float64)
    c = x - x.mean(axis=1, keepdims=True)
    return float(np.linalg.norm(x - model) / np.linalg.norm(c))


@FEW
@given(seed=seeds, planted=st.integers(1, 4), warm=st.integers(6, 10), extra=st.integers(1, 10))
def test_online_centroid_error_never_grows_when_a_mode_is_added(
    backend, seed, planted, warm, extra
):
    """On a planted trajectory (``planted`` modes, no noise) the whole-run error of online CMD with
    centroid profiles never grows from ``M`` to ``M + 1`` modes: it falls to rounding level at the
    planted number and stays there for every larger ``M``."""
    rng = np.random.default_rng(seed)
    x, _, _ = modal_trajectory(rng, 60, warm + extra, planted)
    xa = backend.asarray(x)
    errors = []
    for m in range(1, planted + 3):
        online = cmd.OnlineCMD.from_trajectory(
            xa[:, :warm], m, num_samples=60, seed=seed, profile="centroid"
        )
        for t in range(warm, warm + extra):
            online.update(xa[:, t])
        errors.append(_online_error(x, online, backend))
    floor = 1e-9  # float64 rounding of an exact model, relative to the motion
    assert errors[planted - 1] <= floor, errors
    for m in range(len(errors) - 1):
        assert errors[m + 1] <= errors[m] + floor, errors


def test_online_centroid_profile_resists_a_departing_reference(backend):
    """A mode whose reference parameter departs from its warm-up shape afterwards: the published
    profile follows the reference and models the whole mode badly, the centroid profile does not."""
    rng = np.random.default_rng(0)
    warm, t = 10, 30
    x, _, _ = modal_trajectory(rng, 200, t, 2, noise=0.02)
    fit = cmd.fit_cmd(backend.asarray(x[:, :warm]), 2, num_samples=200, seed=0)
    for r in np.asarray(fit.references):  # every reference walks off on its own after the warm-up
        x[r, warm:] = x[r, warm - 1] + np.cumsum(rng.standard_normal(t - warm))
    xa = backend.asarray(x)
    errors = {}
    for kind in ("reference", "centroid"):
        online = cmd.OnlineCMD.from_fit(xa[:, :warm], fit, profile=kind)
        for k in range(warm, t):
            online.update(xa[:, k])
        errors[kind] = _online_error(x, online, backend)
    assert errors["centroid"] < 0.2 < errors["reference"], errors


def test_online_profile_option_is_checked(backend):
    x, _, _ = modal_trajectory(np.random.default_rng(0), 30, 8, 2)
    with pytest.raises(ParameterError, match="profile"):
        cmd.OnlineCMD.from_trajectory(backend.asarray(x), 2, profile="mean")
    online = cmd.OnlineCMD.from_trajectory(backend.asarray(x), 2, profile="centroid")
    state = online.state_dict()
    del state["mix"]
    with pytest.raises(ParameterError, match="mix"):
        cmd.OnlineCMD.from_state_dict(state)
    default = cmd.OnlineCMD.from_trajectory(backend.asarray(x), 2)
    assert default.profile == "reference"
    assert set(default.state_dict()) == {
        "references",
        "assignment",
        "profiles",
        "r_mean",
        "r_m2",
        "w_mean",
        "c_wr",
        "unit",
    }


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
    with pytest.raises(ParameterError, match="missing"):
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
    with pytest.raises(ParameterError, match="epoch"):
        online.weights(epoch=5)


# ---------------------------------------------------------------------------------------------------
# never-moving parameters (issue 9, defects 2 and 3)
# ---------------------------------------------------------------------------------------------------
def frozen_trajectory(
    seed: int, frozen: float, n: int = 1500, t: int = 100, modes: int = 4
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Planted modes (noise 0.02) with a share ``frozen`` of never-moving parameters, float32."""
    rng = np.random.default_rng(seed)
    x, _, mode = modal_trajectory(rng, n, t, modes, noise=0.02)
    still = rng.random(n) < frozen
    still[:modes] = False  # keep every planted mode
    x[still] = rng.standard_normal((int(still.sum()), 1))
    return x.astype(np.float32), mode, still


@pytest.mark.parametrize("frozen", [0.02, 0.1])
@pytest.mark.parametrize("metric", ["euclidean", "correlation"])
def test_never_moving_parameters_do_not_break_the_fit(backend, frozen, metric):
    # regression: rows constant up to rounding had |corr| ~ 1 with themselves and ~5 (unclipped) with
    # everything, became references, and gave |a| ~ 1e7..1e17 and an error worse than no model at all
    x, mode, still = frozen_trajectory(0, frozen)
    xa = backend.asarray(x, "float32")
    for m in (4, 10):
        fit = cmd.fit_cmd(xa, m, num_samples=400, seed=1, metric=metric)
        a, b = backend.to_numpy(fit.a), backend.to_numpy(fit.b)
        err = cmd.relative_error(xa, fit)
        # the noise floor of the planted data is ~0.058; the published code reaches 0.059
        assert err < 0.08, (m, err)
        assert np.abs(a).max() < 5.0  # planted |a| ratios are <= 4
        assert not np.isin(fit.references, np.flatnonzero(still)).any()  # never a reference
        np.testing.assert_array_equal(a[still], 0.0)
        np.testing.assert_array_equal(b[still], x[still, 0])  # reconstructed exactly
        labels = backend.to_numpy(fit.labels)
        np.testing.assert_array_equal(labels < 0, still[fit.sample])  # out of the clustering
    # with the true number of modes the planted partition is found exactly (ARI 1)
    fit = cmd.fit_cmd(xa, 4, num_samples=400, seed=1, metric=metric)
    assert fit.num_modes == 4
    got = backend.to_numpy(fit.assignment)
    assert partition(got[~still]) == partition(mode[~still])


def test_default_distance_does_not_collapse_to_one_mode(backend):
    # regression: with 1 - |corr| and constant rows in the sample, all final merges tied at 1.0 and
    # any M gave one mode; constant rows are now out of the clustering (and the default is the paper's)
    x, _, _ = frozen_trajectory(2, 0.05, n=600, t=40)
    xa = backend.asarray(x, "float32")
    for metric in ("correlation", "euclidean"):
        assert cmd.fit_cmd(xa, 4, num_samples=300, metric=metric).num_modes == 4
    assert cmd.DEFAULT_METRIC == "euclidean"
    assert cmd.choose_num_modes(xa[:300, :], 0.08, max_modes=10) == 4


def test_correlation_is_true_and_clipped_for_rounding_level_profiles(backend, dtype):
    # a profile constant up to rounding must not capture parameters (|corr| ~5 before), nor get a ~1e15
    rng = np.random.default_rng(4)
    t = 30
    moving = np.sin(np.linspace(0.0, 3.0, t))
    flat = 0.7 + np.zeros(t)
    flat[::7] = np.nextafter(np.asarray(0.7, dtype=dtype), 1.0)  # one ulp of "motion"
    x = np.stack([2.0 * moving + 1.0, -0.5 * moving + 3.0, np.full(t, 1.25)])
    x = x + 1e-3 * rng.standard_normal(x.shape)
    x[2] = 1.25
    p = np.stack([flat, moving])
    xa, pa = backend.asarray(x, dtype), backend.asarray(p, dtype)
    assignment = backend.to_numpy(cmd.assign_modes(xa, pa))
    np.testing.assert_array_equal(assignment, [1, 1, 0])
    a, b = cmd.fit_coefficients(xa, pa, backend.asarray(np.array([0, 1, 0]), "int64"))
    a, b = backend.to_numpy(a), backend.to_numpy(b)
    assert a[0] == 0.0 and a[2] == 0.0  # a rounding-level profile or row: a = 0
    assert abs(a[1] + 0.5) < 1e-2
    c = backend.to_numpy(cmd.abs_correlation(backend.asarray(np.vstack([x, p]), dtype)))
    assert c.max() <= 1.0 and c[2, 2] == 0.0 and c[3, 3] == 0.0


# ---------------------------------------------------------------------------------------------------
# scale invariance (issue 9, defect 8)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("exponent", [-1, 1])
def test_fit_is_scale_invariant(backend, dtype, exponent):
    # regression: fit_cmd(trajectory * 1e200) returned Inf (squares overflowed before normalizing)
    x, _, _ = modal_trajectory(np.random.default_rng(5), 80, 12, 3, noise=0.05)
    x[10] = 0.25  # a constant row too
    big = 2.0 ** (exponent * (660 if dtype == "float64" else 100))  # ~1e199 / ~1e30
    base = cmd.fit_cmd(backend.asarray(x, dtype), 3, num_samples=60)
    scaled_x = backend.asarray(x * big, dtype)
    fit = cmd.fit_cmd(scaled_x, 3, num_samples=60)
    np.testing.assert_array_equal(
        backend.to_numpy(fit.assignment), backend.to_numpy(base.assignment)
    )
    np.testing.assert_array_equal(fit.references, base.references)
    # powers of two: exact scaling, up to the order of the float operations (a few ulps)
    tol = 1e-12 if dtype == "float64" else 1e-5
    a, b = backend.to_numpy(fit.a), backend.to_numpy(fit.b)
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
    np.testing.assert_allclose(a, backend.to_numpy(base.a), rtol=tol, atol=tol)
    np.testing.assert_allclose(b / big, backend.to_numpy(base.b), rtol=tol, atol=tol)
    err = cmd.relative_error(scaled_x, fit)
    assert math.isfinite(err)
    assert abs(err - cmd.relative_error(backend.asarray(x, dtype), base)) <= 10 * tol
    m = cmd.choose_num_modes(scaled_x, 0.2)
    assert m == cmd.choose_num_modes(backend.asarray(x, dtype), 0.2)
    if dtype == "float64":  # and a scale that is not a power of two
        y = backend.asarray(x * (1e200 if exponent > 0 else 1e-200), dtype)
        fit = cmd.fit_cmd(y, 3, num_samples=60)
        np.testing.assert_allclose(backend.to_numpy(fit.a), backend.to_numpy(base.a), rtol=1e-9)
        assert abs(cmd.relative_error(y, fit) - cmd.relative_error(backend.asarray(x), base)) < 1e-9


@pytest.mark.parametrize("exponent", [-1, 1])
def test_online_cmd_is_scale_invariant(backend, dtype, exponent):
    # the online co-moments are kept in a power-of-two unit chosen at the fit: no overflow at 1e160
    x, _, _ = modal_trajectory(np.random.default_rng(12), 40, 10, 2, noise=0.1)
    big = 2.0 ** (exponent * (560 if dtype == "float64" else 70))
    base = cmd.OnlineCMD.from_trajectory(backend.asarray(x[:, :6], dtype), 2, num_samples=40)
    scaled = cmd.OnlineCMD.from_trajectory(
        backend.asarray(x[:, :6] * big, dtype), 2, num_samples=40
    )
    for t in range(6, 10):
        base.update(backend.asarray(x[:, t], dtype))
        scaled.update(backend.asarray(x[:, t] * big, dtype))
    tol = 1e-12 if dtype == "float64" else 1e-5
    (a0, b0), (a1, b1) = base.coefficients(), scaled.coefficients()
    np.testing.assert_allclose(backend.to_numpy(a1), backend.to_numpy(a0), rtol=tol, atol=tol)
    np.testing.assert_allclose(backend.to_numpy(b1) / big, backend.to_numpy(b0), rtol=tol, atol=tol)
    again = cmd.OnlineCMD.from_state_dict(scaled.state_dict())
    assert again.unit == scaled.unit
    old_format = {k: v for k, v in base.state_dict().items() if k != "unit"}
    assert cmd.OnlineCMD.from_state_dict(old_format).unit == 1.0  # states saved before the unit


# ---------------------------------------------------------------------------------------------------
# bad input (issue 9, validation gaps): a LowRankError that names the problem, nothing modified
# ---------------------------------------------------------------------------------------------------
def _online(backend):
    x, _, _ = modal_trajectory(np.random.default_rng(6), 30, 8, 2, noise=0.1)
    xa = backend.asarray(x)
    return xa, cmd.OnlineCMD.from_trajectory(xa[:, :6], 2, num_samples=30)


def _bad_states(backend, state):
    """(description, broken copy of ``state``): wrong keys, types, shapes, dtypes, values, sizes."""
    xp = backend.xp
    m = int(state["profiles"].shape[0])
    float_keys = ("profiles", "r_mean", "r_m2", "w_mean", "c_wr")

    def with_(key, value):
        bad = dict(state)
        bad[key] = value
        return bad

    out = []
    for key in state:
        if key == "unit":  # optional: states saved before it existed load in data units
            continue
        bad = dict(state)
        del bad[key]
        out.append((f"missing {key}", bad))
    out.append(("extra key", {**state, "epoch": 3}))
    out.append(("not a dict", list(state.items())))
    out.append(("None", None))
    out.append(("key not a string", {**state, 3: 1}))
    for key in ("assignment", *float_keys):
        out.append((f"{key} as list", with_(key, backend.to_numpy(state[key]).tolist())))
        out.append((f"{key} None", with_(key, None)))
        out.append((f"{key} scalar", with_(key, 1.0)))
        v = state[key]
        out.append((f"{key} 2-D", with_(key, xp.reshape(v, (1, *v.shape)))))
        out.append((f"{key} truncated", with_(key, v[:-1] if v.ndim == 1 else v[:-1, :])))
    for key in float_keys:
        v = state[key]
        out.append((f"{key} int", with_(key, xp.astype(v, xp.int64))))
        out.append((f"{key} bool", with_(key, v > 0)))
        out.append((f"{key} float32", with_(key, xp.astype(v, xp.float32))))
        out.append((f"{key} 0-d", with_(key, v[0] if v.ndim == 1 else v[0, 0])))
        host = backend.to_numpy(v).copy()
        host.reshape(-1)[0] = np.nan
        out.append((f"{key} NaN", with_(key, backend.asarray(host))))
        host.reshape(-1)[0] = np.inf
        out.append((f"{key} Inf", with_(key, backend.asarray(host))))
    assignment = backend.to_numpy(state["assignment"])
    for value in (-1, m):
        bad_a = assignment.copy()
        bad_a[0] = value
        out.append((f"assignment {value}", with_("assignment", backend.asarray(bad_a, "int32"))))
    out.append(
        ("assignment float", with_("assignment", xp.astype(state["assignment"], xp.float64)))
    )
    refs = state["references"]
    for value in (0.0, -1.0, 3.0, float("nan"), float("inf"), "1", None, True):
        out.append((f"unit {value!r}", with_("unit", value)))
    out += [
        ("references float", with_("references", refs.astype(np.float64))),
        ("references bool", with_("references", np.ones(m, dtype=bool))),
        ("references wrap", with_("references", np.arange(m, dtype=np.uint64) + np.uint64(2**64 - m))),
        ("references negative", with_("references", -refs - 1)),
        ("references too many", with_("references", np.arange(m + 1))),
        ("references too few", with_("references", refs[:-1])),
        ("references 2-D", with_("references", refs[None, :])),
        ("references str", with_("references", "0")),
        ("references None", with_("references", None)),
        ("references repeated", with_("references", np.zeros(m, dtype=np.int64))),
        ("r_m2 negative", with_("r_m2", -xp.abs(state["r_m2"]) - 1.0)),
        ("profiles no epochs", with_("profiles", state["profiles"][:, :0])),
        ("all sizes halved", {k: (v[: max(1, v.shape[0] // 2)] if k in ("w_mean", "c_wr") else v)
                              for k, v in state.items()}),
    ]  # fmt: skip
    return out


def test_online_from_state_dict_refuses_every_bad_state(backend):
    _, online = _online(backend)
    state = online.state_dict()
    cases = _bad_states(backend, state)
    assert len(cases) >= 86
    before = {
        k: (v.copy() if isinstance(v, np.ndarray) else backend.to_numpy(v))
        for k, v in state.items()
    }
    for what, bad in cases:
        kept = dict(bad) if isinstance(bad, dict) else bad
        with pytest.raises(LowRankError):
            cmd.OnlineCMD.from_state_dict(bad)
        if isinstance(bad, dict):
            assert bad.keys() == kept.keys(), what
    for k, v in state.items():  # nothing written
        got = v if isinstance(v, np.ndarray) else backend.to_numpy(v)
        np.testing.assert_array_equal(got, before[k])
    cmd.OnlineCMD.from_state_dict(state)  # the good state still loads


def test_online_bad_calls(backend):
    xa, online = _online(backend)
    a0, b0 = (backend.to_numpy(v) for v in online.coefficients())
    for bad in (2.5, True, "1", None, np.float64(1.0), 6, -7):
        with pytest.raises(ParameterError, match="epoch"):
            online.weights(bad)
    assert np.array_equal(
        backend.to_numpy(online.weights(np.int64(-1))), backend.to_numpy(online.weights())
    )
    # a state whose references lie beyond its rows (a shard's) needs the references' values
    shard = cmd.OnlineCMD.from_state_dict({**online.state_dict(), "references": np.array([40, 41])})
    with pytest.raises(ParameterError, match="reference_values"):
        shard.update(xa[:, 6])
    for bad in (backend.asarray(np.array([np.nan, 1.0])), backend.asarray(np.ones(2), "int64")):
        with pytest.raises(LowRankError):
            shard.update(xa[:, 6], reference_values=bad)
    for bad in (xa[:3, 0], xa[:, :2], backend.asarray(np.full(30, np.nan))):
        with pytest.raises(LowRankError):
            online.update(bad)
    with pytest.raises(LowRankError):
        online.update(backend.asarray(np.ones(30), "int64"))
    with pytest.raises(ParameterError):
        online.update(xa[:, 6], check_finite="yes")
    for start, stop in ((2.5, None), (True, None), (0, 31), (-1, None), (5, 2), (0, "3")):
        with pytest.raises(ParameterError):
            online.reconstruct(start, stop)
    assert online.epochs == 6
    a1, b1 = (backend.to_numpy(v) for v in online.coefficients())
    np.testing.assert_array_equal(a0, a1)
    np.testing.assert_array_equal(b0, b1)
    with pytest.raises(ParameterTypeError, match="CMDFit"):
        cmd.OnlineCMD.from_fit(xa, "fit")
    fit = cmd.fit_cmd(xa[:, :6], 2, num_samples=30)
    with pytest.raises(ShapeError):
        cmd.OnlineCMD.from_fit(xa[:, :5], fit)
    with pytest.raises(ShapeError):
        cmd.OnlineCMD.from_fit(xa[:20, :6], fit)


def test_reconstruct_and_relative_error_bad_input(backend):
    x, _, _ = modal_trajectory(np.random.default_rng(7), 20, 6, 2, noise=0.1)
    xa = backend.asarray(x)
    fit = cmd.fit_cmd(xa, 2, num_samples=20)
    p, asg, a, b = fit.profiles, fit.assignment, fit.a, fit.b
    nan = backend.asarray(np.full(20, np.nan))
    bad_calls = [
        lambda: cmd.reconstruct_trajectory(p, asg, nan, b),
        lambda: cmd.reconstruct_trajectory(p, asg, a, nan),
        lambda: cmd.reconstruct_trajectory(p * float("inf"), asg, a, b),
        lambda: cmd.reconstruct_trajectory(p, asg + 5, a, b),
        lambda: cmd.reconstruct_trajectory(p, asg - 1, a, b),
        lambda: cmd.reconstruct_trajectory(p, backend.xp.astype(asg, backend.xp.float64), a, b),
        lambda: cmd.reconstruct_trajectory(p, asg[:5], a, b),
        lambda: cmd.reconstruct_trajectory(p, asg, a[:5], b),
        lambda: cmd.reconstruct_trajectory(p, asg, backend.asarray(np.ones(20), "int64"), b),
        lambda: cmd.reconstruct_trajectory(p[0, :], asg, a, b),
        lambda: cmd.reconstruct_trajectory(p, asg, a, b, start=2.5),
        lambda: cmd.reconstruct_trajectory(p, asg, a, b, stop=True),
        lambda: cmd.reconstruct_trajectory(p, asg, a, b, start=3, stop=2),
        lambda: cmd.reconstruct_trajectory(p, asg, a, b, stop=21),
        lambda: cmd.reconstruct_trajectory(p, asg, a, b, check_finite=None),
        lambda: cmd.relative_error(xa, "fit"),
        lambda: cmd.relative_error(xa[:10, :], fit),
        lambda: cmd.relative_error(xa[:, :4], fit),
        lambda: cmd.relative_error(xa, fit, chunk_size=0),
        lambda: cmd.relative_error(xa, fit, centered="no"),
    ]
    for i, call in enumerate(bad_calls):
        with pytest.raises(LowRankError):
            call()
        assert i >= 0
    # regression: a trajectory holding NaN gave 0.0 ("perfect fit")
    for bad in (np.nan, np.inf):
        y = x.copy()
        y[3, 2] = bad
        with pytest.raises(NonFiniteError):
            cmd.relative_error(backend.asarray(y), fit)
    assert cmd.reconstruct_trajectory(p, asg, a, b, start=np.int64(2), stop=np.int64(5)).shape == (
        3,
        6,
    )


def test_select_embedding_bad_input(backend):
    n = 10
    rng = np.random.default_rng(8)
    vals = [backend.asarray(rng.standard_normal(n)) for _ in range(4)]
    emb = backend.asarray(np.zeros(n, dtype=bool), "bool")
    refs = np.array([2])
    nan = backend.asarray(np.full(n, np.nan))
    before = snapshot(backend, *vals, emb)
    bad_calls = [
        lambda: cmd.select_embedding(nan, *vals[1:], emb, refs),
        lambda: cmd.select_embedding(*vals[:3], nan, emb, refs),
        lambda: cmd.select_embedding(*vals, emb, refs, 2.5),
        lambda: cmd.select_embedding(*vals, emb, refs, float("nan")),
        lambda: cmd.select_embedding(*vals, emb, refs, "0.1"),
        lambda: cmd.select_embedding(*vals, emb, refs, True),
        lambda: cmd.select_embedding(*vals, emb, np.array([2.0])),
        lambda: cmd.select_embedding(*vals, emb, np.array([10])),
        lambda: cmd.select_embedding(*vals, emb, np.array([[2]])),
        lambda: cmd.select_embedding(*vals, emb, "2"),
        lambda: cmd.select_embedding(*vals, emb, None),
        lambda: cmd.select_embedding(*vals, vals[0], refs),
        lambda: cmd.select_embedding(*vals, emb[:5], refs),
        lambda: cmd.select_embedding(vals[0][:5], *vals[1:], emb, refs),
        lambda: cmd.select_embedding(backend.asarray(np.ones(n), "int64"), *vals[1:], emb, refs),
        lambda: cmd.select_embedding(*vals[:3], [0.0] * n, emb, refs),
    ]
    for call in bad_calls:
        with pytest.raises(LowRankError):
            call()
    assert_unchanged(backend, before, *vals, emb)
    # NumPy scalars are accepted where a float is expected
    got = cmd.select_embedding(*vals, emb, refs, np.float32(0.25))
    want = cmd.select_embedding(*vals, emb, refs, 0.25)
    np.testing.assert_array_equal(backend.to_numpy(got), backend.to_numpy(want))
    assert int(backend.to_numpy(got).sum()) == 3
    # a huge scale does not overflow the distance (hypot)
    big = [v * 1e300 for v in vals]
    got = cmd.select_embedding(*big, emb, refs, 0.25)
    np.testing.assert_array_equal(backend.to_numpy(got), backend.to_numpy(want))


def test_fit_cmd_bad_parameters(backend):
    x, _, _ = modal_trajectory(np.random.default_rng(9), 30, 6, 2, noise=0.1)
    xa = backend.asarray(x)
    before = snapshot(backend, xa)
    bad_kwargs = [
        {"max_modes": 2.5},
        {"max_modes": True},
        {"max_modes": "2"},
        {"max_modes": np.float64(2.0)},
        {"max_modes": 0},
        {"max_modes": 31},
        {"num_samples": 2.5},
        {"num_samples": True},
        {"num_samples": 0},
        {"seed": -1},
        {"seed": 1.5},
        {"seed": "0"},
        {"tol": float("nan")},
        {"tol": 1.5},
        {"tol": -0.1},
        {"tol": "0.1"},
        {"tol": 0.1, "max_modes": 2},
        {"metric": "cosine"},
        {"metric": None},
        {"chunk_size": 0},
        {"chunk_size": 2.5},
        {"chunk_size": True},
        {"sizes": [10, 10]},
        {"sizes": "30"},
        {"sizes": [10.5, 19.5]},
        {"sizes": [31, -1]},
        {"check_finite": "yes"},
    ]
    for kw in bad_kwargs:
        with pytest.raises(LowRankError):
            cmd.fit_cmd(xa, **kw)
        assert_unchanged(backend, before, xa)
    for kw in ({"max_modes": 2.5}, {"tol": float("inf")}, {"metric": 3}, {"max_modes": 0}):
        with pytest.raises(LowRankError):
            cmd.choose_num_modes(xa, kw.get("tol", 0.1), max_modes=kw.get("max_modes"),
                                 metric=kw.get("metric", "euclidean"))  # fmt: skip
    with pytest.raises(LowRankError):
        cmd.find_modes(xa, 2.5)
    with pytest.raises(LowRankError):
        cmd.cluster(cmd.abs_correlation(xa), np.float64(2.0))
    with pytest.raises(LowRankError):
        cmd.abs_correlation(xa, check_finite="no")
    # NumPy scalars are accepted: np.int64 counts, np.float32 tolerances
    fit = cmd.fit_cmd(xa, np.int64(2), num_samples=np.int64(30), seed=np.int64(1),
                      chunk_size=np.int32(7))  # fmt: skip
    same = cmd.fit_cmd(xa, 2, num_samples=30, seed=1, chunk_size=7)
    np.testing.assert_array_equal(backend.to_numpy(fit.a), backend.to_numpy(same.a))
    assert cmd.fit_cmd(xa, tol=np.float32(0.5), num_samples=30).num_modes >= 1
    assert cmd.choose_num_modes(xa, np.float64(0.5), max_modes=np.int64(5)) >= 1
    assert cmd.relative_error(xa, fit, chunk_size=np.int64(4)) == pytest.approx(
        cmd.relative_error(xa, fit)
    )


def test_relative_error_handles_constant_trajectories(backend):
    x = backend.asarray(np.ones((6, 5)) * np.arange(6.0)[:, None])
    fit = cmd.fit_cmd(x, 1)
    assert fit.num_modes == 1
    np.testing.assert_array_equal(backend.to_numpy(fit.a), 0.0)
    assert cmd.relative_error(x, fit) == 0.0  # every row constant: modelled exactly
    assert backend.to_numpy(fit.labels).tolist() == [-1] * 6


# ---------------------------------------------------------------------------------------------------
# immutable arrays (JAX, issue 11): nothing in the core writes into an array in place
# ---------------------------------------------------------------------------------------------------
def test_jax_arrays_run_and_stay_jax():
    # JAX compiles every primitive per shape on first use, so the shapes here are few and small
    jnp = pytest.importorskip("jax.numpy")
    jax = pytest.importorskip("jax")
    x, _, _ = modal_trajectory(np.random.default_rng(10), 40, 8, 2, noise=0.02)
    x[5] = 0.5
    x32 = x.astype(np.float32)
    xj = jnp.asarray(x32)
    fit = cmd.fit_cmd(xj, 2, num_samples=40)
    want = cmd.fit_cmd(x32, 2, num_samples=40)
    for name in ("a", "b", "profiles", "assignment", "labels"):
        got = getattr(fit, name)
        assert isinstance(got, jax.Array), name
        np.testing.assert_allclose(
            np.asarray(got), np.asarray(getattr(want, name)), rtol=1e-5, atol=1e-5
        )
    online = cmd.OnlineCMD.from_trajectory(xj[:, :6], 2, num_samples=40)
    online.update(xj[:, 6])
    a, _ = online.coefficients()
    assert isinstance(a, jax.Array) and isinstance(online.weights(), jax.Array)
    ref_online = cmd.OnlineCMD.from_trajectory(x32[:, :6], 2, num_samples=40)
    ref_online.update(x32[:, 6])
    np.testing.assert_allclose(np.asarray(a), ref_online.coefficients()[0], rtol=1e-4, atol=1e-5)


def test_fit_coefficients_needs_an_assignment(backend):
    # regression (sweep): assignment=None silently computed an assignment instead of refusing
    x = backend.asarray(np.random.default_rng(11).standard_normal((6, 5)))
    with pytest.raises(ArrayTypeError, match="assignment"):
        cmd.fit_coefficients(x, x[:2, :], None)


@pytest.mark.parametrize("factor", [1e200, 1e-200, 3.0, 1e30])
def test_reference_ties_do_not_depend_on_the_scale(backend, dtype, factor):
    """Rows of a mode that are exact affine images of each other all have |corr| = 1 with each other:
    their reference scores tie, and rounding (which changes with the scale) must not break the tie.
    The documented rule: scores within the rounding bound of the best count as tied, and the first
    tied member (lowest sample row) is the reference."""
    if dtype == "float32" and abs(math.log10(factor)) > 30:
        factor = 10.0 ** math.copysign(30, math.log10(factor))
    rng = np.random.default_rng(2)
    prof = np.cumsum(rng.standard_normal((3, 8)), axis=1)
    pick = rng.integers(0, 3, 12)
    sample = prof[pick] * rng.uniform(0.5, 2, (12, 1)) + rng.standard_normal((12, 1))
    base = cmd.find_modes(backend.asarray(sample, dtype), 3, metric="correlation")
    scaled = cmd.find_modes(backend.asarray(sample * factor, dtype), 3, metric="correlation")
    labels = backend.to_numpy(base.labels)
    np.testing.assert_array_equal(backend.to_numpy(scaled.labels), labels)
    np.testing.assert_array_equal(scaled.references, base.references)
    # the first member of each mode (every member ties)
    firsts = [int(np.flatnonzero(labels == m)[0]) for m in range(int(labels.max()) + 1)]
    np.testing.assert_array_equal(base.references, firsts)
