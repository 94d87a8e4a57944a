"""lowrank_torch.optim_state: optimizer state that follows OIALR's switch, re-diagonalization, truncation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from _helpers import random_orthogonal
from _strategies import seeds
from hypothesis import given, settings
from hypothesis import strategies as st

import lowrank_core as lc

torch = pytest.importorskip("torch")
nn = torch.nn

from lowrank_torch.layers import LowRankConv2d, LowRankLinear  # noqa: E402
from lowrank_torch.optim_state import (  # noqa: E402
    MAGNITUDE_KEYS,
    SECOND_MOMENT_KEYS,
    dense_to_sigma_state,
    rotate_sigma_state,
    swap_parameter,
    truncate_sigma_state,
)

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: one intra-op thread is fastest and immune to a busy machine; restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def close(actual, desired, atol=1e-10, rtol=1e-10):
    torch.testing.assert_close(actual, desired, atol=atol, rtol=rtol)


# --------------------------------------------------------------------------------------------------
# a fixed regression problem and a training loop
# --------------------------------------------------------------------------------------------------
def regression(seed, n_in, n_out, samples=64, noise=0.5):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(samples, n_in, generator=gen, dtype=F64)
    W = torch.randn(n_out, n_in, generator=gen, dtype=F64)
    Y = X @ W.T + noise * torch.randn(samples, n_out, generator=gen, dtype=F64)
    return X, Y


def linear(seed, n_in, n_out, bias=True):
    gen = torch.Generator().manual_seed(seed + 1)
    lin = nn.Linear(n_in, n_out, bias=bias, dtype=F64)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, n_in, generator=gen, dtype=F64) / n_in**0.5)
        if bias:
            lin.bias.copy_(0.1 * torch.randn(n_out, generator=gen, dtype=F64))
    return lin


def dense_weight(model):
    """The dense weight of a dense or low-rank layer, detached."""
    return model.weight.detach().clone()


def train(model, opt, X, Y, steps):
    """``steps`` full-batch steps; returns the losses and the dense weights after every step."""
    losses, weights = [], []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(X) - Y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        weights.append(dense_weight(model))
    return losses, weights


def move_parameter(opt, old, new):
    """Like OIALR's bias handling: same slot, the state carried over unchanged."""
    state = opt.state.pop(old, None)
    swap_parameter(opt, old, new)
    if state is not None:
        opt.state[new] = state


def rediagonalize_(layer, opt, rotate=rotate_sigma_state):
    """The brief's re-diagonalization sequence, with the state rule ``rotate``."""
    rd = lc.rediagonalize(layer.U, layer.sigma.detach(), layer.V)
    rotate(opt, layer.sigma, rd.left, rd.right)
    layer.set_factors(rd.U, rd.Sigma, rd.V)
    return rd


def sgd(params, nesterov, weight_decay, lr=0.05):
    return torch.optim.SGD(
        params, lr=lr, momentum=0.9, nesterov=nesterov, weight_decay=weight_decay
    )


def interrupted_vs_uninterrupted(seed, m, n, k, make_opt, rotate=rotate_sigma_state):
    X, Y = regression(seed, n, m)
    base = LowRankLinear.from_dense(linear(seed, n, m))
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    opt_a, opt_b = make_opt(a.parameters()), make_opt(b.parameters())
    loss_a, w_a = train(a, opt_a, X, Y, 2 * k)
    loss_b, w_b = train(b, opt_b, X, Y, k)
    rediagonalize_(b, opt_b, rotate)
    # the re-diagonalization itself is exact
    close(dense_weight(b), w_b[-1], atol=1e-12, rtol=1e-12)
    more_loss, more_w = train(b, opt_b, X, Y, k)
    return loss_a, w_a, loss_b + more_loss, w_b + more_w


