"""save_checkpoint / load_checkpoint: resume equals an uninterrupted run; bad files fail clearly."""

from __future__ import annotations

import pytest

import lowrank_core as lc

torch = pytest.importorskip("torch")
nn = torch.nn

from lowrank_torch.checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402
from lowrank_torch.oialr import OIALR, OIALRConfig  # noqa: E402


def _build(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )
    model = model.double()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    cfg = OIALRConfig(switch_step=4, update_every=5, rule=lc.SigmaCutoff(0.4))
    return model, opt, sched, OIALR(model, opt, cfg)


def _batches(n: int = 30):
    g = torch.Generator().manual_seed(5)
    return [
        (
            torch.randn(16, 12, generator=g, dtype=torch.float64),
            torch.randint(0, 4, (16,), generator=g),
        )
        for _ in range(n)
    ]


def _run(model, opt, sched, ctrl, batches):
    losses = []
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        ctrl.step()
        losses.append(loss.item())
    return losses


def test_resume_matches_an_uninterrupted_run(tmp_path):
    batches = _batches()
    straight = _run(*_build(), batches)
    model, opt, sched, ctrl = _build()
    first = _run(model, opt, sched, ctrl, batches[:13])
    assert any(e["new"] < e["old"] for e in ctrl.events("rank")), (
        "the checkpoint must follow a rank change"
    )
    path = save_checkpoint(
        tmp_path / "run.pt",
        model=model,
        optimizer=opt,
        oialr=ctrl,
        scheduler=sched,
        extra={"epoch": 3},
    )
    model, opt, sched, ctrl = _build()  # fresh, dense
    extra = load_checkpoint(path, model=model, optimizer=opt, oialr=ctrl, scheduler=sched)
    assert extra == {"epoch": 3}
    second = _run(model, opt, sched, ctrl, batches[13:])
    assert first + second == pytest.approx(straight, rel=1e-9, abs=1e-12)


def test_corrupt_and_foreign_files_fail_clearly(tmp_path):
    model, opt, sched, ctrl = _build()
    _run(model, opt, sched, ctrl, _batches(6))
    good = save_checkpoint(tmp_path / "good.pt", model=model, optimizer=opt, oialr=ctrl)
    data = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.pt").write_bytes(b"\x00not a checkpoint" * 10)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    for name, match in (
        ("trunc.pt", "not a readable checkpoint"),
        ("junk.pt", "not a readable checkpoint"),
        ("foreign.pt", "not a lowrank_torch checkpoint"),
        ("missing.pt", "no checkpoint at"),
    ):
        fresh, fopt, _, fctrl = _build()
        before = {k: v.clone() for k, v in fresh.state_dict().items()}
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(tmp_path / name, model=fresh, optimizer=fopt, oialr=fctrl)
        after = fresh.state_dict()
        assert before.keys() == after.keys() and all(
            torch.equal(before[k], after[k]) for k in before
        )
        assert not fctrl.switched


def test_mismatched_model_and_missing_controller(tmp_path):
    model, opt, sched, ctrl = _build()
    _run(model, opt, sched, ctrl, _batches(6))
    del sched
    path = save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, oialr=ctrl)
    other = nn.Sequential(
        nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    )
    oopt = torch.optim.SGD(other.parameters(), lr=0.1)
    octrl = OIALR(other, oopt, OIALRConfig(switch_step=4))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(path, model=other, optimizer=oopt, oialr=octrl)
    fresh, fopt, _, _ = _build()
    with pytest.raises(CheckpointError, match="pass the controller"):
        load_checkpoint(path, model=fresh, optimizer=fopt)


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path):
    model, opt, _sched, ctrl = _build()
    path = save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, oialr=ctrl)
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017, PT011 - whatever pickling raises
        save_checkpoint(path, model=model, extra={"bad": lambda: None})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]
