"""Does CMD generalize better than the run it shadows? Online and embedded CMD vs SGD, EMA and SWA.

    python benchmarks/cmd_generalization.py                       # three data sets, the default seeds
    python benchmarks/cmd_generalization.py --data mnist1d --seeds 0 1 2 --json out.json
    python benchmarks/cmd_generalization.py --quick               # a smoke run (a few epochs, one seed)

The CMD paper's protocol, as closely as data that work offline allow: one training run per seed with a
constant learning rate (SGD with momentum 0.9 for the MLPs, as in the paper's ResNet runs; AdamW for the
language model, as Adam in its LeNet runs), observed by every shadow model at once, and one more run per
seed for each embedded-CMD setting (embedding changes the training itself):

- **last weights**: the optimizer's own weights at the end;
- **EMA** of the weights after every step (``torch.optim.swa_utils.AveragedModel`` with
  ``get_ema_multi_avg_fn``); **SWA**: the equal average of the weights at every time point from the end
  of CMD's warm-up on;
- **online CMD** (``lowrank_torch.cmd.CMDTracker``): modes fitted after ``F`` time points, then the
  exact online update of ``(a, b)``; evaluated with its weights ``a r(T) + b`` swapped in. The
  published profiles (``profile='reference'``) and centroid profiles, each at ``M`` = 2 and 10;
- **embedded CMD** (``CMDConfig(embed=True)``): after the warm-up, every ``L`` = 10 time points the
  10% of parameters whose ``(a, b)`` moved least since the last embedding are fixed to their mode model
  for the rest of the run; evaluated as trained (the weights of that run, embedded parameters at their
  model values) and with the whole mode model swapped in.

Data sets: MNIST-1D (``mnist1d``, generated locally) and scikit-learn's bundled digits (70/30 split),
each with the MLP ``in -> 512 -> 512 -> 10`` (SGD lr 0.05, momentum 0.9, weight decay 5e-4, batch 128,
60 epochs, a time point per epoch, warm-up 20), and the byte-level GPT of ``bench_lm.py`` at its
``--quick`` size (d=128, 2 layers, context 64, batch 16) on the standard library's source (AdamW lr
3e-3, weight decay 0.01, 600 steps, a time point every 10 steps, warm-up 20 time points). The metric is
test accuracy (%) for the MLPs and validation bits per byte for the language model (lower is better).

Every row is reported as mean +- standard deviation over the seeds and as the paired difference to the
observed run's last weights of the same seed (the same initialization and batches; positive = better),
with the number of seeds on which it is better. The centred relative reconstruction error of each online
model over the whole run (the share of the weights' motion it misses) is measured from the kept
trajectory. Single-threaded by default (``--threads``); the whole run takes about 15 minutes on one core.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from lowrank_core import cmd as core  # noqa: E402
from lowrank_torch.cmd import CMDConfig, CMDTracker  # noqa: E402

ONLINE = (("reference", 2), ("reference", 10), ("centroid", 2), ("centroid", 10))
EMBEDDED = (("reference", 2), ("centroid", 10))


@dataclass(frozen=True)
class Setting:
    """One data set's protocol."""

    name: str
    metric: str  # "acc" (higher is better) or "bpb" (lower is better)
    steps_per_point: int  # optimizer steps per CMD time point (0: one per epoch)
    points: int  # time points in the run (epochs for the MLPs)
    warmup: int
    embed_every: int = 10
    embed_fraction: float = 0.1
    ema_decay: float = 0.99


MNIST1D = Setting("MNIST-1D", "acc", 0, 60, 20)
DIGITS = Setting("digits", "acc", 0, 60, 20)
LM = Setting("byte LM", "bpb", 10, 60, 20)
SETTINGS = {"mnist1d": MNIST1D, "digits": DIGITS, "lm": LM}


class Task:
    """A model factory, the training batches in order and an evaluation."""

    setting: Setting

    def model(self, seed: int) -> nn.Module:
        raise NotImplementedError

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        raise NotImplementedError

    def batches(self, seed: int) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """One list of (input, target) batches per time point."""
        raise NotImplementedError

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> float:
        raise NotImplementedError


