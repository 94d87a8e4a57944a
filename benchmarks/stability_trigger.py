"""What OIALR's stability trigger measures, and whether a normalized form means the same on every run.

    python benchmarks/stability_trigger.py            # MNIST-1D MLP and the byte LM (--quick size)
    python benchmarks/stability_trigger.py --model mlp

For each run (model, learning rate, check interval ``k``), every ``k`` steps the polar factor of each
eligible weight is compared with the previous check's (:func:`lowrank_core.polar_stability`, averaged
over the layers): the raw value OIALR's ``stability_threshold`` compares. Two normalized forms are
derived from it:

- the rotation per step, ``arccos(stability) / k`` (radians: the basis' angle of turn, per step);
- the *relative* rotation rate, that rate divided by the layer's first measured rate (what
  ``OIALRConfig(rotation_threshold=...)`` compares).

The table prints the three at 25 / 50 / 75 / 100% of the run, for two check intervals and two learning
rates: a trigger that "means the same on every run" gives the same value across ``k`` and across
learning rates at the same point of training.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import lowrank_core  # noqa: F401
except ImportError:
    sys.path += [str(HERE.parent / d) for d in (".", "backends", "reference")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import lowrank_core as lc  # noqa: E402


def _mlp_run(lr: float, steps: int) -> tuple[nn.Module, Any, list[nn.Module]]:
    import mnist1d

    args = mnist1d.data.get_dataset_args()
    args.num_samples = 4000
    data = mnist1d.data.make_dataset(args)
    x = torch.tensor(data["x"], dtype=torch.float32)
    y = torch.tensor(data["y"])
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(40, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(1)

    def step() -> None:
        idx = torch.randint(0, x.shape[0], (100,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()

    return model, step, [model[0], model[2]]


def _lm_run(lr: float, steps: int) -> tuple[nn.Module, Any, list[nn.Module]]:
    import bench_lm as b

    cfg = b.QUICK
    train, _, _ = b.stdlib_text(cfg.train_bytes, cfg.val_bytes)
    data = torch.frombuffer(bytearray(train), dtype=torch.uint8).long()
    torch.manual_seed(0)
    model = b.ByteGPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(cfg.seed)

    def step() -> None:
        starts = torch.randint(0, data.numel() - cfg.context - 1, (cfg.batch,), generator=g)
        xb, yb = b._windows(data, starts, cfg.context)
        loss = b._loss(model, xb, yb, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()

    layers = [m for m in model.modules() if isinstance(m, nn.Linear)][:-1]
    return model, step, layers


def trajectory(model_name: str, lr: float, every: int, steps: int) -> list[tuple[int, float]]:
    """``[(step, mean stability over the layers)]`` at every check after the first."""
    make = _mlp_run if model_name == "mlp" else _lm_run
    _, step, layers = make(lr, steps)
    prev: list[torch.Tensor] | None = None
    out = []
    for t in range(1, steps + 1):
        step()
        if t % every:
            continue
        with torch.no_grad():
            polars = [lc.orthogonal_factor(m.weight.detach().double()) for m in layers]
        if prev is not None:
            vals = [
                float(lc.polar_stability(p, q).mean()) for p, q in zip(prev, polars, strict=True)
            ]
            out.append((t, float(np.mean(vals))))
        prev = polars
    return out


def summarize(
    points: list[tuple[int, float]], every: int, steps: int
) -> list[tuple[float, float, float]]:
    """(raw, rate per step, relative rate) at 25 / 50 / 75 / 100% of the run."""
    rates = [math.acos(min(1.0, max(-1.0, v))) / every for _, v in points]
    first = rates[0] if rates and rates[0] > 0 else float("nan")
    rows = []
    for frac in (0.25, 0.5, 0.75, 1.0):
        target = frac * steps
        i = min(range(len(points)), key=lambda j: abs(points[j][0] - target))
        rows.append((points[i][1], rates[i], rates[i] / first))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["mlp", "lm", "both"], default="both")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    plans = {
        "mlp": (800, (0.05, 0.15), (5, 20)),
        "lm": (120, (1e-3, 3e-3), (10, 20)),
    }
    names = ["mlp", "lm"] if args.model == "both" else [args.model]
    print("| model | lr | k | raw 25/50/75/100% | rotation per step (mrad) | relative rate |")
    print("|---|---|---|---|---|---|")
    for name in names:
        steps, lrs, intervals = plans[name]
        for lr in lrs:
            for k in intervals:
                rows = summarize(trajectory(name, lr, k, steps), k, steps)
                raw = " / ".join(f"{r[0]:.5f}" for r in rows)
                rate = " / ".join(f"{1e3 * r[1]:.2f}" for r in rows)
                rel = " / ".join(f"{r[2]:.2f}" for r in rows)
                print(f"| {name} | {lr:g} | {k} | {raw} | {rate} | {rel} |", flush=True)


if __name__ == "__main__":
    main()
