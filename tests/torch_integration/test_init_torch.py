"""lowrank_torch.init: fixed-rank factorized layers initialized spectrally, nonlinearly or at random."""

from __future__ import annotations

import numpy as np
import pytest

import lowrank_core as lc

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

import lowrank_reference.init as ref  # noqa: E402
from lowrank_torch.convert import count_trainable  # noqa: E402
from lowrank_torch.init import (  # noqa: E402
    frobenius_decay_penalty,
    init_low_rank_layer_,
    layer_rank,
    low_rank_model,
    train_bases_,
)
from lowrank_torch.layers import LowRankConv1d, LowRankLayer, LowRankLinear  # noqa: E402

F64 = torch.float64


def _best(w: np.ndarray, r: int) -> np.ndarray:
    U, s, Vt = np.linalg.svd(w, full_matrices=False)
    return (U[:, :r] * s[:r]) @ Vt[:r]


def _matrix(layer) -> np.ndarray:
    return lc.weight_to_matrix(layer.weight.detach(), groups=layer.groups).numpy()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 16, kernel_size=3, padding=1)
        self.gconv = nn.Conv2d(4, 12, kernel_size=3, groups=2)
        self.fc = nn.Linear(16 * 6, 40)
        self.head = nn.Linear(40, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.head(torch.relu(self.fc(h)))


@pytest.mark.parametrize("init", ["spectral", "nonlinear"])
def test_from_pretrained_reproduces_the_approximation(init):
    torch.manual_seed(0)
    dense = nn.Linear(30, 20, dtype=F64)
    with torch.no_grad():
        dense.weight.mul_(torch.linspace(0.5, 2.0, 30, dtype=F64))  # a "pretrained", non-iid weight
    w = dense.weight.detach().numpy().copy()
    layer = LowRankLinear.from_dense(dense, 5)
    init_low_rank_layer_(layer, dense.weight, init=init, train_bases=False)
    want = _best(w, 5) if init == "spectral" else ref.nonlinear_matrix(w, 5)
    np.testing.assert_allclose(_matrix(layer), want, atol=1e-12)
    # OIALR layout: orthonormal frozen bases, diagonal sigma, only sigma (and bias) trains
    assert not isinstance(layer.U, nn.Parameter) and not isinstance(layer.V, nn.Parameter)
    np.testing.assert_allclose(layer.U.mT @ layer.U, np.eye(5), atol=1e-12)
    np.testing.assert_allclose(layer.V.mT @ layer.V, np.eye(5), atol=1e-12)
    assert count_trainable(layer) == 25 + 20
    # the layer computes the factorized product, on both paths
    x = torch.randn(7, 30, dtype=F64)
    expect = x @ torch.as_tensor(want).mT + dense.bias
    for mode in ("factorized", "dense"):
        layer.forward_mode = mode
        torch.testing.assert_close(layer(x), expect, atol=1e-12, rtol=1e-12)


def test_convolution_and_groups_compute_the_factorized_product():
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 12, kernel_size=3, groups=2, dtype=F64)
    w = conv.weight.detach().numpy().copy()
    model = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(12, 2, 1, dtype=F64))
    layers = low_rank_model(model, rank=3, init="spectral", keep_last=True)
    layer = layers["0"]
    assert layer.rank == 3 and layer.groups == 2
    mats = w.reshape(2, 6, 18)
    got = _matrix(layer)
    for g in range(2):
        np.testing.assert_allclose(got[g], _best(mats[g], 3), atol=1e-12)
    x = torch.randn(2, 4, 7, 7, dtype=F64)
    want_w = torch.as_tensor(np.stack([_best(mats[g], 3) for g in range(2)]).reshape(w.shape))
    expect = F.conv2d(x, want_w, conv.bias, groups=2)
    for mode in ("factorized", "dense"):
        layer.forward_mode = mode
        torch.testing.assert_close(layer(x), expect, atol=1e-12, rtol=1e-12)
    # balanced, trainable factors: U, V are parameters with equal Gram matrices, sigma = I
    assert isinstance(layer.U, nn.Parameter) and isinstance(layer.V, nn.Parameter)
    torch.testing.assert_close(layer.sigma.detach(), torch.eye(3, dtype=F64).expand(2, 3, 3))
    torch.testing.assert_close(layer.U.mT @ layer.U, layer.V.mT @ layer.V, atol=1e-12, rtol=0)


