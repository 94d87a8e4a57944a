"""One OIALR for every framework: the torch and JAX controllers take the same decisions, keep the same
history and save the same state for the same weights, and map optimizer moments by the same rule."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")
torch = pytest.importorskip("torch")

import lowrank_core as lc  # noqa: E402
from lowrank_jax import oialr as jo  # noqa: E402
from lowrank_jax import optim_state as jstate  # noqa: E402
from lowrank_torch import oialr as to  # noqa: E402
from lowrank_torch import optim_state as tstate  # noqa: E402

jax.config.update("jax_enable_x64", True)

SHAPES = {"0": (12, 8), "2": (12, 12), "4": (3, 12)}  # (out, in): torch's layout


def _script(steps: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Weights per step: each layer drifts, more slowly for the earlier layers, so that their bases
    settle at different steps."""
    rng = np.random.default_rng(seed)
    w = {n: rng.standard_normal(s) for n, s in SHAPES.items()}
    out = []
    for t in range(steps):
        scale = {"0": 0.3 / (1 + t), "2": 0.3 / (1 + t / 6), "4": 0.3}
        w = {n: w[n] + scale[n] * rng.standard_normal(SHAPES[n]) for n in SHAPES}
        out.append({n: v.copy() for n, v in w.items()})
    return out


def _torch_model() -> Any:
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 12),
        torch.nn.ReLU(),
        torch.nn.Linear(12, 12),
        torch.nn.ReLU(),
        torch.nn.Linear(12, 3),
    ).double()
    return model


def _config(framework: Any, budget: bool = False) -> Any:
    kwargs: dict[str, Any] = {
        "switch_step": 14,
        "stability_threshold": 0.995,
        "stability_every": 2,
        "update_every": 3,
        "rule": lc.FixedRank(rank=5),
        "progressive": True,
    }
    if budget:  # a global budget, reached gradually by step 18 of 20 (an update step)
        kwargs.pop("rule")
        kwargs.update(progressive=False, total_steps=20)
        kwargs["budget"] = lc.oialr.RankBudget(0.35, measure="params", reach_at=0.9)
    if framework is jo:
        kwargs["layout"] = "torch"
    return framework.OIALRConfig(**kwargs)


def _jax_name(torch_name: str) -> str:
    return f"['{torch_name}']['weight']"


@pytest.mark.parametrize("budget", [False, True], ids=["rule", "budget"])
def test_torch_and_jax_controllers_take_the_same_decisions_and_save_the_same_state(
    budget: bool,
) -> None:
    script = _script(20)
    model = _torch_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    tctrl = to.OIALR(model, opt, _config(to, budget))
    params = {
        n: {"weight": jnp.asarray(script[0][n]), "bias": jnp.zeros(SHAPES[n][0])} for n in SHAPES
    }
    jctrl = jo.OIALR(params, _config(jo, budget))
    assert (
        [_jax_name(n) for n in tctrl.eligible]
        == jctrl.eligible
        == ["['0']['weight']", "['2']['weight']"]
    )
    trainable, opt_state = params, optax.sgd(0.0).init(params)
    for weights in script:
        with torch.no_grad():  # the scripted weights, written into whatever is still dense
            for n in tctrl.pending:
                model.get_submodule(n).weight.copy_(torch.from_numpy(weights[n]))
        tctrl.step()
        pend = set(jctrl.pending)
        trainable = {
            n: {
                **leaf,
                "weight": jnp.asarray(weights[n]) if _jax_name(n) in pend else leaf["weight"],
            }
            for n, leaf in trainable.items()
        }
        trainable, opt_state = jctrl.step(trainable, opt_state)

    # the same decisions: switch steps, rank updates, the same events in the same order
    assert {_jax_name(n): t for n, t in tctrl.switched.items()} == jctrl.switched
    assert 0 < min(jctrl.switched.values()) < 14  # the stability rule switched one layer early
    assert {_jax_name(n): r for n, r in tctrl.ranks().items()} == jctrl.ranks()
    assert tctrl.schedule.updates == jctrl.schedule.updates > 0
    tev, jev = tctrl.history, jctrl.history
    assert [(e["step"], e["event"]) for e in tev] == [(e["step"], e["event"]) for e in jev]
    for a, b in zip(tev, jev, strict=True):
        if "layer" in a:
            assert _jax_name(a["layer"]) == b["layer"]
        for key in ("value",):
            if key in a and a["event"] == "stability":
                assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12)
        for key in ("rank", "old", "new"):
            assert a.get(key) == b.get(key)

    # the same saved state, in one schema
    ts, js = tctrl.state_dict(), jctrl.state_dict()
    assert ts["format"] == js["format"] == lc.oialr.STATE_FORMAT
    assert ts["version"] == js["version"] == lc.oialr.STATE_VERSION
    common = ("step_count", "updates", "switched", "ranks", "eligible", "warmup", "history")
    assert set(common) <= set(ts) and set(common) <= set(js)
    assert ts["step_count"] == js["step_count"] and ts["updates"] == js["updates"]
    assert {_jax_name(n): v for n, v in ts["switched"].items()} == js["switched"]
    assert {_jax_name(n): v for n, v in ts["ranks"].items()} == js["ranks"]
    assert set(ts["warmup"]) == set() == set(js["warmup"])  # both layers switched
    if budget:  # the budget holds at the end, and was reached gradually
        shapes = {"0": (12, 8), "2": (12, 12)}
        cost = lc.oialr.budget_cost("params", shapes, tctrl.ranks())
        assert 0.25 < cost <= 0.35
        rank_steps = sorted({e["step"] for e in tctrl.events("rank") if e["new"] < e["old"]})
        assert len(rank_steps) >= 2


