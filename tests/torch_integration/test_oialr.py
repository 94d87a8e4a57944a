"""The OIALR controller: switch, stability, rank updates, progressive updates, resume from a checkpoint."""

from __future__ import annotations

import io

import numpy as np
import pytest

import lowrank_core as lc

torch = pytest.importorskip("torch")
nn = torch.nn

from lowrank_torch.layers import LowRankLayer  # noqa: E402
from lowrank_torch.oialr import OIALR, OIALRConfig  # noqa: E402


def _mlp(seed: int = 0, width: int = 48) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(20, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 5),
    ).double()  # fmt: skip


def _data(n_batches: int = 40, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(20, 5, generator=g, dtype=torch.float64)
    out = []
    for _ in range(n_batches):
        x = torch.randn(32, 20, generator=g, dtype=torch.float64)
        out.append(
            (x, torch.argmax(x @ w + 0.1 * torch.randn(32, 5, generator=g, dtype=torch.float64), 1))
        )
    return out


def _train(model, opt, ctrl, batches, *, start: int = 0, stop: int | None = None) -> list[float]:
    losses = []
    for x, y in batches[start:stop]:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctrl.step()
        losses.append(loss.item())
    return losses


def _in_optimizer(opt, p) -> bool:
    return any(q is p for g in opt.param_groups for q in g["params"])


def test_fixed_step_switch_converts_eligible_layers_and_keeps_the_function():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ctrl = OIALR(model, opt, OIALRConfig(switch_step=5, update_every=1000))
    assert ctrl.eligible == ["0", "2", "4"]  # the head (6) stays dense by default
    batches = _data()
    _train(model, opt, ctrl, batches, stop=4)
    assert not ctrl.layers and ctrl.pending == ["0", "2", "4"]
    x = batches[0][0]
    before = model(x).detach()
    dense_weights = [model[i].weight for i in (0, 2, 4)]
    loss = nn.functional.cross_entropy(model(x), batches[0][1])
    opt.zero_grad()
    loss.backward()
    opt.step()
    after_step = model(x).detach()
    assert ctrl.step() is None
    assert ctrl.structure_changed is True  # the switch (step 5) replaces parameters
    assert sorted(ctrl.layers) == ["0", "2", "4"]
    assert all(isinstance(model[i], LowRankLayer) for i in (0, 2, 4))
    assert isinstance(model[6], nn.Linear)
    # full rank at the switch: the network computes the same function as before it
    torch.testing.assert_close(model(x).detach(), after_step, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(before, after_step)
    for w, i in zip(dense_weights, (0, 2, 4), strict=True):
        assert not _in_optimizer(opt, w)
        assert _in_optimizer(opt, model[i].sigma) and _in_optimizer(opt, model[i].bias)
    assert [e["layer"] for e in ctrl.events("switch")] == ["0", "2", "4"]
    # training goes on, and only sigma/bias move
    U0 = model[2].U.clone()
    _train(model, opt, ctrl, batches, start=5, stop=10)
    torch.testing.assert_close(model[2].U, U0)


def test_stability_switch_happens_once_the_basis_stops_moving():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # nothing moves: stability is 1
    ctrl = OIALR(
        model, opt, OIALRConfig(switch_step=None, stability_threshold=0.999, stability_every=3)
    )
    batches = _data()
    _train(model, opt, ctrl, batches, stop=5)
    assert not ctrl.switched  # the first check (step 3) only takes the snapshot
    _train(model, opt, ctrl, batches, start=5, stop=6)
    assert ctrl.switched == {"0": 6, "2": 6, "4": 6}
    values = [e["value"] for e in ctrl.events("stability")]
    assert values == pytest.approx([1.0, 1.0, 1.0])


def test_no_stability_switch_while_the_basis_turns():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ctrl = OIALR(
        model, opt, OIALRConfig(switch_step=None, stability_threshold=1.0, stability_every=2)
    )
    _train(model, opt, ctrl, _data(), stop=10)
    assert not ctrl.switched
    values = [e["value"] for e in ctrl.events("stability")]
    assert values and all(0.0 < v < 1.0 for v in values)


def test_rank_updates_shrink_sigma_and_its_optimizer_state():
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ctrl = OIALR(model, opt, OIALRConfig(switch_step=2, update_every=4, rule=lc.FixedRank(rank=12)))
    batches = _data()
    _train(model, opt, ctrl, batches, stop=3)
    assert ctrl.ranks() == {"0": 20, "2": 48, "4": 48}
    share_full = ctrl.trainable_share()
    x, y = batches[3]
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    ctrl.step()
    assert ctrl.structure_changed is True  # step 4: rank update with truncation
    assert ctrl.ranks() == {"0": 12, "2": 12, "4": 12}
    for i in (0, 2, 4):
        layer = model[i]
        assert tuple(layer.sigma.shape) == (12, 12)
        assert tuple(layer.U.shape)[1] == 12 and tuple(layer.V.shape)[1] == 12
        for key in ("exp_avg", "exp_avg_sq"):
            assert tuple(opt.state[layer.sigma][key].shape) == (12, 12)
    assert ctrl.trainable_share() < share_full
    expected = (20 * 48 + 48) + (48 * 48 + 48) + (48 * 48 + 48) + (48 * 5 + 5)
    assert ctrl.dense_trainable == expected
    assert ctrl.trainable_share() == pytest.approx((3 * (144 + 48) + 48 * 5 + 5) / expected)
    losses = _train(model, opt, ctrl, batches, start=4, stop=20)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert [e["new"] for e in ctrl.events("rank")][:3] == [12, 12, 12]


def test_update_without_truncation_keeps_the_function_and_reports_no_shape_change():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ctrl = OIALR(model, opt, OIALRConfig(switch_step=1, update_every=3, rule=lc.FixedRank(rank=48)))
    batches = _data()
    _train(model, opt, ctrl, batches, stop=2)
    x, y = batches[2]
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    out = model(x).detach()
    sig_before = model[2].sigma.detach().clone()
    ctrl.step()
    assert ctrl.structure_changed is False  # step 3: re-diagonalization only
    torch.testing.assert_close(model(x).detach(), out, rtol=1e-10, atol=1e-10)
    sig = model[2].sigma.detach()
    assert torch.count_nonzero(sig - torch.diag(torch.diagonal(sig))) == 0  # now diagonal
    assert not torch.equal(sig, sig_before)


def test_sigma_cutoff_rank_never_falls_below_half_per_update():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ctrl = OIALR(model, opt, OIALRConfig(switch_step=1, update_every=2, rule=lc.SigmaCutoff(0.99)))
    _train(model, opt, ctrl, _data(), stop=7)
    for layer in ("2", "4"):
        news = [e["new"] for e in ctrl.events("rank") if e["layer"] == layer]
        assert news[:3] == [24, 12, 6]


def test_progressive_updates_start_with_the_last_layers():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cfg = OIALRConfig(switch_step=1, update_every=2, rule=lc.FixedRank(rank=4), progressive=True)
    ctrl = OIALR(model, opt, cfg)
    _train(model, opt, ctrl, _data(), stop=2)
    assert ctrl.ranks() == {"0": 20, "2": 48, "4": 4}  # 10% of 3 layers, at least one: the last
    _train(model, opt, ctrl, _data(), start=2, stop=4)
    assert ctrl.ranks() == {"0": 20, "2": 4, "4": 4}


def _checkpoint(model, opt, ctrl) -> bytes:
    buf = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "oialr": ctrl.state_dict()}, buf
    )
    return buf.getvalue()


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_resume_from_checkpoint_gives_the_same_losses(optim):
    def build():
        model = _mlp(seed=3)
        if optim == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        cfg = OIALRConfig(
            switch_step=None, stability_threshold=0.5, stability_every=3, update_every=5
        )
        cfg.rule = lc.SigmaCutoff(0.3)
        return model, opt, OIALR(model, opt, cfg)

    batches = _data(36)
    model, opt, ctrl = build()
    straight = _train(model, opt, ctrl, batches)
    assert ctrl.switched and any(e["new"] < e["old"] for e in ctrl.events("rank"))

    model, opt, ctrl = build()
    first = _train(model, opt, ctrl, batches, stop=17)
    blob = _checkpoint(model, opt, ctrl)
    del model, opt, ctrl
    model, opt, ctrl = build()  # a fresh dense model
    ckpt = torch.load(io.BytesIO(blob), weights_only=False)
    ctrl.load_state_dict(ckpt["oialr"])
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    second = _train(model, opt, ctrl, batches, start=17)
    assert first + second == pytest.approx(straight, rel=1e-9, abs=1e-12)