def test_low_rank_model_with_optimizer_trains_all_factors():
    torch.manual_seed(2)
    model = Net()
    dense_params = count_trainable(model)
    bias_before = model.fc.bias
    opt = torch.optim.SGD(
        [
            {"params": [model.conv.weight, model.conv.bias], "lr": 0.1},
            {
                "params": list(model.fc.parameters())
                + list(model.head.parameters())
                + list(model.gconv.parameters()),
                "lr": 0.01,
            },
        ]
    )
    layers = low_rank_model(model, 0.25, init="nonlinear", optimizer=opt)
    assert set(layers) == {"conv", "gconv", "fc"}  # head kept dense (keep_last)
    assert isinstance(model.conv, LowRankConv1d) and isinstance(model.fc, LowRankLinear)
    assert model.fc.rank == layer_rank((40, 96), 0.25) == 10
    assert model.fc.bias is bias_before  # the dense bias Parameter itself
    # the optimizer holds exactly the model's parameters, the new ones in the old weight's group
    in_opt = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in in_opt} == {id(p) for p in model.parameters()}
    assert len(in_opt) == len(list(model.parameters()))
    assert any(p is model.conv.U for p in opt.param_groups[0]["params"])
    assert any(p is model.fc.sigma for p in opt.param_groups[1]["params"])
    # trainable counts: (m + n + r) r per layer (groups: per group) plus the biases and the dense head
    fc, conv = model.fc, model.conv
    expect = (40 + 96 + 10) * 10 + 40 + (16 + 12 + 3) * 3 + 16
    g = model.gconv
    expect += 2 * (6 + 18 + g.rank) * g.rank + 12 + sum(p.numel() for p in model.head.parameters())
    assert count_trainable(model) == expect
    assert count_trainable(model) < dense_params
    # one step changes every factor
    x = torch.randn(5, 4, 6)
    before = [t.detach().clone() for t in (fc.U, fc.sigma, fc.V, conv.U)]
    model(x).square().mean().backward()
    opt.step()
    after = [fc.U, fc.sigma, fc.V, conv.U]
    assert all(not torch.equal(b, a.detach()) for b, a in zip(before, after, strict=True))


def test_nonlinear_not_worse_than_spectral_on_a_layer():
    torch.manual_seed(3)
    dense = nn.Linear(64, 128, dtype=F64)  # a fresh default init: from-scratch
    errs = {}
    for init in ("spectral", "nonlinear"):
        layer = LowRankLinear.from_dense(dense, 4)
        init_low_rank_layer_(layer, dense.weight, init=init, refine_steps=0)
        errs[init] = float(
            lc.init.relu_function_error(dense.weight.detach(), layer.weight.detach())
        )
    assert errs["nonlinear"] < errs["spectral"]


def test_random_init_matches_the_dense_variance():
    torch.manual_seed(4)
    dense = nn.Linear(256, 384, dtype=F64)
    layer = LowRankLinear.from_dense(dense, 32)
    init_low_rank_layer_(layer, dense.weight, init="random", seed=0)
    want = 1.0 / (3 * 256)  # PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    var_dense = float(dense.weight.detach().square().mean())
    var_low = float(layer.weight.detach().square().mean())
    assert abs(var_dense / want - 1) < 0.05
    # relative sd of this estimate is about sqrt(2/m + 2/n)/sqrt(r) ~ 2%: 10% is a 5-sigma bound, and
    # the natural mistakes (a factor r or 1/r) are far outside
    assert abs(var_low / want - 1) < 0.10, var_low / want


