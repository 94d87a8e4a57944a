"""A realistic workload: a GPT-style byte-level language model on the Python standard library's source.

    python benchmarks/bench_lm.py                  # dense vs OIALR, the default size (a few minutes each)
    python benchmarks/bench_lm.py --quick          # a small model, a smoke run
    python benchmarks/bench_lm.py --device cuda    # on a GPU (the prepared GPU script does this)
    python benchmarks/bench_lm.py --cutoff 0.6     # a stated, stronger rank rule (SigmaCutoff(0.6))
    python benchmarks/run.py lm                    # through the benchmark runner (JSON in results/)

The text is real and on every machine: the ``.py`` files of ``sysconfig.get_paths()["stdlib"]`` (test
suites, ``site-packages`` and IDLE left out), sorted by path; a file goes to validation when the CRC32 of
its relative path is divisible by 10, so the split is fixed by the file list alone. Tokens are bytes.

Dense and OIALR train the same model from the same initialization on the same batches (one seeded
generator), with AdamW, interleaved step by step (one dense step, one OIALR step, ...: load on the machine
hits both alike). OIALR runs its warm-up stability checks at the published interval (every 100
steps), switches every eligible Linear at 40% of training, and updates ranks every 10% with
``SigmaCutoff(0.2)``. Every timing is a wall-clock measurement of the run itself: the training step
(forward, backward, optimizer) and, separately, each ``OIALR.step()``, so the cost of a check, a rank
update and the switch are read off the steps where they happened, in units of one dense step.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import sysconfig
import time
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
try:
    import lowrank_core  # noqa: F401
except ImportError:  # a source tree that is not installed (the GPU machine)
    sys.path += [str(HERE.parent / d) for d in (".", "backends", "reference")]

import torch  # noqa: E402
from _common import Config, Report, Table  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import lowrank_core as lc  # noqa: E402
from lowrank_torch.convert import count_trainable  # noqa: E402
from lowrank_torch.oialr import OIALR, OIALRConfig  # noqa: E402

DESCRIPTION = "GPT-style byte LM on the stdlib's source: dense vs OIALR, step times and check costs"

_SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "lib2to3",
}


@dataclass(frozen=True)
class LMConfig:
    d_model: int = 256
    layers: int = 4
    heads: int = 4
    context: int = 128
    batch: int = 16
    steps: int = 500
    lr: float = 1e-3
    train_bytes: int = 4_000_000
    val_bytes: int = 200_000
    val_batches: int = 20
    switch_fraction: float = 0.4
    update_fraction: float = 0.1
    check_every: int = 100
    cutoff: float = 0.2
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"  # "bfloat16": autocast for the forward pass


QUICK = LMConfig(d_model=128, layers=2, heads=4, context=64, batch=16, steps=120, check_every=20,
                 train_bytes=600_000, val_bytes=60_000, val_batches=5)  # fmt: skip


def stdlib_text(train_bytes: int, val_bytes: int) -> tuple[bytes, bytes, dict[str, Any]]:
    """(train, validation) bytes of the stdlib's own source files, a fixed list and split."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts)
    )
    train, val = bytearray(), bytearray()
    used = {"train": 0, "val": 0}
    for path in files:
        rel = path.relative_to(root).as_posix()
        target, cap, key = (
            (val, val_bytes, "val")
            if zlib.crc32(rel.encode()) % 10 == 0
            else (train, train_bytes, "train")
        )
        if len(target) >= cap:
            if len(train) >= train_bytes and len(val) >= val_bytes:
                break
            continue
        target.extend(path.read_bytes()[: cap - len(target)])
        used[key] += 1
    if len(train) < 10_000 or len(val) < 1_000:
        raise SystemExit(f"too little standard-library source under {root}")
    info = {"stdlib": str(root), "files": used, "train_bytes": len(train), "val_bytes": len(val)}
    return bytes(train), bytes(val), info


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        shape = (b, t, self.heads, d // self.heads)
        q, k, v = (z.reshape(shape).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ByteGPT(nn.Module):
    """A small GPT over bytes: token + position embeddings, pre-LN blocks, a dense output head."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(256, cfg.d_model)
        self.pos = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.heads) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, 256)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def _windows(
    data: torch.Tensor, starts: torch.Tensor, context: int
) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.arange(context + 1, device=starts.device)
    chunk = data[starts[:, None] + offsets]
    return chunk[:, :-1], chunk[:, 1:]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    state = sum(
        v.numel() * v.element_size()
        for s in opt.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )
    return int(params + buffers + state)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: LMConfig) -> torch.Tensor:
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
        logits = model(x)
    return F.cross_entropy(logits.float().reshape(-1, 256), y.reshape(-1))


def _validate(model: nn.Module, val: torch.Tensor, cfg: LMConfig) -> float:
    """Validation loss in bits per byte, on fixed windows."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    total = 0.0
    with torch.no_grad():
        for _ in range(cfg.val_batches):
            starts = torch.randint(0, val.numel() - cfg.context - 1, (cfg.batch,), generator=g)
            x, y = _windows(val, starts.to(val.device), cfg.context)
            total += float(_loss(model, x, y, cfg))
    return total / cfg.val_batches / math.log(2)


class _Run:
    """One training run (dense or OIALR) from ``init``, advanced one step at a time.

    Per-step wall times of the training step and of ``OIALR.step()`` are recorded. :func:`train_both`
    alternates the two runs step by step, so that load on the machine (other processes, frequency
    changes) hits dense and OIALR alike.
    """

    def __init__(
        self, cfg: LMConfig, method: str, init: dict[str, torch.Tensor], train: torch.Tensor
    ) -> None:
        self.cfg, self.method, self.train = cfg, method, train
        self.device = torch.device(cfg.device)
        self.model = ByteGPT(cfg).to(self.device)
        self.model.load_state_dict(init)
        self.dense_trainable = count_trainable(self.model)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=0.01)
        self.switch = max(1, int(cfg.switch_fraction * cfg.steps))
        self.ctrl: OIALR | None = None
        if method == "oialr":
            ocfg = OIALRConfig(
                switch_step=self.switch,
                stability_threshold=1.0,  # checks for their cost; the switch happens at `switch`
                stability_every=cfg.check_every,
                update_every=max(1, int(cfg.update_fraction * cfg.steps)),
                rule=lc.SigmaCutoff(cfg.cutoff),
            )
            self.ctrl = OIALR(self.model, self.opt, ocfg)
        self.gen = torch.Generator().manual_seed(cfg.seed)  # the same batches in both runs
        self.step_s: list[float] = []
        self.ctrl_s: list[float] = []
        self.events: dict[int, str] = {}

    def step(self, step: int) -> None:
        cfg, device, ctrl = self.cfg, self.device, self.ctrl
        starts = torch.randint(
            0, self.train.numel() - cfg.context - 1, (cfg.batch,), generator=self.gen
        )
        x, y = _windows(self.train, starts.to(device), cfg.context)
        _sync(device)
        t0 = time.perf_counter()
        loss = _loss(self.model, x, y, cfg)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        _sync(device)
        t1 = time.perf_counter()
        if ctrl is not None:
            n_hist = len(ctrl.history)
            ctrl.step()
            _sync(device)
            kinds = {e["event"] for e in ctrl.history[n_hist:]}
            if "switch" in kinds:
                self.events[step] = "switch"
            elif "rank" in kinds or (ctrl.layers and step % ctrl.config.update_every == 0):
                self.events[step] = "update"
            elif "stability" in kinds or (not ctrl.layers and step % cfg.check_every == 0):
                self.events[step] = "check"
        t2 = time.perf_counter()
        self.step_s.append(t1 - t0)
        self.ctrl_s.append(t2 - t1)

    def result(self, val: torch.Tensor) -> dict[str, Any]:
        result: dict[str, Any] = {
            "method": self.method,
            "val_bpb": _validate(self.model, val, self.cfg),
            "trainable_share": count_trainable(self.model) / self.dense_trainable,
            "state_bytes": _state_bytes(self.model, self.opt),
            "step_s": self.step_s,
            "ctrl_s": self.ctrl_s,
            "events": self.events,
            "switch_step": self.switch,
        }
        if self.ctrl is not None:
            result["ranks"] = self.ctrl.ranks()
        return result


def train_one(
    cfg: LMConfig,
    method: str,
    init: dict[str, torch.Tensor],
    train: torch.Tensor,
    val: torch.Tensor,
) -> dict[str, Any]:
    """Train dense or OIALR from ``init`` alone; per-step wall times of the step and of OIALR.step()."""
    run = _Run(cfg, method, init, train)
    for step in range(1, cfg.steps + 1):
        run.step(step)
    return run.result(val)


def train_both(
    cfg: LMConfig, init: dict[str, torch.Tensor], train: torch.Tensor, val: torch.Tensor
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Dense and OIALR from the same ``init`` on the same batches, interleaved step by step.

    Which of the two goes first alternates from step to step, so neither always runs on a cache the
    other has just warmed (or cooled).
    """
    dense = _Run(cfg, "dense", init, train)
    oialr = _Run(cfg, "oialr", init, train)
    for step in range(1, cfg.steps + 1):
        for run in (dense, oialr) if step % 2 else (oialr, dense):
            run.step(step)
    return dense.result(val), oialr.result(val)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(
    cfg: LMConfig, dense: dict[str, Any], oialr: dict[str, Any]
) -> tuple[Table, dict[str, Any]]:
    """The one table of the issue: losses, shares, step times and the costs in dense steps."""
    s = oialr["switch_step"]
    n = cfg.steps
    tail = max(1, n // 10)
    d_step = _median(dense["step_s"][5:])  # the first steps warm the allocator up
    # each OIALR phase against the dense steps of the same step range (run interleaved with them)
    before = _median(oialr["step_s"][5 : s - 1])
    dense_before = _median(dense["step_s"][5 : s - 1])
    after = _median(oialr["step_s"][s + 1 : min(n, s + tail + 1)])
    dense_after = _median(dense["step_s"][s + 1 : min(n, s + tail + 1)])
    end = _median(oialr["step_s"][-tail:])
    dense_end = _median(dense["step_s"][-tail:])
    ev = oialr["events"]
    ctrl = oialr["ctrl_s"]
    checks = [ctrl[i - 1] for i, k in ev.items() if k == "check"]
    updates = [ctrl[i - 1] for i, k in ev.items() if k == "update"]
    switch_cost = sum(ctrl[i - 1] for i, k in ev.items() if k == "switch")
    total_train = sum(oialr["step_s"]) + sum(ctrl)
    check_share = sum(checks) / total_train
    table = Table(
        title=f"(lm) byte GPT d={cfg.d_model} L={cfg.layers} ctx={cfg.context} batch={cfg.batch}, "
        f"{n} steps, {cfg.device} {cfg.dtype}",
        columns=["", "dense", "OIALR", "OIALR/dense"],
    )
    rows = [
        ("validation loss (bits/byte)", dense["val_bpb"], oialr["val_bpb"], oialr["val_bpb"] / dense["val_bpb"]),
        ("trainable share at the end", 1.0, oialr["trainable_share"], oialr["trainable_share"]),
        ("step before the switch (ms)", 1e3 * dense_before, 1e3 * before, before / dense_before),
        ("step after the switch (ms)", 1e3 * dense_after, 1e3 * after, after / dense_after),
        ("step at the end (ms)", 1e3 * dense_end, 1e3 * end, end / dense_end),
        ("parameter + optimizer bytes", dense["state_bytes"], oialr["state_bytes"], oialr["state_bytes"] / dense["state_bytes"]),
    ]  # fmt: skip
    for label, a, b, r in rows:
        table.rows.append([label, f"{a:.4g}", f"{b:.4g}", f"{r:.3f}"])
    table.rows.append(
        ["one stability check (dense steps)", "", f"{_median(checks) / d_step:.2f}", ""]
    )
    table.rows.append(["one rank update (dense steps)", "", f"{_median(updates) / d_step:.2f}", ""])
    table.rows.append(["the switch (dense steps)", "", f"{switch_cost / d_step:.2f}", ""])
    table.rows.append(["checks' share of training time", "", f"{100 * check_share:.2f}%", ""])
    goals = {
        "steady_step_ratio<=0.7": end / dense_end,
        "val_loss_within_2%": oialr["val_bpb"] / dense["val_bpb"] - 1,
        "checks_share<=2%": check_share,
        "rank_update<=2_dense_steps": _median(updates) / d_step,
        "switch<=5_dense_steps": switch_cost / d_step,
    }
    table.notes += [
        f"OIALR: checks every {cfg.check_every} steps until the switch at step {s}, rank updates every "
        f"{max(1, int(cfg.update_fraction * n))} steps, SigmaCutoff({cfg.cutoff}); AdamW lr {cfg.lr:g}",
        "goals (measured): " + ", ".join(f"{k}: {v:.3g}" for k, v in goals.items()),
        f"final ranks: {oialr.get('ranks')}",
    ]
    data = {
        "config": asdict(cfg),
        "goals": goals,
        "dense": {k: v for k, v in dense.items() if k not in ("step_s", "ctrl_s")},
        "oialr": {k: v for k, v in oialr.items() if k not in ("step_s", "ctrl_s")},
        "dense_step_s": d_step,
        "oialr_step_before_s": before,
        "dense_step_before_s": dense_before,
        "dense_step_after_s": dense_after,
        "oialr_step_after_s": after,
        "oialr_step_end_s": end,
        "dense_step_end_s": dense_end,
        "check_s": checks,
        "update_s": updates,
        "switch_s": switch_cost,
    }
    return table, data


def measure(cfg: LMConfig) -> tuple[Table, dict[str, Any]]:
    train_b, val_b, info = stdlib_text(cfg.train_bytes, cfg.val_bytes)
    device = torch.device(cfg.device)
    train = torch.frombuffer(bytearray(train_b), dtype=torch.uint8).long().to(device)
    val = torch.frombuffer(bytearray(val_b), dtype=torch.uint8).long().to(device)
    torch.manual_seed(cfg.seed)
    init = copy.deepcopy(ByteGPT(cfg).state_dict())
    dense, oialr = train_both(cfg, init, train, val)
    table, data = summarize(cfg, dense, oialr)
    data["text"] = info
    table.notes.append(
        f"text: {info['train_bytes']:,} training / {info['val_bytes']:,} validation bytes from "
        f"{info['files']['train']} + {info['files']['val']} stdlib files"
    )
    return table, data


def run(config: Config) -> Report:
    """The benchmark runner's entry point (``python benchmarks/run.py lm``)."""
    cfg = QUICK if config.quick else LMConfig()
    table, data = measure(cfg)
    return Report(tables=[table], data=data)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=DESCRIPTION)
    p.add_argument("--quick", action="store_true", help="a small model and few steps (a smoke run)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--cutoff",
        type=float,
        default=None,
        help="SigmaCutoff of the rank rule (default 0.2; larger drops ranks faster)",
    )
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = replace(QUICK if args.quick else LMConfig(), device=args.device, dtype=args.dtype)
    if args.steps:
        cfg = replace(cfg, steps=args.steps)
    if args.cutoff is not None:
        cfg = replace(cfg, cutoff=args.cutoff)
    table, data = measure(cfg)
    print(table.render())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=1, default=str))


if __name__ == "__main__":
    main()
