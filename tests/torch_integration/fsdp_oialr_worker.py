"""Run by tests/torch_integration/test_fsdp.py as a script: OIALR under FSDP2 ``fully_shard`` (gloo).

Two processes hold an MLP whose eligible Linears are FSDP units of their own; each trains on its half of
a global batch, with :class:`lowrank_torch.fsdp_oialr.FSDPOIALR` (switch, then rank updates). After every step
the gathered factors of every low-rank layer are compared across ranks, and with an unsharded copy
trained by plain OIALR on the whole batch (the single-process reference). Writes ``argv[2].<rank>``.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import torch
from _ddp import finish, init, max_diff_across_ranks, spawn
from torch import nn
from torch.distributed.fsdp import fully_shard

import lowrank_core as lc
from lowrank_torch.fsdp_oialr import FSDPOIALR, _full
from lowrank_torch.oialr import OIALR, OIALRConfig
from lowrank_torch.sharded import ShardingError


def worker(rank: int, world: int, init_file: str, out: str) -> None:
    init(rank, init_file)
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    ref = nn.Sequential(
        nn.Linear(16, 33), nn.Tanh(), nn.Linear(33, 24), nn.Tanh(), nn.Linear(24, 4)
    )  # 33 rows: uneven shards
    model = copy.deepcopy(ref)
    for i in (0, 2, 4):
        fully_shard(model[i])
    fully_shard(model)
    cfg = OIALRConfig(
        switch_step=None, stability_threshold=0.5, stability_every=3, update_every=4,
        rule=lc.SigmaCutoff(0.2),
    )  # fmt: skip
    if os.environ.get("FSDP_OIALR_BUDGET"):  # the global rank budget instead of the per-layer rule
        cfg = dataclasses.replace(
            cfg, budget=lc.oialr.RankBudget(0.6, reach_at=22), rule=lc.SigmaCutoff(0.0)
        )
    # Adam: two moment buffers and a step counter per parameter, all carried through switch/updates
    opt_ref = torch.optim.Adam(ref.parameters(), lr=0.01)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    ctrl_ref, ctrl = OIALR(ref, opt_ref, cfg), FSDPOIALR(model, opt, cfg)
    g = torch.Generator().manual_seed(1)  # the same global batches on every rank
    half = 16
    across, vs_ref, changed_steps, ranks_seen = 0.0, 0.0, 0, []
    for step in range(1, 31):
        x, y = torch.randn(2 * half, 16, generator=g), torch.randint(0, 4, (2 * half,), generator=g)
        mine = slice(rank * half, (rank + 1) * half)
        for net, o, c, xb, yb in (
            (ref, opt_ref, ctrl_ref, x, y),
            (model, opt, ctrl, x[mine], y[mine]),
        ):
            loss = nn.functional.cross_entropy(net(xb), yb)
            o.zero_grad()
            loss.backward()
            o.step()
            c.step()
        changed_steps += int(ctrl.structure_changed)
        assert ctrl.ranks() == ctrl_ref.ranks(), (step, ctrl.ranks(), ctrl_ref.ranks())
        for name, layer in ctrl.layers.items():
            lr = ctrl_ref.layers[name]
            U, S, V = (_full(t.detach()) for t in (layer.U, layer.sigma, layer.V))
            for t in (U, S, V):
                across = max(across, max_diff_across_ranks(t))
            w = lc.reconstruct(U, S, V)
            w_ref = lc.reconstruct(lr.U, lr.sigma.detach(), lr.V)
            vs_ref = max(vs_ref, float((w - w_ref).abs().max()))
        ranks_seen.append(dict(ctrl.ranks()))
    with torch.no_grad():
        xe = torch.randn(8, 16, generator=g)
        out_diff = float((model(xe) - ref(xe)).abs().max())
    in_opt = {id(p) for grp in opt.param_groups for p in grp["params"]}
    report = {
        "rank": rank,
        "switched": ctrl.switched,
        "switched_ref": ctrl_ref.switched,
        "ranks": ctrl.ranks(),
        "ranks_seen": ranks_seen,
        "max_across_ranks": across,
        "max_vs_reference": vs_ref,
        "output_diff": out_diff,
        "changed_steps": changed_steps,
        "factors_sharded": all(
            type(t).__name__ == "DTensor" and t.to_local().shape[0] < t.shape[0]
            for layer in ctrl.layers.values()
            for t in (layer.U, layer.sigma, layer.V)
        ),
        "bases_frozen": all(
            not layer.U.requires_grad and not layer.V.requires_grad and layer.sigma.requires_grad
            for layer in ctrl.layers.values()
        ),
        "bases_not_in_optimizer": all(
            id(t) not in in_opt for layer in ctrl.layers.values() for t in (layer.U, layer.V)
        ),
        "optimizer_holds_model_params": {id(p) for p in model.parameters() if p.requires_grad}
        == in_opt,
        "state_sharded": all(
            type(v).__name__ == "DTensor"
            for layer in ctrl.layers.values()
            for k, v in opt.state[layer.sigma].items()
            if k != "step"
        )
        and all(len(opt.state[layer.sigma]) == 3 for layer in ctrl.layers.values()),
        "stability_events": len(ctrl.events("stability")),
        "rank_events": len(ctrl.events("rank")),
        "share": ctrl.trainable_share(),
        "share_ref": ctrl_ref.trainable_share(),
    }
    # refused before anything changes: a root that is not sharded, an eligible layer that is not an
    # FSDP unit of its own (its weight would sit in the root's flat group)
    refused = []
    plain = nn.Sequential(
        nn.Linear(16, 33), nn.Tanh(), nn.Linear(33, 24), nn.Tanh(), nn.Linear(24, 4)
    )
    coarse = copy.deepcopy(plain)
    fully_shard(coarse)
    for net in (plain, coarse):
        before = [id(p) for p in net.parameters()]
        try:
            FSDPOIALR(net, torch.optim.SGD(net.parameters(), lr=0.1), cfg)
        except ShardingError as exc:
            refused.append(str(exc))
        assert [id(p) for p in net.parameters()] == before
    report["refused"] = refused
    del model, opt, ctrl, coarse
    finish(rank, out, report)


if __name__ == "__main__":
    spawn(worker)
