"""Online CMD for PyTorch (lowrank_torch.cmd): swapping, memory, exactness, embedding, checkpoints, DDP."""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from _ddp import run_workers  # noqa: E402
from torch import nn  # noqa: E402

import lowrank_core as lc  # noqa: E402
from lowrank_core.errors import (  # noqa: E402
    DeviceMismatchError,
    LowRankError,
    ParameterError,
    ParameterTypeError,
    RankError,
)
from lowrank_reference import cmd as ref  # noqa: E402
from lowrank_torch.cmd import CMDConfig, CMDTracker, NotFittedError  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def _train_epoch(model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator) -> None:
    for _ in range(4):
        x = torch.randn(32, 8, generator=gen)
        y = torch.randint(0, 3, (32,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _flat(model: nn.Module) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double().numpy()


def _run(config: CMDConfig, epochs: int, seed: int = 0):
    model = _model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    cmd = CMDTracker(model, config)
    traj = []
    for _ in range(epochs):
        _train_epoch(model, opt, gen)
        cmd.after_epoch()
        traj.append(_flat(model))
    return model, cmd, np.stack(traj, axis=1)


def test_online_cmd_equals_batch_least_squares_on_the_whole_run():
    cfg = CMDConfig(warmup_epochs=4, max_modes=3, num_samples=200, dtype="float64")
    _, cmd, traj = _run(cfg, epochs=12)
    assert cmd.fitted and cmd.epochs_seen == 12
    state = cmd.state
    a, b = cmd.coefficients()
    mode = state.assignment.numpy()
    ra, rb = ref.cmd_lstsq(traj, traj[state.references], mode)
    np.testing.assert_allclose(a.numpy(), ra, atol=1e-8 * (1 + np.abs(ra).max()))
    np.testing.assert_allclose(b.numpy(), rb, atol=1e-8 * (1 + np.abs(rb).max()))
    # the modes and assignment are the post-hoc fit of the warm-up epochs
    want = ref.cmd_assign(traj[:, :4], traj[state.references, :4])
    np.testing.assert_array_equal(mode, want)


def test_swap_in_and_out_restores_the_exact_weights():
    model, cmd, traj = _run(CMDConfig(warmup_epochs=3, max_modes=2, num_samples=100), epochs=5)
    before = [p.detach().clone() for p in model.parameters()]
    storages = [p.data.data_ptr() for p in model.parameters()]
    x = torch.randn(5, 8)
    out_trained = model(x)
    with cmd.swapped():
        inside = [p.detach().clone() for p in model.parameters()]
        out_cmd = model(x)
    for p, w in zip(inside, cmd.cmd_weights(), strict=True):
        torch.testing.assert_close(p, w, rtol=0, atol=0)
    assert not torch.equal(out_cmd, out_trained)  # the CMD weights are really different
    for p, b, ptr in zip(model.parameters(), before, storages, strict=True):
        assert torch.equal(p.detach(), b)  # bit for bit
        assert p.data.data_ptr() == ptr  # the very same storage: nothing was copied back
    with pytest.raises(RuntimeError, match="boom"), cmd.swapped():
        raise RuntimeError("boom")
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.detach(), b)
    # the CMD weights are a * r(t) + b at the last epoch
    a, bb = cmd.coefficients()
    refs = cmd.state.references
    mode = cmd.state.assignment.numpy()
    want = a.numpy() * traj[refs, -1][mode] + bb.numpy()
    np.testing.assert_allclose(torch.cat([w.reshape(-1) for w in inside]).numpy(), want, atol=1e-5)


def test_swap_before_the_fit_changes_nothing():
    model, cmd, _ = _run(CMDConfig(warmup_epochs=5, max_modes=2), epochs=2)
    before = [p.detach().clone() for p in model.parameters()]
    with cmd.swapped():
        pass
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    with pytest.raises(RuntimeError, match="not fitted"):
        cmd.cmd_weights()
    with pytest.raises(NotFittedError):  # a LowRankError too
        cmd.coefficients()


def test_state_memory_does_not_grow_with_epochs():
    cfg = CMDConfig(warmup_epochs=3, max_modes=2, num_samples=100)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    cmd = CMDTracker(model, cfg)
    n = cmd.num_params
    sizes = []
    for epoch in range(1, 31):
        _train_epoch(model, opt, gen)
        cmd.after_epoch()
        if epoch < 3:
            assert cmd.state_nbytes() == n * 3 * 4  # the warm-up trajectory, float32
        else:  # fitted at epoch 3: the warm-up trajectory is gone
            assert cmd.fitted
            m = cmd.state.num_modes
            sizes.append(cmd.state_nbytes() - m * epoch * 4)  # minus the M x t profiles
    assert len(set(sizes)) == 1, sizes
    assert sizes[0] <= n * (4 + 4 + 4) + 64  # w_mean, c_wr (float32), assignment (int32), O(M)


def test_embedded_cmd_overwrites_the_settled_parameters():
    cfg = CMDConfig(
        warmup_epochs=3, max_modes=2, num_samples=100, embed=True, embed_every=2,
        embed_fraction=0.2, dtype="float64",
    )  # fmt: skip
    _, cmd, traj = _run(cfg, epochs=9)  # embeddings after epochs 5, 7, 9
    n = cmd.num_params
    emb = cmd.embedded.numpy()
    assert emb.sum() == 3 * math.ceil(0.2 * n)
    assert not emb[cmd.state.references].any()
    # embedded weights equal their CMD model a r(t) + b (t = the last epoch)
    a, b = cmd.coefficients()
    mode = cmd.state.assignment.numpy()
    model_w = a.numpy() * traj[cmd.state.references, -1][mode] + b.numpy()
    np.testing.assert_allclose(traj[emb, -1], model_w[emb], atol=1e-6)
    assert np.abs(traj[~emb, -1] - model_w[~emb]).max() > 1e-4  # the others are free


def _reloaded(model, cmd):
    """A model and tracker of another config loaded from ``model`` and ``cmd``'s saved states."""
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "cmd": cmd.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    twin_model = _model(seed=1)
    twin_model.load_state_dict(saved["model"])
    twin = CMDTracker(twin_model, CMDConfig(warmup_epochs=9, max_modes=5))
    twin.load_state_dict(saved["cmd"])
    return twin_model, twin


@pytest.mark.parametrize("stop", [2, 6])  # during the warm-up, and after the fit
def test_state_dict_resumes_identically(stop):
    cfg = CMDConfig(warmup_epochs=4, max_modes=2, num_samples=100, embed=True, embed_every=2)
    model, cmd, _ = _run(cfg, epochs=stop)
    twin_model, twin = _reloaded(model, cmd)
    assert twin.config == cfg
    for m, c in ((model, cmd), (twin_model, twin)):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(7)
        for _ in range(4):
            _train_epoch(m, opt, gen)
            c.after_epoch()
    for u, v in zip(cmd.coefficients(), twin.coefficients(), strict=True):
        assert torch.equal(u, v)
    assert torch.equal(cmd.embedded, twin.embedded)
    with pytest.raises(lc.CheckpointError, match="parameters"):
        CMDTracker(nn.Linear(2, 2)).load_state_dict(cmd.state_dict())


def test_config_validation():
    with pytest.raises(ValueError, match="warmup_epochs"):
        CMDConfig(warmup_epochs=1)
    with pytest.raises(ValueError, match="max_modes"):
        CMDConfig(max_modes=None)
    with pytest.raises(ValueError, match="embed_fraction"):
        CMDConfig(embed_fraction=0.0)
    with pytest.raises(ValueError, match="no trainable"):
        CMDTracker(nn.ReLU())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"warmup_epochs": 2.5},
        {"warmup_epochs": True},
        {"warmup_epochs": "20"},
        {"max_modes": 2.5},
        {"max_modes": True},
        {"max_modes": 0},
        {"tol": float("nan")},
        {"tol": 1.5},
        {"tol": "0.1"},
        {"num_samples": 2.5},
        {"num_samples": 0},
        {"seed": -1},
        {"seed": 0.5},
        {"metric": "cosine"},
        {"metric": None},
        {"chunk_size": 0},
        {"chunk_size": 1.5},
        {"warmup_device": 3},
        {"warmup_device": "no-such-device"},
        {"dtype": "float16"},
        {"dtype": 32},
        {"embed": 1},
        {"embed": "yes"},
        {"embed_every": 0},
        {"embed_every": 2.5},
        {"embed_fraction": 0.0},
        {"embed_fraction": 1.5},
        {"embed_fraction": float("nan")},
        {"embed_fraction": "0.1"},
    ],
)
def test_config_refuses_bad_values_at_construction(kwargs):
    # regression: 2.5 was truncated, True taken as 1, NaN/str/None failed only at the first fit
    with pytest.raises(LowRankError):
        CMDConfig(**kwargs)