class MLPTask(Task):
    def __init__(self, setting: Setting, data: str) -> None:
        from cmd_online_modes import _data  # the same data and split as the diagnosis

        self.setting = setting
        self.xtr, self.ytr, self.xte, self.yte = _data(data)

    def model(self, seed: int) -> nn.Module:
        from lowrank_torch.demo.models import MLP

        torch.manual_seed(seed)
        return MLP(in_features=int(self.xtr.shape[1]))

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    def batches(self, seed: int) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        gen = torch.Generator().manual_seed(seed)
        for _ in range(self.setting.points):
            order = torch.randperm(self.xtr.shape[0], generator=gen)
            yield [(self.xtr[i], self.ytr[i]) for i in order.split(128)]

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(model(x), y)

    def evaluate(self, model: nn.Module) -> float:
        with torch.no_grad():
            pred = model(self.xte).argmax(dim=1)
        return 100.0 * float((pred == self.yte).float().mean())


class LMTask(Task):
    def __init__(self, setting: Setting) -> None:
        import bench_lm

        self.lm = bench_lm
        self.setting = setting
        self.cfg = replace(bench_lm.QUICK, steps=setting.points * setting.steps_per_point, lr=3e-3)
        train_b, val_b, _ = bench_lm.stdlib_text(self.cfg.train_bytes, self.cfg.val_bytes)
        self.train = torch.frombuffer(bytearray(train_b), dtype=torch.uint8).long()
        self.val = torch.frombuffer(bytearray(val_b), dtype=torch.uint8).long()

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return self.lm.ByteGPT(self.cfg)

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=self.cfg.lr, weight_decay=0.01)

    def batches(self, seed: int) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        gen = torch.Generator().manual_seed(seed)
        c = self.cfg
        for _ in range(self.setting.points):
            out = []
            for _ in range(self.setting.steps_per_point):
                starts = torch.randint(
                    0, self.train.numel() - c.context - 1, (c.batch,), generator=gen
                )
                out.append(self.lm._windows(self.train, starts, c.context))
            yield out

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.lm._loss(model, x, y, self.cfg)

    def evaluate(self, model: nn.Module) -> float:
        return self.lm._validate(model, self.val, self.cfg)


def _config(s: Setting, profile: str, modes: int, seed: int, embed: bool) -> CMDConfig:
    return CMDConfig(
        warmup_epochs=s.warmup,
        max_modes=modes,
        seed=seed,
        profile=profile,
        embed=embed,
        embed_every=s.embed_every,
        embed_fraction=s.embed_fraction,
        every_n_steps=s.steps_per_point or None,
    )


def _tick(tracker: CMDTracker) -> None:
    """One time point's worth of calls in the tracker's cadence (``step()`` after every step)."""
    if tracker.config.every_n_steps is None:
        tracker.after_epoch()


def _train(
    task: Task,
    seed: int,
    trackers: Callable[[nn.Module], dict[str, CMDTracker]],
    keep_trajectory: bool,
) -> tuple[nn.Module, dict[str, CMDTracker], AveragedModel, AveragedModel, np.ndarray | None]:
    s = task.setting
    model = task.model(seed)
    opt = task.optimizer(model)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(s.ema_decay))
    swa = AveragedModel(model)
    observers = trackers(model)
    params = [p for p in model.parameters() if p.requires_grad]
    traj = (
        np.empty((sum(p.numel() for p in params), s.points), dtype=np.float32)
        if keep_trajectory
        else None
    )
    for point, batches in enumerate(task.batches(seed)):
        model.train()
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            task.loss(model, x, y).backward()
            opt.step()
            ema.update_parameters(model)
            for c in observers.values():
                if c.config.every_n_steps is not None:
                    c.step()
        for c in observers.values():
            _tick(c)
        if point + 1 >= s.warmup:
            swa.update_parameters(model)
        if traj is not None:
            with torch.no_grad():
                traj[:, point] = torch.cat([p.detach().reshape(-1) for p in params]).numpy()
    model.eval()
    return model, observers, ema, swa, traj


def _online_error(tracker: CMDTracker, traj: np.ndarray) -> float:
    state = tracker.state
    assert state is not None
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
    return float(core.relative_error(traj, fit))


