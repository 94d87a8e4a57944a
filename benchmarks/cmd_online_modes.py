"""Why does online CMD get worse as the number of modes ``M`` grows? A measurement.

Online CMD (``lowrank_core.cmd.OnlineCMD``, ``lowrank_torch.cmd.CMDTracker``) fits the modes, their
references and every parameter's assignment once, on the first ``F`` epochs (the warm-up), and then only
updates the coefficients ``(a, b)`` by exact recursive least squares. Its model at the end of training
therefore equals the batch least-squares fit of the *whole* trajectory with the warm-up's references
(profiles = the references' whole trajectories) and the warm-up's assignment, which is what this script
computes (``fit_coefficients``), so every ``(F, M)`` costs one fit instead of one training run.

One SGD run per seed (the setting of ``examples/cmd_mnist1d.py``: MNIST-1D MLP 40-512-512-10, SGD lr 0.05,
momentum 0.9, weight decay 5e-4, batch 128; or scikit-learn's digits with the same MLP), the whole
trajectory ``(N, T)`` kept. For every warm-up length ``F`` and ``M`` it reports the centred relative
reconstruction error over the whole run and the test accuracy of the model's last-epoch weights for:

- ``online``: the published method (warm-up references, warm-up assignment);
- ``reassign``: warm-up references, but every parameter assigned by its |corr| over the *whole* run (not
  an online method: it shows how much of the loss is the frozen assignment rather than the references);
- ``centroid``: each warm-up cluster's profile is the mean of its sampled members' trajectories, each
  standardised by its own warm-up mean and standard deviation and signed by its warm-up correlation with
  the cluster's reference (a fixed linear function of the weights, so it can be updated online exactly);
  every parameter assigned by its warm-up |corr| with these profiles;
- ``post-hoc``: ``fit_cmd`` of the whole trajectory (needs the whole trajectory; the bound to aim at).

Diagnostics of the published method: the share of parameters whose |corr| with their reference is
>= 0.8 over the warm-up but < 0.5 over the whole run ("departed"); the share of parameters on a mode
whose reference's trajectory after the warm-up correlates < 0.5 with the mode's centroid after the
warm-up ("on departed ref"); and, for a few ``(F, M)``, a per-mode table: the mode's share of
parameters, its members' median |corr| with the reference over the warm-up and over the whole run,
the reference's |corr| with the mode centroid after the warm-up, how much the reference keeps moving
("ref moves": its standard deviation after the warm-up over that during the warm-up, divided by the
members' median of the same ratio), and the mode's relative error after the warm-up (the model is
fitted on the whole run, so this can exceed 1: ``a`` times the reference's own later motion is added
to every member).

Run (single thread): ``python benchmarks/cmd_online_modes.py [--data mnist1d digits] [--seeds 0 1 2]
[--epochs 60] [--warmups 5 10 20 30] [--modes 1 2 5 10 20]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from lowrank_core import cmd


def _data(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if name == "mnist1d":
        from lowrank_torch.demo.data import load_mnist1d

        d = load_mnist1d(seed=0)
        return d.x_train, d.y_train, d.x_test, d.y_test
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    cut = int(0.7 * len(y))
    xs = torch.as_tensor(x / 16.0, dtype=torch.float32)
    ys = torch.as_tensor(y, dtype=torch.int64)
    tr, te = torch.as_tensor(order[:cut]), torch.as_tensor(order[cut:])
    return xs[tr], ys[tr], xs[te], ys[te]


def train(
    name: str, seed: int, epochs: int
) -> tuple[nn.Module, np.ndarray, list[int], tuple[torch.Tensor, torch.Tensor]]:
    """SGD (momentum 0.9, lr 0.05, wd 5e-4, batch 128): the model, its ``(N, epochs)`` trajectory
    (float64 copy of the float32 weights), the tensor sizes, the test set."""
    from lowrank_torch.demo.models import MLP

    xtr, ytr, xte, yte = _data(name)
    torch.manual_seed(seed)
    model = MLP(in_features=int(xtr.shape[1]))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    traj = np.empty((sum(p.numel() for p in params), epochs), dtype=np.float64)
    for e in range(epochs):
        for idx in torch.randperm(xtr.shape[0], generator=gen).split(128):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
        with torch.no_grad():
            traj[:, e] = torch.cat([p.detach().reshape(-1) for p in params]).double().numpy()
    return model, traj, [p.numel() for p in params], (xte, yte)


def accuracy(model: nn.Module, flat: np.ndarray, test: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Test accuracy (%) with ``flat`` swapped in; the model's weights are restored."""
    params = list(model.parameters())
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(torch.as_tensor(flat, dtype=torch.float32), params)
        pred = model(test[0]).argmax(dim=1)
        for p, s in zip(params, saved, strict=True):
            p.copy_(s)
    return 100.0 * float((pred == test[1]).float().mean())


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows centred and scaled to unit norm (0 for a constant row)."""
    c = x - x.mean(axis=1, keepdims=True)
    n = np.linalg.norm(c, axis=1, keepdims=True)
    return np.divide(c, n, out=np.zeros_like(c), where=n > 0)


def model_of(
    traj: np.ndarray, profiles: np.ndarray, assignment: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares ``(a, b)`` of every row on its mode's profile over the whole trajectory."""
    a, b = cmd.fit_coefficients(traj, profiles, assignment)
    return np.asarray(a), np.asarray(b)


