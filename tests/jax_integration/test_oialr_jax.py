"""OIALR over JAX parameter pytrees with optax: switch, optimizer state, rank updates, factored apply."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")

import lowrank_core as lc  # noqa: E402
from lowrank_jax import oialr as jo  # noqa: E402

jax.config.update("jax_enable_x64", True)


def _params(seed: int = 0, dtype: Any = jnp.float64) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "l0": {
            "kernel": jnp.asarray(rng.standard_normal((6, 8)) / 3, dtype),
            "bias": jnp.zeros(8, dtype),
        },
        "l1": {
            "kernel": jnp.asarray(rng.standard_normal((8, 8)) / 3, dtype),
            "bias": jnp.zeros(8, dtype),
        },
        "l2": {
            "kernel": jnp.asarray(rng.standard_normal((8, 3)) / 3, dtype),
            "bias": jnp.zeros(3, dtype),
        },
    }


def _apply(p: dict[str, Any], x: jax.Array) -> jax.Array:
    h = jax.nn.relu(jo.dense(x, p["l0"]["kernel"]) + p["l0"]["bias"])
    h = jax.nn.relu(jo.dense(h, p["l1"]["kernel"]) + p["l1"]["bias"])
    return jo.dense(h, p["l2"]["kernel"]) + p["l2"]["bias"]


_X = jnp.asarray(np.random.default_rng(5).standard_normal((32, 6)))
_Y = jnp.asarray(np.arange(32) % 3)
_X8 = jnp.asarray(np.random.default_rng(6).standard_normal((32, 8)))


def _loss(p: dict[str, Any]) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(_apply(p, _X), _Y).mean()


def _make_step(tx: Any) -> Any:
    @jax.jit
    def step(trainable: Any, frozen: Any, opt_state: Any) -> Any:
        loss, g = jax.value_and_grad(lambda t: _loss(jo.materialize(t, frozen)))(trainable)
        updates, opt_state = tx.update(g, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step


def _close(a: Any, b: Any, atol: float = 1e-10) -> None:
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


def test_eligible_kernels_and_layouts() -> None:
    p = _params()
    ctrl = jo.OIALR(p, jo.OIALRConfig(switch_step=1))
    assert ctrl.eligible == ["['l0']['kernel']", "['l1']['kernel']"]  # the last one stays dense
    ctrl = jo.OIALR(p, jo.OIALRConfig(switch_step=1, keep_first=True, exclude=("l1.*",)))
    assert ctrl.eligible == []
    # exclude patterns are fnmatch globs over the dotted path and over keystr's spelling
    ctrl = jo.OIALR(p, jo.OIALRConfig(switch_step=1, exclude="l1.kernel"))
    assert ctrl.eligible == ["['l0']['kernel']"]
    ctrl = jo.OIALR(p, jo.OIALRConfig(switch_step=1, exclude=("*'l0'*",)))
    assert ctrl.eligible == ["['l1']['kernel']"]
    ctrl = jo.OIALR(p, jo.OIALRConfig(switch_step=1, exclude=("l1",)))  # a glob, not a substring
    assert ctrl.eligible == ["['l0']['kernel']", "['l1']['kernel']"]
    wide = {"w": jnp.zeros((4, 100)), "b": jnp.zeros((4, 5)), "c": jnp.zeros(3)}
    ctrl = jo.OIALR(wide, jo.OIALRConfig(switch_step=1, keep_last=False))
    assert ctrl.eligible == ["['b']"]  # aspect 0.04 < min_aspect, 1-D skipped
    # the MNIST-1D MLP: the first and last kernels fail the aspect rule, the last is kept dense anyway;
    # keep_last means the output layer, not the last kernel that passes the aspect rule
    mlp = {
        f"l{i}": {"kernel": jnp.zeros(s)} for i, s in enumerate([(40, 512), (512, 512), (512, 10)])
    }
    assert jo.OIALR(mlp, jo.OIALRConfig(switch_step=1)).eligible == ["['l1']['kernel']"]
    conv = {"conv": {"kernel": jnp.zeros((3, 4, 8))}, "out": {"kernel": jnp.zeros((8, 2))}}
    ctrl = jo.OIALR(conv, jo.OIALRConfig(switch_step=1))
    assert ctrl.eligible == ["['conv']['kernel']"]
    with pytest.raises(lc.ParameterError, match="layout"):
        jo.OIALRConfig(layout="tf")
    with pytest.raises(lc.ParameterError, match="switch_step"):
        jo.OIALRConfig(switch_step=None)


@pytest.mark.parametrize("layout", ["flax", "torch"])
def test_switch_is_exact_and_conv_kernels_round_trip(layout: str) -> None:
    rng = np.random.default_rng(1)
    p = {
        "conv": {"kernel": jnp.asarray(rng.standard_normal((3, 4, 6)))},
        "head": {"kernel": jnp.zeros((6, 2))},
    }
    ctrl = jo.OIALR(p, jo.OIALRConfig(switch_step=1, layout=layout))
    opt = optax.adam(1e-3).init(p)
    tr, opt = ctrl.switch(p, opt)
    r = 6 if layout == "flax" else 3
    assert tr["conv"]["kernel"].shape == (r, r)
    _close(jo.materialize(tr, ctrl.frozen), p)


@pytest.mark.parametrize("layout", ["flax", "torch"])
def test_materialize_traces_under_jit_and_grad(layout: str) -> None:
    """A training step differentiates (and usually jits) materialize: both layouts must trace (the
    torch layout's reshape back to the weight's shape once checked finiteness on traced values)."""
    rng = np.random.default_rng(2)
    p = {"conv": {"kernel": jnp.asarray(rng.standard_normal((3, 4, 6)))}, "head": {"kernel": jnp.zeros((6, 2))}}  # fmt: skip
    ctrl = jo.OIALR(p, jo.OIALRConfig(switch_step=1, layout=layout))
    tr, _ = ctrl.switch(p, optax.sgd(0.1).init(p))

    def total(t: Any, frozen: Any) -> jax.Array:
        return jnp.sum(jo.materialize(t, frozen)["conv"]["kernel"] ** 2)

    _close(jax.jit(jo.materialize)(tr, ctrl.frozen), p)
    g = jax.grad(total)(tr, ctrl.frozen)["conv"]["kernel"]
    g_jit = jax.jit(jax.grad(total))(tr, ctrl.frozen)["conv"]["kernel"]
    # d/dSigma ||U Sigma V^T||^2 = 2 Sigma (orthonormal U, V)
    np.testing.assert_allclose(np.asarray(g), 2 * np.asarray(tr["conv"]["kernel"]), atol=1e-12)
    np.testing.assert_allclose(np.asarray(g_jit), np.asarray(g), atol=1e-12)


def test_adam_state_follows_the_switch_rule() -> None:
    p = _params()
    tx = optax.adam(1e-2)
    step = _make_step(tx)
    opt = tx.init(p)
    tr = p
    for _ in range(3):
        tr, opt, _ = step(tr, {}, opt)
    ctrl = jo.OIALR(tr, jo.OIALRConfig(switch_step=1))
    mu, nu, count = opt[0].mu, opt[0].nu, opt[0].count
    new_tr, new_opt = ctrl.switch(tr, opt)
    for name, key in (("['l0']['kernel']", "l0"), ("['l1']['kernel']", "l1")):
        b = ctrl.frozen[name]
        U, V = np.asarray(b.U), np.asarray(b.V)
        m1 = np.asarray(mu[key]["kernel"])
        v1 = np.asarray(nu[key]["kernel"])
        np.testing.assert_allclose(
            np.asarray(new_opt[0].mu[key]["kernel"]), U.T @ m1 @ V, atol=1e-12
        )
        want_nu = np.maximum((U * U).T @ v1 @ (V * V), 0)
        np.testing.assert_allclose(np.asarray(new_opt[0].nu[key]["kernel"]), want_nu, atol=1e-12)
        assert np.all(np.asarray(new_opt[0].nu[key]["kernel"]) >= 0)
    assert int(new_opt[0].count) == int(count) == 3
    # untouched leaves are the same arrays
    assert new_opt[0].mu["l2"]["kernel"] is mu["l2"]["kernel"]
    # training goes on in Sigma coordinates, with a first step of the usual size
    tr2, _, _ = step(new_tr, ctrl.frozen, new_opt)
    dense_next, _, _ = step(tr, {}, opt)
    change_lr = np.abs(
        np.asarray(jo.materialize(tr2, ctrl.frozen)["l1"]["kernel"] - tr["l1"]["kernel"])
    ).max()
    change_dense = np.abs(np.asarray(dense_next["l1"]["kernel"] - tr["l1"]["kernel"])).max()
    assert 0.2 * change_dense < change_lr < 3 * change_dense


def test_sgd_momentum_switch_and_rotation_keep_the_trajectory() -> None:
    """For a square kernel (orthogonal U, V) the switch with SGD momentum is exact, and so is a
    re-diagonalization: the factored run equals the dense run."""
    p = {"l1": {"kernel": _params()["l1"]["kernel"]}, "l2": _params()["l2"]}
    tx = optax.sgd(0.1, momentum=0.9)

    def loss(q: Any) -> jax.Array:
        h = jax.nn.relu(_X8 @ q["l1"]["kernel"])
        return optax.softmax_cross_entropy_with_integer_labels(
            h @ q["l2"]["kernel"] + q["l2"]["bias"], _Y
        ).mean()

    @jax.jit
    def step(trainable: Any, frozen: Any, opt_state: Any) -> Any:
        g = jax.grad(lambda t: loss(jo.materialize(t, frozen)))(trainable)
        u, opt_state = tx.update(g, opt_state, trainable)
        return optax.apply_updates(trainable, u), opt_state

    dense, dopt = p, tx.init(p)
    for _ in range(3):
        dense, dopt = step(dense, {}, dopt)
    ctrl = jo.OIALR(
        dense, jo.OIALRConfig(switch_step=10**6, update_every=2, rule=lc.FixedRank(rank=8))
    )
    low, lopt = ctrl.switch(dense, dopt)
    for _ in range(6):
        dense, dopt = step(dense, {}, dopt)
        low, lopt = step(low, ctrl.frozen, lopt)
        low, lopt = ctrl.step(low, lopt)  # rank updates at steps 2, 4, 6: rotations at full rank
        _close(jo.materialize(low, ctrl.frozen), dense, atol=1e-10)
    assert len(ctrl.events("rank")) == 3


@pytest.mark.parametrize(
    "make_tx",
    [lambda: optax.adamw(1e-2, weight_decay=1e-2), lambda: optax.sgd(0.05, momentum=0.9)],
    ids=["adamw", "sgd-momentum"],
)
def test_rank_updates_truncate_params_and_state(make_tx: Any) -> None:
    tx = make_tx()
    p = _params(2)
    step = _make_step(tx)
    ctrl = jo.OIALR(p, jo.OIALRConfig(switch_step=2, update_every=3, rule=lc.FixedRank(rank=3)))
    tr, opt = p, tx.init(p)
    losses = []
    for _ in range(12):
        tr, opt, loss = step(tr, ctrl.frozen, opt)
        losses.append(float(loss))
        before = ctrl.ranks()
        tr, opt = ctrl.step(tr, opt)
        if ctrl.structure_changed and before:
            assert ctrl.ranks() != before
    assert ctrl.ranks() == {"['l0']['kernel']": 3, "['l1']['kernel']": 3}
    assert tr["l1"]["kernel"].shape == (3, 3)
    shapes = {leaf.shape for leaf in jax.tree_util.tree_leaves(opt)}
    assert (3, 3) in shapes and (8, 8) not in shapes and (6, 8) not in shapes
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    # the truncated model is the rank-3 product
    b = ctrl.frozen["['l1']['kernel']"]
    want = np.asarray(b.U) @ np.asarray(tr["l1"]["kernel"]) @ np.asarray(b.V).T
    np.testing.assert_allclose(
        np.asarray(jo.materialize(tr, ctrl.frozen)["l1"]["kernel"]), want, atol=1e-12
    )
    assert ctrl.trainable_count(tr) == 9 + 9 + 24 + 8 + 8 + 3
    assert ctrl.trainable_share(tr) == pytest.approx(ctrl.trainable_count(tr) / jo.count_params(p))


def test_stability_threshold_switches_and_factored_apply() -> None:
    tx = optax.sgd(1e-4)
    p = _params(3)
    step = _make_step(tx)
    ctrl = jo.OIALR(p, jo.OIALRConfig(switch_step=None, stability_threshold=0.9, stability_every=2))
    tr, opt = p, tx.init(p)
    for _ in range(4):
        tr, opt, _ = step(tr, ctrl.frozen, opt)
        tr, opt = ctrl.step(tr, opt)
    assert ctrl.switched == {
        "['l0']['kernel']": 4,
        "['l1']['kernel']": 4,
    }  # tiny lr: stable at once
    values = [e["value"] for e in ctrl.events("stability")]
    assert len(values) == 2 and min(values) > 0.99
    # the factored apply equals the materialized one (factored only where cheaper)
    fk = jo.factored(tr, ctrl.frozen)["l1"]["kernel"]
    assert isinstance(fk, jo.FactoredKernel) and not fk.cheaper_factored  # 8x8 at rank 8
    small = jo.FactoredKernel(fk.U[:, :2], fk.Sigma[:2, :2], fk.V[:, :2], fk.shape, fk.layout)
    assert small.cheaper_factored
    h = _X8
    np.testing.assert_allclose(
        np.asarray(jo.dense(h, small)), np.asarray(h @ small.kernel()), atol=1e-12
    )
    np.testing.assert_allclose(
        np.asarray(_apply(jo.factored(tr, ctrl.frozen), _X)),
        np.asarray(_apply(jo.materialize(tr, ctrl.frozen), _X)),
        atol=1e-12,
    )


def test_float32_stays_float32() -> None:
    p = _params(4, jnp.float32)
    tx = optax.adam(1e-2)
    ctrl = jo.OIALR(p, jo.OIALRConfig(switch_step=1, rule=lc.FixedRank(rank=2), update_every=1))
    tr, opt = p, tx.init(p)
    tr, opt, _ = _make_step(tx)(tr, ctrl.frozen, opt)
    tr, opt = ctrl.step(tr, opt)
    tr, opt = ctrl.step(tr, opt)
    for leaf in jax.tree_util.tree_leaves((tr, ctrl.frozen)):
        assert leaf.dtype == jnp.float32
    for leaf in jax.tree_util.tree_leaves(opt):
        assert leaf.dtype in (jnp.float32, jnp.int32)


def test_flax_linen_and_nnx_params() -> None:
    nn = pytest.importorskip("flax.linen")
    nnx = pytest.importorskip("flax.nnx")

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            return nn.Dense(3)(nn.relu(nn.Dense(8)(nn.relu(nn.Dense(8)(x)))))

    model = MLP()
    params = model.init(jax.random.key(0), _X)
    ctrl = jo.OIALR(params, jo.OIALRConfig(switch_step=1))
    assert ctrl.eligible == ["['params']['Dense_0']['kernel']", "['params']['Dense_1']['kernel']"]
    tx = optax.adam(1e-3)
    tr, _ = ctrl.switch(params, tx.init(params))
    np.testing.assert_allclose(
        np.asarray(model.apply(jo.materialize(tr, ctrl.frozen), _X)),
        np.asarray(model.apply(params, _X)),
        atol=1e-5,  # Flax initializes float32 parameters: an exact switch up to float32 rounding
    )

    class NMLP(nnx.Module):
        def __init__(self, rngs: Any) -> None:
            self.a = nnx.Linear(6, 8, rngs=rngs)
            self.b = nnx.Linear(8, 8, rngs=rngs)
            self.c = nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.c(jax.nn.relu(self.b(jax.nn.relu(self.a(x)))))

    graphdef, state = nnx.split(NMLP(nnx.Rngs(0)), nnx.Param)
    ctrl = jo.OIALR(state, jo.OIALRConfig(switch_step=1))
    assert len(ctrl.eligible) == 2
    tr, _ = ctrl.switch(state, tx.init(state))
    merged = nnx.merge(graphdef, jo.materialize(tr, ctrl.frozen))
    np.testing.assert_allclose(
        np.asarray(merged(_X)), np.asarray(nnx.merge(graphdef, state)(_X)), atol=1e-5
    )


def test_errors() -> None:
    p = _params()
    ctrl = jo.OIALR(p, jo.OIALRConfig(switch_step=1))
    with pytest.raises(lc.ShapeError, match="structure"):
        ctrl.step({"l0": p["l0"]}, None)
    with pytest.raises(lc.ParameterError, match="not an eligible"):
        ctrl.switch(p, optax.sgd(0.1).init(p), ["['l2']['kernel']"])
    assert ctrl.switched == {}
    with pytest.raises(lc.ShapeError):
        jo.dense(_X, jo.FactoredKernel(jnp.eye(2), jnp.eye(2), jnp.eye(2), (2, 2, 1), "flax"))


def test_optimizer_scales_the_updates_of_switched_kernels_from_its_state() -> None:
    """ctrl.optimizer(tx): after the switch each named kernel's update is its scale times tx's, the rest
    unchanged. The multiplier lives in the optimizer state: a jitted update traced before the switch
    (the square kernel keeps its shape at a full-rank switch, so nothing retraces) applies it too."""
    p = _params()
    ctrl = jo.OIALR(
        p, jo.OIALRConfig(switch_step=1, sigma_lr_scale={"*'l1'*": 0.5}, exclude=("*l0*",))
    )
    assert ctrl.eligible == ["['l1']['kernel']"]  # l0 excluded, l2 kept as the last layer
    base = optax.sgd(0.1)
    tx = ctrl.optimizer(base)
    state = tx.init(p)
    assert isinstance(state, jo.SigmaScaleState)
    assert {k: float(v) for k, v in state.scales.items()} == {"['l1']['kernel']": 1.0}
    update = jax.jit(tx.update)
    grads = jax.tree_util.tree_map(jnp.ones_like, p)
    before, _ = update(grads, state, p)  # traced here, before the switch
    np.testing.assert_array_equal(before["l1"]["kernel"], -0.1 * grads["l1"]["kernel"])
    trainable, state = ctrl.switch(p, state)
    assert trainable["l1"]["kernel"].shape == p["l1"]["kernel"].shape == (8, 8)
    assert float(state.scales["['l1']['kernel']"]) == 0.5
    after, state2 = update(grads, state, trainable)
    np.testing.assert_array_equal(after["l1"]["kernel"], 0.5 * -0.1 * grads["l1"]["kernel"])
    np.testing.assert_array_equal(after["l0"]["kernel"], -0.1 * grads["l0"]["kernel"])
    assert state2.scales == state.scales
    # a fresh init after the switch (e.g. a new optimizer for the low-rank phase) starts scaled
    assert float(tx.init(trainable).scales["['l1']['kernel']"]) == 0.5
    with pytest.raises(lc.ParameterTypeError, match="SigmaScaleState"):
        tx.update(grads, base.init(p), p)


def test_scaled_updates_keep_their_dtype() -> None:
    """The multiplier is applied in the update's dtype: bfloat16 updates stay bfloat16 (a float32
    multiplier would promote them, and the parameters with them)."""
    p = {"a": {"kernel": jnp.ones((4, 4), jnp.bfloat16)}, "b": {"kernel": jnp.ones((4, 2))}}
    ctrl = jo.OIALR(p, jo.OIALRConfig(switch_step=1, sigma_lr_scale=4.0))
    tx = ctrl.optimizer(optax.sgd(0.5))
    state = tx.init(p)
    assert list(state.scales) == ["['a']['kernel']"]  # b is kept dense as the last layer
    state = state._replace(scales={k: jnp.asarray(4.0, jnp.float32) for k in state.scales})
    out, _ = tx.update(jax.tree_util.tree_map(jnp.ones_like, p), state, p)
    assert out["a"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out["a"]["kernel"], np.float32), -2.0)


def test_a_scale_without_the_wrapped_optimizer_warns_once_at_the_switch() -> None:
    p = _params()
    ctrl = jo.OIALR(p, jo.OIALRConfig(switch_step=1, sigma_lr_scale=4.0))
    with pytest.warns(UserWarning, match=r"sigma_lr_scale .*not applied.*ctrl\.optimizer"):
        ctrl.switch(p, optax.sgd(0.1).init(p))
    for config, wrap in ((jo.OIALRConfig(switch_step=1, sigma_lr_scale=4.0), True),
                         (jo.OIALRConfig(switch_step=1, sigma_lr_scale=1.0), False)):  # fmt: skip
        quiet = jo.OIALR(p, config)
        tx = quiet.optimizer(optax.sgd(0.1)) if wrap else optax.sgd(0.1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            quiet.switch(p, tx.init(p))


def test_truncate_sigma_state_takes_numpy_integers() -> None:
    from lowrank_jax import optim_state as jstate

    p = {"w": jnp.ones((4, 4))}
    state = optax.adam(1e-2).init(p)
    path = (jax.tree_util.DictKey("w"),)
    cut = jstate.truncate_sigma_state(state, path, 4, np.int64(2))
    assert cut[0].mu["w"].shape == (2, 2)
    for bad in (0, 5, 2.0, True):
        with pytest.raises(lc.RankError):
            jstate.truncate_sigma_state(state, path, 4, bad)


def test_a_failed_step_leaves_the_controller_as_it_was() -> None:
    """A rank update that fails (NaN in a Sigma) raises a LowRankError naming the fault and leaves the
    controller's counts, history, bases and warm-up state as before the call (the trees passed in are
    never changed)."""
    p = _params()
    budget = lc.oialr.RankBudget(0.5, measure="params")
    ctrl = jo.OIALR(p, jo.OIALRConfig(switch_step=1, update_every=2, budget=budget))
    tx = optax.sgd(0.0)
    trainable, opt_state = ctrl.step(p, tx.init(p))  # step 1: the switch
    bad = {
        **trainable,
        "l0": {**trainable["l0"], "kernel": trainable["l0"]["kernel"].at[0, 0].set(jnp.nan)},
    }
    before = (
        ctrl.step_count,
        dict(ctrl.switched),
        list(ctrl.history),
        ctrl.schedule.updates,
        dict(ctrl.frozen),
    )
    with pytest.raises(lc.NonFiniteError):
        ctrl.step(bad, opt_state)  # step 2: a rank update under the budget
    after = (
        ctrl.step_count,
        dict(ctrl.switched),
        list(ctrl.history),
        ctrl.schedule.updates,
        dict(ctrl.frozen),
    )
    assert after == before
    assert not ctrl.structure_changed