def test_from_scratch_redraws_the_dense_init():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 2))
    with torch.no_grad():
        model[0].weight.fill_(1.0)  # a rank-1 "pretrained" weight
    torch.manual_seed(6)
    fresh = nn.Linear(20, 20).weight.detach().clone()
    torch.manual_seed(6)
    low_rank_model(model, rank=4, init="spectral", from_scratch=True)
    got = model[0].weight.detach().numpy()
    np.testing.assert_allclose(got, _best(fresh.numpy().astype(np.float64), 4), atol=1e-5)


def test_transformer_attention_is_converted_and_initialized():
    from lowrank_torch.demo.models import build_model

    model = build_model("transformer", seed=0).double()
    attn = model.layers[0].self_attn
    in_proj = attn.in_proj_weight.detach().numpy().copy()
    layers = low_rank_model(model, 0.25, init="spectral", train_bases=False)
    key = "layers.0.self_attn.parametrizations.in_proj_weight.0"
    assert key in layers
    r = layers[key].rank
    np.testing.assert_allclose(attn.in_proj_weight.detach().numpy(), _best(in_proj, r), atol=1e-12)
    out = model(torch.randn(3, 40, dtype=F64))
    assert out.shape == (3, 10) and torch.isfinite(out).all()


def test_demo_methods_register_and_train_a_step():
    from lowrank_torch.demo.methods import make_method, method_names
    from lowrank_torch.demo.models import build_model

    assert {"lowrank-spectral", "lowrank-nonlinear"} <= set(method_names())
    for name in ("lowrank-spectral", "lowrank-nonlinear"):
        model = build_model("mlp", seed=0)
        dense = count_trainable(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        method = make_method(name, rank_fraction=0.1)
        method.setup(model, opt, steps_per_epoch=1, epochs=1)
        assert isinstance(model.net[2], LowRankLinear) and model.net[2].rank == 51
        share = method.trainable_share(model, dense)
        assert 0 < share < 1 and share == count_trainable(model) / dense
        assert {id(p) for g in opt.param_groups for p in g["params"]} == {
            id(p) for p in model.parameters()
        }
        loss = F.cross_entropy(model(torch.randn(8, 40)), torch.randint(0, 10, (8,)))
        loss.backward()
        opt.step()


def test_demo_methods_keep_the_first_layer_dense_unless_asked():
    from lowrank_torch.demo.methods import make_method
    from lowrank_torch.demo.models import build_model

    for keep in (None, False):
        model = build_model("cnn", seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        options = {} if keep is None else {"keep_first": keep}
        make_method("lowrank-nonlinear", **options).setup(model, opt, steps_per_epoch=1, epochs=1)
        first, second = model.features[0], model.features[2]
        assert isinstance(second, LowRankLayer)  # the later convs are factorized either way
        assert isinstance(first, LowRankLayer) == (keep is False)


def test_frobenius_decay_penalty_gradients():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(12, 10, dtype=F64), nn.ReLU(), nn.Linear(10, 3, dtype=F64))
    assert float(frobenius_decay_penalty(model)) == 0.0
    low_rank_model(model, rank=3, init="nonlinear")
    layer = model[0]
    penalty = frobenius_decay_penalty(model, coefficient=0.5)
    W = layer.weight.detach()
    torch.testing.assert_close(penalty.detach(), 0.25 * W.square().sum())
    penalty.backward()
    # d/dU of c/2 ||U S V^T||^2 = c W V S^T; d/dS = c U^T W V; d/dV = c W^T U S
    U, S, V = layer.U.detach(), layer.sigma.detach(), layer.V.detach()
    torch.testing.assert_close(layer.U.grad, 0.5 * W @ V @ S.mT)
    torch.testing.assert_close(layer.sigma.grad, 0.5 * U.mT @ W @ V)
    torch.testing.assert_close(layer.V.grad, 0.5 * W.mT @ U @ S)
    # the core's analytic gradient wrt the (U S, V) split agrees
    gl, gr = lc.init.frobenius_decay_grad(U @ S, V, coefficient=0.5)
    torch.testing.assert_close(layer.V.grad, gr)
    torch.testing.assert_close(layer.U.grad, gl @ S.mT)


def test_errors():
    dense = nn.Linear(6, 5)
    layer = LowRankLinear.from_dense(dense, 2)
    with pytest.raises(ValueError, match="init"):
        init_low_rank_layer_(layer, dense.weight, init="svd")
    with pytest.raises(ValueError, match="shape"):
        init_low_rank_layer_(layer, torch.zeros(6, 5))
    with pytest.raises(lc.NonFiniteError):
        init_low_rank_layer_(layer, torch.full((5, 6), float("nan")))
    with pytest.raises(TypeError):
        train_bases_(dense)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="rank_fraction"):
            low_rank_model(model, bad)
    with pytest.raises(ValueError, match="rank"):
        low_rank_model(model, rank=0)
    with pytest.raises(ValueError, match="init"):
        low_rank_model(model, init="pca")
    other = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="optimizer"):
        low_rank_model(model, optimizer=other)
    from lowrank_torch.demo.methods import make_method

    with pytest.raises(ValueError, match="rank_fraction"):
        make_method("lowrank-nonlinear", rank_fraction=0.0)