def run_seed(task: Task, seed: int) -> dict[str, dict[str, float | None]]:
    """{row: {"value": metric, "error": online reconstruction error or None}} for one seed."""
    s = task.setting
    out: dict[str, dict[str, float | None]] = {}

    def online(model: nn.Module) -> dict[str, CMDTracker]:
        return {
            f"online CMD, {p}, M={m}": CMDTracker(model, _config(s, p, m, seed, False))
            for p, m in ONLINE
        }

    model, observers, ema, swa, traj = _train(task, seed, online, keep_trajectory=True)
    assert traj is not None
    out["last weights"] = {"value": task.evaluate(model), "error": None}
    out[f"EMA (decay {s.ema_decay:g}, every step)"] = {
        "value": task.evaluate(ema.module),
        "error": None,
    }
    out[f"SWA (from time point {s.warmup})"] = {"value": task.evaluate(swa.module), "error": None}
    for label, c in observers.items():
        with c.swapped():
            out[label] = {"value": task.evaluate(model), "error": _online_error(c, traj)}
    del traj
    for p, m in EMBEDDED:
        label = f"embedded CMD, {p}, M={m}"
        model, trackers, _, _, _ = _train(
            task,
            seed,
            lambda mdl, p=p, m=m, label=label: {
                label: CMDTracker(mdl, _config(s, p, m, seed, True))
            },
            keep_trajectory=False,
        )
        c = trackers[label]
        embedded = c.embedded
        share = 0.0 if embedded is None else float(embedded.float().mean())
        out[f"{label}: as trained"] = {
            "value": task.evaluate(model),
            "error": None,
            "embedded": share,
        }
        with c.swapped():
            out[f"{label}: mode model"] = {"value": task.evaluate(model), "error": None}
    return out


def summarize(
    setting: Setting, runs: list[dict[str, dict[str, float | None]]]
) -> list[dict[str, Any]]:
    """Per row: mean, sd, paired difference to the last weights (positive = better), wins."""
    sign = 1.0 if setting.metric == "acc" else -1.0
    rows = []
    for label in runs[0]:
        values = [float(r[label]["value"]) for r in runs]  # type: ignore[arg-type]
        base = [float(r["last weights"]["value"]) for r in runs]  # type: ignore[arg-type]
        diffs = [sign * (v - b) for v, b in zip(values, base, strict=True)]
        errors = [r[label]["error"] for r in runs]
        row: dict[str, Any] = {
            "method": label,
            "mean": statistics.mean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "paired_gain": statistics.mean(diffs),
            "paired_sd": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
            "better_on": sum(d > 0 for d in diffs),
            "seeds": len(runs),
            "error": None if errors[0] is None else statistics.mean(float(e) for e in errors),  # type: ignore[arg-type]
        }
        if "embedded" in runs[0][label]:
            row["embedded_share"] = statistics.mean(float(r[label]["embedded"]) for r in runs)  # type: ignore[arg-type]
        rows.append(row)
    return rows


def render(setting: Setting, rows: list[dict[str, Any]], header: str) -> str:
    unit = "test acc %" if setting.metric == "acc" else "val bits/byte"
    lines = [
        header,
        "",
        f"| method | {unit} | vs last weights (paired) | better on | online error |",
    ]
    lines.append("|---|---|---|---|---|")
    digits = 2 if setting.metric == "acc" else 4
    for r in rows:
        err = "-" if r["error"] is None else f"{r['error']:.3f}"
        gain = (
            "-"
            if r["method"] == "last weights"
            else f"{r['paired_gain']:+.{digits}f} +- {r['paired_sd']:.{digits}f}"
        )
        better = "-" if r["method"] == "last weights" else f"{r['better_on']}/{r['seeds']}"
        extra = f" ({r['embedded_share']:.0%} embedded)" if "embedded_share" in r else ""
        lines.append(
            f"| {r['method']}{extra} | {r['mean']:.{digits}f} +- {r['sd']:.{digits}f} | {gain} | {better} | {err} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--data", nargs="+", choices=sorted(SETTINGS), default=["mnist1d", "digits", "lm"]
    )
    p.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="default: 0-4 (MLPs), 0-2 (LM)"
    )
    p.add_argument("--quick", action="store_true", help="8 time points, warm-up 4, one seed")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {}
    for name in args.data:
        setting = SETTINGS[name]
        if args.quick:
            setting = replace(setting, points=8, warmup=4, embed_every=2)
        seeds = args.seeds or (
            [0] if args.quick else [0, 1, 2] if name == "lm" else [0, 1, 2, 3, 4]
        )
        task: Task = LMTask(setting) if name == "lm" else MLPTask(setting, name)
        start = time.perf_counter()
        runs = [run_seed(task, seed) for seed in seeds]
        rows = summarize(setting, runs)
        seconds = time.perf_counter() - start
        header = (
            f"({name}) {setting.points} time points, warm-up {setting.warmup}, embedding every "
            f"{setting.embed_every} ({setting.embed_fraction:.0%}), seeds {seeds}, {seconds:.0f} s"
        )
        print(render(setting, rows, header) + "\n", flush=True)
        results[name] = {"setting": setting.__dict__, "seeds": seeds, "rows": rows, "runs": runs,
                         "seconds": seconds}  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
