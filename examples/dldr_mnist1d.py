"""DLDR on MNIST-1D: train 40 variables instead of ~290k, after a short recorded SGD run.

1. SGD (momentum 0.9) on the demo's MLP for ``--sgd-epochs`` epochs, snapshotting the trainable
   parameters every few steps (about ``--snapshots`` of them);
2. the top-``--d`` PCA subspace of the snapshots (exact, streamed Gram route);
3. from the last SGD weights, ``--sub-epochs`` more epochs with P-BFGS (batch ``--bfgs-batch``,
   Armijo backtracking) and, separately, with P-SGD;
4. the baseline: SGD continued for the same total number of epochs.

    python examples/dldr_mnist1d.py            # about a minute or two on a laptop CPU
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import Tensor, nn

from lowrank_torch.demo.data import load_mnist1d
from lowrank_torch.demo.models import build_model, count_params
from lowrank_torch.demo.train import evaluate
from lowrank_torch.dldr import SnapshotRecorder, SubspaceBFGS, SubspaceSGD


def batches(n: int, size: int, gen: torch.Generator) -> list[Tensor]:
    order = torch.randperm(n, generator=gen)
    return [order[i : i + size] for i in range(0, n, size)]


def sgd_epochs(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    epochs: int,
    batch: int,
    gen: torch.Generator,
    recorder: SnapshotRecorder | None = None,
) -> None:
    model.train()
    for _ in range(epochs):
        for idx in batches(x.shape[0], batch, gen):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            if recorder is not None:
                recorder.step()


def subspace_epochs(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    epochs: int,
    batch: int,
    gen: torch.Generator,
) -> None:
    model.train()
    for _ in range(epochs):
        for idx in batches(x.shape[0], batch, gen):
            xb, yb = x[idx], y[idx]

            def closure(xb: Tensor = xb, yb: Tensor = yb) -> Tensor:
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(xb), yb)
                loss.backward()
                return loss

            opt.step(closure)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sgd-epochs", type=int, default=15)
    p.add_argument("--sub-epochs", type=int, default=5)
    p.add_argument("--snapshots", type=int, default=80)
    p.add_argument("--d", type=int, default=40)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--bfgs-batch", type=int, default=1024)
    p.add_argument("--psgd-lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    data = load_mnist1d(seed=args.seed)
    x, y = data.x_train, data.y_train
    model = build_model("mlp", seed=args.seed)
    dense = count_params(model)
    gen = torch.Generator().manual_seed(args.seed)
    steps = -(-x.shape[0] // args.batch) * args.sgd_epochs
    recorder = SnapshotRecorder(model, every=max(1, steps // args.snapshots))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    start = time.perf_counter()
    sgd_epochs(model, opt, x, y, args.sgd_epochs, args.batch, gen, recorder)
    acc_switch = evaluate(model, data.x_test, data.y_test)[1]
    t_fit = time.perf_counter()
    subspace = recorder.fit(args.d)
    t_fit = time.perf_counter() - t_fit
    ratio = float(subspace.explained_variance_ratio.sum())
    switch_state = copy.deepcopy(model.state_dict())
    rows = []

    # baseline: SGD for the same total number of epochs
    sgd_gen = torch.Generator().manual_seed(args.seed + 1)
    sgd_epochs(model, opt, x, y, args.sub_epochs, args.batch, sgd_gen)
    rows.append(("SGD", evaluate(model, data.x_test, data.y_test)[1], dense))

    for name in ("P-SGD", "P-BFGS"):
        model.load_state_dict(switch_state)
        g = torch.Generator().manual_seed(args.seed + 1)
        if name == "P-SGD":
            sub_opt: torch.optim.Optimizer = SubspaceSGD(
                model.parameters(), subspace, lr=args.psgd_lr
            )
            subspace_epochs(model, sub_opt, x, y, args.sub_epochs, args.batch, g)
        else:
            sub_opt = SubspaceBFGS(model.parameters(), subspace, model=model)
            subspace_epochs(model, sub_opt, x, y, args.sub_epochs, args.bfgs_batch, g)
        rows.append((name, evaluate(model, data.x_test, data.y_test)[1], subspace.d))

    total = args.sgd_epochs + args.sub_epochs
    print(
        f"MNIST-1D, mlp ({dense:,} parameters): SGD {args.sgd_epochs} epochs with "
        f"{len(recorder)} snapshots -> test acc {100 * acc_switch:.2f}% at the switch; "
        f"{args.d}-dim subspace fitted in {t_fit:.2f} s (explains {100 * ratio:.1f}% of the "
        f"snapshots' variance); then {args.sub_epochs} more epochs ({total} in all)."
    )
    print(f"{'method':8s}  {'test acc %':>10s}  {'trained variables':>17s}")
    for name, acc, n in rows:
        print(f"{name:8s}  {100 * acc:10.2f}  {n:17,d}")
    print(f"(total {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
