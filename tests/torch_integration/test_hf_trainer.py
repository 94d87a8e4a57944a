"""lowrank_torch.hf with a real transformers.Trainer on CPU: tiny GPT-2, in-memory data, resume.

transformers and accelerate are required test packages of the torch session (dependency groups
``models`` and ``integrations``): there a failed import fails these tests; elsewhere they are skipped.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.dirname(__file__))
from _model_packages import _declare_torchvision_ops  # noqa: E402

_declare_torchvision_ops()  # transformers imports the (CPU-broken) torchvision wheel when present
if "torch" in os.environ.get("LOWRANK_TEST_BACKENDS", ""):
    import accelerate  # noqa: F401  (the Trainer needs it; a missing package fails loudly)
    import transformers
else:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")

import lowrank_core as lc  # noqa: E402
from lowrank_torch import LowRankLayer  # noqa: E402
from lowrank_torch.hf import (  # noqa: E402
    CMDConfig,
    CMDTrainerCallback,
    DLDRConfig,
    DLDRTrainerCallback,
    IntegrationError,
    OIALRConfig,
    OIALRTrainerCallback,
)

SEQ = 16
VOCAB = 64


class Tokens(torch.utils.data.Dataset):  # type: ignore[misc]
    """Arithmetic progressions mod VOCAB: learnable next-token structure."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        step = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (start + step * torch.arange(SEQ)) % VOCAB

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=SEQ, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


def _args(out: Path, **kw: Any) -> Any:
    base: dict[str, Any] = {
        "output_dir": str(out),
        "per_device_train_batch_size": 4,
        "learning_rate": 3e-3,
        "max_steps": 12,
        "save_strategy": "no",
        "logging_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }
    base.update(kw)
    return transformers.TrainingArguments(**base)


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def _oialr() -> OIALRConfig:
    return OIALRConfig(switch_step=4, update_every=3, rule=lc.SigmaCutoff(0.2))


def _flat(model: Any) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k != "_lowrank_state"}


def test_oialr_trainer_callback_converts_gpt2_and_trains(tmp_path: Path) -> None:
    model = _model()
    cb = OIALRTrainerCallback(_oialr())
    trainer = transformers.Trainer(
        model=model,
        args=_args(tmp_path, gradient_accumulation_steps=2),
        train_dataset=Tokens(48),
        callbacks=[cb],
    )
    wte = model.transformer.wte.weight.detach().clone()
    out = trainer.train()
    ctrl = cb.controller
    assert ctrl.step_count == trainer.state.global_step == 12  # optimizer steps, not micro-batches
    assert min(ctrl.switched.values()) == 4 and len(ctrl.switched) == 8  # all 8 Conv1D projections
    assert isinstance(model.transformer.h[0].mlp.c_fc, LowRankLayer)
    assert {e["step"] for e in ctrl.events("rank")} == {6, 9, 12}
    # the tied embedding / head keeps training after the switch
    assert model.lm_head.weight is model.transformer.wte.weight
    assert not torch.equal(wte, model.transformer.wte.weight.detach())
    assert out.training_loss < float(torch.log(torch.tensor(float(VOCAB))))