def test_loading_a_checkpoint_of_another_model_fails_clearly():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ctrl = OIALR(model, opt, OIALRConfig(switch_step=1))
    _train(model, opt, ctrl, _data(), stop=2)
    state = ctrl.state_dict()
    other = nn.Sequential(nn.Linear(20, 48), nn.ReLU(), nn.Linear(48, 5)).double()
    ctrl2 = OIALR(other, torch.optim.SGD(other.parameters(), lr=0.1), OIALRConfig(switch_step=1))
    with pytest.raises(ValueError, match="other eligible layers"):
        ctrl2.load_state_dict(state)
    with pytest.raises(ValueError, match="not an OIALR state"):
        ctrl2.load_state_dict({"step_count": 3})


def test_config_and_optimizer_errors():
    with pytest.raises(ValueError, match="switch_step"):
        OIALRConfig(switch_step=None, stability_threshold=None)
    with pytest.raises(ValueError, match="stability_threshold"):
        OIALRConfig(stability_threshold=1.5)
    with pytest.raises(ValueError, match="update_every"):
        OIALRConfig(update_every=0)
    model = _mlp()
    opt = torch.optim.SGD(list(model.parameters())[:2], lr=0.1)
    with pytest.raises(ValueError, match="not in the optimizer"):
        OIALR(model, opt)


