"""Sigma's learning-rate scale on the MNIST-1D demo MLP, for one optimizer: does x4 help or hurt?

    python benchmarks/sigma_lr_mnist1d.py                       # SGD (momentum 0.9, Nesterov)
    python benchmarks/sigma_lr_mnist1d.py --optimizer adamw --lrs 5e-4,1e-3,2e-3

A dense learning-rate sweep at seed 0 (the same schedule, warm-up and cosine decay, as the demo), then
dense, OIALR with ``sigma_lr_scale=1`` (the published method) and OIALR with ``sigma_lr_scale=4`` at
the sweep's best rate, for every seed (the demo's OIALR setting otherwise: switch at half the run,
``SigmaCutoff(0.1)``, a rank update per epoch). Prints test accuracies and the paired x4 - x1 gains.
About 20 seconds a run on 2 CPU threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
try:
    import lowrank_core  # noqa: F401
except ImportError:
    sys.path += [str(HERE.parent / d) for d in (".", "backends", "reference")]

import torch  # noqa: E402

from lowrank_torch.demo.data import load_mnist1d  # noqa: E402
from lowrank_torch.demo.methods import OIALR, Dense  # noqa: E402
from lowrank_torch.demo.models import build_model  # noqa: E402
from lowrank_torch.demo.train import train  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    p.add_argument("--lrs", default="0.1,0.2,0.4", help="comma list: the dense sweep")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_mnist1d()
    common = {"epochs": args.epochs, "batch_size": 128, "weight_decay": args.weight_decay,
              "optimizer": args.optimizer, "progress": False}  # fmt: skip
    sweep = {}
    for lr in (float(x) for x in args.lrs.split(",") if x.strip()):
        sweep[lr] = train(build_model("mlp", seed=0), data, lr=lr, seed=0, **common).test_accuracy
        print(f"sweep lr {lr:g}: {100 * sweep[lr]:.2f}%", flush=True)
    best = max(sweep, key=lambda lr: sweep[lr])
    edge = " (at the edge of the sweep)" if best in (min(sweep), max(sweep)) else ""
    print(f"best lr {best:g}{edge}")
    methods = {
        "dense": Dense,
        "OIALR x1": lambda: OIALR(sigma_lr_scale=1.0),
        "OIALR x4": lambda: OIALR(sigma_lr_scale=4.0),
    }
    acc: dict[str, list[float]] = {name: [] for name in methods}
    for seed in range(args.seeds):
        for name, make in methods.items():
            r = train(
                build_model("mlp", seed=seed), data, method=make(), lr=best, seed=seed, **common
            )
            acc[name].append(100 * r.test_accuracy)
            print(f"{name}, seed {seed}: {100 * r.test_accuracy:.2f}% (share {r.trainable_share:.3f})",
                  flush=True)  # fmt: skip
    gains = [a - b for a, b in zip(acc["OIALR x4"], acc["OIALR x1"], strict=True)]
    print(f"\n{args.optimizer}, lr {best:g}, {args.epochs} epochs, seeds 0-{args.seeds - 1}")
    for name, values in acc.items():
        print(f"  {name:9s} " + " / ".join(f"{v:.2f}" for v in values))
    print("  x4 - x1   " + " / ".join(f"{g:+.2f}" for g in gains)
          + f"  (mean {statistics.fmean(gains):+.2f})")  # fmt: skip
    if args.json:
        args.json.write_text(
            json.dumps({"sweep": sweep, "best_lr": best, "accuracy": acc}, indent=1)
        )


if __name__ == "__main__":
    main()
