"""Figures of the documentation site, each from a real short run (``nox -s docs`` calls this first).

    python docs/figures.py [--out docs/generated]

Every figure is computed here, on MNIST-1D generated locally (the demo's data and models) or on random
weights, with fixed seeds; nothing is drawn from stored numbers. One CPU thread; about a minute.
Each figure also writes the numbers it plots to ``<name>.json`` beside it.

The one exception is ``lm_frontier``: the language-model benchmark takes far too long for a docs
build, so that figure is drawn from the JSON a run of ``benchmarks/bench_lm.py --json`` wrote
(``benchmarks/stored/lm_table.json`` by default, ``--lm-table`` to choose another); without that file
it is skipped and says so.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

import lowrank_core as lc
from lowrank_torch.demo.data import load_mnist1d
from lowrank_torch.demo.models import build_model
from lowrank_torch.dldr import SnapshotRecorder
from lowrank_torch.oialr import OIALR, OIALRConfig
from lowrank_torch.plots import plot_history

SEED = 0


def _batches(x: torch.Tensor, y: torch.Tensor, batch: int, seed: int):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=g)
    for i in range(0, x.shape[0] - batch + 1, batch):
        idx = perm[i : i + batch]
        yield x[idx], y[idx]


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean()) * 100


def fig_oialr(out: Path) -> dict[str, Any]:
    """Basis stability per layer before the switch, rank per layer after it (demo transformer)."""
    data = load_mnist1d(SEED, 4000)
    model = build_model("transformer", seed=SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    cfg = OIALRConfig(
        switch_step=150,  # whatever has not settled by then
        stability_threshold=0.999,
        stability_every=5,
        update_every=25,
        rule=lc.SigmaCutoff(0.3),
    )
    ctrl = OIALR(model, opt, cfg)
    for epoch in range(10):
        for xb, yb in _batches(data.x_train, data.y_train, 128, SEED + epoch):
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ctrl.step()
    plot_history(ctrl.history, out / "oialr_history.png", title="OIALR on the demo transformer")
    return {
        "steps": ctrl.step_count,
        "switched_at": ctrl.switched,
        "ranks": ctrl.ranks(),
        "trainable_share": ctrl.trainable_share(),
        "test_accuracy": _accuracy(model, data.x_test, data.y_test),
    }


def _trajectory(epochs: int, per_epoch: int) -> tuple[np.ndarray, nn.Module]:
    """Flattened parameters of the demo MLP, recorded ``per_epoch`` times per epoch of SGD."""
    data = load_mnist1d(SEED, 4000)
    model = build_model("mlp", seed=SEED)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rec = SnapshotRecorder(model)
    steps = data.x_train.shape[0] // 128
    every = max(1, steps // per_epoch)
    for epoch in range(epochs):
        for i, (xb, yb) in enumerate(_batches(data.x_train, data.y_train, 128, SEED + epoch)):
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i % every == every - 1:
                rec.record()
    snaps = [rec.store.snapshot(i).numpy() for i in range(len(rec.store))]
    return np.stack(snaps), model


def fig_dldr(out: Path) -> dict[str, Any]:
    """Explained-variance ratio of the top-d PCA directions of an SGD trajectory (demo MLP)."""
    snaps, _ = _trajectory(epochs=15, per_epoch=5)
    d = min(40, snaps.shape[0] - 1)
    sub = lc.fit_subspace(snaps, d)
    ratio = np.asarray(sub.explained_variance_ratio)
    cum = np.cumsum(ratio)
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    ax[0].semilogy(np.arange(1, d + 1), ratio, "o-", ms=3)
    ax[0].set_xlabel("direction")
    ax[0].set_ylabel("explained-variance ratio")
    ax[1].plot(np.arange(1, d + 1), cum, "o-", ms=3)
    ax[1].axvline(40, color="grey", ls="--", lw=1)
    ax[1].set_xlabel("subspace dimension d")
    ax[1].set_ylabel("cumulative ratio")
    ax[1].set_ylim(min(0.8, float(cum[0])), 1.001)
    fig.suptitle(
        f"DLDR: {snaps.shape[0]} snapshots of {snaps.shape[1]:,} parameters (demo MLP, SGD)"
    )
    fig.tight_layout()
    fig.savefig(out / "dldr_variance.png", dpi=110)
    plt.close(fig)
    return {"snapshots": int(snaps.shape[0]), "D": int(snaps.shape[1]), "cum_at_40": float(cum[39])}


def fig_cmd(out: Path) -> dict[str, Any]:
    """CMD mode profiles and the centred reconstruction error against M (demo MLP trajectory)."""
    snaps, _ = _trajectory(epochs=20, per_epoch=1)
    traj = np.ascontiguousarray(snaps.T)  # (N, T)
    ms = [1, 2, 3, 5, 8, 12, 20]
    errors = []
    for m in ms:
        fit = lc.fit_cmd(traj, m, seed=SEED)
        errors.append(lc.cmd.relative_error(traj, fit))
    fit = lc.fit_cmd(traj, 5, seed=SEED)
    prof = np.asarray(fit.profiles)
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    for j, p in enumerate(prof):
        span = p.max() - p.min()
        ax[0].plot((p - p.min()) / (span if span > 0 else 1.0), label=f"mode {j + 1}")
    ax[0].set_xlabel("epoch")
    ax[0].set_ylabel("reference profile (scaled to [0, 1])")
    ax[0].legend(fontsize=7)
    ax[1].plot(ms, errors, "o-")
    ax[1].set_xlabel("number of modes M")
    ax[1].set_ylabel("centred relative error")
    fig.suptitle(f"CMD of {traj.shape[0]:,} parameters over {traj.shape[1]} epochs (demo MLP)")
    fig.tight_layout()
    fig.savefig(out / "cmd_modes.png", dpi=110)
    plt.close(fig)
    return {"M": ms, "relative_error": [float(e) for e in errors], "modes_at_5": fit.num_modes}


def fig_init(out: Path) -> dict[str, Any]:
    """Relative ReLU function error of spectral vs nonlinear init against the rank."""
    rng = np.random.default_rng(SEED)
    m, n = 1024, 256
    w = rng.standard_normal((m, n)) * np.sqrt(2.0 / n)  # a fresh He-initialized weight
    ranks = [1, 2, 4, 8, 16, 32, 64, 128]
    spec, nonl = [], []
    for r in ranks:
        fs = lc.spectral_init(w, r)
        fn = lc.nonlinear_init(w, r)
        spec.append(float(lc.relu_function_error(w, fs.left @ fs.right.T, relative=True)))
        nonl.append(float(lc.relu_function_error(w, fn.left @ fn.right.T, relative=True)))
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    ax[0].plot(ranks, spec, "o-", label="spectral (truncated SVD)")
    ax[0].plot(ranks, nonl, "s-", label="nonlinear (ReLU-optimal rescaling)")
    ax[0].set_xscale("log", base=2)
    ax[0].set_xlabel("rank")
    ax[0].set_ylabel("relative ReLU function error")
    ax[0].legend(fontsize=8)
    ax[1].plot(ranks, np.array(nonl) / np.array(spec), "o-", color="C2")
    ax[1].axhline(1.0, color="grey", ls="--", lw=1)
    ax[1].set_xscale("log", base=2)
    ax[1].set_xlabel("rank")
    ax[1].set_ylabel("nonlinear / spectral error")
    fig.suptitle(f"Low-rank init of a {m} x {n} He-initialized weight (x ~ N(0, I))")
    fig.tight_layout()
    fig.savefig(out / "init_error.png", dpi=110)
    plt.close(fig)
    return {"ranks": ranks, "spectral": spec, "nonlinear": nonl}


LM_TABLE = Path(__file__).resolve().parent.parent / "benchmarks" / "stored" / "lm_table.json"


def fig_lm_frontier(out: Path) -> dict[str, Any]:
    """Validation loss against whole-run training time, one point per method (stored benchmark JSON)."""
    if not LM_TABLE.is_file():
        return {"skipped": f"no benchmark JSON at {LM_TABLE}"}
    table = json.loads(LM_TABLE.read_text())
    rows = [r for r in table["rows"] if not r["method"].startswith("dense (")]
    cfg = table["config"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, r in enumerate(rows):
        marker = "*" if r["method"] == "dense" else "o"
        ax.scatter(r["wall_ratio"], r["val_bpb"], marker=marker, s=90 if marker == "*" else 40)
        ax.annotate(r["method"], (r["wall_ratio"], r["val_bpb"]), textcoords="offset points",
                    xytext=(5, 4 if i % 2 else -11), fontsize=8)  # fmt: skip
    # the grids (bench_lm.py --grid-switches): OIALR by budget, switch fraction and Sigma lr, and
    # fixed rank at a budget's FLOPs; a setting measured in two grids is drawn once
    grid: dict[str, dict[str, Any]] = {}
    for name in ("lm_grid.json", "lm_grid_budgets.json"):
        path = LM_TABLE.with_name(name)
        for r in json.loads(path.read_text())["rows"][1:] if path.is_file() else []:
            if r["val_ratio"] < 1.5:  # a diverged setting would flatten the rest
                grid.setdefault(r["method"], r)
    for i, r in enumerate(grid.values()):
        fixed = r["method"].startswith("fixed rank")
        ax.scatter(r["wall_ratio"], r["val_bpb"], marker="^" if fixed else "s", s=30,
                   facecolors="none", edgecolors="C3" if fixed else "k")  # fmt: skip
        label = (
            r["method"].replace("OIALR flops ", "grid: ").replace(", switch ", " @")
            .replace(", Sigma lr ", " ").replace("fixed rank, flops ", "fixed rank ")
            .replace(", spectral init", " (FLOPs)")
        )  # fmt: skip
        ax.annotate(label, (r["wall_ratio"], r["val_bpb"]), textcoords="offset points",
                    xytext=(-60, -9 if i % 2 else 3), fontsize=6.5, color="0.3")  # fmt: skip
    ax.set_xlabel("whole-run training time / dense (same lockstep run)")
    ax.set_ylabel("validation loss (bits/byte)")
    ax.set_title(
        f"byte GPT d={cfg['d_model']} L={cfg['layers']}, {cfg['steps']} steps, lr {cfg['lr']:g}"
        + (" (--quick smoke run)" if table.get("quick") else ""),
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "lm_frontier.png", dpi=110)
    plt.close(fig)
    return {
        "source": str(LM_TABLE),
        "points": {r["method"]: [r["wall_ratio"], r["val_bpb"]] for r in [*rows, *grid.values()]},
    }


FIGURES: dict[str, Callable[[Path], dict[str, Any]]] = {
    "oialr_history": fig_oialr,
    "dldr_variance": fig_dldr,
    "cmd_modes": fig_cmd,
    "init_error": fig_init,
    "lm_frontier": fig_lm_frontier,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "generated")
    p.add_argument("--only", default="", help="comma list of figures (default: all)")
    p.add_argument("--lm-table", type=Path, default=None, help="the benchmark JSON of lm_frontier")
    args = p.parse_args()
    if args.lm_table is not None:
        global LM_TABLE
        LM_TABLE = args.lm_table
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    chosen = [f for f in args.only.split(",") if f] or list(FIGURES)
    for name in chosen:
        start = time.perf_counter()
        numbers = FIGURES[name](args.out)
        numbers["seconds"] = round(time.perf_counter() - start, 1)
        (args.out / f"{name}.json").write_text(json.dumps(numbers, indent=1, default=str))
        print(f"{name}: {json.dumps(numbers, default=str)}")


if __name__ == "__main__":
    main()
