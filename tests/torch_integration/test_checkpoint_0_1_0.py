"""A checkpoint written by lowrank-core 0.1.0 (tests/data, made by make_0_1_0_checkpoints.py) loads."""

from __future__ import annotations

from pathlib import Path

import pytest

import lowrank_core as lc

torch = pytest.importorskip("torch")
nn = torch.nn

from lowrank_torch.checkpoint import load_checkpoint  # noqa: E402
from lowrank_torch.oialr import OIALR, OIALRConfig  # noqa: E402

FILE = Path(__file__).resolve().parent.parent / "data" / "checkpoint_0_1_0_torch.pt"


def _fresh():
    torch.manual_seed(7)  # other initial values than the saved run: loading must replace them
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    ctrl = OIALR(model, opt, OIALRConfig(switch_step=2, update_every=3, rule=lc.FixedRank(4)))
    return model, opt, sched, ctrl


def test_a_0_1_0_torch_checkpoint_loads() -> None:
    saved = torch.load(FILE, weights_only=True)  # the 0.1.0 file, read directly
    model, opt, sched, ctrl = _fresh()
    extra = load_checkpoint(FILE, model=model, optimizer=opt, oialr=ctrl, scheduler=sched)
    assert extra["epoch"] == 5 and extra["name"] == "0.1.0"
    assert extra["bf16"].dtype == torch.bfloat16
    assert torch.equal(extra["bf16"], torch.arange(4, dtype=torch.bfloat16) / 3)
    assert ctrl.switched and set(ctrl.ranks().values()) == {4}
    state = model.state_dict()
    assert set(state) == set(saved["model"])
    for key, value in saved["model"].items():
        assert torch.equal(state[key], value), key
    assert sched.state_dict() == saved["scheduler"]
    assert opt.state_dict()["param_groups"] == saved["optimizer"]["param_groups"]
    # and training goes on from there
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    ctrl.step()
    assert torch.isfinite(loss)
