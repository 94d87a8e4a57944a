"""Run by tests/torch_integration/test_dldr_torch.py as a script: P-SGD and P-BFGS under DDP (gloo).

Two processes train the same model on different data shards: SGD with snapshots, then a subspace is
fitted on every rank, then P-SGD and P-BFGS steps. After every step the parameters are compared
across processes. Writes a JSON report to ``argv[2].<rank>``.
"""

from __future__ import annotations

import torch
from _ddp import finish, init, max_diff_across_ranks, spawn
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from lowrank_torch.dldr import SnapshotRecorder, SubspaceBFGS, SubspaceSGD, flatten


def worker(rank: int, world: int, init_file: str, out: str) -> None:
    init(rank, init_file)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    ddp = DDP(model)
    g = torch.Generator().manual_seed(100 + rank)  # a different shard per process

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)

    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    rec = SnapshotRecorder(model, every=2)
    for _ in range(24):
        x, y = batch()
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        rec.step()
    sub = rec.fit(6)
    worst, losses, bfgs_first, bfgs_last = 0.0, [], 0.0, 0.0
    psgd = SubspaceSGD(model.parameters(), sub, lr=0.05)
    for _ in range(5):
        x, y = batch()
        psgd.zero_grad()
        loss = nn.functional.cross_entropy(ddp(x), y)
        loss.backward()
        psgd.step()
        worst = max(worst, max_diff_across_ranks(flatten(model.parameters())))
    pbfgs = SubspaceBFGS(model.parameters(), sub, model=model)
    xb, yb = batch()
    for k in range(8):

        def closure(
            x: torch.Tensor = xb,
            y: torch.Tensor = yb,
            net: nn.Module = ddp,
            opt: SubspaceBFGS = pbfgs,
        ) -> torch.Tensor:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            return loss

        loss = pbfgs.step(closure)
        losses.append(float(loss))
        if k == 0:
            bfgs_first = float(loss)
        bfgs_last = float(loss)
        worst = max(worst, max_diff_across_ranks(flatten(model.parameters())))
    report = {
        "rank": rank,
        "max_param_diff": worst,
        "bfgs_first": bfgs_first,
        "bfgs_last": bfgs_last,
        "snapshots": len(rec),
    }
    del ddp, opt, psgd, pbfgs  # the DDP reducers hold the process group
    finish(rank, out, report)


if __name__ == "__main__":
    spawn(worker)
