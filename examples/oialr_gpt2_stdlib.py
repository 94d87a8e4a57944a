"""A small GPT-2 on the Python standard library's own source code: dense vs OIALR, HF Trainer.

The text is real and needs no download: the ``.py`` files at the top level of this interpreter's
standard library (``sysconfig.get_paths()["stdlib"]``), in sorted order; every 10th file (by that order)
is held out for validation. Tokens are bytes (vocabulary 256), so the validation loss in bits is bits
per byte. The model is a randomly initialized GPT-2 (transformers' ``GPT2LMHeadModel``) trained twice
with the same seed, data and schedule: once dense, once with OIALR through
:class:`lowrank_torch.hf.OIALRTrainerCallback` (its 4 ``Conv1D`` projections per block are switched to
``U Sigma V^T`` form part-way through and their ranks reduced; the tied embedding/head stays dense).

    python examples/oialr_gpt2_stdlib.py            # a few minutes on 2 CPU cores
    python examples/oialr_gpt2_stdlib.py --quick    # a ~30 s smoke run

Prints one row per method: validation bits per byte, the trainable share (trainable scalars at the end
over the dense model's), and the training wall time. The numbers depend on the Python version (its
standard library is the data set).
"""

from __future__ import annotations

import argparse
import math
import os
import sysconfig
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import lowrank_core as lc
from lowrank_torch.hf import OIALRConfig, OIALRTrainerCallback


def stdlib_files() -> list[Path]:
    """The top-level ``.py`` files of the standard library, sorted by name (a fixed list)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.is_file())


def load_bytes(max_train: int, max_val: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(train bytes, validation bytes, number of files)``: every 10th file is validation."""
    train, val = bytearray(), bytearray()
    files = stdlib_files()
    for i, path in enumerate(files):
        target, cap = (val, max_val) if i % 10 == 0 else (train, max_train)
        if len(target) < cap:
            target += path.read_bytes()
    t = torch.frombuffer(bytes(train[:max_train]), dtype=torch.uint8).long()
    v = torch.frombuffer(bytes(val[:max_val]), dtype=torch.uint8).long()
    return t, v, len(files)


class Blocks(torch.utils.data.Dataset):  # type: ignore[misc]
    """Non-overlapping blocks of ``block`` bytes; each is its own label (the model shifts)."""

    def __init__(self, data: torch.Tensor, block: int) -> None:
        n = data.numel() // block
        self.ids = data[: n * block].view(n, block)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def build_model(size: dict[str, int], seed: int) -> Any:
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=256,
        n_positions=size["block"],
        n_embd=size["embd"],
        n_layer=size["layers"],
        n_head=size["heads"],
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config)


def run(
    method: str, size: dict[str, int], data: tuple[Any, Any], out: Path, seed: int
) -> dict[str, Any]:
    import transformers

    model = build_model(size, seed)
    dense = sum(p.numel() for p in model.parameters() if p.requires_grad)
    steps = size["steps"]
    callbacks: list[Any] = []
    cb: OIALRTrainerCallback | None = None
    if method == "oialr":
        cb = OIALRTrainerCallback(
            OIALRConfig(
                switch_step=max(1, int(0.4 * steps)),
                update_every=max(1, steps // 10),
                rule=lc.SigmaCutoff(0.2),
            )
        )
        callbacks.append(cb)
    args = transformers.TrainingArguments(
        output_dir=str(out / method),
        per_device_train_batch_size=size["batch"],
        per_device_eval_batch_size=size["batch"],
        learning_rate=3e-3,
        warmup_steps=max(1, steps // 20),
        lr_scheduler_type="cosine",
        weight_decay=0.01,
        max_steps=steps,
        save_strategy="no",
        logging_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data[0], eval_dataset=data[1], callbacks=callbacks
    )
    trainer.remove_callback(transformers.PrinterCallback)  # the table below is the output
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    loss = float(trainer.evaluate()["eval_loss"])
    now = sum(p.numel() for p in model.parameters() if p.requires_grad)
    row = {
        "method": method,
        "bpb": loss / math.log(2.0),
        "share": now / dense,
        "wall": wall,
        "params": dense,
    }
    if cb is not None:
        ranks = cb.controller.ranks()
        row["ranks"] = f"{min(ranks.values())}-{max(ranks.values())} of {size['embd']}"
    return row


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~30 s smoke run")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per method")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs") / "oialr_gpt2_stdlib")
    opts = parser.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=UserWarning)
    if opts.quick:
        size = {"block": 64, "embd": 48, "layers": 2, "heads": 2, "batch": 8, "steps": 30}
        max_train, max_val = 100_000, 8_000
    else:
        size = {"block": 128, "embd": 128, "layers": 4, "heads": 4, "batch": 16, "steps": 500}
        max_train, max_val = 4_000_000, 100_000
    if opts.steps is not None:
        size["steps"] = opts.steps
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    train, val, nfiles = load_bytes(max_train, max_val)
    data = (Blocks(train, size["block"]), Blocks(val, size["block"]))
    print(
        f"stdlib: {nfiles} files, train {train.numel():,} bytes, validation {val.numel():,} bytes; "
        f"GPT-2 {size['layers']}x{size['embd']}, block {size['block']}, {size['steps']} steps"
    )
    rows = [run(m, size, data, opts.out, opts.seed) for m in ("dense", "oialr")]
    print(f"{'method':<8} {'val bits/byte':>13} {'trainable share':>16} {'wall s':>8}  ranks")
    for r in rows:
        print(
            f"{r['method']:<8} {r['bpb']:>13.3f} {r['share']:>16.3f} {r['wall']:>8.1f}  "
            f"{r.get('ranks', '')}"
        )
    return rows


if __name__ == "__main__":
    main()