# --------------------------------------------------------------------------------------------------
# issue 9: every bad input gets a library error, and a failed conversion changes nothing
# --------------------------------------------------------------------------------------------------
def _model_state(model, opt=None):
    out = {
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "params": [id(p) for p in model.parameters()],
        "values": {k: v.clone() for k, v in model.state_dict().items()},
    }
    if opt is not None:
        out["groups"] = [[id(p) for p in g["params"]] for g in opt.param_groups]
    return out


def _assert_same_model(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if key == "values":
            assert a[key].keys() == b[key].keys()
            assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rank_fraction": float("nan")},
        {"rank_fraction": "0.5"},
        {"rank_fraction": True},
        {"rank": 2.5},
        {"rank": True},
        {"rank": "3"},
        {"init": 3},
        {"train_bases": 1},
        {"from_scratch": "yes"},
        {"refine_steps": -1},
        {"refine_steps": 1.5},
        {"seed": -3},
        {"seed": 1.5},
        {"optimizer": "sgd"},
    ],
    ids=repr,
)
def test_low_rank_model_refuses_bad_settings(kwargs):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    before = _model_state(model)
    with pytest.raises(lc.LowRankError):
        low_rank_model(model, **kwargs)
    _assert_same_model(before, _model_state(model))


def test_low_rank_model_with_an_optimizer_missing_a_weight_changes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    params = [p for n, p in model.named_parameters() if n != "2.weight"]
    opt = torch.optim.SGD(params, lr=0.1)
    before = _model_state(model, opt)
    with pytest.raises(lc.LowRankError, match="'2'"):
        low_rank_model(model, rank=2, optimizer=opt, from_scratch=True)
    _assert_same_model(before, _model_state(model, opt))