def test_conv_and_transformer_models_train_through_switch_and_updates():
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv1d(1, 16, 5, padding=2), nn.ReLU(), nn.Conv1d(16, 32, 3, padding=1, groups=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 20, 10),
    )  # fmt: skip
    layer = nn.TransformerEncoderLayer(
        d_model=16, nhead=4, dim_feedforward=32, batch_first=True, dropout=0.0
    )
    tf = nn.Sequential(layer, nn.Flatten(), nn.Linear(16 * 6, 10))
    for model, shape in ((cnn, (8, 1, 20)), (tf, (8, 6, 16))):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        ctrl = OIALR(
            model, opt, OIALRConfig(switch_step=2, update_every=3, rule=lc.SigmaCutoff(0.5))
        )
        g = torch.Generator().manual_seed(0)
        for _ in range(8):
            x = torch.randn(*shape, generator=g)
            y = torch.randint(0, 10, (8,), generator=g)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            ctrl.step()
            assert torch.isfinite(loss)
        assert ctrl.layers and all(r >= 1 for r in ctrl.ranks().values())
        assert ctrl.trainable_share() < 1.0


def test_history_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    from lowrank_torch.plots import plot_history

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cfg = OIALRConfig(switch_step=9, stability_threshold=1.0, stability_every=2, update_every=4)
    ctrl = OIALR(model, opt, cfg)
    _train(model, opt, ctrl, _data(), stop=20)
    kinds = {e["event"] for e in ctrl.history}
    assert {"stability", "switch", "rank", "share"} <= kinds
    path = plot_history(ctrl.history, tmp_path / "oialr.png", title="test")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def _snapshot(model, opt, ctrl):
    """Every value and identity a rank update may touch."""
    return {
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "params": [id(p) for p in model.parameters()],
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "groups": [[id(p) for p in g["params"]] for g in opt.param_groups],
        "state": {
            id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
            for p, s in opt.state.items()
        },
        "ranks": ctrl.ranks(),
        "step_count": ctrl.step_count,
        "history": len(ctrl.history),
        "updates": ctrl.schedule.updates,
    }


