"""A realistic workload: a GPT-style byte-level language model on the Python standard library's source.

    python benchmarks/bench_lm.py --threads 2      # the side-by-side table, the default size
    python benchmarks/bench_lm.py --quick          # the same table, a small model (a smoke run, ~1-2 min)
    python benchmarks/bench_lm.py --json t.json    # also write every number (docs/figures.py draws it)
    python benchmarks/bench_lm.py --pair           # only dense vs OIALR with its check and switch costs
    python benchmarks/bench_lm.py --device cuda    # on a GPU (the prepared GPU script does this)
    python benchmarks/run.py lm                    # through the benchmark runner (JSON in results/)

The side-by-side table (:func:`measure_table`). Every method uses the same schedule: linear warm-up,
then cosine decay to a tenth of the peak. A dense AdamW sweep over a few peak learning rates (half
the run's steps, the same model; printed) picks the learning rate that every method then uses (OIALR's
Sigma stays in its weight's param group, so it gets the same schedule). Then, from one initialization
and on the same batches: dense; OIALR at three ``RankBudget("flops")`` targets (switch at 50% of the
run, the budget reached linearly by 75%); embedded CMD, evaluated with its mode model swapped in; P-SGD
and P-BFGS in a 40-dimensional DLDR subspace fitted on snapshots of a dense first half. These run in
lockstep with the dense run, one step each in rotating order, so load on the machine hits them alike.
Then a second dense run in lockstep with the fixed-rank models (``low_rank_model``, spectral and
nonlinear init) at the final trainable share of OIALR's middle budget and with GaLore (the
``galore-torch`` package's ``GaLoreAdamW``, rank = that OIALR run's mean final rank; skipped, and said
so, when the package does not import). Every ratio is to the dense run of the same group.

OIALR and CMD run the library's defaults (Sigma at ``sigma_lr_scale``'s default, CMD's number of
modes); ``--sigma-lr-scales 1`` adds the published method's OIALR at the middle budget. The default size
(d=256, 4 layers, context 128, batch 16, 800 steps) ran in 62 minutes with ``--threads 2 --sigma-lr-scales
1`` on two otherwise idle cores (sweep 11, first group 36, second group 14; the stored
``benchmarks/stored/lm_table.json``). ``--grid-switches``: dense against OIALR at each budget
(``--grid-budgets``), switch fraction and Sigma learning-rate scale, and with ``--grid-fixed`` a
fixed-rank model per budget at the same forward FLOPs (:func:`measure_grid`; 27-29 minutes for six
runs).

The text is real and on every machine: the ``.py`` files of ``sysconfig.get_paths()["stdlib"]`` (test
suites, ``site-packages`` and IDLE left out), sorted by path; a file goes to validation when the CRC32 of
its relative path is divisible by 10, so the split is fixed by the file list alone. Tokens are bytes.

``--pair`` (:func:`measure`, also used by ``gpu_suite.py``): dense and OIALR train the same model from
the same initialization on the same batches (one seeded generator), with AdamW at a constant lr,
interleaved step by step (one dense step, one OIALR step, ...: load on the machine hits both alike).
OIALR runs its warm-up stability checks at the published interval (every 100 steps), switches every
eligible Linear at 40% of training, and updates ranks every 10% with ``SigmaCutoff(0.2)``. Every timing
is a wall-clock measurement of the run itself: the training step (forward, backward, optimizer) and,
separately, each ``OIALR.step()``, so the cost of a check, a rank update and the switch are read off the
steps where they happened, in units of one dense step.
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
from lowrank_core.oialr.budget import layer_cost  # noqa: E402
from lowrank_torch.cmd import CMDConfig, CMDTracker  # noqa: E402
from lowrank_torch.convert import count_trainable  # noqa: E402
from lowrank_torch.dldr import SnapshotRecorder, SubspaceBFGS, SubspaceSGD  # noqa: E402
from lowrank_torch.init import low_rank_model  # noqa: E402
from lowrank_torch.oialr import OIALR, OIALRConfig  # noqa: E402

DESCRIPTION = (
    "GPT-style byte LM on the stdlib's source: every method vs a tuned dense run, one table"
)

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


def _text_and_init(
    cfg: LMConfig,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any], dict[str, torch.Tensor]]:
    """The training and validation bytes on ``cfg.device``, the text's description, and the one
    initialization (seeded by ``cfg.seed``) every run starts from."""
    train_b, val_b, info = stdlib_text(cfg.train_bytes, cfg.val_bytes)
    device = torch.device(cfg.device)
    train = torch.frombuffer(bytearray(train_b), dtype=torch.uint8).long().to(device)
    val = torch.frombuffer(bytearray(val_b), dtype=torch.uint8).long().to(device)
    torch.manual_seed(cfg.seed)
    init = copy.deepcopy(ByteGPT(cfg).state_dict())
    return train, val, info, init


def measure(cfg: LMConfig) -> tuple[Table, dict[str, Any]]:
    train, val, info, init = _text_and_init(cfg)
    dense, oialr = train_both(cfg, init, train, val)
    table, data = summarize(cfg, dense, oialr)
    data["text"] = info
    table.notes.append(
        f"text: {info['train_bytes']:,} training / {info['val_bytes']:,} validation bytes from "
        f"{info['files']['train']} + {info['files']['val']} stdlib files"
    )
    return table, data


# ---------------------------------------------------------------------------------------------------
# The side-by-side table: every method against a tuned dense run, one shared learning-rate schedule.


@dataclass(frozen=True)
class TableConfig:
    """Settings of the side-by-side table (on top of an :class:`LMConfig`, whose ``lr`` the sweep sets).

    - ``warmup_fraction``, ``min_lr_ratio``: the schedule of every method: linear warm-up over that
      fraction of the run, then cosine decay to ``min_lr_ratio`` of the peak;
    - ``sweep_lrs``, ``sweep_fraction``: the dense learning rates tried, each for that fraction of the
      run's steps (the same schedule, shortened); the best one is used by every method;
    - ``budgets``: OIALR's ``RankBudget("flops")`` targets; ``switch_fraction`` / ``reach_fraction``:
      the switch, and the point by which the budget is reached (linearly from the switch);
      ``updates``: rank updates per run; ``match``: the index of the budget whose final trainable share
      the fixed-rank models and whose mean final rank GaLore are given;
    - ``galore_gap_fraction``, ``galore_scale``: GaLore's ``update_proj_gap`` (as a fraction of the run)
      and ``scale``;
    - ``cmd_points``, ``cmd_warmup``, ``cmd_modes``: CMD's time points per run, the warm-up time points
      before its fit, and its number of modes (embedded CMD);
    - ``dldr_fraction``, ``dldr_dim``, ``dldr_snapshots``, ``psgd_lr``: the dense phase before the
      subspace, the subspace's dimension, the snapshots recorded in the dense phase, P-SGD's peak
      learning rate (P-BFGS takes its step length from its line search);
    - ``sigma_lr_scales``: further OIALR rows at the ``match`` budget with ``sigma_lr_scale`` set to each
      value (Sigma's learning rate after the switch, relative to the weight's; the budget rows use
      ``OIALRConfig``'s default).
    """

    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.1
    sweep_lrs: tuple[float, ...] = (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2)
    sweep_fraction: float = 0.5
    budgets: tuple[float, ...] = (0.6, 0.4, 0.25)
    switch_fraction: float = 0.5
    reach_fraction: float = 0.75
    updates: int = 10
    match: int = 1
    galore_gap_fraction: float = 0.1
    galore_scale: float = 0.25
    cmd_points: int = 100
    cmd_warmup: int = 20
    cmd_modes: int = 2
    dldr_fraction: float = 0.5
    dldr_dim: int = 40
    dldr_snapshots: int = 50
    sigma_lr_scales: tuple[float, ...] = ()
    psgd_lr: float = 0.5


TABLE = LMConfig(steps=800, check_every=100)
QUICK_TABLE = replace(QUICK, steps=100)


def lr_multiplier(step: int, steps: int, tcfg: TableConfig) -> float:
    """Warm-up then cosine decay: the factor of the peak learning rate at ``step`` (1-based)."""
    warm = max(1, round(tcfg.warmup_fraction * steps))
    if step <= warm:
        return step / warm
    done = (step - warm) / max(1, steps - warm)
    return tcfg.min_lr_ratio + (1 - tcfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * done))


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    matrix = getattr(value, "ortho_matrix", None)  # GaLore's projector keeps its basis here
    if isinstance(matrix, torch.Tensor):
        return matrix.numel() * matrix.element_size()
    if isinstance(matrix, list | tuple):
        return sum(_tensor_bytes(m) for m in matrix)
    return 0


def _all_state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    state = sum(_tensor_bytes(v) for s in opt.state.values() for v in s.values())
    return int(params + buffers + state)


class _Method:
    """One method's run from ``init``: its own model, optimizer and batches (the same seeded ones as
    every other run), the shared schedule applied to each param group's peak learning rate, and the
    wall time of each training step and of each controller call (OIALR, CMD, DLDR) recorded."""

    def __init__(self, name: str, cfg: LMConfig, tcfg: TableConfig, init: dict[str, torch.Tensor],
                 train: torch.Tensor, params: str = "dense") -> None:  # fmt: skip
        self.name, self.cfg, self.tcfg, self.train = name, cfg, tcfg, train
        self.device = torch.device(cfg.device)
        self.model = ByteGPT(cfg).to(self.device)
        self.model.load_state_dict(init)
        self.dense_trainable = count_trainable(self.model)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step_s: list[float] = []
        self.ctrl_s: list[float] = []
        self.extra_bytes = 0
        self.setting = ""
        self.opt: torch.optim.Optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, weight_decay=0.01
        )

    def _peak(self) -> None:
        for g in self.opt.param_groups:
            g.setdefault("peak_lr", g["lr"])

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        starts = torch.randint(
            0, self.train.numel() - cfg.context - 1, (cfg.batch,), generator=self.gen
        )
        return _windows(self.train, starts.to(self.device), cfg.context)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> None:
        mult = lr_multiplier(step, self.cfg.steps, self.tcfg)
        self._peak()
        for g in self.opt.param_groups:
            g["lr"] = g["peak_lr"] * mult
        loss = _loss(self.model, x, y, self.cfg)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def control(self, step: int) -> None:
        """The controller's work after the optimizer step (none for plain training)."""

    def step(self, step: int) -> None:
        x, y = self.batch()
        _sync(self.device)
        t0 = time.perf_counter()
        self.train_step(x, y, step)
        _sync(self.device)
        t1 = time.perf_counter()
        self.control(step)
        _sync(self.device)
        self.step_s.append(t1 - t0)
        self.ctrl_s.append(time.perf_counter() - t1)

    def evaluate(self, val: torch.Tensor) -> float:
        return _validate(self.model, val, self.cfg)

    def trainable_share(self) -> float:
        return count_trainable(self.model) / self.dense_trainable

    def state_bytes(self) -> int:
        return _all_state_bytes(self.model, self.opt) + self.extra_bytes