# --------------------------------------------------------------------------------------------------
# 1. re-diagonalization: the trajectory does not change (SGD), stays close (Adam)
# --------------------------------------------------------------------------------------------------
@settings(max_examples=25)
@given(
    seed=seeds,
    m=st.integers(1, 6),
    n=st.integers(1, 6),
    k=st.integers(1, 4),
    nesterov=st.booleans(),
    weight_decay=st.sampled_from([0.0, 1e-2]),
)
def test_sgd_momentum_rediagonalization_keeps_the_trajectory(seed, m, n, k, nesterov, weight_decay):
    loss_a, w_a, loss_b, w_b = interrupted_vs_uninterrupted(
        seed, m, n, k, lambda p: sgd(p, nesterov, weight_decay)
    )
    for wa, wb in zip(w_a, w_b, strict=True):
        close(wb, wa, atol=1e-9, rtol=1e-9)
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-9, atol=1e-12)


def _wrong_no_rotation(opt, sigma, left, right):
    pass


def _wrong_transposed(opt, sigma, left, right):
    rotate_sigma_state(opt, sigma, right, left)


def _wrong_zeroed(opt, sigma, left, right):
    for key, value in opt.state[sigma].items():
        if key != "step" and value is not None:
            value.zero_()


@pytest.mark.parametrize("wrong", [_wrong_no_rotation, _wrong_transposed, _wrong_zeroed])
@pytest.mark.parametrize("nesterov", [False, True])
def test_a_wrong_state_rule_breaks_the_trajectory(wrong, nesterov):
    """The property above has teeth: a state rule other than ``left^T M right`` changes the run."""
    _, w_a, _, w_b = interrupted_vs_uninterrupted(
        1, 5, 4, 3, lambda p: sgd(p, nesterov, 0.0), wrong
    )
    gap = max(float((wa - wb).abs().max()) for wa, wb in zip(w_a, w_b, strict=True))
    assert gap > 1e-4


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adam_rediagonalization_is_close_but_not_exact(seed, amsgrad):
    """Adam's second moment is element-wise: no exact transform exists, the squared map is close."""
    k = 6
    loss_a, w_a, loss_b, w_b = interrupted_vs_uninterrupted(
        seed, 6, 5, k, lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=amsgrad)
    )
    gap = max(float((wa - wb).abs().max()) for wa, wb in zip(w_a[k:], w_b[k:], strict=True))
    assert gap > 1e-8  # not exact ...
    np.testing.assert_allclose(loss_b, loss_a, rtol=2e-2)  # ... but close
    step_size = float((w_a[-1] - w_a[-2]).abs().max())
    assert gap < 5 * k * step_size


# --------------------------------------------------------------------------------------------------
# 2. the switch
# --------------------------------------------------------------------------------------------------
def naive_switch(opt, dense, sigma):
    """The reference code's switch: Adam's moments zeroed, the step count kept."""
    step = opt.state[dense]["step"]
    swap_parameter(opt, dense, sigma)
    opt.state[sigma] = {
        "step": step,
        "exp_avg": torch.zeros_like(sigma),
        "exp_avg_sq": torch.zeros_like(sigma),
    }


def switch_ratio(seed, steps, lr, variant):
    """Adam on a square Linear; the dense update right after the switch over the one right before."""
    n = 8
    X, Y = regression(seed, n, n, samples=128)
    lin = linear(seed, n, n, bias=False)
    opt = torch.optim.Adam([lin.weight], lr=lr)
    _, weights = train(lin, opt, X, Y, steps)
    before = (weights[-1] - weights[-2]).norm()
    if variant == "dense":
        layer = lin
    else:
        layer = LowRankLinear.from_dense(lin)  # full rank, square: U, V orthogonal
        if variant == "ours":
            dense_to_sigma_state(opt, lin.weight, layer.sigma, layer.U, layer.V)
        else:
            naive_switch(opt, lin.weight, layer.sigma)
    close(dense_weight(layer), weights[-1], atol=1e-12, rtol=1e-12)
    _, after = train(layer, opt, X, Y, 1)
    return float((after[0] - weights[-1]).norm() / before)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adam_switch_has_no_oversized_first_step(seed):
    """Long after warm-up (bias correction ~1) the first step after the switch keeps its size.

    Measured (seeds 0-2): ours ~1.2x, the naive variant (zeroed moments, kept step) ~4x; the dense run
    itself ~1.0x.
    """
    steps, lr = 2500, 1e-4
    ours = switch_ratio(seed, steps, lr, "ours")
    naive = switch_ratio(seed, steps, lr, "naive")
    dense = switch_ratio(seed, steps, lr, "dense")
    assert 1 / 1.5 < dense < 1.5
    assert 1 / 1.5 < ours < 1.5
    assert naive > 2.5
    assert naive > 2 * ours