def test_config_accepts_numpy_scalars_and_stores_plain_values():
    cfg = CMDConfig(
        warmup_epochs=np.int64(3), max_modes=np.int32(2), num_samples=np.int64(100),
        seed=np.int64(1), embed_fraction=np.float32(0.25), warmup_device=torch.device("cpu"),
    )  # fmt: skip
    assert type(cfg.warmup_epochs) is int and cfg.warmup_epochs == 3
    assert type(cfg.max_modes) is int and type(cfg.num_samples) is int and type(cfg.seed) is int
    assert type(cfg.embed_fraction) is float and cfg.embed_fraction == 0.25
    assert cfg.warmup_device == "cpu"
    assert cfg == CMDConfig(
        warmup_epochs=3, max_modes=2, num_samples=100, seed=1, embed_fraction=0.25
    )
    assert (
        CMDConfig().metric == "euclidean"
    )  # the paper's distance (measured: benchmarks/cmd_distance.py)
    with pytest.raises(RankError):
        CMDConfig(max_modes=2.0)


def test_tracker_arguments_and_errors_are_library_errors():
    with pytest.raises(ParameterTypeError):
        CMDTracker(_model(), config={"warmup_epochs": 3})
    with pytest.raises(ParameterTypeError):
        CMDTracker("model")
    with pytest.raises(ParameterTypeError):
        CMDTracker([1.0, 2.0])
    with pytest.raises(ParameterError, match="no trainable"):
        CMDTracker(nn.ReLU())
    with pytest.raises(DeviceMismatchError):
        CMDTracker([nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, device="meta"))])