def _torch_state(opt_name: str) -> tuple[Any, Any, dict[str, Any]]:
    """A Linear (6 x 5) trained 3 steps by a torch optimizer: (weight, optimizer, its state)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 6, bias=False).double()
    make = {
        "adam": lambda p: torch.optim.Adam(p, lr=0.01),
        "adamw": lambda p: torch.optim.AdamW(p, lr=0.01),
        "adamax": lambda p: torch.optim.Adamax(p, lr=0.01),
        "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
        "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01),
        "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.01),
    }[opt_name]
    opt = make(layer.parameters())
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(7, 5, dtype=torch.float64)).pow(2).sum().backward()
        opt.step()
    return layer.weight, opt, dict(opt.state[layer.weight])


# torch key -> (optax state builder from the torch values, how to read the mapped value back, kinds)
def _optax_state(opt_name: str, st: dict[str, Any]) -> tuple[Any, dict[str, str], dict[str, Any]]:
    def tree(x: Any) -> dict[str, Any]:
        return {"w": jnp.asarray(x.detach().numpy())}

    count = jnp.asarray(3, jnp.int32)
    if opt_name in ("adam", "adamw"):
        state = optax.ScaleByAdamState(count, tree(st["exp_avg"]), tree(st["exp_avg_sq"]))
        return state, {}, {"exp_avg": ("mu",), "exp_avg_sq": ("nu",)}
    if opt_name == "adamax":
        state = optax.ScaleByAdamState(count, tree(st["exp_avg"]), tree(st["exp_inf"]))
        return state, jstate.ADAMAX_KINDS, {"exp_avg": ("mu",), "exp_inf": ("nu",)}
    if opt_name == "sgd_momentum":
        return optax.TraceState(tree(st["momentum_buffer"])), {}, {"momentum_buffer": ("trace",)}
    if opt_name == "rmsprop":
        return optax.ScaleByRmsState(tree(st["square_avg"])), {}, {"square_avg": ("nu",)}
    state = optax.ScaleByRssState(tree(st["sum"]))
    return state, {}, {"sum": ("sum_of_squares",)}


@pytest.mark.parametrize(
    "opt_name", ["adam", "adamw", "adamax", "sgd_momentum", "rmsprop", "adagrad"]
)
@pytest.mark.parametrize("event", ["switch", "rotation"])
def test_torch_and_jax_map_optimizer_moments_the_same(opt_name: str, event: str) -> None:
    weight, opt, before = _torch_state(opt_name)
    rng = np.random.default_rng(1)
    jax_state, kinds, fields = _optax_state(opt_name, before)
    if event == "switch":
        f = lc.factorize(weight.detach())
        sigma = torch.nn.Parameter(f.Sigma.clone())
        tstate.dense_to_sigma_state(opt, weight, sigma, f.U, f.V)
        after = opt.state[sigma]
        mapped = jstate.dense_to_sigma_state(
            jax_state, (jax.tree_util.DictKey("w"),), (6, 5), lambda x: x,
            jnp.asarray(f.U.numpy()), jnp.asarray(f.V.numpy()), kinds=kinds,
        )  # fmt: skip
    else:
        square = torch.nn.Parameter(torch.zeros(5, 5, dtype=torch.float64))
        opt.param_groups[0]["params"][0] = square  # a 5 x 5 Sigma with the same kind of state
        opt.state[square] = {
            k: (v[:5, :5].clone() if torch.is_tensor(v) and v.ndim == 2 else v)
            for k, v in before.items()
        }
        jax_state, kinds, fields = _optax_state(opt_name, opt.state[square])
        left = torch.from_numpy(np.linalg.qr(rng.standard_normal((5, 5)))[0])
        right = torch.from_numpy(np.linalg.qr(rng.standard_normal((5, 5)))[0])
        tstate.rotate_sigma_state(opt, square, left, right)
        after = opt.state[square]
        mapped = jstate.rotate_sigma_state(
            jax_state, (jax.tree_util.DictKey("w"),),
            jnp.asarray(left.numpy()), jnp.asarray(right.numpy()), kinds=kinds,
        )  # fmt: skip
    for key, (field,) in fields.items():
        got = np.asarray(getattr(mapped, field)["w"])
        want = after[key].numpy()
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14, err_msg=f"{opt_name} {key}")
        if key in ("exp_avg_sq", "exp_inf", "square_avg", "sum"):
            assert (got >= 0).all()


def test_adamax_infinity_norm_is_a_magnitude_only_when_told() -> None:
    """optax's Adamax keeps its infinity norm under Adam's field name: without the override it is
    mapped as a second moment (a different value), with ADAMAX_KINDS as torch maps ``exp_inf``."""
    weight, opt, before = _torch_state("adamax")
    jax_state, _, _ = _optax_state("adamax", before)
    f = lc.factorize(weight.detach())
    args = ((jax.tree_util.DictKey("w"),), (6, 5), lambda x: x)
    U, V = jnp.asarray(f.U.numpy()), jnp.asarray(f.V.numpy())
    as_second = jstate.dense_to_sigma_state(jax_state, *args, U, V)
    as_magnitude = jstate.dense_to_sigma_state(jax_state, *args, U, V, kinds=jstate.ADAMAX_KINDS)
    sigma = torch.nn.Parameter(f.Sigma.clone())
    tstate.dense_to_sigma_state(opt, weight, sigma, f.U, f.V)
    want = opt.state[sigma]["exp_inf"].numpy()
    np.testing.assert_allclose(np.asarray(as_magnitude.nu["w"]), want, rtol=1e-12, atol=1e-14)
    assert not np.allclose(np.asarray(as_second.nu["w"]), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_torch_and_jax_train_the_same_with_a_sigma_lr_scale(opt_name: str) -> None:
    """The same data, init and ``sigma_lr_scale``: PyTorch (the optimizer's step hooks) and JAX
    (``OIALR.optimizer``) give the same weights after the switch. ``W = U Sigma V^T`` is compared: it
    does not depend on the signs each framework's SVD gives the singular vectors. A JAX optimizer that
    ignored the scale would end ~1e-2 away (the test's 4 steps at x4 after a switch at step 2)."""
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((32, 8)), rng.standard_normal((32, 3))
    model = _torch_model()
    with torch.no_grad():
        for n, (m, k) in SHAPES.items():
            model.get_submodule(n).weight.copy_(torch.from_numpy(rng.standard_normal((m, k)) / 3))
            model.get_submodule(n).bias.zero_()
    params = {
        n: {"weight": jnp.asarray(model.get_submodule(n).weight.detach().numpy()),
            "bias": jnp.zeros(SHAPES[n][0])}
        for n in SHAPES
    }  # fmt: skip
    lr = 0.05 if opt_name == "sgd" else 0.01
    opt = (torch.optim.SGD if opt_name == "sgd" else torch.optim.Adam)(model.parameters(), lr=lr)
    settings = {"switch_step": 2, "update_every": 100, "sigma_lr_scale": 4.0}
    tctrl = to.OIALR(model, opt, to.OIALRConfig(**settings))
    jctrl = jo.OIALR(params, jo.OIALRConfig(layout="torch", **settings))
    tx = jctrl.optimizer((optax.sgd if opt_name == "sgd" else optax.adam)(lr))
    tx_plain = (optax.sgd if opt_name == "sgd" else optax.adam)(lr)

    def forward(p: Any, xs: Any) -> Any:
        h = jax.nn.relu(xs @ p["0"]["weight"].T + p["0"]["bias"])
        h = jax.nn.relu(h @ p["2"]["weight"].T + p["2"]["bias"])
        return h @ p["4"]["weight"].T + p["4"]["bias"]

    def jax_loss(t: Any, frozen: Any) -> Any:
        return jnp.mean((forward(jo.materialize(t, frozen), jnp.asarray(x)) - jnp.asarray(y)) ** 2)

    trainable, opt_state = params, tx.init(params)
    plain_t, plain_state = params, tx_plain.init(params)
    plain_ctrl = jo.OIALR(
        params, jo.OIALRConfig(layout="torch", **{**settings, "sigma_lr_scale": 1.0})
    )
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(6):
        loss = torch.nn.functional.mse_loss(model(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        tctrl.step()
        g = jax.grad(jax_loss)(trainable, jctrl.frozen)
        updates, opt_state = tx.update(g, opt_state, trainable)
        trainable, opt_state = jctrl.step(optax.apply_updates(trainable, updates), opt_state)
        g = jax.grad(jax_loss)(plain_t, plain_ctrl.frozen)
        updates, plain_state = tx_plain.update(g, plain_state, plain_t)
        plain_t, plain_state = plain_ctrl.step(optax.apply_updates(plain_t, updates), plain_state)
    assert set(tctrl.switched) == {"0", "2"}
    dense_j = jo.materialize(trainable, jctrl.frozen)
    dense_plain = jo.materialize(plain_t, plain_ctrl.frozen)
    for n in ("0", "2"):
        w_torch = model.get_submodule(n).weight.detach().numpy()
        # float64 on both sides; the SVDs and products differ in order only: 1e-9 is far below the
        # scale's effect (checked below)
        np.testing.assert_allclose(np.asarray(dense_j[n]["weight"]), w_torch, rtol=0, atol=1e-9)
        assert np.abs(np.asarray(dense_plain[n]["weight"]) - w_torch).max() > 1e-4
