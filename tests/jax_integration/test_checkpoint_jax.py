"""lowrank_jax.checkpoint: round trips of OIALR, DLDR and CMD runs that resume bit for bit, and files
that do not fit (corrupt, other parameters, another optimizer, a tampered manifest) refused with
nothing changed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")

import lowrank_core as lc  # noqa: E402
from lowrank_core import checkpoint as container  # noqa: E402
from lowrank_jax import checkpoint as ck  # noqa: E402
from lowrank_jax import cmd as jc  # noqa: E402
from lowrank_jax import dldr as jd  # noqa: E402
from lowrank_jax import oialr as jo  # noqa: E402

jax.config.update("jax_enable_x64", True)

_RNG = np.random.default_rng(3)
_X = jnp.asarray(_RNG.standard_normal((32, 6)))
_Y = jnp.asarray(np.arange(32) % 3)


def _params(dtype: Any = jnp.float64) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {
        "l0": {"kernel": jnp.asarray(rng.standard_normal((6, 8)) / 3, dtype), "bias": jnp.zeros(8, dtype)},
        "l1": {"kernel": jnp.asarray(rng.standard_normal((8, 8)) / 3, dtype), "bias": jnp.zeros(8, dtype)},
        "l2": {"kernel": jnp.asarray(rng.standard_normal((8, 3)) / 3, dtype), "bias": jnp.zeros(3, dtype)},
    }  # fmt: skip


def _loss(p: dict[str, Any], x: jax.Array = _X, y: jax.Array = _Y) -> jax.Array:
    h = jax.nn.relu(x.astype(p["l0"]["kernel"].dtype) @ p["l0"]["kernel"] + p["l0"]["bias"])
    h = jax.nn.relu(h @ p["l1"]["kernel"] + p["l1"]["bias"])
    logits = h @ p["l2"]["kernel"] + p["l2"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _make_step(tx: Any) -> Any:
    @jax.jit
    def step(trainable: Any, frozen: Any, opt_state: Any) -> Any:
        g = jax.grad(lambda t: _loss(jo.materialize(t, frozen)))(trainable)
        updates, opt_state = tx.update(g, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    return step


def _equal(a: Any, b: Any) -> None:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _config() -> jo.OIALRConfig:
    return jo.OIALRConfig(switch_step=3, update_every=4, rule=lc.FixedRank(rank=5))


def _train(ctrl: jo.OIALR, tx: Any, tr: Any, opt: Any, steps: int) -> tuple[Any, Any]:
    step = _make_step(tx)
    for _ in range(steps):
        tr, opt = step(tr, ctrl.frozen, opt)
        tr, opt = ctrl.step(tr, opt)
    return tr, opt


def _saved_run(tmp_path: Path, tx: Any) -> tuple[Path, jo.OIALR, Any, Any]:
    p = _params()
    ctrl = jo.OIALR(p, _config())
    tr, opt = _train(ctrl, tx, p, tx.init(p), 6)  # switched at 3, truncated to rank 5 at 4
    assert ctrl.ranks() == {"['l0']['kernel']": 5, "['l1']['kernel']": 5}
    path = ck.save_checkpoint(
        tmp_path / "run.npz", params=tr, opt_state=opt, oialr=ctrl, extra={"epoch": 6, "lr": 0.01}
    )
    return path, ctrl, tr, opt


@pytest.mark.parametrize(
    "make_tx",
    [lambda: optax.adam(1e-2), lambda: optax.sgd(0.05, momentum=0.9)],
    ids=["adam", "sgd-momentum"],
)
def test_oialr_run_resumes_bit_for_bit(tmp_path: Path, make_tx: Any) -> None:
    tx = make_tx()
    path, ctrl, tr, opt = _saved_run(tmp_path, tx)
    want_tr, want_opt = _train(ctrl, tx, tr, opt, 6)

    fresh = jo.OIALR(_params(), _config())
    ckpt = ck.load_checkpoint(path, params=_params(), tx=tx, oialr=fresh)
    assert ckpt.extra == {"epoch": 6, "lr": 0.01}
    assert fresh.ranks() == {"['l0']['kernel']": 5, "['l1']['kernel']": 5}
    assert fresh.step_count == 6 and fresh.switched == {n: 3 for n in fresh.eligible}
    assert ckpt.params["l1"]["kernel"].shape == (5, 5)
    got_tr, got_opt = _train(fresh, tx, ckpt.params, ckpt.opt_state, 6)
    _equal(got_tr, want_tr)
    _equal(got_opt, want_opt)
    _equal(fresh.frozen, ctrl.frozen)
    assert fresh.history == ctrl.history


def test_oialr_sigma_lr_scale_resumes_bit_for_bit(tmp_path: Path) -> None:
    """The multipliers of ctrl.optimizer(tx) are in the optimizer state: saved and restored with it."""
    config = jo.OIALRConfig(
        switch_step=3, update_every=4, rule=lc.FixedRank(rank=5), sigma_lr_scale=4.0
    )
    p = _params()
    ctrl = jo.OIALR(p, config)
    tx = ctrl.optimizer(optax.adam(1e-2))
    tr, opt = _train(ctrl, tx, p, tx.init(p), 6)
    assert {k: float(v) for k, v in opt.scales.items()} == dict.fromkeys(ctrl.eligible, 4.0)
    path = ck.save_checkpoint(tmp_path / "run.npz", params=tr, opt_state=opt, oialr=ctrl)
    want_tr, want_opt = _train(ctrl, tx, tr, opt, 6)

    fresh = jo.OIALR(_params(), config)
    fresh_tx = fresh.optimizer(optax.adam(1e-2))
    ckpt = ck.load_checkpoint(path, params=_params(), tx=fresh_tx, oialr=fresh)
    assert isinstance(ckpt.opt_state, jo.SigmaScaleState)
    got_tr, got_opt = _train(fresh, fresh_tx, ckpt.params, ckpt.opt_state, 6)
    _equal(got_tr, want_tr)
    _equal(got_opt, want_opt)


def test_oialr_warmup_polar_factors_survive(tmp_path: Path) -> None:
    """Before the switch the controller keeps the last check's polar factors: after a reload the next
    stability check compares against them and gives the same values."""
    tx = optax.sgd(0.05)
    config = jo.OIALRConfig(switch_step=None, stability_threshold=0.9999, stability_every=2)
    p = _params()
    ctrl = jo.OIALR(p, config)
    tr, opt = _train(ctrl, tx, p, tx.init(p), 3)  # one check (step 2): factors kept, no value yet
    assert not ctrl.switched and not ctrl.events("stability")
    ck.save_checkpoint(tmp_path / "w.npz", params=tr, opt_state=opt, oialr=ctrl)
    _train(ctrl, tx, tr, opt, 1)
    fresh = jo.OIALR(_params(), config)
    ckpt = ck.load_checkpoint(tmp_path / "w.npz", params=_params(), tx=tx, oialr=fresh)
    _train(fresh, tx, ckpt.params, ckpt.opt_state, 1)
    assert fresh.events("stability") == ctrl.events("stability") != []


def test_bfloat16_and_float32_leaves_keep_their_dtype(tmp_path: Path) -> None:
    p = _params(jnp.bfloat16)
    p["l2"] = {k: v.astype(jnp.float32) for k, v in p["l2"].items()}
    path = ck.save_checkpoint(tmp_path / "bf.npz", params=p)
    _equal(ck.load_checkpoint(path, params=p).params, p)


def _cmd_run(params: dict[str, Any], epochs: int, tracker: jc.CMDTracker) -> dict[str, Any]:
    tx = optax.sgd(0.2)
    opt = tx.init(params)
    for _ in range(epochs):
        for _ in range(3):
            g = jax.grad(_loss)(params)
            u, opt = tx.update(g, opt, params)
            params = optax.apply_updates(params, u)
        tracker.after_epoch(params)
    return params


@pytest.mark.parametrize("saved_after", [2, 6], ids=["in-warm-up", "fitted"])
def test_cmd_tracker_resumes_bit_for_bit(tmp_path: Path, saved_after: int) -> None:
    tracker = jc.CMDTracker(_params(), warmup_epochs=4, max_modes=3, seed=0)
    p = _cmd_run(_params(), saved_after, tracker)
    ck.save_checkpoint(tmp_path / "cmd.npz", params=p, cmd=tracker)
    _cmd_run(p, 4, tracker)
    fresh = jc.CMDTracker(_params(), warmup_epochs=4, max_modes=3, seed=0)
    ckpt = ck.load_checkpoint(tmp_path / "cmd.npz", params=_params(), cmd=fresh)
    assert fresh.epochs == saved_after
    _cmd_run(ckpt.params, 4, fresh)
    assert fresh.fitted and fresh.epochs == tracker.epochs == saved_after + 4
    _equal(fresh.evaluation_params(p), tracker.evaluation_params(p))


def _subspace(d: int = 4) -> lc.Subspace:
    tx = optax.sgd(0.2)
    p, opt = _params(), tx.init(_params())
    rec = jd.SnapshotRecorder(p)
    for _ in range(10):
        g = jax.grad(_loss)(p)
        u, opt = tx.update(g, opt, p)
        p = optax.apply_updates(p, u)
        rec.record(p)
    return rec.fit(d)


def test_dldr_bfgs_and_subspace_sgd_resume_bit_for_bit(tmp_path: Path) -> None:
    sub = _subspace()
    bfgs = jd.SubspaceBFGS(_loss, sub, _params())
    state = bfgs.init()
    for _ in range(3):
        state, _ = bfgs.step(state, _X, _Y)
    ck.save_checkpoint(tmp_path / "b.npz", params=bfgs.params(state), bfgs=bfgs, bfgs_state=state)
    want = state
    for _ in range(3):
        want, _ = bfgs.step(want, _X, _Y)
    ckpt = ck.load_checkpoint(tmp_path / "b.npz", params=_params(), loss_fn=_loss)
    assert ckpt.bfgs is not None and ckpt.bfgs_state is not None and ckpt.subspace is not None
    _equal(ckpt.subspace.basis, sub.basis)
    got = ckpt.bfgs_state
    for _ in range(3):
        got, _ = ckpt.bfgs.step(got, _X, _Y)
    _equal(got, want)
    # without loss_fn: the state and subspace, no solver
    assert ck.load_checkpoint(tmp_path / "b.npz", params=_params()).bfgs is None

    # P-SGD: the momentum lives in the optax state
    tx = jd.subspace_sgd(sub, 0.1, momentum=0.9)
    p, opt = _params(), tx.init(_params())

    def run(p: Any, opt: Any, n: int) -> tuple[Any, Any]:
        for _ in range(n):
            u, opt = tx.update(jax.grad(_loss)(p), opt, p)
            p = optax.apply_updates(p, u)
        return p, opt

    p, opt = run(p, opt, 3)
    ck.save_checkpoint(tmp_path / "s.npz", params=p, opt_state=opt, subspace=sub)
    want_p, want_opt = run(p, opt, 3)
    loaded_sub = ck.load_checkpoint(tmp_path / "s.npz", params=_params()).subspace
    assert loaded_sub is not None
    tx = jd.subspace_sgd(loaded_sub, 0.1, momentum=0.9)
    ckpt = ck.load_checkpoint(tmp_path / "s.npz", params=_params(), tx=tx)
    got_p, got_opt = run(ckpt.params, ckpt.opt_state, 3)
    _equal(got_p, want_p)
    _equal(got_opt, want_opt)


# --------------------------------------------------------------------------------------------------
# refusals: a clear CheckpointError, nothing changed
# --------------------------------------------------------------------------------------------------
def _untouched(ctrl: jo.OIALR) -> None:
    assert ctrl.step_count == 0 and not ctrl.switched and not ctrl.frozen and not ctrl.history


def _reseal(path: Path, edit: Any) -> None:
    """Rewrite the manifest with ``edit`` and a *valid* digest (a consistent but hostile file)."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    manifest = json.loads(arrays.pop(container._MANIFEST).tobytes())
    arrays.pop(container._DIGEST)
    edit(manifest)
    text = json.dumps(manifest, sort_keys=True).encode()
    arrays[container._DIGEST] = np.frombuffer(
        f"sha256:{container._digest(text, arrays)}".encode(), np.uint8
    )
    arrays[container._MANIFEST] = np.frombuffer(text, np.uint8)
    np.savez(path, **arrays)


