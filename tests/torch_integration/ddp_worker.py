"""Run by tests/torch_integration/test_ddp.py as a script: OIALR under DDP (gloo), 2 processes on this machine.

Each process trains the same model on its own shard of the data; after every controller step the
factors of every low-rank layer are compared across processes. Writes a JSON report to argv[2].
"""

from __future__ import annotations

import torch
from _ddp import finish, init, max_diff_across_ranks, spawn
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import lowrank_core as lc
from lowrank_torch.oialr import OIALR, OIALRConfig


def worker(rank: int, world: int, init_file: str, out: str) -> None:
    init(rank, init_file)
    torch.manual_seed(0)  # the same initial model everywhere
    model = nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)
    )
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    cfg = OIALRConfig(switch_step=5, update_every=4, rule=lc.SigmaCutoff(0.2))
    ctrl = OIALR(ddp, opt, cfg)
    g = torch.Generator().manual_seed(100 + rank)  # a different shard per process
    rebuilds, no_rebuild_updates, worst = 0, 0, 0.0
    for step in range(1, 31):
        x = torch.randn(32, 16, generator=g)
        y = torch.randint(0, 4, (32,), generator=g)
        loss = nn.functional.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctrl.step()
        if ctrl.structure_changed:
            rebuilds += 1
            ddp = DDP(ctrl.model)  # only when parameters changed shape or identity
        elif ctrl.layers and step % cfg.update_every == 0:
            no_rebuild_updates += 1
        for layer in ctrl.layers.values():
            for t in (layer.U, layer.V, layer.sigma):
                worst = max(worst, max_diff_across_ranks(t))
    report = {
        "rank": rank,
        "rebuilds": rebuilds,
        "no_rebuild_updates": no_rebuild_updates,
        "max_factor_diff": worst,
        "ranks": ctrl.ranks(),
        "final_loss": float(loss.detach()),
    }
    del ddp, ctrl, opt  # the DDP reducers hold the process group
    finish(rank, out, report)


if __name__ == "__main__":
    spawn(worker)