class _OIALRMethod(_Method):
    def __init__(self, name: str, cfg: LMConfig, tcfg: TableConfig, init: dict[str, torch.Tensor],
                 train: torch.Tensor, target: float, sigma_lr_scale: float | None = None) -> None:  # fmt: skip
        super().__init__(name, cfg, tcfg, init, train)
        budget = lc.oialr.RankBudget(target, measure="flops", reach_at=tcfg.reach_fraction)
        ocfg = OIALRConfig(
            total_steps=cfg.steps,
            switch_fraction=tcfg.switch_fraction,
            update_every=max(1, cfg.steps // tcfg.updates),
            budget=budget,
            **({} if sigma_lr_scale is None else {"sigma_lr_scale": sigma_lr_scale}),
        )
        self.ctrl = OIALR(self.model, self.opt, ocfg)
        self.setting = (
            f"RankBudget({target}, 'flops', reach_at={tcfg.reach_fraction}), switch at "
            f"{tcfg.switch_fraction:.0%}, rank updates every {ocfg.update_every} steps, "
            f"sigma_lr_scale {ocfg.sigma_lr_scale:g}"
            + (" (the default)" if sigma_lr_scale is None else "")
        )

    def control(self, step: int) -> None:
        self.ctrl.step()


class _FixedRankMethod(_Method):
    def __init__(self, name: str, cfg: LMConfig, tcfg: TableConfig, init: dict[str, torch.Tensor],
                 train: torch.Tensor, how: str, fraction: float) -> None:  # fmt: skip
        super().__init__(name, cfg, tcfg, init, train)
        low_rank_model(self.model, fraction, init=how, seed=cfg.seed, optimizer=self.opt)
        self.setting = f"low_rank_model(rank_fraction={fraction:.4g}, init={how!r}), bases trained"


class _GaLoreMethod(_Method):
    def __init__(self, name: str, cfg: LMConfig, tcfg: TableConfig, init: dict[str, torch.Tensor],
                 train: torch.Tensor, rank: int) -> None:  # fmt: skip
        super().__init__(name, cfg, tcfg, init, train)
        from galore_torch import GaLoreAdamW

        matrices = [m.weight for m in self.model.blocks.modules() if isinstance(m, nn.Linear)]
        chosen = {id(p) for p in matrices}
        rest = [p for p in self.model.parameters() if id(p) not in chosen]
        gap = max(1, round(tcfg.galore_gap_fraction * cfg.steps))
        groups = [
            {"params": rest},
            {"params": matrices, "rank": rank, "update_proj_gap": gap,
             "scale": tcfg.galore_scale, "proj_type": "std"},
        ]  # fmt: skip
        self.opt = GaLoreAdamW(groups, lr=cfg.lr, weight_decay=0.01, no_deprecation_warning=True)
        self.setting = (
            f"GaLoreAdamW on the blocks' Linear weights: rank {rank}, update_proj_gap {gap}, "
            f"scale {tcfg.galore_scale}, proj_type 'std'"
        )


class _CMDMethod(_Method):
    def __init__(self, name: str, cfg: LMConfig, tcfg: TableConfig, init: dict[str, torch.Tensor],
                 train: torch.Tensor) -> None:  # fmt: skip
        super().__init__(name, cfg, tcfg, init, train)
        every = max(1, cfg.steps // tcfg.cmd_points)
        ccfg = CMDConfig(warmup_epochs=tcfg.cmd_warmup, max_modes=tcfg.cmd_modes, embed=True,
                         every_n_steps=every, seed=cfg.seed)  # fmt: skip
        self.tracker = CMDTracker(self.model, ccfg)
        self.setting = (
            f"embedded CMD, {tcfg.cmd_modes} modes fitted after {tcfg.cmd_warmup} time points, "
            f"a time point every {every} steps; evaluated with its mode model swapped in"
        )

    def control(self, step: int) -> None:
        self.tracker.step()

    def evaluate(self, val: torch.Tensor) -> float:
        with self.tracker.swapped():
            return _validate(self.model, val, self.cfg)

    def trainable_share(self) -> float:
        embedded = self.tracker.embedded
        if embedded is None:
            return 1.0
        return 1.0 - float(embedded.float().sum()) / self.tracker.num_params

    def state_bytes(self) -> int:
        return _all_state_bytes(self.model, self.opt) + self.tracker.state_nbytes()


class _DLDRMethod(_Method):
    """A dense phase (the dense run's own steps) recording snapshots, then P-SGD or P-BFGS in the
    top-``dldr_dim`` subspace of the snapshots."""

    def __init__(self, name: str, cfg: LMConfig, tcfg: TableConfig, init: dict[str, torch.Tensor],
                 train: torch.Tensor, solver: str) -> None:  # fmt: skip
        super().__init__(name, cfg, tcfg, init, train)
        self.solver = solver
        self.dense_steps = max(tcfg.dldr_dim + 1, round(tcfg.dldr_fraction * cfg.steps))
        self.every = max(1, self.dense_steps // tcfg.dldr_snapshots)
        self.recorder: SnapshotRecorder | None = SnapshotRecorder(self.model, every=self.every)
        self.recorder.record()
        self.sub: torch.optim.Optimizer | None = None
        how = (
            f"lr {tcfg.psgd_lr:g} (peak), momentum 0.9" if solver == "sgd" else "Armijo line search"
        )
        self.setting = (
            f"dense AdamW for {self.dense_steps} steps, a snapshot every {self.every}; then "
            f"P-{solver.upper()} in a {tcfg.dldr_dim}-dim subspace ({how})"
        )

    def train_step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> None:
        if self.sub is None:
            super().train_step(x, y, step)
            return

        def closure() -> torch.Tensor:
            self.sub.zero_grad(set_to_none=True)  # type: ignore[union-attr]
            loss = _loss(self.model, x, y, self.cfg)
            loss.backward()
            return loss

        if isinstance(self.sub, SubspaceSGD):
            self.sub.param_groups[0]["lr"] = self.tcfg.psgd_lr * lr_multiplier(
                step, self.cfg.steps, self.tcfg
            )
            closure()
            self.sub.step()
        else:
            self.sub.step(closure)

    def control(self, step: int) -> None:
        if self.recorder is None:
            return
        if step < self.dense_steps:
            self.recorder.step()
            return
        self.recorder.record()
        subspace = self.recorder.fit(self.tcfg.dldr_dim)
        self.recorder = None  # the snapshots are dropped once the subspace is fitted
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.solver == "sgd":
            self.sub = SubspaceSGD(params, subspace, lr=self.tcfg.psgd_lr, momentum=0.9)
        else:
            self.sub = SubspaceBFGS(params, subspace, model=self.model)
        self.opt = self.sub
        # the subspace basis and its origin are state the method keeps for the rest of the run
        self.extra_bytes = sum(_tensor_bytes(t) for t in vars(subspace).values())
        self.extra_bytes += sum(p.numel() * p.element_size() for p in params)

    def trainable_share(self) -> float:
        if self.sub is None:
            return 1.0
        return self.tcfg.dldr_dim / self.dense_trainable


def _lockstep(runs: list[_Method], steps: int) -> None:
    """Advance every run one step at a time, the order rotating each step."""
    for step in range(1, steps + 1):
        k = step % len(runs)
        for run in runs[k:] + runs[:k]:
            run.step(step)


def _matching_fraction(cfg: LMConfig, init: dict[str, torch.Tensor], share: float) -> float:
    """The uniform rank fraction whose fixed-rank model (bases trained) has trainable ``share``."""
    lo, hi = 1.0 / cfg.d_model, 1.0
    for _ in range(12):
        mid = (lo + hi) / 2
        model = ByteGPT(cfg)
        model.load_state_dict(init)
        dense = count_trainable(model)
        low_rank_model(model, mid, init="random", seed=0)
        if count_trainable(model) / dense > share:
            hi = mid
        else:
            lo = mid
    return lo


def _row(run: _Method, dense: _Method, val: torch.Tensor) -> dict[str, Any]:
    tail = max(1, run.cfg.steps // 10)
    total = [a + b for a, b in zip(run.step_s, run.ctrl_s, strict=True)]
    d_total = [a + b for a, b in zip(dense.step_s, dense.ctrl_s, strict=True)]
    bpb, d_bpb = run.evaluate(val), dense.evaluate(val)
    return {
        "method": run.name,
        "setting": run.setting,
        "val_bpb": bpb,
        "val_ratio": bpb / d_bpb,
        "steady_step_ratio": _median(total[-tail:]) / _median(d_total[-tail:]),
        "wall_ratio": sum(total) / sum(d_total),
        "wall_s": sum(total),
        "dense_wall_s": sum(d_total),
        "bytes_ratio": run.state_bytes() / dense.state_bytes(),
        "state_bytes": run.state_bytes(),
        "trainable_share": run.trainable_share(),
    }


_COLUMNS = ("method", "val bpb", "/dense", "steady step", "whole run", "bytes", "trainable")


def _cells(r: dict[str, Any]) -> list[str]:
    """One row of the printed tables (the columns of :data:`_COLUMNS`)."""
    return [
        r["method"], f"{r['val_bpb']:.4f}", f"{r['val_ratio']:.3f}",
        f"{r['steady_step_ratio']:.2f}", f"{r['wall_ratio']:.2f}",
        f"{r['bytes_ratio']:.2f}", f"{r['trainable_share']:.3g}",
    ]  # fmt: skip


def galore_available() -> str | None:
    """``None`` when ``galore_torch.GaLoreAdamW`` imports, else why not."""
    try:
        from galore_torch import GaLoreAdamW  # noqa: F401
    except Exception as exc:  # an ImportError, or bitsandbytes failing at import on this machine
        return f"{type(exc).__name__}: {exc}"
    return None


def measure_table(
    cfg: LMConfig, tcfg: TableConfig, *, log: Any = None
) -> tuple[list[Table], dict[str, Any]]:
    """The sweep, then every method against the tuned dense run (module docstring)."""
    say = log or (lambda _msg: None)
    train, val, info, init = _text_and_init(cfg)
    started = time.perf_counter()

    # 1. the learning-rate sweep (dense, a shortened run, the same schedule)
    scfg = replace(cfg, steps=max(2, round(tcfg.sweep_fraction * cfg.steps)))
    sweep = [
        _Method(f"dense lr {lr:g}", replace(scfg, lr=lr), tcfg, init, train)
        for lr in tcfg.sweep_lrs
    ]
    _lockstep(sweep, scfg.steps)  # type: ignore[arg-type]
    sweep_bpb = {lr: run.evaluate(val) for lr, run in zip(tcfg.sweep_lrs, sweep, strict=True)}
    best = min(sweep_bpb, key=lambda lr: sweep_bpb[lr])
    sweep_s = time.perf_counter() - started
    say(f"sweep done in {sweep_s:.0f} s: best lr {best:g}")
    cfg = replace(cfg, lr=best)
    del sweep

    # 2. dense, OIALR at each budget, CMD, P-SGD, P-BFGS, in lockstep
    t0 = time.perf_counter()
    dense_a = _Method("dense", cfg, tcfg, init, train)
    dense_a.setting = f"AdamW lr {best:g} (the sweep's best), weight decay 0.01"
    oialr = [_OIALRMethod(f"OIALR flops {b:g}", cfg, tcfg, init, train, b) for b in tcfg.budgets]
    target = tcfg.budgets[tcfg.match]
    oialr += [
        _OIALRMethod(f"OIALR flops {target:g}, Sigma lr x{k:g}", cfg, tcfg, init, train, target, k)
        for k in tcfg.sigma_lr_scales
    ]
    cmd = _CMDMethod("CMD (mode model)", cfg, tcfg, init, train)
    psgd = _DLDRMethod(f"P-SGD (DLDR d={tcfg.dldr_dim})", cfg, tcfg, init, train, "sgd")
    pbfgs = _DLDRMethod(f"P-BFGS (DLDR d={tcfg.dldr_dim})", cfg, tcfg, init, train, "bfgs")
    group_a: list[_Method] = [dense_a, *oialr, cmd, psgd, pbfgs]
    _lockstep(group_a, cfg.steps)
    rows = [_row(run, dense_a, val) for run in group_a]
    for r, o in zip(rows[1 : 1 + len(oialr)], oialr, strict=True):
        r["ranks"] = o.ctrl.ranks()
    a_s = time.perf_counter() - t0
    say(f"dense, OIALR, CMD, DLDR done in {a_s:.0f} s")
    for r in rows:  # printed now: a long run shows its first group before the second starts
        say(
            f"  {r['method']}: {r['val_bpb']:.4f} bpb ({r['val_ratio']:.3f}x dense), steady step "
            f"{r['steady_step_ratio']:.2f}x, whole run {r['wall_ratio']:.2f}x"
        )

    # 3. fixed rank and GaLore matched to one budget's outcome, with a dense run of their own
    t0 = time.perf_counter()
    matched = oialr[tcfg.match]
    share = matched.trainable_share()
    fraction = _matching_fraction(cfg, init, share)
    ranks = list(matched.ctrl.ranks().values())
    galore_rank = max(1, round(sum(ranks) / len(ranks)))
    dense_b = _Method("dense (2nd run)", cfg, tcfg, init, train)
    dense_b.setting = dense_a.setting
    group_b: list[_Method] = [dense_b]
    group_b += [_FixedRankMethod(f"fixed rank, {how} init", cfg, tcfg, init, train, how, fraction)
                for how in ("spectral", "nonlinear")]  # fmt: skip
    galore_missing = galore_available()
    if galore_missing is None:
        group_b.append(_GaLoreMethod("GaLore", cfg, tcfg, init, train, galore_rank))
    _lockstep(group_b, cfg.steps)
    rows += [_row(run, dense_b, val) for run in group_b]
    b_s = time.perf_counter() - t0
    say(f"dense, fixed rank, GaLore done in {b_s:.0f} s")

    title = (
        f"(lm table) byte GPT d={cfg.d_model} L={cfg.layers} ctx={cfg.context} batch={cfg.batch}, "
        f"{cfg.steps} steps, {cfg.device} {cfg.dtype}, {torch.get_num_threads()} thread(s)"
    )
    sweep_table = Table(
        title=f"(lm sweep) dense AdamW, {scfg.steps} steps ({tcfg.sweep_fraction:.0%} of the run), same model",
        columns=["lr", "val bits/byte"],
        rows=[[f"{lr:g}", f"{v:.4f}"] for lr, v in sweep_bpb.items()],
        notes=[f"best: lr {best:g}, used by every method below"],
    )
    if best in (min(tcfg.sweep_lrs), max(tcfg.sweep_lrs)):
        sweep_table.notes.append("the best lr is at the edge of the grid: widen `sweep_lrs`")
    table = Table(
        title=title,
        columns=list(_COLUMNS),
        rows=[_cells(r) for r in rows],
    )
    table.notes += [
        "ratios are to the dense run in the same lockstep group (dense, OIALR, CMD, P-SGD, P-BFGS; "
        "then a second dense run with the fixed-rank models and GaLore)",
        "steady step: median of the last 10% of steps (training step + controller); whole run: sum "
        "of all steps; bytes: parameters + buffers + optimizer and method state at the end",
        f"schedule (every method): linear warm-up over {tcfg.warmup_fraction:.0%} of the run, cosine "
        f"decay to {tcfg.min_lr_ratio:g}x the peak",
        f"fixed rank and GaLore matched to {matched.name}: trainable share {share:.3f} -> rank "
        f"fraction {fraction:.4g}; GaLore rank = its mean final rank, {galore_rank}",
    ]
    if galore_missing is not None:
        table.notes.append(f"GaLore not run: galore_torch does not import here ({galore_missing})")
    table.notes += [f"{r['method']}: {r['setting']}" for r in rows]
    table.notes.append(
        f"time: sweep {sweep_s:.0f} s, first group {a_s:.0f} s, second group {b_s:.0f} s"
    )
    data = {
        "config": asdict(cfg),
        "table_config": asdict(tcfg),
        "threads": torch.get_num_threads(),
        "text": info,
        "sweep": {
            "steps": scfg.steps,
            "val_bpb": {f"{k:g}": v for k, v in sweep_bpb.items()},
            "best_lr": best,
        },
        "rows": rows,
        "galore": galore_missing or "ran",
        "seconds": {"sweep": sweep_s, "group_a": a_s, "group_b": b_s},
    }
    return [sweep_table, table], data


def _flops_fraction(cfg: LMConfig, init: dict[str, torch.Tensor], target: float) -> float:
    """The uniform rank fraction whose fixed-rank model costs ``target`` of the dense layers' forward
    multiply-adds (``lowrank_core.oialr``'s ``"flops"`` measure, over the layers it converts)."""
    lo, hi = 1.0 / cfg.d_model, 1.0
    for _ in range(12):
        mid = (lo + hi) / 2
        model = ByteGPT(cfg)
        model.load_state_dict(init)
        layers = low_rank_model(model, mid, init="random", seed=0)
        shapes = [lc.matrix_shape(layer.weight_shape) for layer in layers.values()]
        cost = sum(
            layer_cost("flops", m, n, layer.rank)
            for (m, n), layer in zip(shapes, layers.values(), strict=True)
        )
        if cost / sum(m * n for m, n in shapes) > target:
            hi = mid
        else:
            lo = mid
    return lo


def measure_grid(
    cfg: LMConfig,
    tcfg: TableConfig,
    switches: tuple[float, ...],
    scales: tuple[float, ...],
    *,
    budgets: tuple[float, ...] = (),
    fixed_flops: bool = False,
    log: Any = None,
) -> tuple[Table, dict[str, Any]]:
    """Dense and OIALR at each of ``budgets`` (default: the ``match`` budget) for every (switch
    fraction, ``sigma_lr_scale``), in lockstep, at ``cfg.lr`` (no sweep: give the sweep's result). Each
    run reaches its budget halfway from its switch to the end; ranks are updated every 5% of the run.
    ``fixed_flops``: also a fixed-rank model (spectral init, bases trained) per budget whose layers
    cost that budget's forward multiply-adds from the first step (the same measure as OIALR's)."""
    say = log or (lambda _msg: None)
    train, val, info, init = _text_and_init(cfg)
    budgets = budgets or (tcfg.budgets[tcfg.match],)
    t0 = time.perf_counter()
    dense = _Method("dense", cfg, tcfg, init, train)
    dense.setting = f"AdamW lr {cfg.lr:g}, weight decay 0.01"
    runs: list[_Method] = [dense]
    for b in budgets:
        for s in switches:
            for k in scales:
                g = replace(tcfg, switch_fraction=s, reach_fraction=s + (1 - s) / 2, updates=20)
                runs.append(_OIALRMethod(f"OIALR flops {b:g}, switch {s:g}, Sigma lr x{k:g}",
                                         cfg, g, init, train, b, k))  # fmt: skip
        if fixed_flops:
            fraction = _flops_fraction(cfg, init, b)
            runs.append(_FixedRankMethod(f"fixed rank, flops {b:g}, spectral init", cfg, tcfg,
                                         init, train, "spectral", fraction))  # fmt: skip
    _lockstep(runs, cfg.steps)
    rows = [_row(run, dense, val) for run in runs]
    seconds = time.perf_counter() - t0
    say(f"grid done in {seconds:.0f} s")
    table = Table(
        title=(
            f"(lm grid) byte GPT d={cfg.d_model} L={cfg.layers}, {cfg.steps} steps, lr {cfg.lr:g}, "
            f"OIALR RankBudget('flops') by budget, switch fraction and Sigma lr scale"
        ),
        columns=list(_COLUMNS),
        rows=[_cells(r) for r in rows],
    )
    table.notes.append(f"{seconds:.0f} s, every run in lockstep with the dense run")
    table.notes += [f"{r['method']}: {r['setting']}" for r in rows if "fixed rank" in r["method"]]
    data = {"config": asdict(cfg), "table_config": asdict(tcfg), "threads": torch.get_num_threads(),
            "text": info, "switches": switches, "scales": scales, "budgets": budgets,
            "rows": rows, "seconds": seconds}  # fmt: skip
    return table, data


def run(config: Config) -> Report:
    """The benchmark runner's entry point (``python benchmarks/run.py lm``)."""
    cfg = QUICK_TABLE if config.quick else TABLE
    tables, data = measure_table(cfg, TableConfig())
    return Report(tables=tables, data=data)


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
    p.add_argument(
        "--pair",
        action="store_true",
        help="only dense vs OIALR (SigmaCutoff, constant lr) with check and switch costs",
    )
    p.add_argument(
        "--sigma-lr-scales",
        default="",
        help="comma list: further OIALR rows with sigma_lr_scale set to each value (e.g. 0.5,2)",
    )
    p.add_argument(
        "--grid-switches",
        default="",
        help="comma list of switch fractions: instead of the table, dense vs OIALR at each switch "
        "fraction x --grid-scales (needs --lr)",
    )
    p.add_argument(
        "--grid-scales", default="1", help="comma list of sigma_lr_scale for --grid-switches"
    )
    p.add_argument(
        "--grid-budgets",
        default="",
        help="comma list of RankBudget('flops') targets for --grid-switches (default: the table's "
        "matched budget, 0.4)",
    )
    p.add_argument(
        "--grid-fixed",
        action="store_true",
        help="with --grid-switches: also a fixed-rank model per budget at the same forward FLOPs",
    )
    p.add_argument(
        "--lr", type=float, default=None, help="peak lr (the grid's; the table sweeps it)"
    )
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.pair:
        cfg = replace(QUICK if args.quick else LMConfig(), device=args.device, dtype=args.dtype)
    else:
        cfg = replace(QUICK_TABLE if args.quick else TABLE, device=args.device, dtype=args.dtype)
    if args.steps:
        cfg = replace(cfg, steps=args.steps)
    if args.cutoff is not None:
        cfg = replace(cfg, cutoff=args.cutoff)
    if args.grid_switches:
        if args.lr is None:
            p.error("--grid-switches needs --lr (the table's sweep result)")
        switches = tuple(float(x) for x in args.grid_switches.split(",") if x.strip())
        scales_g = tuple(float(x) for x in args.grid_scales.split(",") if x.strip())
        budgets_g = tuple(float(x) for x in args.grid_budgets.split(",") if x.strip())
        table, data = measure_grid(
            replace(cfg, lr=args.lr), TableConfig(), switches, scales_g, budgets=budgets_g,
            fixed_flops=args.grid_fixed, log=lambda m: print(m, flush=True),
        )  # fmt: skip
        print(table.render())
    elif args.pair:
        table, data = measure(cfg)
        print(table.render())
    else:
        scales = tuple(float(x) for x in args.sigma_lr_scales.split(",") if x.strip())
        tcfg = TableConfig(sigma_lr_scales=scales)
        tables, data = measure_table(cfg, tcfg, log=lambda m: print(m, flush=True))
        data["quick"] = args.quick
        print("\n\n".join(t.render() for t in tables))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=1, default=str))


if __name__ == "__main__":
    main()