def test_corrupt_or_foreign_files_are_refused(tmp_path: Path) -> None:
    tx = optax.adam(1e-2)
    path, *_ = _saved_run(tmp_path, tx)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    bad = tmp_path / "flipped.npz"
    bad.write_bytes(bytes(data))
    fresh = jo.OIALR(_params(), _config())
    with pytest.raises(lc.CheckpointError, match=r"(?i)corrupt|readable|CRC"):
        ck.load_checkpoint(bad, params=_params(), tx=tx, oialr=fresh)
    _untouched(fresh)
    (tmp_path / "text.npz").write_text("not a checkpoint")
    with pytest.raises(lc.CheckpointError, match="readable"):
        ck.load_checkpoint(tmp_path / "text.npz", params=_params())
    with pytest.raises(lc.CheckpointError, match="no checkpoint file"):
        ck.load_checkpoint(tmp_path / "missing.npz", params=_params())
    np.savez(tmp_path / "plain.npz", w=np.zeros(3))
    with pytest.raises(lc.CheckpointError, match="manifest"):
        ck.load_checkpoint(tmp_path / "plain.npz", params=_params())
    with pytest.raises(lc.ParameterError, match="directory"):
        ck.save_checkpoint(tmp_path, params=_params())
    with pytest.raises(lc.ParameterTypeError, match="path"):
        ck.save_checkpoint(3, params=_params())  # type: ignore[arg-type]
    with pytest.raises(lc.ParameterTypeError, match="holds"):
        ck.save_checkpoint(tmp_path / "x.npz", params=_params(), extra={"f": print})
    assert not (tmp_path / "x.npz").exists()


