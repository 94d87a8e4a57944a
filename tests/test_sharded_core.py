"""The core's sharded pieces, without processes: shards of one trajectory give the unsharded result.

``subspace_from_gram(..., reduce=)`` and ``fit_cmd_shard`` / ``OnlineCMD.update(reference_values=)``
are what the torch sharded DLDR / CMD (``lowrank_torch.sharded``) call on every rank; here the
"ranks" are slices of one array and the all-reduce is a plain sum over the slices, so the sharded result
must equal the whole-array one up to the summation order of the partial sums (float64: a few ulps).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import lowrank_core.cmd as cmd
import lowrank_core.dldr as dl
from lowrank_core.errors import ShapeError

SPLITS = [np.array([0, 7, 19, 40]), np.array([0, 33, 40])]  # 3 and 2 uneven shards of D = 40


def _blocks(backend, Y, lo, hi):
    def rows():
        yield 0, backend.asarray(Y[:, lo:hi])

    return rows


@pytest.mark.parametrize("bounds", SPLITS)
def test_subspace_from_partial_grams_equals_whole(backend, bounds):
    rng = np.random.default_rng(5)
    t, D, d = 9, int(bounds[-1]), 3
    X = rng.standard_normal((t, 4)) @ rng.standard_normal((4, D)) + 0.01 * rng.standard_normal(
        (t, D)
    )
    X += 5.0  # a large common part, as along a trajectory
    Y = X - X[0]
    centre = X.mean(axis=0)
    whole = dl.subspace_from_gram(
        backend.asarray(Y @ Y.T), d, _blocks(backend, Y, 0, D), centre=backend.asarray(centre)
    )
    shards = list(itertools.pairwise(bounds))
    G = sum(Y[:, lo:hi] @ Y[:, lo:hi].T for lo, hi in shards)  # the all-reduced partial Grams

    def shard_fit(lo, hi, reduce, orthonormalize=True):
        return dl.subspace_from_gram(
            backend.asarray(G), d, _blocks(backend, Y, lo, hi),
            centre=backend.asarray(centre[lo:hi]), orthonormalize=orthonormalize, reduce=reduce,
        )  # fmt: skip

    # The shards run one after the other here, so an all-reduce is simulated by its result: the sum of
    # every shard's partial. The reductions, in order: the length D, then P P^T of the rows before
    # the orthonormalization (the sum of the shards' un-orthonormalized P_s P_s^T).
    def total_dim(a):
        assert a.shape == (1,)
        return np.array([float(D)])

    raw = [backend.to_numpy(shard_fit(lo, hi, total_dim, False).basis) for lo, hi in shards]
    pp_total = sum(r @ r.T for r in raw)
    results = []
    for lo, hi in shards:
        answers = iter([np.array([float(D)]), pp_total])
        seen = []

        def reduce(a, answers=answers, seen=seen):
            seen.append(a.shape)
            return next(answers)

        results.append(shard_fit(lo, hi, reduce))
        assert seen == [(1,), (d, d)]
    basis = np.concatenate([backend.to_numpy(s.basis) for s in results], axis=1)
    np.testing.assert_allclose(basis, backend.to_numpy(whole.basis), rtol=0, atol=1e-12)
    for s in results:
        np.testing.assert_allclose(
            backend.to_numpy(s.explained_variance),
            backend.to_numpy(whole.explained_variance),
            rtol=1e-12,
        )
        assert s.total_variance == pytest.approx(whole.total_variance, rel=1e-12)
    np.testing.assert_allclose(basis @ basis.T, np.eye(d), atol=1e-12)  # orthonormal as a whole


@pytest.mark.parametrize("bounds", SPLITS)
def test_fit_cmd_shard_and_online_updates_equal_whole(backend, bounds):
    rng = np.random.default_rng(2)
    N, F, T = int(bounds[-1]), 6, 10
    base = rng.standard_normal((3, T)).cumsum(axis=1)
    traj = rng.standard_normal((N, 1)) * base[rng.integers(0, 3, N)] + rng.standard_normal((N, 1))
    traj += 0.01 * rng.standard_normal((N, T))
    sizes = [15, 25]
    whole = cmd.fit_cmd(backend.asarray(traj[:, :F]), 3, sizes=sizes, num_samples=12, seed=1)
    idx = cmd.sample_indices(sizes, 12, seed=1)
    sample = backend.asarray(traj[idx, :F])  # what the all-reduce of the shards' sampled rows gives
    online_whole = cmd.OnlineCMD.from_fit(backend.asarray(traj[:, :F]), whole)
    for t in range(F, T):
        online_whole.update(backend.asarray(traj[:, t]))
    a_whole, b_whole = (backend.to_numpy(v) for v in online_whole.coefficients())
    for lo, hi in itertools.pairwise(bounds):
        shard = backend.asarray(traj[lo:hi, :F])
        fit = cmd.fit_cmd_shard(shard, sample, idx, 3)
        np.testing.assert_array_equal(fit.references, whole.references)
        np.testing.assert_array_equal(
            backend.to_numpy(fit.assignment), backend.to_numpy(whole.assignment)[lo:hi]
        )
        np.testing.assert_allclose(
            backend.to_numpy(fit.a), backend.to_numpy(whole.a)[lo:hi], rtol=1e-12, atol=1e-14
        )
        online = cmd.OnlineCMD.from_fit(shard, fit)
        for t in range(F, T):
            r = backend.asarray(traj[whole.references, t])  # gathered from whichever shard holds it
            online.update(backend.asarray(traj[lo:hi, t]), reference_values=r)
        a, b = (backend.to_numpy(v) for v in online.coefficients())
        np.testing.assert_allclose(a, a_whole[lo:hi], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(b, b_whole[lo:hi], rtol=1e-12, atol=1e-14)


def test_sharded_inputs_of_the_wrong_shape_are_refused(backend):
    rng = np.random.default_rng(0)
    traj = backend.asarray(rng.standard_normal((10, 5)))
    idx = np.arange(4)
    with pytest.raises(ShapeError, match="one row per"):
        cmd.fit_cmd_shard(traj, backend.asarray(rng.standard_normal((3, 5))), idx, 2)
    with pytest.raises(ShapeError, match="as many epochs"):
        cmd.fit_cmd_shard(traj, backend.asarray(rng.standard_normal((4, 6))), idx, 2)
    fit = cmd.fit_cmd(traj, 2)
    online = cmd.OnlineCMD.from_fit(traj, fit)
    before = backend.to_numpy(online.w_mean).copy()
    with pytest.raises(ShapeError, match="reference_values"):
        online.update(traj[:, 0], reference_values=backend.asarray(np.zeros(3)))
    np.testing.assert_array_equal(backend.to_numpy(online.w_mean), before)
    assert online.epochs == 5
