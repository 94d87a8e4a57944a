"""DLDR (snapshots, subspace SGD as optax, jitted subspace BFGS) and online CMD over JAX pytrees."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")

import lowrank_core as lc  # noqa: E402
from lowrank_jax import cmd as jc  # noqa: E402
from lowrank_jax import dldr as jd  # noqa: E402

jax.config.update("jax_enable_x64", True)

_RNG = np.random.default_rng(0)
_X = jnp.asarray(_RNG.standard_normal((64, 5)))
_Y = jnp.asarray(_RNG.integers(0, 3, 64))
_P0 = {"w": jnp.asarray(_RNG.standard_normal((5, 3))), "b": jnp.zeros(3)}


def _loss(p: dict[str, Any], x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y).mean()


def _trajectory(steps: int = 12) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    tx = optax.sgd(0.2)
    p, opt, out = _P0, tx.init(_P0), []
    for _ in range(steps):
        g = jax.grad(_loss)(p, _X, _Y)
        u, opt = tx.update(g, opt, p)
        p = optax.apply_updates(p, u)
        out.append(p)
    return out, p


def test_recorder_fits_the_core_subspace() -> None:
    snaps, _ = _trajectory()
    rec = jd.SnapshotRecorder(_P0)
    for s in snaps:
        rec.record(s)
    sub = rec.fit(4)
    flat = jnp.stack([jd.flatten(s)[0] for s in snaps])
    want = lc.fit_subspace(flat, 4)
    np.testing.assert_allclose(np.asarray(sub.centre), np.asarray(want.centre), atol=1e-12)
    assert isinstance(sub.basis, jax.Array) and sub.basis.shape == (4, 18)
    with pytest.raises(lc.ShapeError):
        rec.record({"w": _P0["w"]})


def test_subspace_sgd_is_psgd_and_stays_in_the_subspace() -> None:
    snaps, p = _trajectory()
    rec = jd.SnapshotRecorder(_P0)
    for s in snaps:
        rec.record(s)
    sub = rec.fit(3)
    tx = jd.subspace_sgd(sub, 0.1, momentum=0.9)
    opt, q = tx.init(p), p
    w0 = jd.flatten(p)[0]
    c, v = jnp.zeros(3), jnp.zeros(3)
    update = jax.jit(tx.update)
    for i in range(5):
        g = jax.grad(_loss)(q, _X, _Y)
        u, opt = update(g, opt, q)
        q = optax.apply_updates(q, u)
        # the P-SGD recursion by hand: v <- m v + P g, c <- c - lr v
        gc = sub.basis @ jd.flatten(g)[0]
        v = gc if i == 0 else 0.9 * v + gc
        c = c - 0.1 * v
        np.testing.assert_allclose(
            np.asarray(jd.flatten(q)[0]), np.asarray(w0 + c @ sub.basis), atol=1e-12
        )
    assert float(_loss(q, _X, _Y)) < float(_loss(p, _X, _Y))
    with pytest.raises(lc.ShapeError):
        tx.init({"w": _P0["w"]})


def test_subspace_bfgs_jitted_step_descends_and_matches_the_core_math() -> None:
    snaps, p = _trajectory()
    rec = jd.SnapshotRecorder(_P0)
    for s in snaps:
        rec.record(s)
    sub = rec.fit(4)
    opt = jd.SubspaceBFGS(_loss, sub, p)
    st = opt.init()
    losses = []
    for _ in range(8):
        prev = st
        st, f0 = opt.step(st, _X, _Y)
        losses.append(float(f0))
        # an accepted step satisfies the core's Armijo condition on the same batch
        if bool(st.has_prev):
            g = sub.basis @ jd.flatten(jax.grad(_loss)(opt.params(prev), _X, _Y))[0]
            s = st.c - prev.c
            alpha_p = s
            slope = float(g @ alpha_p)
            assert lc.dldr.armijo_condition(
                float(_loss(opt.params(st), _X, _Y)), float(f0), 1.0, slope, c1=opt.c1
            )
    assert losses[-1] < losses[0]
    assert int(st.updates) + int(st.skipped) >= 1 and int(st.trials) >= 8
    # the flat weights are origin + P^T c
    np.testing.assert_allclose(
        np.asarray(jd.flatten(opt.params(st))[0]),
        np.asarray(opt.origin + st.c @ sub.basis),
        atol=1e-12,
    )


def test_cmd_tracker_fits_updates_and_round_trips() -> None:
    snaps, p = _trajectory(10)
    tr = jc.CMDTracker(_P0, warmup_epochs=4, max_modes=2)
    for s in snaps[:4]:
        assert tr.evaluation_params(s) is s
        tr.after_epoch(s)
    assert tr.fitted
    for s in snaps[4:]:
        tr.after_epoch(s)
    assert tr.epochs == 10
    # the jitted update equals the eager core update
    flat = jnp.stack([jd.flatten(s)[0] for s in snaps], axis=1)
    ref = lc.OnlineCMD.from_trajectory(flat[:, :4], 2)
    for t in range(4, 10):
        ref.update(flat[:, t])
    np.testing.assert_allclose(np.asarray(tr.cmd.weights()), np.asarray(ref.weights()), atol=1e-10)
    ev = tr.evaluation_params(p)
    assert jax.tree_util.tree_structure(ev) == jax.tree_util.tree_structure(p)
    # checkpoint round trip through the state dict
    other = jc.CMDTracker(_P0, warmup_epochs=4, max_modes=2)
    other.load_state_dict(tr.state_dict())
    np.testing.assert_array_equal(np.asarray(other.cmd.weights()), np.asarray(tr.cmd.weights()))
    other.after_epoch(p)
    tr.after_epoch(p)
    np.testing.assert_allclose(
        np.asarray(other.cmd.weights()), np.asarray(tr.cmd.weights()), atol=1e-12
    )
    with pytest.raises(lc.CheckpointError, match="scalars"):
        jc.CMDTracker({"w": _P0["w"]}, warmup_epochs=4).load_state_dict(tr.state_dict())
    with pytest.raises(lc.CheckpointError, match="warmup_epochs"):
        jc.CMDTracker(_P0, warmup_epochs=5).load_state_dict(tr.state_dict())
    with pytest.raises(lc.CheckpointError, match="format"):
        other.load_state_dict({"format": "x"})


def test_cmd_tracker_centroid_profile_jitted_equals_eager_and_round_trips() -> None:
    snaps, p = _trajectory(10)
    tr = jc.CMDTracker(_P0, warmup_epochs=4, max_modes=2, profile="centroid")
    for s in snaps:
        tr.after_epoch(s)
    assert tr.cmd.profile == "centroid"
    flat = jnp.stack([jd.flatten(s)[0] for s in snaps], axis=1)
    ref = lc.OnlineCMD.from_trajectory(flat[:, :4], 2, profile="centroid")
    for t in range(4, 10):
        ref.update(flat[:, t])
    np.testing.assert_allclose(np.asarray(tr.cmd.weights()), np.asarray(ref.weights()), atol=1e-10)
    other = jc.CMDTracker(_P0, warmup_epochs=4, max_modes=2, profile="centroid")
    other.load_state_dict(tr.state_dict())
    assert other.cmd.profile == "centroid"
    other.after_epoch(p)
    tr.after_epoch(p)
    np.testing.assert_allclose(
        np.asarray(other.cmd.weights()), np.asarray(tr.cmd.weights()), atol=1e-12
    )
