"""lowrank_torch.dldr: recorder, P-SGD, P-BFGS (BatchNorm safety, DDP)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from _ddp import run_workers  # noqa: E402
from torch import nn  # noqa: E402

from lowrank_core.dldr import SnapshotStore, Subspace, fit_subspace  # noqa: E402
from lowrank_torch.dldr import (  # noqa: E402
    SnapshotRecorder,
    SubspaceBFGS,
    SubspaceParametrization,
    SubspaceSGD,
    batchnorm_buffers,
    flatten,
)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _identity_subspace(D: int) -> Subspace:
    eye = torch.eye(D, dtype=torch.float64)
    return Subspace(
        torch.zeros(D, dtype=torch.float64), eye, torch.ones(D, dtype=torch.float64), D, D
    )


def test_psgd_with_full_identity_basis_equals_sgd():
    torch.manual_seed(0)
    x, y = torch.randn(64, 5, dtype=torch.float64), torch.randn(64, 2, dtype=torch.float64)
    a = nn.Linear(5, 2).double()
    b = nn.Linear(5, 2).double()
    b.load_state_dict(a.state_dict())
    D = sum(p.numel() for p in a.parameters())
    sgd = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    psgd = SubspaceSGD(b.parameters(), _identity_subspace(D), lr=0.1, momentum=0.9)
    for _ in range(10):
        for m, opt in ((a, sgd), (b, psgd)):
            opt.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            opt.step()
    wa, wb = flatten(a.parameters()), flatten(b.parameters())
    assert not torch.equal(wa, flatten(nn.Linear(5, 2).double().parameters()))
    torch.testing.assert_close(wb, wa, rtol=1e-12, atol=1e-12)


def test_psgd_stays_in_the_affine_subspace():
    torch.manual_seed(1)
    model = nn.Linear(6, 3)
    w0 = flatten(model.parameters()).clone()
    D = w0.numel()
    P = torch.linalg.qr(torch.randn(D, 4))[0].T.contiguous()
    sub = Subspace(torch.zeros(D), P, torch.ones(4), 4.0, 5)
    opt = SubspaceSGD(model.parameters(), sub, lr=0.05)
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    for _ in range(5):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    delta = flatten(model.parameters()) - w0
    assert delta.abs().max() > 1e-4
    torch.testing.assert_close(P.T @ (P @ delta), delta, atol=1e-5, rtol=0)


def _regression(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 10, generator=g)
    y = x @ torch.randn(10, 1, generator=g) + 0.05 * torch.randn(256, 1, generator=g)
    return x, y


def _record(model, x, y, steps=40, every=1, **kw):
    rec = SnapshotRecorder(model, every=every, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        rec.step()
    return rec


def test_pbfgs_lowers_the_loss_on_a_regression():
    torch.manual_seed(0)
    x, y = _regression()
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 1))
    rec = _record(model, x, y, steps=30)
    sub = rec.fit(8)
    opt = SubspaceBFGS(model.parameters(), sub)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    start = float(closure().detach())
    for _ in range(15):
        opt.step(closure)
    end = float(closure())
    st = opt.state[next(iter(model.parameters()))]
    assert end < 0.7 * start, (start, end)
    assert st["updates"] >= 5  # quasi-Newton updates really happened
    # the weights stayed in origin + span(P^T)
    delta = flatten(model.parameters()) - opt.param.origin
    P = opt.param.subspace.basis
    torch.testing.assert_close(P.T @ (P @ delta), delta, atol=1e-5, rtol=0)


def test_pbfgs_on_a_quadratic_in_the_full_space_converges():
    """f(w) = 0.5 w^T A w - b^T w with the identity basis: BFGS + Armijo reaches the minimizer."""
    torch.manual_seed(0)
    D = 6
    M = torch.randn(D, D, dtype=torch.float64)
    A = M @ M.T + D * torch.eye(D, dtype=torch.float64)
    b = torch.randn(D, dtype=torch.float64)
    w = nn.Parameter(torch.zeros(D, dtype=torch.float64))
    opt = SubspaceBFGS([w], _identity_subspace(D))

    def closure():
        opt.zero_grad()
        loss = 0.5 * w @ A @ w - b @ w
        loss.backward()
        return loss

    for _ in range(25):
        opt.step(closure)
    torch.testing.assert_close(w.detach(), torch.linalg.solve(A, b), atol=1e-6, rtol=1e-6)


def test_pbfgs_line_search_trials_leave_batchnorm_stats_as_after_one_forward():
    torch.manual_seed(0)
    x, y = _regression(3)
    model = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))
    rec = _record(model, x, y, steps=20)
    sub = rec.fit(6)
    opt = SubspaceBFGS(model.parameters(), sub, model=model, alpha0=64.0)  # forces several trials
    forwards = []

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        forwards.append(1)
        return loss

    for _ in range(3):
        before = [b.clone() for b in batchnorm_buffers(model)]
        forwards.clear()
        # what one plain forward at the pre-step weights does to the statistics
        probe = [b.clone() for b in batchnorm_buffers(model)]
        model(x)
        expected = [b.clone() for b in batchnorm_buffers(model)]
        with torch.no_grad():
            for buf, v in zip(batchnorm_buffers(model), probe, strict=True):
                buf.copy_(v)
        opt.step(closure)
        assert len(forwards) >= 2  # there were line-search trials
        after = batchnorm_buffers(model)
        for e, a in zip(expected, after, strict=True):
            torch.testing.assert_close(a, e, rtol=0, atol=0)
        assert any(not torch.equal(a, b0) for a, b0 in zip(after, before, strict=True))
    # without `model=`, the trials do move the statistics (the test can fail)
    opt2 = SubspaceBFGS(model.parameters(), sub, alpha0=64.0)
    before = [b.clone() for b in batchnorm_buffers(model)]

    def closure2():
        opt2.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    opt2.step(closure2)
    assert int(batchnorm_buffers(model)[2]) > int(before[2]) + 1


def test_recorder_excludes_batchnorm_buffers_by_default(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    n_params = sum(p.numel() for p in model.parameters())
    rec = SnapshotRecorder(model)
    rec.record()
    assert rec.store.dim == n_params
    with_buf = SnapshotRecorder(model, SnapshotStore(path=tmp_path / "s.dat"), include_buffers=True)
    with_buf.record()
    assert with_buf.store.dim == n_params + 8 + 8  # running mean and var, not the batch count
    with_buf.store.close()
    every = SnapshotRecorder(model, every=3)
    assert [every.step() for _ in range(7)] == [False, False, True, False, False, True, False]
    assert len(every) == 2


def test_recorder_step_that_raises_is_not_counted():
    # regression: the call was counted before the snapshot was refused, shifting the cadence
    model = nn.Linear(3, 2)
    rec = SnapshotRecorder(model, every=2)
    assert rec.step() is False
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN|finite"):
        rec.step()
    with torch.no_grad():
        model.weight[0, 0] = 0.0
    assert rec.step() is True and len(rec) == 1  # the retried 2nd call records
    assert [rec.step() for _ in range(2)] == [False, True]


def test_recorder_snapshots_match_the_parameters_and_fit_works():
    torch.manual_seed(0)
    x, y = _regression(1)
    model = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 1))
    rec = _record(model, x, y, steps=12, every=2)
    assert len(rec) == 6
    torch.testing.assert_close(rec.store.snapshot(-1), flatten(model.parameters()))
    X = torch.stack([rec.store.snapshot(i) for i in range(6)])
    a, b = rec.fit(3), fit_subspace(X, 3)
    cos = torch.linalg.svdvals(a.basis @ b.basis.T)
    assert float(cos.min()) > 0.999


def test_parametrization_round_trip_and_errors():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    D = sum(p.numel() for p in model.parameters())
    P = torch.linalg.qr(torch.randn(D, 3))[0].T.contiguous()
    sub = Subspace(torch.zeros(D), P, torch.ones(3), 3.0, 4)
    par = SubspaceParametrization(model.parameters(), sub)
    c = torch.tensor([0.3, -0.2, 0.5])
    par.set(c)
    torch.testing.assert_close(par.coordinates(), c)
    with pytest.raises(ValueError, match="dimension"):
        SubspaceParametrization(nn.Linear(4, 2).parameters(), sub)
    with pytest.raises(ValueError, match="closure"):
        SubspaceBFGS(model.parameters(), sub).step()


def test_p_sgd_and_p_bfgs_under_ddp_take_identical_steps(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    reports = run_workers("ddp_dldr_worker.py", tmp_path, timeout=300)
    for rep in reports:
        assert rep["max_param_diff"] == 0.0, rep
        assert rep["snapshots"] == 12
    # different shards: different local losses, yet identical steps
    assert reports[0]["bfgs_first"] != reports[1]["bfgs_first"]
    assert np.mean([r["bfgs_last"] for r in reports]) < np.mean([r["bfgs_first"] for r in reports])


@pytest.mark.parametrize("name", ["p-sgd", "p-bfgs"])
def test_demo_methods_switch_into_the_subspace_and_stay_there(name):
    from lowrank_torch.demo import data, methods, models, train
    from lowrank_torch.dldr import flatten

    mnist = data.load_mnist1d(seed=0, num_samples=500)
    model = models.build_model("mlp", seed=0)
    method = methods.make_method(name, switch_at=0.5, d=5, snapshots=8)
    result = train(model, mnist, method=method, epochs=4, batch_size=100, progress=False)
    assert method.opt is not None and method.fitted_d == 5
    assert result.trainable_share == 5 / result.dense_params
    assert np.isfinite(result.history[-1]["train_loss"])
    # after the switch the weights moved only inside w_switch + span(P)
    par = method.opt.param
    w = flatten(par.params)
    assert not torch.equal(w, par.origin)  # it did take steps
    torch.testing.assert_close(par.weights(par.coordinates()), w, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# validation at construction (issue 9): bad settings are refused before any step
# --------------------------------------------------------------------------------------------------
def _small():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    D = sum(p.numel() for p in model.parameters())
    return model, _identity_subspace(D)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": float("nan")},
        {"lr": float("inf")},
        {"lr": 0.0},
        {"lr": -0.1},
        {"lr": "0.1"},
        {"lr": True},
        {"lr": None},
        {"lr": 1 + 2j},
        {"momentum": float("nan")},
        {"momentum": 1.0},
        {"momentum": -0.5},
        {"weight_decay": float("nan")},
        {"weight_decay": -1.0},
        {"nesterov": 1},
        {"nesterov": True, "momentum": 0.0},
    ],
    ids=repr,
)
def test_subspace_sgd_refuses_bad_settings(kwargs):
    import lowrank_core as lc

    model, sub = _small()
    before = flatten(model.parameters()).clone()
    with pytest.raises(lc.LowRankError):
        SubspaceSGD(model.parameters(), sub, **kwargs)
    assert torch.equal(flatten(model.parameters()), before)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"alpha0": float("nan")},
        {"alpha0": 0.0},
        {"shrink": 1.0},
        {"shrink": 0.0},
        {"shrink": float("nan")},
        {"c1": 1.5},
        {"c1": float("nan")},
        {"max_trials": 0},
        {"max_trials": 2.5},
        {"max_trials": True},
        {"curvature_eps": -1.0},
        {"curvature_eps": float("nan")},
        {"model": "not a module"},
        {"average_loss": 1},
        {"origin": [0.0] * 8},
        {"origin": torch.zeros(5, dtype=torch.float64)},
        {"origin": torch.full((8,), float("nan"), dtype=torch.float64)},
    ],
    ids=repr,
)
def test_subspace_bfgs_refuses_bad_settings(kwargs):
    import lowrank_core as lc

    model, sub = _small()
    with pytest.raises(lc.LowRankError):
        SubspaceBFGS(model.parameters(), sub, **kwargs)


def test_bad_parameters_and_subspaces_get_library_errors():
    import lowrank_core as lc

    model, sub = _small()
    with pytest.raises(lc.LowRankError, match="single tensor"):
        SubspaceSGD(model.weight, sub)
    with pytest.raises(lc.LowRankError, match="empty"):
        SubspaceSGD([], sub)
    with pytest.raises(lc.LowRankError, match="Subspace"):
        SubspaceSGD(model.parameters(), "subspace")
    with pytest.raises(lc.ShapeError, match="dimension"):
        SubspaceSGD(nn.Linear(4, 2).parameters(), sub)
    with pytest.raises(lc.LowRankError, match="single parameter group"):
        SubspaceSGD([{"params": [model.weight]}, {"params": [model.bias]}], sub)
    with pytest.raises(lc.DTypeError):
        SubspaceSGD([torch.zeros(8, dtype=torch.int64)], sub)
    bad = Subspace(
        sub.centre, torch.full_like(sub.basis, float("nan")), sub.explained_variance, 8, 8
    )
    with pytest.raises(lc.NonFiniteError, match="basis"):
        SubspaceSGD(model.parameters(), bad)
    with pytest.raises(lc.LowRankError, match="every"):
        SnapshotRecorder(model, every=0)
    with pytest.raises(lc.LowRankError, match="every"):
        SnapshotRecorder(model, every=1.5)
    with pytest.raises(lc.LowRankError, match="model"):
        SnapshotRecorder("model")
    with pytest.raises(lc.LowRankError, match="closure"):
        SubspaceBFGS(model.parameters(), sub).step()
    # a group lr changed later (by hand or by a scheduler) is checked at the step, before any change
    opt = SubspaceSGD(model.parameters(), sub, lr=0.1)
    opt.param_groups[0]["lr"] = float("nan")
    model(torch.ones(1, 3, dtype=torch.float64)).sum().backward()
    before = flatten(model.parameters()).clone()
    with pytest.raises(lc.LowRankError, match="lr"):
        opt.step()
    assert torch.equal(flatten(model.parameters()), before)
    # NumPy scalars are accepted
    SubspaceSGD(model.parameters(), sub, lr=np.float32(0.1), momentum=np.float64(0.5))
    SubspaceBFGS(model.parameters(), sub, max_trials=np.int64(3))


def test_subspace_bfgs_refuses_a_nan_loss_without_changing_anything():
    import lowrank_core as lc

    model, sub = _small()
    opt = SubspaceBFGS(model.parameters(), sub)
    x = torch.ones(4, 3, dtype=torch.float64)

    def closure():
        opt.zero_grad()
        loss = model(x).sum() * float("nan")
        loss.backward()
        return loss

    before = flatten(model.parameters()).clone()
    state = {k: v for k, v in opt.state[next(iter(model.parameters()))].items()}
    with pytest.raises(lc.NonFiniteError):
        opt.step(closure)
    assert torch.equal(flatten(model.parameters()), before)
    after = opt.state[next(iter(model.parameters()))]
    assert after.keys() == state.keys() and all(after[k] is state[k] for k in state)


# --------------------------------------------------------------------------------------------------
# issue 12: line-search trials need only the loss
# --------------------------------------------------------------------------------------------------
def _count_backward(model):
    count = {"n": 0}

    def hook(_grad):
        count["n"] += 1

    next(iter(model.parameters())).register_hook(hook)
    return count


def test_pbfgs_trials_with_evaluate_run_one_backward_per_step():
    torch.manual_seed(0)
    x, y = _regression()
    results = {}
    for mode in ("closure", "evaluate"):
        model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 1))
        torch.manual_seed(1)
        for p in model.parameters():
            nn.init.normal_(p, std=0.3)
        D = sum(p.numel() for p in model.parameters())
        g = torch.Generator().manual_seed(2)
        P = torch.linalg.qr(torch.randn(D, 6, generator=g))[0].T.contiguous()
        sub = Subspace(torch.zeros(D), P, torch.ones(6), 6.0, 7)
        opt = SubspaceBFGS(model.parameters(), sub, alpha0=4.0)  # a long first trial: backtracking
        count = _count_backward(model)

        def closure(model=model, opt=opt):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        def evaluate(model=model):
            return nn.functional.mse_loss(model(x), y)

        losses = []
        for _ in range(10):
            if mode == "evaluate":
                losses.append(float(opt.step(closure, evaluate=evaluate)))
            else:
                losses.append(float(opt.step(closure)))
        st = opt.state[next(iter(model.parameters()))]
        results[mode] = (count["n"], st["trials"], losses, flatten(model.parameters()))
    n_closure, trials, losses_closure, w_closure = results["closure"]
    n_eval, trials_eval, losses_eval, w_eval = results["evaluate"]
    assert trials == trials_eval > 10  # the searches backtracked
    assert n_closure == 10 + trials  # today: one backward per step and one per trial
    assert n_eval == 10  # with `evaluate`: only the step's own backward
    # the same trajectory: trials evaluate the same loss either way
    assert losses_eval == pytest.approx(losses_closure, rel=1e-6)
    torch.testing.assert_close(w_eval, w_closure, rtol=1e-6, atol=1e-7)


def test_dldr_config_takes_numpy_integers_and_refuses_bad_counts():
    import lowrank_core as lc
    from lowrank_torch.dldr import DLDRConfig

    assert DLDRConfig() == DLDRConfig(record_steps=100, every=1, dim=10)
    cfg = DLDRConfig(record_steps=np.int64(10), every=np.int32(2), dim=3)
    assert (cfg.record_steps, cfg.every, cfg.dim) == (10, 2, 3) and type(cfg.record_steps) is int
    for bad in ({"dim": 0}, {"every": True}, {"record_steps": 2.0}, {"record_steps": 4, "dim": 5}):
        with pytest.raises(lc.ParameterError):
            DLDRConfig(**bad)