def test_low_rank_model_failing_halfway_restores_structure_and_redrawn_weights(monkeypatch):
    import lowrank_torch.init as lti

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = _model_state(model, opt)
    real = lti.init_low_rank_layer_
    calls = {"n": 0}

    def failing(layer, weight, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise lc.NonFiniteError("injected failure in the second layer")
        return real(layer, weight, **kw)

    monkeypatch.setattr(lti, "init_low_rank_layer_", failing)
    with pytest.raises(lc.NonFiniteError, match="injected"):
        low_rank_model(model, rank=2, optimizer=opt, from_scratch=True)
    assert calls["n"] == 2
    _assert_same_model(before, _model_state(model, opt))


def test_init_layer_and_penalty_refuse_bad_input():
    dense = nn.Linear(6, 5)
    layer = LowRankLinear.from_dense(dense, 2)
    with pytest.raises(lc.LowRankError, match="layer"):
        init_low_rank_layer_(dense, dense.weight)
    with pytest.raises(lc.LowRankError, match="weight"):
        init_low_rank_layer_(layer, dense.weight.detach().numpy())
    with pytest.raises(lc.DTypeError):
        init_low_rank_layer_(layer, torch.zeros(5, 6, dtype=torch.int64))
    with pytest.raises(lc.LowRankError, match="refine_steps"):
        init_low_rank_layer_(layer, dense.weight, refine_steps=-2)
    with pytest.raises(lc.LowRankError, match="seed"):
        init_low_rank_layer_(layer, dense.weight, init="random", seed="x")
    with pytest.raises(lc.LowRankError, match="train_bases"):
        init_low_rank_layer_(layer, dense.weight, train_bases=None)
    with pytest.raises(lc.NonFiniteError, match="too large for the layer's dtype"):
        init_low_rank_layer_(layer, dense.weight.detach().double() * 1e160)  # a float32 layer
    with pytest.raises(lc.LowRankError, match="shape"):
        layer_rank((0, 5), 0.5)
    with pytest.raises(lc.LowRankError, match="shape"):
        layer_rank((8.5, 10), 0.5)
    with pytest.raises(lc.LowRankError, match="rank_fraction"):
        layer_rank((8, 10), float("nan"))
    assert layer_rank((8, 10), np.float32(0.5)) == 4
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    low_rank_model(model, rank=2)
    for bad in (float("nan"), float("inf"), -1.0, "1", None, True):
        with pytest.raises(lc.LowRankError, match="coefficient"):
            frobenius_decay_penalty(model, coefficient=bad)
    with pytest.raises(lc.LowRankError, match="model"):
        frobenius_decay_penalty("model")
    with pytest.raises(lc.LowRankError, match="LowRankLayer"):
        train_bases_(dense)


def test_torch_backend_random_normal_validates_shape_and_seed():
    b = lc.get_backend(torch.zeros(1))
    for shape in ((2, 2.5), (-1, 3), "ab", 3, (True, 2)):
        with pytest.raises(lc.LowRankError):
            b.random_normal(shape)
    for seed in (-1, 1.5, True, "1"):
        with pytest.raises(lc.LowRankError, match="seed"):
            b.random_normal((2, 2), seed=seed)
    a = b.random_normal((2, 3), seed=np.int64(4), dtype=torch.float64)
    assert torch.equal(a, b.random_normal((2, 3), seed=4, dtype=torch.float64))


def test_layer_and_conversion_errors_are_library_errors():
    """Fuzz findings in layers.py / convert.py fixed alongside (each was a plain error or silent)."""
    from lowrank_torch.convert import count_trainable as count
    from lowrank_torch.convert import eligible_names, trainable_share
    from lowrank_torch.layers import LowRankConv2d, low_rank_attention_

    dense = nn.Linear(6, 5).double()
    layer = LowRankLinear.from_dense(dense, 2)
    U, S, V = layer.U, layer.sigma.detach(), layer.V
    for bias, error in (
        (torch.full((5,), float("nan"), dtype=F64), lc.NonFiniteError),
        (torch.zeros(5, dtype=torch.int64), lc.DTypeError),
    ):
        with pytest.raises(error, match="bias"):
            LowRankLinear(U, S, V, bias)
    for mode, error in (("bogus", lc.ParameterError), (3, lc.ParameterTypeError)):
        with pytest.raises(error, match="forward_mode"):
            LowRankLinear(U, S, V, None, forward_mode=mode)
    for bad in (None, 3, torch.zeros(2)):
        with pytest.raises(lc.ParameterTypeError):
            LowRankLinear.from_dense(bad)
        with pytest.raises(lc.ParameterTypeError):
            LowRankConv2d.from_dense(bad)
        with pytest.raises(lc.ParameterTypeError):
            low_rank_attention_(bad)
    with pytest.raises(lc.LowRankError, match="groups"):
        LowRankLayer(U, S, V, None, weight_shape=(5, 6), groups=True)
    with pytest.raises(lc.LowRankError, match="weight_shape"):
        LowRankLayer(U, S, V, None, weight_shape="ab")
    with pytest.raises(lc.ParameterTypeError, match="model"):
        count("model")
    for bad in (0, 1.5, True, None):
        with pytest.raises(lc.LowRankError, match="dense_count"):
            trainable_share(dense, bad)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    for kwargs in (
        {"keep_first": 1},
        {"keep_last": None},
        {"min_aspect": "0.1"},
        {"min_aspect": True},
    ):
        with pytest.raises(lc.LowRankError):
            eligible_names(model, **kwargs)