def rel_error(traj: np.ndarray, profiles: np.ndarray, assignment: np.ndarray, cols: slice) -> float:
    """Centred relative error of the whole-run model, measured on the columns ``cols``."""
    a, b = model_of(traj, profiles, assignment)
    x = traj[:, cols]
    res = x - (a[:, None] * profiles[assignment][:, cols] + b[:, None])
    den = x - x.mean(axis=1, keepdims=True)
    return float(np.sqrt((res * res).sum() / (den * den).sum()))


def centroid_profiles(
    traj: np.ndarray, warm: int, fit: cmd.CMDFit
) -> tuple[np.ndarray, np.ndarray]:
    """Per warm-up cluster: the signed mean of its sampled members' trajectories, each standardised
    by its warm-up mean and norm; and the (M, N)-free description: (profiles (M, T), member weights)."""
    labels = np.asarray(fit.labels)
    refs = np.asarray(fit.references)
    m = refs.size
    w_unit = _unit_rows(traj[fit.sample, :warm])
    r_unit = _unit_rows(traj[refs, :warm])
    mean = traj[fit.sample, :warm].mean(axis=1)
    norm = np.linalg.norm(traj[fit.sample, :warm] - mean[:, None], axis=1)
    profiles = np.zeros((m, traj.shape[1]))
    for k in range(m):
        members = np.flatnonzero(labels == k)
        sign = np.sign(w_unit[members] @ r_unit[k])
        sign[sign == 0] = 1.0
        z = (traj[fit.sample[members]] - mean[members, None]) / norm[members, None]
        profiles[k] = (sign[:, None] * z).mean(axis=0)
    return profiles, labels


def assign(traj: np.ndarray, profiles: np.ndarray, cols: slice) -> np.ndarray:
    """Mode of every row by its largest |corr| with a profile over the columns ``cols``."""
    return np.asarray(cmd.assign_modes(np.ascontiguousarray(traj[:, cols]), profiles[:, cols]))


def per_mode(traj: np.ndarray, warm: int, fit: cmd.CMDFit, centroids: np.ndarray) -> list[str]:
    """Rows of the per-mode table of the published method at one ``(F, M)``."""
    refs = np.asarray(fit.references)
    assignment = np.asarray(fit.assignment)
    profiles = traj[refs]
    a, b = model_of(traj, profiles, assignment)
    post = slice(warm, None)
    u_w = _unit_rows(traj[:, :warm])
    u_f = _unit_rows(traj)
    p_w = _unit_rows(profiles[:, :warm])
    p_f = _unit_rows(profiles)
    c_post = _unit_rows(centroids[:, post])
    r_post = _unit_rows(profiles[:, post])
    n = traj.shape[0]
    lines = []
    for k in range(refs.size):
        mem = np.flatnonzero(assignment == k)
        if mem.size == 0:
            continue
        cw = np.abs(u_w[mem] @ p_w[k])
        cf = np.abs(u_f[mem] @ p_f[k])
        x = traj[mem, post]
        res = x - (a[mem, None] * profiles[k, post] + b[mem, None])
        den = x - x.mean(axis=1, keepdims=True)
        err = float(np.sqrt((res * res).sum() / max((den * den).sum(), 1e-300)))
        rc = float(abs(c_post[k] @ r_post[k]))
        # how much the reference keeps moving after the warm-up, relative to its members
        ref_ratio = float(np.std(profiles[k, post]) / max(np.std(profiles[k, :warm]), 1e-300))
        mem_ratio = np.std(traj[mem, post], axis=1) / np.maximum(
            np.std(traj[mem, :warm], axis=1), 1e-300
        )
        lines.append(
            f"{k:4d} {100 * mem.size / n:7.2f} {np.median(cw):9.3f} {np.median(cf):9.3f} "
            f"{rc:10.3f} {ref_ratio / np.median(mem_ratio):10.2f} {err:9.3f}"
        )
    return lines