def _assert_same(before, after):
    assert before.keys() == after.keys()
    for key in before:
        a, b = before[key], after[key]
        if key == "model":
            assert a.keys() == b.keys()
            for k in a:
                assert torch.allclose(a[k], b[k], rtol=0, atol=0, equal_nan=True), k
        elif key == "state":
            assert a.keys() == b.keys()
            for pid in a:
                assert a[pid].keys() == b[pid].keys()
                for k, v in a[pid].items():
                    w = b[pid][k]
                    if torch.is_tensor(v):
                        assert torch.allclose(v, w, rtol=0, atol=0, equal_nan=True), k
                    else:
                        assert v == w, k
        else:
            assert a == b, key


@pytest.mark.parametrize("bad", ["4", "2"])
def test_a_nan_during_a_rank_update_changes_nothing_and_names_the_layer(bad):
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ctrl = OIALR(model, opt, OIALRConfig(switch_step=2, update_every=4, rule=lc.FixedRank(rank=12)))
    batches = _data()
    _train(model, opt, ctrl, batches, stop=3)
    assert ctrl.ranks() == {"0": 20, "2": 48, "4": 48}
    with torch.no_grad():
        model[int(bad)].sigma[1, 2] = float("nan")
    before = _snapshot(model, opt, ctrl)
    with pytest.raises(lc.LowRankError, match=f"layer '{bad}'"):
        ctrl.step()  # step 4: the rank update meets the NaN
    _assert_same(before, _snapshot(model, opt, ctrl))
    # once the layer is repaired, the same step succeeds for every layer
    with torch.no_grad():
        model[int(bad)].sigma[1, 2] = 0.0
    ctrl.step()
    assert ctrl.structure_changed is True
    assert ctrl.ranks() == {"0": 12, "2": 12, "4": 12}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"switch_step": 2.5},
        {"switch_step": "10"},
        {"switch_step": True},
        {"switch_step": -1},
        {"stability_threshold": float("nan")},
        {"stability_threshold": "0.5"},
        {"stability_threshold": 0.0},
        {"stability_threshold": True},
        {"stability_every": 0},
        {"stability_every": 1.5},
        {"update_every": np.float64(10.0)},
        {"update_every": None},
        {"rule": "sigma"},
        {"rule": lc.SigmaCutoff},
        {"progressive": 1},
        {"include": "Linear"},
        {"include": (nn.ReLU,)},
        {"exclude_names": 5},
        {"exclude_names": ("a", 3)},
        {"keep_first": None},
        {"keep_last": "no"},
        {"min_aspect": float("nan")},
        {"min_aspect": 2.0},
        {"allow_rank_one": 0},
    ],
    ids=repr,
)
def test_config_refuses_bad_settings_at_construction(kwargs):
    with pytest.raises(lc.LowRankError):
        OIALRConfig(**kwargs)


def test_config_accepts_numpy_scalars_and_a_single_name():
    cfg = OIALRConfig(
        switch_step=np.int64(10),
        stability_threshold=np.float32(0.5),
        update_every=np.int32(7),
        min_aspect=np.float64(0.2),
        exclude_names="head*",
        include=nn.Linear,
    )
    assert cfg.switch_step == 10 and type(cfg.switch_step) is int
    assert cfg.stability_threshold == pytest.approx(0.5) and type(cfg.stability_threshold) is float
    assert cfg.exclude_names == ("head*",) and cfg.include == (nn.Linear,)


