"""Run by tests/torch_integration/test_cmd_torch.py as a script: online CMD under DDP (gloo), 2 processes.

Each process trains the same model on its own shard; CMD is fed after every epoch on both ranks. After
every epoch the CMD state (and, once fitted, the CMD weights) is compared across processes, and the
weights after a swapped evaluation are compared with the ones before. Writes a JSON report to argv[2].
"""

from __future__ import annotations

import torch
from _ddp import finish, init, max_diff_across_ranks, spawn
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from lowrank_torch.cmd import CMDConfig, CMDTracker


def worker(rank: int, world: int, init_file: str, out: str) -> None:
    init(rank, init_file)
    torch.manual_seed(0)  # the same initial model everywhere
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    cmd = CMDTracker(ddp, CMDConfig(warmup_epochs=3, max_modes=3, num_samples=200, embed=True,
                                   embed_every=2))  # fmt: skip
    g = torch.Generator().manual_seed(100 + rank)  # a different shard per process
    worst_state, worst_swap = 0.0, 0.0
    for _epoch in range(8):
        for _ in range(3):
            x = torch.randn(32, 16, generator=g)
            y = torch.randint(0, 4, (32,), generator=g)
            loss = nn.functional.cross_entropy(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        cmd.after_epoch()
        if cmd.fitted:
            state = cmd.state
            for t in (state.w_mean, state.c_wr, state.profiles, state.assignment, cmd.embedded):
                worst_state = max(worst_state, max_diff_across_ranks(t))
            for w in cmd.cmd_weights():
                worst_state = max(worst_state, max_diff_across_ranks(w))
            before = [p.detach().clone() for p in ddp.parameters()]
            with cmd.swapped(), torch.no_grad():
                ddp.eval()
                ddp(torch.randn(4, 16, generator=g))
                ddp.train()
            for p, b in zip(ddp.parameters(), before, strict=True):
                worst_swap = max(worst_swap, float((p.detach() - b).abs().max()))
    report = {
        "rank": rank,
        "fitted": cmd.fitted,
        "max_state_diff": worst_state,
        "max_swap_diff": worst_swap,
        "references": cmd.state.references.tolist() if cmd.state is not None else [],
        "final_loss": float(loss.detach()),
    }
    del ddp, cmd, opt  # the DDP reducers hold the process group
    finish(rank, out, report)


if __name__ == "__main__":
    spawn(worker)