def test_checkpoints_that_do_not_fit_change_nothing(tmp_path: Path) -> None:
    tx = optax.adam(1e-2)
    path, *_ = _saved_run(tmp_path, tx)

    # other parameters with the same names (a wider hidden layer)
    other = _params()
    other["l1"]["kernel"] = jnp.zeros((8, 9))
    other["l1"]["bias"] = jnp.zeros(9)
    other["l2"]["kernel"] = jnp.zeros((9, 3))
    fresh = jo.OIALR(other, _config())
    with pytest.raises(lc.CheckpointError, match="shape"):
        ck.load_checkpoint(path, params=other, tx=tx, oialr=fresh)
    _untouched(fresh)

    # Adam's state into an SGD-momentum run
    fresh = jo.OIALR(_params(), _config())
    with pytest.raises(lc.CheckpointError, match="optimizer state has another tree structure"):
        ck.load_checkpoint(path, params=_params(), tx=optax.sgd(0.1, momentum=0.9), oialr=fresh)
    _untouched(fresh)

    # the file holds an OIALR state but no controller is given (the shapes would not fit)
    with pytest.raises(lc.CheckpointError, match="oialr="):
        ck.load_checkpoint(path, params=_params(), tx=tx)
    cmd = jc.CMDTracker(_params(), warmup_epochs=4)
    with pytest.raises(lc.CheckpointError, match="holds no CMD tracker state"):
        ck.load_checkpoint(path, params=_params(), tx=tx, oialr=fresh, cmd=cmd)
    _untouched(fresh)

    # a controller that already switched
    used = jo.OIALR(_params(), _config())
    used.switch(_params(), tx.init(_params()))
    with pytest.raises(lc.CheckpointError, match="not switched"):
        ck.load_checkpoint(path, params=_params(), tx=tx, oialr=used)
    assert used.ranks() == {"['l0']['kernel']": 6, "['l1']['kernel']": 8}

    # hostile but digest-consistent manifests: a saved rank that does not match the bases, a Sigma
    # of the wrong size, a parameter leaf of another dtype
    def bad_rank(m: dict[str, Any]) -> None:
        m["oialr"]["ranks"]["['l1']['kernel']"] = 4

    def bad_sigma(m: dict[str, Any]) -> None:
        m["params"]["leaves"][3]["shape"] = [1, 25]

    def bad_dtype(m: dict[str, Any]) -> None:
        m["params"]["leaves"][0]["dtype"] = "int64"

    for edit, pattern in ((bad_rank, "bases of"), (bad_sigma, "shape"), (bad_dtype, "int64")):
        copy = tmp_path / f"{edit.__name__}.npz"
        copy.write_bytes(path.read_bytes())
        _reseal(copy, edit)
        fresh = jo.OIALR(_params(), _config())
        with pytest.raises(lc.CheckpointError, match=pattern):
            ck.load_checkpoint(copy, params=_params(), tx=tx, oialr=fresh)
        _untouched(fresh)