def test_load_state_dict_refuses_bad_states_and_changes_nothing():
    cfg = CMDConfig(warmup_epochs=3, max_modes=2, num_samples=100, embed=True, embed_every=2)
    _, cmd, _ = _run(cfg, epochs=5)
    good = cmd.state_dict()
    _, other, _ = _run(CMDConfig(warmup_epochs=4, max_modes=2, num_samples=100), epochs=2, seed=1)
    before = other.state_dict()
    core = good["core"]
    bad_states = [
        "state",
        {k: v for k, v in good.items() if k != "core"},
        {**good, "extra": 1},
        {**good, "num_params": 2.5},
        {**good, "num_params": good["num_params"] + 1},
        {**good, "config": {**good["config"], "max_modes": 2.5}},
        {**good, "config": {**good["config"], "colour": "red"}},
        {**good, "config": "cfg"},
        {**good, "epochs_seen": -1},
        {**good, "fit_epoch": "3"},
        {**good, "warmup": torch.zeros(3)},
        {**good, "embedded": torch.zeros(good["num_params"])},
        {**good, "prev": [core["w_mean"]]},
        {**good, "core": {**core, "w_mean": core["w_mean"][:-1]}},
        {**good, "core": {**core, "references": core["references"].double()}},
        {**good, "core": {**core, "c_wr": core["c_wr"] * float("nan")}},
        {**good, "core": {k: v for k, v in core.items() if k != "r_m2"}},
        {**good, "core": "core"},
    ]
    for bad in bad_states:
        # a fault of the saved content: the same class as lowrank_jax's tracker and OIALR
        with pytest.raises(lc.CheckpointError):
            other.load_state_dict(bad)  # type: ignore[arg-type]
        after = other.state_dict()
        assert after["config"] == before["config"] and after["epochs_seen"] == before["epochs_seen"]
        assert torch.equal(after["warmup"], before["warmup"]) and after["core"] is None
    other.load_state_dict(good)
    assert other.fitted