def test_controller_refuses_wrong_objects():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(lc.LowRankError, match="model"):
        OIALR("model", opt)
    with pytest.raises(lc.LowRankError, match="optimizer"):
        OIALR(model, "sgd")
    with pytest.raises(lc.LowRankError, match="config"):
        OIALR(model, opt, {"switch_step": 3})
    with pytest.raises(lc.LowRankError, match="not in the optimizer"):
        OIALR(model, torch.optim.SGD(list(model.parameters())[:2], lr=0.1))


@pytest.mark.parametrize("which", ["U", "Sigma", "V"])
def test_layers_refuse_nan_factors_and_set_factors_changes_nothing(which):
    from lowrank_torch.layers import LowRankLinear

    torch.manual_seed(0)
    layer = LowRankLinear.from_dense(nn.Linear(6, 5).double(), 3)
    good = {"U": layer.U.clone(), "Sigma": layer.sigma.detach().clone(), "V": layer.V.clone()}
    bad = dict(good)
    bad[which] = good[which].clone()
    bad[which][0, 0] = float("nan")
    with pytest.raises(lc.NonFiniteError, match=which):
        LowRankLinear(bad["U"], bad["Sigma"], bad["V"], None)
    with pytest.raises(lc.NonFiniteError, match=which):
        layer.set_factors(bad["U"], bad["Sigma"], bad["V"])
    torch.testing.assert_close(layer.U, good["U"], rtol=0, atol=0)
    torch.testing.assert_close(layer.sigma.detach(), good["Sigma"], rtol=0, atol=0)
    torch.testing.assert_close(layer.V, good["V"], rtol=0, atol=0)


@pytest.mark.parametrize("when", ["switch", "stability"])
def test_a_nan_weight_at_the_switch_or_a_stability_check_names_the_layer(when):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    if when == "switch":
        cfg = OIALRConfig(switch_step=3, update_every=100)
    else:
        cfg = OIALRConfig(switch_step=None, stability_threshold=0.9, stability_every=3)
    ctrl = OIALR(model, opt, cfg)
    _train(model, opt, ctrl, _data(), stop=2)
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    before = _snapshot(model, opt, ctrl)
    with pytest.raises(lc.NonFiniteError, match="layer '2'"):
        ctrl.step()
    _assert_same(before, _snapshot(model, opt, ctrl))
    assert not ctrl.switched and not ctrl.warmup


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_sigma_lr_scale_scales_every_update_of_sigma(opt_name):
    """With sigma_lr_scale=s each optimizer update of Sigma is s times the unscaled one (the same
    update: Adam's moments see the same gradients), only for the layers it names."""
    runs = {}
    for scale in (1.0, {"2": 0.25}):
        torch.manual_seed(0)
        model = _mlp()
        make = {
            "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
            "adamw": lambda p: torch.optim.AdamW(p, lr=0.01),
        }[opt_name]
        opt = make(model.parameters())
        ctrl = OIALR(model, opt, OIALRConfig(switch_step=2, update_every=100, sigma_lr_scale=scale))
        x = torch.randn(16, 20, dtype=torch.float64)
        y = torch.randint(0, 5, (16,))
        deltas = []
        for _ in range(4):
            before = {n: layer.sigma.detach().clone() for n, layer in ctrl.layers.items()}
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            deltas.append({n: ctrl.layers[n].sigma.detach() - b for n, b in before.items()})
            ctrl.step()
        runs[str(scale)] = deltas
    plain, scaled = runs["1.0"], runs[str({"2": 0.25})]
    assert plain[0] == {} and set(plain[2]) == {"0", "2", "4"}
    # step 3 is the first after the switch with identical state in both runs
    torch.testing.assert_close(scaled[2]["2"], 0.25 * plain[2]["2"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(scaled[2]["0"], plain[2]["0"], rtol=0, atol=0)