def departed(
    traj: np.ndarray, warm: int, refs: np.ndarray, assignment: np.ndarray, centroids: np.ndarray
) -> tuple[float, float]:
    """Two shares of parameters: those with warm-up |corr| >= 0.8 to their reference but whole-run
    |corr| < 0.5; and those on a mode whose reference's trajectory after the warm-up correlates < 0.5
    (in absolute value) with the mode's centroid after the warm-up."""
    u_w, u_f = _unit_rows(traj[:, :warm]), _unit_rows(traj)
    p_w, p_f = _unit_rows(traj[refs, :warm]), _unit_rows(traj[refs])
    cw = np.abs(np.einsum("nt,nt->n", u_w, p_w[assignment]))
    cf = np.abs(np.einsum("nt,nt->n", u_f, p_f[assignment]))
    post = slice(warm, None)
    rc = np.abs(np.einsum("mt,mt->m", _unit_rows(traj[refs, post]), _unit_rows(centroids[:, post])))
    return float(np.mean((cw >= 0.8) & (cf < 0.5))), float(np.mean(rc[assignment] < 0.5))


def measure(
    name: str,
    seeds: Sequence[int],
    epochs: int,
    warmups: Sequence[int],
    modes: Sequence[int],
    detail: Sequence[tuple[int, int]],
) -> None:
    rows: dict[tuple[int, int, str], list[tuple[float, float]]] = {}
    dep: dict[tuple[int, int], list[tuple[float, float]]] = {}
    sgd: list[float] = []
    for seed in seeds:
        t0 = time.perf_counter()
        model, traj, sizes, test = train(name, seed, epochs)
        sgd.append(accuracy(model, traj[:, -1], test))
        whole = slice(None)
        for warm in warmups:
            for m in modes:
                fit = cmd.fit_cmd(np.ascontiguousarray(traj[:, :warm]), m, sizes=sizes, seed=seed)
                refs = np.asarray(fit.references)
                asg = np.asarray(fit.assignment)
                prof = traj[refs]
                cen, _ = centroid_profiles(traj, warm, fit)
                cen_asg = assign(traj, cen, slice(0, warm))
                variants = {
                    "online": (prof, asg),
                    "reassign": (prof, assign(traj, prof, whole)),
                    "centroid": (cen, cen_asg),
                }
                for label, (p, g) in variants.items():
                    a, b = model_of(traj, p, g)
                    last = a * p[g, -1] + b
                    err = rel_error(traj, p, g, whole)
                    rows.setdefault((warm, m, label), []).append((err, accuracy(model, last, test)))
                dep.setdefault((warm, m), []).append(departed(traj, warm, refs, asg, cen))
                if (warm, m) in detail and seed == seeds[0]:
                    print(f"\nper mode, published online CMD, {name}, seed {seed}, F={warm}, M={m}")
                    print("mode  %param  |c| warm  |c| full  ref~cent  ref moves  err post")
                    for line in per_mode(traj, warm, fit, cen):
                        print(line)
                    e_on = rel_error(traj, prof, asg, slice(warm, None))
                    e_ce = rel_error(traj, cen, cen_asg, slice(warm, None))
                    print(f"after warm-up: error online {e_on:.3f}, centroid {e_ce:.3f}")
        for m in modes:
            fit = cmd.fit_cmd(traj, m, sizes=sizes, seed=seed)
            last = np.asarray(fit.reconstruct())[:, -1]
            rows.setdefault((0, m, "post-hoc"), []).append(
                (cmd.relative_error(traj, fit), accuracy(model, last, test))
            )
        print(
            f"{name} seed {seed}: N={traj.shape[0]} T={epochs} ({time.perf_counter() - t0:.0f} s)"
        )

    def ms(v: list[float]) -> str:
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        return f"{statistics.mean(v):6.2f} +- {sd:4.2f}"

    print(f"\n{name}, MLP, SGD lr 0.05 mom 0.9 wd 5e-4, {epochs} epochs, seeds {list(seeds)}")
    print(f"SGD last weights: test acc {ms(sgd)}")
    print(
        "  F    M  variant    rel.err (mean)  test acc % (mean +- sd)  departed %  "
        "on departed ref %"
    )
    for (warm, m, label), v in rows.items():
        errs = [e for e, _ in v]
        accs = [a for _, a in v]
        d = "       -             -"
        if label == "online":
            d1 = statistics.mean(x for x, _ in dep[(warm, m)])
            d2 = statistics.mean(y for _, y in dep[(warm, m)])
            d = f"{100 * d1:8.2f}  {100 * d2:12.2f}"
        f = "all" if warm == 0 else str(warm)
        print(f"{f:>3} {m:4d}  {label:9s}  {statistics.mean(errs):14.3f}  {ms(accs):>23}  {d}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="+", default=["mnist1d"], choices=["mnist1d", "digits"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--warmups", type=int, nargs="+", default=[5, 10, 20, 30])
    parser.add_argument("--modes", type=int, nargs="+", default=[1, 2, 5, 10, 20])
    parser.add_argument(
        "--detail",
        nargs="+",
        default=["20:2", "20:10"],
        help="F:M pairs whose per-mode table is printed (first seed)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.data:
        detail = [(int(f), int(m)) for f, m in (d.split(":") for d in args.detail)]
        measure(name, args.seeds, args.epochs, args.warmups, args.modes, detail)


if __name__ == "__main__":
    main()