def test_auto_modes_from_tolerance():
    cfg = CMDConfig(warmup_epochs=5, max_modes=None, tol=0.5, num_samples=100)
    _, cmd, _ = _run(cfg, epochs=6)
    m_loose = cmd.state.num_modes
    _, cmd, _ = _run(CMDConfig(warmup_epochs=5, max_modes=None, tol=0.05, num_samples=100), 6)
    assert cmd.state.num_modes >= m_loose


def test_demo_method_cmd_runs():
    pytest.importorskip("mnist1d")
    from lowrank_torch.demo import data, methods, models
    from lowrank_torch.demo.train import train

    method = methods.make_method("cmd", warmup_epochs=2, max_modes=2, num_samples=200)
    assert method.name == "cmd"
    mnist = data.load_mnist1d(seed=0, num_samples=400)
    model = models.build_model("mlp", seed=0)
    result = train(model, mnist, method=method, epochs=3, progress=False)
    assert result.trainable_share == 1.0
    assert method.cmd.fitted and method.cmd.epochs_seen == 3


def test_cmd_identical_on_every_rank_under_ddp(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    reports = run_workers("ddp_cmd_worker.py", tmp_path, timeout=120)
    for rep in reports:
        assert rep["fitted"]
        assert rep["max_state_diff"] == 0.0, rep  # identical CMD state on both ranks
        assert rep["max_swap_diff"] == 0.0, rep  # and the exact weights back after evaluation
    assert reports[0]["references"] == reports[1]["references"]
    assert reports[0]["final_loss"] != reports[1]["final_loss"]  # really different data shards


# ------------------------------------------------------------------------------ per-step cadence
def _state_tensors(state: dict, prefix: str = "") -> dict:
    """Every tensor and plain value of a (nested) tracker state, by dotted key."""
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(_state_tensors(v, f"{prefix}{k}."))
        elif isinstance(v, (list, tuple)):
            out.update({f"{prefix}{k}.{i}": x for i, x in enumerate(v)})
        else:
            out[f"{prefix}{k}"] = v
    return out


def _assert_same_state(a: dict, b: dict, skip: tuple[str, ...] = ()) -> None:
    fa, fb = _state_tensors(a), _state_tensors(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        if k in skip:
            continue
        x, y = fa[k], fb[k]
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), k
        else:
            assert x == y, k


@pytest.mark.parametrize("epochs", [2, 9])  # during the warm-up; after the fit and 3 embeddings
def test_step_every_epoch_length_equals_after_epoch_bit_for_bit(epochs):
    base = dict(warmup_epochs=3, max_modes=2, num_samples=100, embed=True, embed_every=2,
                embed_fraction=0.2)  # fmt: skip
    per_epoch_model, per_epoch, _ = _run(CMDConfig(**base), epochs=epochs)
    # the same training, CMD fed once per optimizer step (4 steps per epoch in _train_epoch)
    model = _model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    per_step = CMDTracker(model, CMDConfig(**base, every_n_steps=4))
    for _ in range(epochs):
        for _ in range(4):
            x = torch.randn(32, 8, generator=gen)
            y = torch.randint(0, 3, (32,), generator=gen)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            per_step.step()
    assert per_step.steps_seen == 4 * epochs and per_epoch.steps_seen == 0
    assert per_step.epochs_seen == per_step.time_points == per_epoch.epochs_seen == epochs
    assert per_step.fitted == per_epoch.fitted == (epochs >= 3)
    _assert_same_state(
        per_step.state_dict(), per_epoch.state_dict(), skip=("steps_seen", "config.every_n_steps")
    )
    # the embedding wrote the same values into both models
    for p, q in zip(model.parameters(), per_epoch_model.parameters(), strict=True):
        assert torch.equal(p, q)
    if epochs >= 3:
        for u, v in zip(per_step.cmd_weights(), per_epoch.cmd_weights(), strict=True):
            assert torch.equal(u, v)


def test_step_makes_a_time_point_of_every_nth_call():
    model = _model()
    cmd = CMDTracker(
        model, CMDConfig(warmup_epochs=3, max_modes=2, num_samples=50, every_n_steps=3)
    )
    points = []
    for i in range(1, 11):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * i * torch.randn_like(p))
        cmd.step()
        points.append(cmd.time_points)
    assert points == [0, 0, 1, 1, 1, 2, 2, 2, 3, 3]  # the fit at the 9th call
    assert cmd.steps_seen == 10 and cmd.fitted


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (0, ParameterError),
        (-3, ParameterError),
        (2.5, ParameterTypeError),
        (True, ParameterTypeError),
        ("4", ParameterTypeError),
        (4.0, ParameterTypeError),
    ],
)
def test_every_n_steps_is_validated_at_construction(value, error):
    with pytest.raises(error, match="every_n_steps"):
        CMDConfig(every_n_steps=value)


