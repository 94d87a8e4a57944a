"""Low-rank networks trained from scratch on MNIST-1D: spectral vs nonlinear vs random initialization.

Each model of :mod:`lowrank_torch.demo.models` is built with its default dense init (the same seed for
every row), its eligible layers (:mod:`lowrank_torch.convert`'s rules: the head stays dense, very thin
Linears too) are replaced by fixed-rank factorized layers at ``rank = round(fraction * min(m, n))``, the
factors are initialized from the dense init by :func:`lowrank_torch.init.low_rank_model`, and all factors
are trained for a fixed budget with :func:`lowrank_torch.demo.train.train` (AdamW, cosine schedule, the
demo's per-model settings). A dense run is the reference row.

Run::

    python examples/init_mnist1d.py                      # MLP, ranks 10% and 25%, 10 epochs
    python examples/init_mnist1d.py --models mlp,cnn --epochs 20 --seeds 0,1

MNIST-1D is generated locally (the ``mnist1d`` package); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from lowrank_torch.demo.data import load_mnist1d
from lowrank_torch.demo.methods import Dense, Method
from lowrank_torch.demo.methods_init import LowRankInit
from lowrank_torch.demo.models import build_model
from lowrank_torch.demo.train import DEFAULT_SETTINGS, train

INITS = ("spectral", "nonlinear", "random")


def _csv(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mlp", help="comma list of mlp, cnn, transformer")
    p.add_argument("--fractions", default="0.1,0.25", help="comma list of rank fractions")
    p.add_argument("--inits", default=",".join(INITS), help="comma list of " + ", ".join(INITS))
    p.add_argument("--epochs", type=int, default=10, help="training budget (epochs) of every run")
    p.add_argument("--seeds", default="0", help="comma list of seeds (model init, data order)")
    p.add_argument("--num-samples", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    seeds = [int(s) for s in _csv(args.seeds)]
    fractions = [float(f) for f in _csv(args.fractions)]
    inits = _csv(args.inits)
    for init in inits:
        if init not in INITS:
            p.error(f"unknown init {init!r}; choose from {', '.join(INITS)}")

    data = load_mnist1d(seed=0, num_samples=args.num_samples)
    print(
        f"MNIST-1D {data.x_train.shape[0]} train / {data.x_test.shape[0]} test; {args.epochs} epochs "
        f"per run; seeds {seeds}; torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    )
    rows: list[dict[str, Any]] = []
    for model_name in _csv(args.models):
        settings = DEFAULT_SETTINGS[model_name].as_kwargs() | {"epochs": args.epochs}
        configs: list[tuple[str, str, float | None]] = [("dense", "dense", None)]
        configs += [(f"low-rank {init}", init, f) for f in fractions for init in inits]
        for label, init, fraction in configs:
            accs, shares, times = [], [], []
            for seed in seeds:
                method: Method = Dense() if fraction is None else LowRankInit(fraction, init=init)
                model = build_model(model_name, seed=seed)
                start = time.perf_counter()
                result = train(model, data, method=method, seed=seed, progress=False, **settings)
                times.append(time.perf_counter() - start)
                accs.append(100 * result.test_accuracy)
                shares.append(100 * result.trainable_share)
            row = {
                "model": model_name,
                "init": label,
                "rank": "full" if fraction is None else f"{round(100 * fraction)}%",
                "acc": statistics.mean(accs),
                "acc_sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "share": statistics.mean(shares),
                "time": statistics.mean(times),
            }
            rows.append(row)
            print(
                f"  {model_name:5s} {row['rank']:>4s} {label:20s} test acc {row['acc']:6.2f}% "
                f"(sd {row['acc_sd']:.2f}), trainable {row['share']:5.1f}%, {row['time']:.0f} s",
                flush=True,
            )
    print()
    print("| model | rank | init | test acc % (mean over seeds) | sd | trainable % | s / run |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['rank']} | {r['init']} | {r['acc']:.2f} | {r['acc_sd']:.2f} | "
            f"{r['share']:.1f} | {r['time']:.0f} |"
        )
    return rows


if __name__ == "__main__":
    main()