def test_oialr_resume_from_trainer_checkpoint_is_exact(tmp_path: Path) -> None:
    cb = OIALRTrainerCallback(_oialr())
    straight = _model()
    trainer = transformers.Trainer(
        model=straight,
        args=_args(tmp_path / "a", save_strategy="steps", save_steps=6),
        train_dataset=Tokens(48),
        callbacks=[cb],
    )
    trainer.train()
    ckpt = tmp_path / "a" / "checkpoint-6"
    assert ckpt.is_dir()

    resumed = _model(seed=1)  # freshly built, dense, other weights
    cb2 = OIALRTrainerCallback(_oialr())
    trainer2 = transformers.Trainer(
        model=resumed, args=_args(tmp_path / "b"), train_dataset=Tokens(48), callbacks=[cb2]
    )
    trainer2.train(resume_from_checkpoint=str(ckpt))
    assert cb2.controller.step_count == 12
    assert cb2.controller.ranks() == cb.controller.ranks()
    assert cb2.controller.history == cb.controller.history
    a, b = _flat(straight), _flat(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_needs_the_callback_at_construction(tmp_path: Path) -> None:
    cb = OIALRTrainerCallback(_oialr())
    trainer = transformers.Trainer(
        model=_model(),
        args=_args(tmp_path / "a", save_strategy="steps", save_steps=6, max_steps=6),
        train_dataset=Tokens(24),
        callbacks=[cb],
    )
    trainer.train()
    late = transformers.Trainer(
        model=_model(), args=_args(tmp_path / "b"), train_dataset=Tokens(24)
    )
    late.add_callback(OIALRTrainerCallback(_oialr()))
    with pytest.raises(IntegrationError, match="Trainer\\(callbacks=") as info:
        late.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-6"))
    assert isinstance(info.value, lc.LowRankError) and isinstance(info.value, RuntimeError)


def test_cmd_trainer_callback_evaluates_cmd_weights(tmp_path: Path) -> None:
    model = _model()
    seen: list[torch.Tensor] = []

    class Probe(transformers.TrainerCallback):  # type: ignore[misc]
        def on_prediction_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            seen.append(kw["model"].transformer.h[0].mlp.c_fc.weight.detach().clone())

    cb = CMDTrainerCallback(CMDConfig(warmup_epochs=2, max_modes=2, num_samples=50))
    trainer = transformers.Trainer(
        model=model,
        args=_args(tmp_path, max_steps=-1, num_train_epochs=3, eval_strategy="epoch"),
        train_dataset=Tokens(16),
        eval_dataset=Tokens(4, seed=1),
        callbacks=[cb, Probe()],
    )
    trainer.train()
    tracker = cb.driver.tracker
    assert tracker is not None and tracker.epochs_seen == 3 and tracker.fitted
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    i = names.index("transformer.h.0.mlp.c_fc.weight")
    assert len(seen) == 3  # one evaluation batch per epoch
    assert torch.equal(seen[-1], tracker.cmd_weights()[i])  # epoch 3: the CMD weights
    trained = model.transformer.h[0].mlp.c_fc.weight.detach()
    assert not torch.equal(seen[-1], trained) and not cb.driver.swapped_in


def test_cmd_trainer_callback_per_step_cadence(tmp_path: Path) -> None:
    # every_n_steps = optimizer steps per epoch (16 samples / batch 4): the per-epoch state bit for bit
    states = []
    for name, extra in (("epoch", {}), ("step", {"every_n_steps": 4})):
        cb = CMDTrainerCallback(CMDConfig(warmup_epochs=2, max_modes=2, num_samples=50, **extra))
        trainer = transformers.Trainer(
            model=_model(),
            args=_args(tmp_path / name, max_steps=-1, num_train_epochs=3),
            train_dataset=Tokens(16),
            callbacks=[cb],
        )
        trainer.train()
        tracker = cb.driver.tracker
        assert tracker is not None and tracker.fitted and tracker.epochs_seen == 3
        states.append(tracker.state_dict())
    assert states[1]["steps_seen"] == 12 and states[0]["steps_seen"] == 0
    for key, value in states[0]["core"].items():
        other = states[1]["core"][key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key


def test_dldr_trainer_callback_trains_in_the_subspace_and_resumes(tmp_path: Path) -> None:
    config = DLDRConfig(record_steps=6, every=1, dim=3)
    straight = _model()
    cb = DLDRTrainerCallback(config)
    trainer = transformers.Trainer(
        model=straight,
        args=_args(tmp_path / "a", save_strategy="steps", save_steps=8, optim="sgd"),
        train_dataset=Tokens(48),
        callbacks=[cb],
    )
    trainer.train()
    sp = cb.driver.subspace
    assert sp is not None and cb.driver.phase == "subspace"
    w = torch.cat([p.detach().reshape(-1) for p in straight.parameters() if p.requires_grad])
    delta = w - sp.origin
    residual = delta - sp.subspace.lift_direction(sp.subspace.project_direction(delta))
    assert float(delta.norm()) > 1e-4
    assert float(residual.norm()) < 1e-5 * max(1.0, float(delta.norm()))

    resumed = _model(seed=1)
    cb2 = DLDRTrainerCallback(config)
    trainer2 = transformers.Trainer(
        model=resumed,
        args=_args(tmp_path / "b", optim="sgd"),
        train_dataset=Tokens(48),
        callbacks=[cb2],
    )
    trainer2.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-8"))
    assert cb2.driver.phase == "subspace"
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_importing_lowrank_torch_does_not_import_transformers() -> None:
    import subprocess

    code = (
        "import sys, lowrank_torch, lowrank_torch.oialr, lowrank_torch.cmd, lowrank_torch.dldr; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'transformers', 'accelerate', 'lightning', 'pytorch_lightning'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ
    )
    assert out.stdout.strip() == "[]"


def test_gpt2_stdlib_example_quick_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "examples" / "oialr_gpt2_stdlib.py"
    spec = importlib.util.spec_from_file_location("oialr_gpt2_stdlib", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    files = example.stdlib_files()
    assert len(files) > 50 and files == sorted(files)  # the fixed list
    rows = example.main(["--quick", "--steps", "6", "--out", str(tmp_path)])
    assert [r["method"] for r in rows] == ["dense", "oialr"]
    assert rows[0]["share"] == 1.0 and rows[1]["share"] < 1.0
    for r in rows:
        assert 0.0 < r["bpb"] < 8.5  # 8 bits/byte is a uniform guess; random init is close to it
    printed = capsys.readouterr().out
    assert "val bits/byte" in printed and "trainable share" in printed


def test_oialr_trainer_callback_reads_max_steps_for_a_schedule_by_fraction(tmp_path: Path) -> None:
    model = _model()
    budget = lc.oialr.RankBudget(0.5, reach_at=0.75)
    cb = OIALRTrainerCallback(OIALRConfig(switch_fraction=0.25, update_every=3, budget=budget))
    trainer = transformers.Trainer(
        model=model, args=_args(tmp_path), train_dataset=Tokens(48), callbacks=[cb]
    )
    trainer.train()
    ctrl = cb.controller
    assert ctrl.config.total_steps == 12 and min(ctrl.switched.values()) == 3
    shapes = {n: (layer.rows, layer.cols) for n, layer in ctrl.layers.items()}
    assert lc.oialr.budget_cost("flops", shapes, ctrl.ranks()) <= 0.5  # reached by step 9