def test_every_n_steps_accepts_numpy_integers_and_round_trips():
    cfg = CMDConfig(every_n_steps=np.int64(5))
    assert type(cfg.every_n_steps) is int and cfg.every_n_steps == 5
    assert CMDConfig().every_n_steps is None
    assert CMDConfig(**dataclasses.asdict(cfg)) == cfg


def test_one_cadence_per_tracker_and_a_wrong_call_changes_nothing():
    per_epoch = CMDTracker(_model(), CMDConfig(warmup_epochs=3, max_modes=2))
    with pytest.raises(ParameterError, match="every_n_steps"):
        per_epoch.step()
    per_step = CMDTracker(_model(), CMDConfig(warmup_epochs=3, max_modes=2, every_n_steps=2))
    per_step.step()
    with pytest.raises(ParameterError, match=r"step\(\)"):
        per_step.after_epoch()
    for c in (per_epoch, per_step):
        assert c.epochs_seen == 0 and c.state_nbytes() == 0
    assert per_epoch.steps_seen == 0 and per_step.steps_seen == 1


def test_a_failed_time_point_is_not_counted():
    # regression: after_epoch counted the epoch before the NaN check refused it
    model = _model()
    cmd = CMDTracker(model, CMDConfig(warmup_epochs=3, max_modes=2, every_n_steps=2))
    epoch_cmd = CMDTracker(model, CMDConfig(warmup_epochs=3, max_modes=2))
    cmd.step()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(LowRankError, match="NaN"):
        cmd.step()
    with pytest.raises(LowRankError, match="NaN"):
        epoch_cmd.after_epoch()
    assert cmd.steps_seen == 1 and cmd.epochs_seen == 0
    assert epoch_cmd.epochs_seen == 0


