"""CMD on MNIST-1D: SGD's last weights vs online CMD vs EMA vs SWA, from one and the same SGD run.

    python examples/cmd_mnist1d.py                    # the MLP, 60 epochs, seeds 0 1 2
    python examples/cmd_mnist1d.py --epochs 10 --seeds 0 --warmup 4   # a quick look

One training run per seed (SGD, momentum 0.9, constant learning rate, as in the CMD paper's CIFAR runs),
observed by every averaging method at once:

- SGD: the weights after the last epoch;
- online CMD (``lowrank_torch.cmd.CMDTracker``, warm-up ``F`` epochs, ``M`` modes; a few ``M`` side by
  side, plus the automatic ``M`` from a tolerance), evaluated with its weights ``a r(T) + b`` swapped in;
  the published method (one reference parameter per mode), and ``profile='centroid'`` (each mode's
  profile the centroid of its sampled members' standardised warm-up trajectories);
- EMA of the weights after every step (``torch.optim.swa_utils.AveragedModel`` with
  ``get_ema_multi_avg_fn``);
- SWA: the equal average of the epoch-end weights from epoch ``F`` on (``AveragedModel``; the MLP has no
  BatchNorm, so no ``update_bn`` is needed).

The full trajectory (N x T, a few tens of MB for the MLP) is also kept, only to measure the post-hoc CMD
reconstruction error against ``M`` (``lowrank_core.cmd.fit_cmd`` + ``relative_error``, centered: the share
of the weights' motion that CMD misses) and the test accuracy of the post-hoc model at the last epoch.
The table reports means (and the spread over seeds); whichever method wins, wins.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from lowrank_core import cmd as core
from lowrank_torch.cmd import CMDConfig, CMDTracker
from lowrank_torch.demo.data import load_mnist1d
from lowrank_torch.demo.models import build_model
from lowrank_torch.demo.train import evaluate


def run(seed: int, args: argparse.Namespace) -> tuple[dict[str, tuple[float, float | None]], int]:
    """One SGD run: {row label: (test accuracy, reconstruction error or None)}, and the auto M."""
    data = load_mnist1d(seed=0)
    model = build_model(args.model, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.wd)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema_decay))
    swa = AveragedModel(model)
    cmds = {
        f"online CMD, M={m}": CMDTracker(
            model, CMDConfig(warmup_epochs=args.warmup, max_modes=m, seed=seed)
        )
        for m in args.modes
    }
    cmds[f"online CMD, auto M (tol {args.tol:g})"] = CMDTracker(
        model, CMDConfig(warmup_epochs=args.warmup, max_modes=None, tol=args.tol, seed=seed)
    )
    for m in args.centroid_modes:
        cmds[f"online CMD, centroid profiles, M={m}"] = CMDTracker(
            model,
            CMDConfig(warmup_epochs=args.warmup, max_modes=m, seed=seed, profile="centroid"),
        )
    params = [p for p in model.parameters() if p.requires_grad]
    trajectory = np.empty((sum(p.numel() for p in params), args.epochs), dtype=np.float32)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = data.x_train, data.y_train
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], args.batch_size):
            idx = order[i : i + args.batch_size]
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            ema.update_parameters(model)
        for c in cmds.values():
            c.after_epoch()
        if epoch + 1 >= args.warmup:
            swa.update_parameters(model)
        with torch.no_grad():
            trajectory[:, epoch] = torch.cat([p.detach().reshape(-1) for p in params]).numpy()

    def acc(m: nn.Module) -> float:
        return 100.0 * evaluate(m, data.x_test, data.y_test)[1]

    out: dict[str, tuple[float, float | None]] = {"SGD (last weights)": (acc(model), None)}
    auto_m = 0
    for label, c in cmds.items():
        state = c.state
        assert state is not None
        # the online model's reconstruction error over the whole run (its own coefficients)
        a, b = (t.numpy() for t in state.coefficients())
        fit = core.CMDFit(
            sample=np.zeros(0, dtype=np.int64),
            labels=np.zeros(0, dtype=np.int64),
            references=state.references,
            profiles=state.profiles.numpy(),
            assignment=state.assignment.numpy(),
            a=a,
            b=b,
        )
        err = core.relative_error(trajectory, fit)
        with c.swapped():
            out[label] = (acc(model), err)
        if "auto" in label:
            auto_m = state.num_modes
    out[f"EMA (decay {args.ema_decay:g}, every step)"] = (acc(ema.module), None)
    out[f"SWA (epochs {args.warmup}..{args.epochs})"] = (acc(swa.module), None)
    # post-hoc CMD of the whole trajectory, against M
    for m in args.posthoc_modes:
        fit = core.fit_cmd(trajectory, m, sizes=[p.numel() for p in params], seed=seed)
        err = core.relative_error(trajectory, fit)
        last = torch.from_numpy(np.ascontiguousarray(fit.reconstruct()[:, -1]))
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(last, params)
            a_m = acc(model)
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
        out[f"post-hoc CMD, M={m}"] = (a_m, err)
    return out, auto_m


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="mlp", choices=["mlp", "cnn", "transformer"])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=20, help="CMD warm-up F (and SWA start)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--wd", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--ema-decay", type=float, default=0.99)
    parser.add_argument("--modes", type=int, nargs="+", default=[2, 10])
    parser.add_argument("--tol", type=float, default=0.3)
    parser.add_argument(
        "--centroid-modes",
        type=int,
        nargs="*",
        default=[2, 10],
        help="M of the online CMD rows with CMDConfig(profile='centroid') (none: leave them out)",
    )
    parser.add_argument("--posthoc-modes", type=int, nargs="+", default=[1, 2, 5, 10, 20, 50])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = [run(seed, args) for seed in args.seeds]
    runs = [r for r, _ in results]
    rows = list(runs[0])
    width = max(len(r) for r in rows)
    print(
        f"MNIST-1D, {args.model}, SGD lr {args.lr:g} mom 0.9 wd {args.wd:g}, {args.epochs} epochs, "
        f"CMD warm-up {args.warmup}, seeds {args.seeds} ({time.perf_counter() - start:.0f} s)"
    )
    print(f"{'method'.ljust(width)}  test acc % (mean +- sd)  recon. error (centered)")
    print(f"{'-' * width}  -----------------------  -----------------------")
    for r in rows:
        accs = [run_[r][0] for run_ in runs]
        errs = [run_[r][1] for run_ in runs]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        err = "-" if errs[0] is None else f"{statistics.mean(e or 0.0 for e in errs):.3f}"
        print(f"{r.ljust(width)}  {statistics.mean(accs):10.2f} +- {sd:4.2f}       {err:>13}")
    print(f"auto M per seed: {[m for _, m in results]} (tol {args.tol:g} on the warm-up sample)")


if __name__ == "__main__":
    main()