def test_sgd_switch_is_exact_for_a_square_weight():
    """SGD with momentum: the switched run makes exactly the dense run's updates, step after step."""
    for nesterov in (False, True):
        X, Y = regression(3, 5, 5)
        dense = linear(3, 5, 5)
        opt = sgd(dense.parameters(), nesterov, 1e-2)
        train(dense, opt, X, Y, 4)
        ref = copy.deepcopy(dense)
        ref_opt = sgd(ref.parameters(), nesterov, 1e-2)
        ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # no shared tensors
        layer = LowRankLinear.from_dense(dense)
        dense_to_sigma_state(opt, dense.weight, layer.sigma, layer.U, layer.V)
        move_parameter(opt, dense.bias, layer.bias)
        ref_loss, ref_w = train(ref, ref_opt, X, Y, 4)
        loss, w = train(layer, opt, X, Y, 4)
        for a, b in zip(ref_w, w, strict=True):
            close(b, a, atol=1e-10, rtol=1e-10)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-10)


def test_grouped_conv_switch():
    """Conv2d with groups=2: per-group factor stacks; exact with SGD for square per-group matrices."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 5, dtype=F64)
    target = torch.randn(3, 4, 5, 5, dtype=F64)
    conv = nn.Conv2d(4, 4, 1, groups=2, dtype=F64)  # per group: (2, 2)
    opt = sgd(conv.parameters(), True, 1e-2)

    def run(model, opt, steps):
        out = []
        for _ in range(steps):
            opt.zero_grad()
            ((model(x) - target) ** 2).mean().backward()
            opt.step()
            out.append(dense_weight(model))
        return out

    run(conv, opt, 3)
    ref = copy.deepcopy(conv)
    ref_opt = sgd(ref.parameters(), True, 1e-2)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # no shared tensors
    layer = LowRankConv2d.from_dense(conv)
    assert layer.sigma.shape == (2, 2, 2)
    dense_to_sigma_state(opt, conv.weight, layer.sigma, layer.U, layer.V, groups=2)
    buf = opt.state[layer.sigma]["momentum_buffer"]
    assert buf.shape == (2, 2, 2)
    move_parameter(opt, conv.bias, layer.bias)
    for a, b in zip(run(ref, ref_opt, 3), run(layer, opt, 3), strict=True):
        close(b, a, atol=1e-10, rtol=1e-10)

    # a non-square per-group matrix (3 x 18) with Adam: U^T M V per group, state shapes (2, 3, 3)
    conv = nn.Conv2d(4, 6, 3, groups=2, padding=1, dtype=F64)
    opt = torch.optim.Adam(conv.parameters(), lr=1e-3)
    target = torch.randn(3, 6, 5, 5, dtype=F64)
    run(conv, opt, 3)
    old = {k: v.clone() for k, v in opt.state[conv.weight].items()}
    layer = LowRankConv2d.from_dense(conv)
    dense_to_sigma_state(opt, conv.weight, layer.sigma, layer.U, layer.V, groups=2)
    new = opt.state[layer.sigma]
    M = old["exp_avg"].reshape(2, 3, 18)
    close(new["exp_avg"], torch.einsum("gia,gij,gjb->gab", layer.U, M, layer.V))
    v = old["exp_avg_sq"].reshape(2, 3, 18)
    close(new["exp_avg_sq"], torch.einsum("gia,gij,gjb->gab", layer.U**2, v, layer.V**2))
    assert new["step"] is old["step"] or torch.equal(new["step"], old["step"])
    move_parameter(opt, conv.bias, layer.bias)
    run(layer, opt, 2)
    assert torch.isfinite(layer.sigma).all()


# --------------------------------------------------------------------------------------------------
# 3. truncation, param groups, schedulers, optimizers, errors, absent state
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["truncate_first", "set_factors_first"])
def test_truncation_keeps_leading_blocks(order):
    X, Y = regression(4, 5, 6)
    layer = LowRankLinear.from_dense(linear(4, 5, 6))
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2, amsgrad=True)
    train(layer, opt, X, Y, 3)
    rd = rediagonalize_(layer, opt)
    rotated = {k: v.clone() for k, v in opt.state[layer.sigma].items()}
    small = lc.truncate(rd.U, rd.Sigma, rd.V, 3)
    old_sigma = layer.sigma

    def set_factors():
        layer.set_factors(*small)
        if layer.sigma is not old_sigma:  # a rank change may give a new Parameter: move it in
            move_parameter(opt, old_sigma, layer.sigma)

    if order == "truncate_first":  # as OIALR does it
        truncate_sigma_state(opt, old_sigma, 3)
        set_factors()
    else:  # the state is cut after it was moved to the (3, 3) parameter
        set_factors()
        truncate_sigma_state(opt, layer.sigma, 3)
    assert [p.shape for p in opt.param_groups[0]["params"]] == [(3, 3), (6,)]
    state = opt.state[layer.sigma]
    assert set(state) == set(rotated)
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert state[key].shape == (3, 3) == layer.sigma.shape
        assert state[key].is_contiguous()
        close(state[key], rotated[key][:3, :3], atol=0, rtol=0)
    assert torch.equal(state["step"], rotated["step"])
    train(layer, opt, X, Y, 2)
    assert layer.sigma.shape == (3, 3)
    with pytest.raises(lc.RankError):
        truncate_sigma_state(opt, layer.sigma, 4)
    with pytest.raises(lc.RankError):
        truncate_sigma_state(opt, layer.sigma, 0)
    assert opt.state[layer.sigma]["exp_avg"].shape == (3, 3)


def test_param_groups_scheduler_adamw_state_dict():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2)).to(F64)
    x, y = torch.randn(32, 6, dtype=F64), torch.randn(32, 2, dtype=F64)
    weights = [model[0].weight, model[2].weight]
    biases = [model[0].bias, model[2].bias]
    opt = torch.optim.AdamW(
        [
            {"params": biases, "lr": 1e-3, "weight_decay": 0.0},
            {"params": weights, "lr": 1e-2, "weight_decay": 0.1},
        ]
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    def run(steps):
        for _ in range(steps):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            opt.step()
            sched.step()
        return loss.item()

    run(3)
    groups_before = list(opt.param_groups)
    lrs_before = [g["lr"] for g in opt.param_groups]
    dense, dense_bias = model[0].weight, model[0].bias
    step_before = opt.state[dense]["step"].clone()
    layer = LowRankLinear.from_dense(model[0])
    dense_to_sigma_state(opt, dense, layer.sigma, layer.U, layer.V)
    move_parameter(opt, dense_bias, layer.bias)
    model[0] = layer

    assert all(a is b for a, b in zip(opt.param_groups, groups_before, strict=True))
    assert opt.param_groups[1]["params"][0] is layer.sigma
    assert opt.param_groups[1]["params"][1] is model[2].weight
    assert opt.param_groups[0]["params"][0] is layer.bias
    assert [g["lr"] for g in opt.param_groups] == lrs_before
    assert opt.param_groups[1]["weight_decay"] == 0.1
    assert dense not in opt.state
    assert dense_bias not in opt.state
    assert torch.equal(opt.state[layer.sigma]["step"], step_before)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters()}

    sigma_before = layer.sigma.detach().clone()
    loss = run(3)  # steps 4..6: the scheduler halves the lr at step 4 and step 6
    assert np.isfinite(loss)
    assert not torch.equal(layer.sigma.detach(), sigma_before)
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-2 * 0.5**3)
    assert sched.get_last_lr()[1] == pytest.approx(1e-2 * 0.5**3)

    # the state dict round-trips into a fresh optimizer over the new parameters
    fresh = torch.optim.AdamW(
        [
            {"params": [layer.bias, model[2].bias], "lr": 1e-3, "weight_decay": 0.0},
            {"params": [layer.sigma, model[2].weight], "lr": 1e-2, "weight_decay": 0.1},
        ]
    )
    fresh.load_state_dict(opt.state_dict())
    close(fresh.state[layer.sigma]["exp_avg"], opt.state[layer.sigma]["exp_avg"], atol=0, rtol=0)


def test_errors_leave_the_optimizer_unchanged():
    lin = linear(0, 4, 4)
    stranger = nn.Parameter(torch.zeros(4, 4, dtype=F64))
    opt = sgd(lin.parameters(), False, 0.0)
    X, Y = regression(0, 4, 4)
    train(lin, opt, X, Y, 1)
    layer = LowRankLinear.from_dense(lin)
    with pytest.raises(lc.ParameterError, match="not in any param group"):
        swap_parameter(opt, stranger, layer.sigma)
    with pytest.raises(lc.ParameterError, match="not in any param group"):
        dense_to_sigma_state(opt, stranger, layer.sigma, layer.U, layer.V)
    with pytest.raises(lc.ParameterError, match="already"):
        swap_parameter(opt, lin.weight, lin.bias)
    with pytest.raises(lc.ParameterTypeError, match="optimizer"):
        swap_parameter("sgd", lin.weight, layer.sigma)
    with pytest.raises(lc.ParameterTypeError, match="new"):
        swap_parameter(opt, lin.weight, "sigma")
    for bad in (0, 5, 2.5, True, "2"):
        with pytest.raises(lc.RankError):
            truncate_sigma_state(opt, lin.weight, bad)
    # factors that do not fit sigma: a ShapeError, and nothing changes
    with pytest.raises(lc.ShapeError):
        dense_to_sigma_state(opt, lin.weight, layer.sigma, layer.U[:, :2], layer.V[:, :2])
    assert opt.param_groups[0]["params"] == [lin.weight, lin.bias]
    assert "momentum_buffer" in opt.state[lin.weight]
    assert layer.sigma not in opt.state
    swap_parameter(opt, lin.weight, lin.weight)  # a no-op
    assert opt.param_groups[0]["params"][0] is lin.weight


@pytest.mark.parametrize("make", [lambda p: torch.optim.Adam(p), lambda p: sgd(p, False, 0.0)])
def test_absent_state(make):
    """An optimizer that never stepped: the switch swaps the parameter, the rest is a no-op."""
    lin = linear(2, 4, 5)
    opt = make(lin.parameters())
    layer = LowRankLinear.from_dense(lin)
    dense_to_sigma_state(opt, lin.weight, layer.sigma, layer.U, layer.V)
    swap_parameter(opt, lin.bias, layer.bias)
    assert opt.param_groups[0]["params"] == [layer.sigma, layer.bias]
    rd = lc.rediagonalize(layer.U, layer.sigma.detach(), layer.V)
    rotate_sigma_state(opt, layer.sigma, rd.left, rd.right)
    truncate_sigma_state(opt, layer.sigma, 2)
    assert layer.sigma not in opt.state
    X, Y = regression(2, 4, 5)
    losses, _ = train(layer, opt, X, Y, 2)
    assert np.isfinite(losses).all()


# --------------------------------------------------------------------------------------------------
# the maps themselves: second moments, magnitudes, dtypes
# --------------------------------------------------------------------------------------------------
def fake_optimizer(shape, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p = nn.Parameter(torch.zeros(shape, dtype=dtype))
    opt = torch.optim.Adam([p])
    opt.state[p] = {
        "step": torch.tensor(7.0),
        "exp_avg": torch.randn(shape, generator=gen, dtype=F64).to(dtype),
        "exp_avg_sq": torch.rand(shape, generator=gen, dtype=F64).to(dtype),
        "exp_inf": torch.rand(shape, generator=gen, dtype=F64).to(dtype),
        "other_shape": torch.ones(3, dtype=F64),
    }
    return p, opt


@given(seed=seeds, r=st.integers(1, 6))
def test_second_moment_map_keeps_sum_and_sign(seed, r):
    rng = np.random.default_rng(seed)
    left = torch.from_numpy(random_orthogonal(rng, r, r))
    right = torch.from_numpy(random_orthogonal(rng, r, r))
    p, opt = fake_optimizer((r, r), seed=seed % 1000)
    old = {k: v.clone() for k, v in opt.state[p].items()}
    other = opt.state[p]["other_shape"]
    rotate_sigma_state(opt, p, left, right)
    new = opt.state[p]
    assert (new["exp_avg_sq"] >= 0).all()
    assert (new["exp_inf"] >= 0).all()
    close(new["exp_avg_sq"].sum(), old["exp_avg_sq"].sum(), atol=1e-12, rtol=1e-12)
    close((new["exp_inf"] ** 2).sum(), (old["exp_inf"] ** 2).sum(), atol=1e-12, rtol=1e-12)
    close(new["exp_avg"], left.T @ old["exp_avg"] @ right)  # first moment: exactly linear
    close(new["exp_avg"].norm(), old["exp_avg"].norm())
    assert torch.equal(new["step"], old["step"])
    assert new["other_shape"] is other
    assert {"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum"} <= SECOND_MOMENT_KEYS
    assert "exp_inf" in MAGNITUDE_KEYS
    assert "exp_avg" not in SECOND_MOMENT_KEYS


@given(seed=seeds, r=st.integers(1, 6), batch=st.sampled_from([(), (2,)]))
def test_signed_permutations_are_exact(seed, r, batch):
    """For a signed permutation every rule is exact: moments are permuted (first moments signed too)."""
    rng = np.random.default_rng(seed)

    def signed_perm():
        mats = []
        for _ in range(int(np.prod(batch, dtype=int))):
            P = np.eye(r)[rng.permutation(r)] * rng.choice([-1.0, 1.0], size=r)
            mats.append(P)
        return torch.from_numpy(np.stack(mats).reshape(*batch, r, r))

    left, right = signed_perm(), signed_perm()
    p, opt = fake_optimizer((*batch, r, r), seed=seed % 1000)
    old = {k: v.clone() for k, v in opt.state[p].items()}
    rotate_sigma_state(opt, p, left, right)
    new = opt.state[p]
    close(new["exp_avg"], left.mT @ old["exp_avg"] @ right, atol=0, rtol=0)
    absl, absr = left.abs(), right.abs()
    close(new["exp_avg_sq"], absl.mT @ old["exp_avg_sq"] @ absr, atol=0, rtol=0)
    close(new["exp_inf"], absl.mT @ old["exp_inf"] @ absr, atol=1e-15, rtol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_state_keeps_its_dtype(dtype):
    r = 5
    rng = np.random.default_rng(3)
    left = torch.from_numpy(random_orthogonal(rng, r, r))  # float64 factors
    right = torch.from_numpy(random_orthogonal(rng, r, r)).to(dtype)
    p, opt = fake_optimizer((r, r), dtype=dtype)
    old = {k: v.clone() for k, v in opt.state[p].items()}
    rotate_sigma_state(opt, p, left, right)
    new = opt.state[p]
    right64 = right.to(F64)
    for key in ("exp_avg", "exp_avg_sq"):
        assert new[key].dtype == dtype
        assert new[key].device == old[key].device
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-6}[dtype]
    close(new["exp_avg"].to(F64), left.T @ old["exp_avg"].to(F64) @ right64, atol=tol, rtol=tol)
    want = (left**2).T @ old["exp_avg_sq"].to(F64) @ right64**2
    close(new["exp_avg_sq"].to(F64), want, atol=tol, rtol=tol)


def test_rotation_and_truncation_refuse_bad_maps_without_changing_the_state():
    lin = linear(0, 4, 4)
    opt = sgd(lin.parameters(), False, 0.0)
    X, Y = regression(0, 4, 4)
    train(lin, opt, X, Y, 1)
    layer = LowRankLinear.from_dense(lin)
    dense_to_sigma_state(opt, lin.weight, layer.sigma, layer.U, layer.V)
    before = opt.state[layer.sigma]["momentum_buffer"].clone()
    eye = torch.eye(4, dtype=F64)
    nan = eye.clone()
    nan[0, 1] = float("nan")
    for left, error in (
        (eye[:, :3], lc.ShapeError),
        (eye[None], lc.ShapeError),
        (nan, lc.NonFiniteError),
        (eye.to(torch.int64), lc.DTypeError),
        (eye.numpy(), lc.ArrayTypeError),
        ([[1.0]], lc.ArrayTypeError),
    ):
        with pytest.raises(error):
            rotate_sigma_state(opt, layer.sigma, left, eye)
        with pytest.raises(error):
            rotate_sigma_state(opt, layer.sigma, eye, left)
    with pytest.raises(lc.ParameterTypeError, match="optimizer"):
        rotate_sigma_state(None, layer.sigma, eye, eye)
    with pytest.raises(lc.ParameterTypeError, match="sigma"):
        truncate_sigma_state(opt, None, 2)
    with pytest.raises(lc.ShapeError):
        truncate_sigma_state(opt, lin.bias, 1)
    assert torch.equal(opt.state[layer.sigma]["momentum_buffer"], before)


def test_flatten_refuses_what_is_not_a_list_of_tensors():
    from lowrank_torch.dldr import flat_grad, flatten

    for bad in (None, 3, torch.zeros(3), [torch.zeros(2), "x"]):
        with pytest.raises(lc.ParameterTypeError):
            flatten(bad)
        with pytest.raises(lc.ParameterTypeError):
            flat_grad(bad)
    with pytest.raises(lc.ParameterError, match="empty"):
        flatten([])


def test_switch_refuses_bad_bases_without_changing_the_optimizer():
    lin = linear(0, 4, 4)
    opt = sgd(lin.parameters(), False, 0.0)
    X, Y = regression(0, 4, 4)
    train(lin, opt, X, Y, 1)
    layer = LowRankLinear.from_dense(lin)
    U, V = layer.U.clone(), layer.V.clone()
    nan = U.clone()
    nan[0, 0] = float("nan")
    cases = [
        (dict(U=nan), lc.NonFiniteError),
        (dict(V=V.to(torch.int64)), lc.DTypeError),
        (dict(U=U.numpy()), lc.ArrayTypeError),
        (dict(V=None), lc.ArrayTypeError),
        (dict(U=U[1:]), lc.ShapeError),
        (dict(groups=0), lc.ParameterError),
        (dict(groups=1.0), lc.ParameterTypeError),
    ]
    for change, error in cases:
        args = {"U": U, "V": V, "groups": 1, **change}
        with pytest.raises(error):
            dense_to_sigma_state(
                opt, lin.weight, layer.sigma, args["U"], args["V"], groups=args["groups"]
            )
        assert opt.param_groups[0]["params"] == [lin.weight, lin.bias]
        assert layer.sigma not in opt.state