def test_cmd_and_bfgs_states_that_do_not_fit(tmp_path: Path) -> None:
    tracker = jc.CMDTracker(_params(), warmup_epochs=4, max_modes=3, seed=0)
    p = _cmd_run(_params(), 5, tracker)
    ck.save_checkpoint(tmp_path / "cmd.npz", params=p, cmd=tracker)
    other = jc.CMDTracker(_params(), warmup_epochs=5)
    with pytest.raises(lc.CheckpointError, match="warmup_epochs"):
        ck.load_checkpoint(tmp_path / "cmd.npz", params=_params(), cmd=other)
    assert other.epochs == 0 and not other.fitted

    sub = _subspace(3)
    bfgs = jd.SubspaceBFGS(_loss, sub, _params())
    ck.save_checkpoint(tmp_path / "b.npz", params=_params(), bfgs=bfgs, bfgs_state=bfgs.init())
    smaller = {"l0": _params()["l0"]}
    with pytest.raises(lc.CheckpointError, match=r"tree structure|dimensions"):
        ck.load_checkpoint(tmp_path / "b.npz", params=smaller, loss_fn=_loss)

    def bad_h(m: dict[str, Any]) -> None:
        m["bfgs"]["state"]["H"]["shape"] = [9]

    _reseal(tmp_path / "b.npz", bad_h)
    with pytest.raises(lc.CheckpointError, match="'H'"):
        ck.load_checkpoint(tmp_path / "b.npz", params=_params(), loss_fn=_loss)
    with pytest.raises(lc.ParameterError, match="together"):
        ck.save_checkpoint(tmp_path / "c.npz", params=_params(), bfgs=bfgs)
