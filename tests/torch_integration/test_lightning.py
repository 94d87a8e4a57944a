"""lowrank_torch.lightning with a real lightning.Trainer on CPU: OIALR, CMD, DLDR, resume from checkpoints.

Lightning is a required test package of the torch session (dependency group ``integrations``): there a
failed import fails these tests; elsewhere (no torch backend under test) they are skipped.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _model_packages import _declare_torchvision_ops  # noqa: E402

_declare_torchvision_ops()  # torchmetrics may import the (CPU-broken) torchvision wheel
if "torch" in os.environ.get("LOWRANK_TEST_BACKENDS", ""):
    import lightning.pytorch as pl  # a missing package fails the torch session loudly
else:
    pl = pytest.importorskip("lightning.pytorch")

import lowrank_core as lc  # noqa: E402
from lowrank_torch import LowRankLayer  # noqa: E402
from lowrank_torch.lightning import (  # noqa: E402
    CMDCallback,
    CMDConfig,
    DLDRCallback,
    DLDRConfig,
    OIALRCallback,
    OIALRConfig,
)

BATCHES = 6  # per epoch
BATCH = 8


class Module(pl.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 3)
        )
        self.lr = lr
        self.val_weights: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self.val_weights.append(self.net[2].weight.detach().clone())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def _loader(seed: int = 0, batches: int = BATCHES) -> Any:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batches * BATCH, 12, generator=g)
    y = (x[:, :3].argmax(1) + (x[:, 3] > 1).long()) % 3
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=False)


def _trainer(tmp: Path, callbacks: list[Any], **kw: Any) -> Any:
    kw.setdefault("max_epochs", 3)
    return pl.Trainer(
        default_root_dir=tmp,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        **kw,
    )


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        yield


def _oialr() -> OIALRConfig:
    return OIALRConfig(switch_step=4, update_every=3, rule=lc.SigmaCutoff(0.2))


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_oialr_callback_switches_and_updates_with_accumulation(
    tmp_path: Path, precision: str
) -> None:
    torch.manual_seed(0)
    module = Module()
    cb = OIALRCallback(_oialr())
    trainer = _trainer(
        tmp_path, [cb], accumulate_grad_batches=2, enable_checkpointing=False, precision=precision
    )
    trainer.fit(module, _loader())
    ctrl = cb.controller
    assert trainer.global_step == 9  # 3 epochs of 6 batches, 2 per step
    assert ctrl.step_count == trainer.global_step  # once per applied step, not per batch
    assert set(ctrl.switched) == {"net.0", "net.2"} and ctrl.switched["net.0"] == 4
    assert isinstance(module.net[2], LowRankLayer)
    assert {e["step"] for e in ctrl.events("rank")} == {6, 9}
    assert ctrl.trainable_share() < 1.0
    # the optimizer the Trainer steps trains sigma (in the weight's place)
    params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert id(module.net[2].sigma) in params
    assert module.net[2].sigma.dtype == module.net[2].U.dtype == torch.float32


def test_oialr_resume_through_lightning_checkpoint_is_exact(tmp_path: Path) -> None:
    """Run 3 epochs straight, or 1 epoch + checkpoint + a fresh dense module resumed: same weights."""
    torch.manual_seed(0)
    straight = Module()
    init = {k: v.clone() for k, v in straight.state_dict().items()}
    cb = OIALRCallback(_oialr())
    _trainer(tmp_path / "a", [cb], enable_checkpointing=False).fit(straight, _loader())

    first = Module()
    first.load_state_dict(init)
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_epochs=1, save_top_k=-1)
    _trainer(tmp_path / "b", [OIALRCallback(_oialr()), ckpt_cb], max_epochs=1).fit(first, _loader())
    ckpt = next((tmp_path / "ck").glob("*.ckpt"))

    resumed = Module()  # freshly built, dense, other random weights
    cb2 = OIALRCallback(_oialr())
    _trainer(tmp_path / "c", [cb2], enable_checkpointing=False).fit(
        resumed, _loader(), ckpt_path=ckpt
    )
    assert cb2.controller.step_count == cb.controller.step_count == 18
    assert cb2.controller.ranks() == cb.controller.ranks()
    assert cb2.controller.history == cb.controller.history
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if k != "_lowrank_state":
            assert torch.equal(a[k], b[k]), k

    # validating a checkpoint on a fresh dense module rebuilds the low-rank structure too
    fresh = Module()
    _trainer(tmp_path / "d", [OIALRCallback(_oialr())]).validate(
        fresh, _loader(seed=1, batches=1), ckpt_path=ckpt, verbose=False
    )
    assert isinstance(fresh.net[2], LowRankLayer)
    assert fresh.net[2].rank == first.net[2].rank
    assert torch.equal(fresh.net[2].sigma, first.net[2].sigma)


def test_cmd_callback_swaps_cmd_weights_in_for_validation_and_resumes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = Module()
    init = {k: v.clone() for k, v in module.state_dict().items()}
    config = CMDConfig(warmup_epochs=2, max_modes=2, num_samples=50)
    cb = CMDCallback(config)
    trainer = _trainer(tmp_path / "a", [cb], max_epochs=4, enable_checkpointing=False)
    trainer.fit(module, _loader(), _loader(seed=1, batches=1))
    tracker = cb.driver.tracker
    assert tracker is not None and tracker.fitted and tracker.epochs_seen == 4
    # epochs 1-2: warm-up (trained weights validated); epochs 3-4: the CMD weights
    assert len(module.val_weights) == 4
    trained = module.net[2].weight.detach()
    cmd_now = tracker.cmd_weights()[2]
    assert torch.equal(module.val_weights[-1], cmd_now.to(trained.dtype))
    assert not torch.equal(module.val_weights[-1], trained)  # swapped back after validation
    assert not cb.driver.swapped_in

    # resume from the checkpoint of epoch 3 (after the fit): same CMD state at the end
    first = Module()
    first.load_state_dict(init)
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_epochs=1, save_top_k=-1)
    _trainer(tmp_path / "b", [CMDCallback(config), ckpt_cb], max_epochs=3).fit(
        first, _loader(), _loader(seed=1, batches=1)
    )
    ckpt = sorted((tmp_path / "ck").glob("*.ckpt"))[-1]
    resumed = Module()
    cb2 = CMDCallback(config)
    _trainer(tmp_path / "c", [cb2], max_epochs=4, enable_checkpointing=False).fit(
        resumed, _loader(), _loader(seed=1, batches=1), ckpt_path=ckpt
    )
    t2 = cb2.driver.tracker
    assert t2 is not None and t2.epochs_seen == 4
    # the checkpoint holds the trained weights (not the swapped-in CMD ones): exact continuation
    assert torch.equal(resumed.net[2].weight, module.net[2].weight)
    for x, y in zip(t2.cmd_weights(), tracker.cmd_weights(), strict=True):
        assert torch.equal(x, y)


def test_cmd_callback_per_step_cadence_matches_the_per_epoch_one(tmp_path: Path) -> None:
    # CMDConfig(every_n_steps=steps per epoch): CMDTracker.step after each optimizer step gives the
    # per-epoch state bit for bit; with accumulation only applied optimizer steps count
    states = []
    for name, extra in (("epoch", {}), ("step", {"every_n_steps": BATCHES})):
        torch.manual_seed(0)
        module = Module()
        cb = CMDCallback(CMDConfig(warmup_epochs=2, max_modes=2, num_samples=50, **extra))
        _trainer(tmp_path / name, [cb], max_epochs=3, enable_checkpointing=False).fit(
            module, _loader(), _loader(seed=1, batches=1)
        )
        tracker = cb.driver.tracker
        assert tracker is not None and tracker.fitted and tracker.epochs_seen == 3
        states.append(tracker.state_dict())
    assert states[1]["steps_seen"] == 3 * BATCHES and states[0]["steps_seen"] == 0
    for key in ("epochs_seen", "fit_epoch"):
        assert states[0][key] == states[1][key]
    for key, value in states[0]["core"].items():
        other = states[1]["core"][key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key

    torch.manual_seed(0)
    cb = CMDCallback(CMDConfig(warmup_epochs=2, max_modes=2, num_samples=50, every_n_steps=2))
    trainer = _trainer(
        tmp_path / "acc", [cb], max_epochs=2, accumulate_grad_batches=2, enable_checkpointing=False
    )
    trainer.fit(Module(), _loader(), _loader(seed=1, batches=1))
    tracker = cb.driver.tracker
    assert tracker is not None and trainer.global_step == BATCHES  # 2 epochs of BATCHES / 2 steps
    assert tracker.steps_seen == BATCHES and tracker.epochs_seen == BATCHES // 2


def test_dldr_callback_records_then_trains_in_the_subspace_and_resumes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = Module()
    init = {k: v.clone() for k, v in module.state_dict().items()}
    config = DLDRConfig(record_steps=6, every=1, dim=3)
    cb = DLDRCallback(config)
    _trainer(tmp_path / "a", [cb], enable_checkpointing=False).fit(module, _loader())
    drv = cb.driver
    assert drv.phase == "subspace" and drv.steps == 6
    sp = drv.subspace
    assert sp is not None and sp.d == 3
    # after 12 more steps the weights still lie in origin + span(P^T): (I - P^T P)(w - origin) = 0
    w = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    delta = w - sp.origin
    residual = delta - sp.subspace.lift_direction(sp.subspace.project_direction(delta))
    assert float(delta.norm()) > 1e-3  # it moved
    # float32 projections of a vector of norm ~1: rounding ~1e-6
    assert float(residual.norm()) < 1e-5 * max(1.0, float(delta.norm()))

    first = Module()
    first.load_state_dict(init)
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_epochs=1, save_top_k=-1)
    _trainer(tmp_path / "b", [DLDRCallback(config), ckpt_cb], max_epochs=2).fit(first, _loader())
    ckpt = sorted((tmp_path / "ck").glob("*.ckpt"))[-1]  # epoch 2: in the subspace phase
    resumed = Module()
    cb2 = DLDRCallback(config)
    _trainer(tmp_path / "c", [cb2], enable_checkpointing=False).fit(
        resumed, _loader(), ckpt_path=ckpt
    )
    assert cb2.driver.phase == "subspace"
    for a, b in zip(module.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


class Overflowing(Module):
    """Poisons the gradients of the optimizer steps in ``at`` once each (an fp16 overflow)."""

    def __init__(self, at: tuple[int, ...]) -> None:
        super().__init__()
        self.todo = set(at)

    def on_after_backward(self) -> None:
        step = self.trainer.global_step
        if step in self.todo:
            self.todo.discard(step)
            self.net[4].weight.grad[0, 0] = float("inf")


def test_oialr_callback_ignores_steps_the_grad_scaler_skipped(tmp_path: Path) -> None:
    # Lightning's "16-mixed" on CPU comes without a scaler; give it one explicitly
    from lightning.pytorch.plugins import MixedPrecision

    torch.manual_seed(0)
    module = Overflowing(at=(2, 5))
    cb = OIALRCallback(_oialr())
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = _trainer(tmp_path, [cb], plugins=[plugin], enable_checkpointing=False, max_epochs=2)
    trainer.fit(module, _loader())
    assert trainer.global_step == 12  # Lightning counts the two skipped steps
    assert cb._watch.monitor.skipped == 2
    ctrl = cb.controller
    assert ctrl.step_count == 10  # OIALR does not
    # the 4th applied step (optimizer step 5, as step 2 was skipped) is the switch
    assert set(ctrl.switched.values()) == {4}
    for layer in ctrl.layers.values():
        assert torch.isfinite(layer.sigma).all()


def test_oialr_callback_reads_the_run_length_for_a_schedule_by_fraction(tmp_path: Path) -> None:
    """switch_fraction and a budget's reach_at are fractions of the fit's optimizer steps."""
    torch.manual_seed(0)
    module = Module()
    budget = lc.oialr.RankBudget(0.3, measure="params", reach_at=1.0)
    cb = OIALRCallback(OIALRConfig(switch_fraction=0.5, update_every=3, budget=budget))
    trainer = _trainer(tmp_path, [cb], accumulate_grad_batches=2, enable_checkpointing=False)
    trainer.fit(module, _loader())
    ctrl = cb.controller
    assert ctrl.config.total_steps == trainer.global_step == 9
    assert set(ctrl.switched.values()) == {4}  # round(0.5 * 9)
    shapes = {n: (layer.rows, layer.cols) for n, layer in ctrl.layers.items()}
    assert lc.oialr.budget_cost("params", shapes, ctrl.ranks()) <= 0.3