@pytest.mark.parametrize("stop", [5, 13])  # between time points, during the warm-up; after the fit
def test_state_dict_keeps_the_step_counter(stop):
    cfg = CMDConfig(warmup_epochs=3, max_modes=2, num_samples=100, every_n_steps=3)

    def nudge(m: nn.Module, i: int) -> None:
        with torch.no_grad():
            for j, p in enumerate(m.parameters()):
                g = torch.Generator().manual_seed(100 * i + j)
                p.add_(0.01 * torch.randn(p.shape, generator=g))

    model = _model()
    cmd = CMDTracker(model, cfg)
    for i in range(stop):
        nudge(model, i)
        cmd.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "cmd": cmd.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert saved["cmd"]["steps_seen"] == stop
    twin_model = _model(seed=1)
    twin_model.load_state_dict(saved["model"])
    twin = CMDTracker(twin_model, CMDConfig(warmup_epochs=5, max_modes=3))
    twin.load_state_dict(saved["cmd"])
    assert twin.steps_seen == stop and twin.config == cfg
    for i in range(stop, 20):
        for m, c in ((model, cmd), (twin_model, twin)):
            nudge(m, i)
            c.step()
    _assert_same_state(cmd.state_dict(), twin.state_dict())
    assert cmd.steps_seen == 20 and cmd.epochs_seen == 6
    for bad in (-1, 2.5, "5", None):
        with pytest.raises(lc.CheckpointError, match="steps_seen"):
            twin.load_state_dict({**saved["cmd"], "steps_seen": bad})
    assert twin.steps_seen == 20
    with pytest.raises(lc.CheckpointError, match="steps_seen"):
        twin.load_state_dict({k: v for k, v in saved["cmd"].items() if k != "steps_seen"})


def test_sharded_tracker_refuses_the_per_step_cadence_clearly():
    from lowrank_torch.sharded import ShardedCMDTracker

    with pytest.raises(ParameterError, match="every_n_steps"):
        ShardedCMDTracker(_model(), CMDConfig(every_n_steps=2))  # before any process group check
    with pytest.raises(ParameterError, match="profile"):
        ShardedCMDTracker(_model(), CMDConfig(profile="centroid"))


def test_centroid_profile_tracker_equals_batch_least_squares_and_resumes():
    """``CMDConfig(profile='centroid')``: the profiles are the fixed linear function of the weights
    chosen at the fit, the coefficients the batch least squares on them, the swapped-in weights
    ``a r(T) + b`` (rounded to the float32 parameters); a checkpoint resumes bit for bit."""
    cfg = CMDConfig(
        warmup_epochs=4, max_modes=3, num_samples=60, dtype="float64", profile="centroid"
    )
    model, cmd, traj = _run(cfg, epochs=12)
    state = cmd.state
    assert state.profile == "centroid"
    mix, offset = state.mix.numpy(), state.mix_offset.numpy()
    profiles = mix @ (traj[state.mix_rows] - offset[:, None])
    np.testing.assert_allclose(state.profiles.numpy(), profiles, atol=1e-12)
    mode = state.assignment.numpy()
    ra, rb = ref.cmd_lstsq(traj, profiles, mode)
    a, b = cmd.coefficients()
    np.testing.assert_allclose(a.numpy(), ra, atol=1e-8 * (1 + np.abs(ra).max()))
    np.testing.assert_allclose(b.numpy(), rb, atol=1e-8 * (1 + np.abs(rb).max()))
    with cmd.swapped():
        inside = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double().numpy()
    want = ra * profiles[mode, -1] + rb
    np.testing.assert_allclose(inside, want, atol=2 * np.finfo(np.float32).eps * np.abs(want).max())
    twin_model, twin = _reloaded(model, cmd)
    assert twin.config == cfg and twin.state.profile == "centroid"
    for m, c in ((model, cmd), (twin_model, twin)):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(7)
        for _ in range(3):
            _train_epoch(m, opt, gen)
            c.after_epoch()
    for u, v in zip(cmd.coefficients(), twin.coefficients(), strict=True):
        assert torch.equal(u, v)
    with pytest.raises(ValueError, match="profile"):
        CMDConfig(profile="medoid")


def test_centroid_profile_embedding_never_overwrites_a_profile_row():
    cfg = CMDConfig(
        warmup_epochs=3, max_modes=2, num_samples=60, profile="centroid", embed=True,
        embed_every=2, embed_fraction=0.2,
    )  # fmt: skip
    _, cmd, _ = _run(cfg, epochs=9)  # embeddings after epochs 5, 7, 9
    emb = cmd.embedded.numpy()
    protected = cmd.state.protected()
    assert protected.size > cmd.state.num_modes  # the sampled members, not only the references
    assert emb.sum() == 3 * math.ceil(0.2 * cmd.num_params)
    assert not emb[protected].any()
