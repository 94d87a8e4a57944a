"""Run by tests/torch_integration/test_fsdp.py as a script: sharded DLDR and CMD under FSDP2 (gloo).

Two processes hold a float64 MLP sharded with ``fully_shard`` (every parameter split on dim 0, some
unevenly); each trains on its half of a global batch. Next to it, every process trains an unsharded
copy on the whole batch (the single-process reference). Sharded DLDR records only each rank's shard,
fits the sharded subspace and takes sharded SubspaceSGD steps; sharded CMD follows the shard. Each rank
compares its shard of everything with the matching entries of the reference. Writes ``argv[2].<rank>``.
"""

from __future__ import annotations

import copy
import io
from functools import partial

import torch
from _ddp import finish, init, spawn
from torch import nn
from torch.distributed.fsdp import fully_shard

from lowrank_core.errors import LowRankError
from lowrank_torch import dldr
from lowrank_torch.cmd import CMDConfig, CMDTracker
from lowrank_torch.sharded import (
    ShardedCMDTracker,
    ShardedSnapshotRecorder,
    ShardedSubspaceBFGS,
    ShardedSubspaceSGD,
    ShardLayout,
)

SubspaceSGD = dldr.SubspaceSGD


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().to(torch.float64) - b.detach().to(torch.float64)).abs().max())


def worker(rank: int, world: int, init_file: str, out: str) -> None:
    init(rank, init_file)
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    ref = nn.Sequential(
        nn.Linear(8, 13), nn.Tanh(), nn.Linear(13, 3)
    )  # 13 and 3 rows: uneven shards
    model = copy.deepcopy(ref)
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    layout = ShardLayout(model.parameters())
    index = torch.as_tensor(layout.index)

    def ref_flat() -> torch.Tensor:
        return dldr.flatten(ref.parameters())[index]

    g = torch.Generator().manual_seed(1)  # the same global batches on every rank
    half = 8

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(2 * half, 8, generator=g), torch.randint(0, 3, (2 * half,), generator=g)

    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec_ref, rec = dldr.SnapshotRecorder(ref, every=2), ShardedSnapshotRecorder(layout, every=2)
    cfg = CMDConfig(
        warmup_epochs=6, max_modes=3, num_samples=40, seed=0
    )  # references on both ranks
    cmd_ref, cmd = CMDTracker(ref, cfg), ShardedCMDTracker(layout, cfg)
    worst_train, worst_cmd = 0.0, 0.0
    for _ in range(16):
        x, y = batch()
        mine = slice(rank * half, (rank + 1) * half)
        for net, o, xb, yb in ((ref, opt_ref, x, y), (model, opt, x[mine], y[mine])):
            o.zero_grad()
            nn.functional.cross_entropy(net(xb), yb).backward()
            o.step()
        rec_ref.step()
        rec.step()
        worst_train = max(worst_train, _diff(layout.flat(), ref_flat()))
        cmd_ref.after_epoch()
        cmd.after_epoch()  # one "epoch" per step keeps the test short
        if cmd.fitted:
            a_ref, b_ref = cmd_ref.coefficients()
            a, b = cmd.coefficients()
            w_ref = dldr.flatten(cmd_ref.cmd_weights())[index]
            worst_cmd = max(worst_cmd, _diff(a, a_ref[index]), _diff(b, b_ref[index]),
                            _diff(cmd.cmd_weights(), w_ref))  # fmt: skip
    assert cmd.state is not None and cmd_ref.state is not None
    # checkpoint round trip of this rank's CMD state (through torch.save / weights_only load)
    buf = io.BytesIO()
    torch.save(cmd.state_dict(), buf)
    buf.seek(0)
    resumed = ShardedCMDTracker(layout, cfg)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    cmd.after_epoch()
    resumed.after_epoch()
    cmd_ref.after_epoch()
    a, b = cmd.coefficients()
    a2, b2 = resumed.coefficients()
    resume_equal = bool(torch.equal(a, a2) and torch.equal(b, b2))
    a_ref, _ = cmd_ref.coefficients()
    worst_cmd = max(worst_cmd, _diff(a, a_ref[index]))
    xe = torch.randn(5, 8, generator=g)
    with torch.no_grad(), cmd_ref.swapped():
        out_ref = ref(xe)
    with torch.no_grad(), cmd.swapped():
        out_swapped = model(xe)
    restored = _diff(layout.flat(), ref_flat())
    report_cmd = {
        "cmd_references": [int(r) for r in cmd.state.references],
        "cmd_references_ref": [int(r) for r in cmd_ref.state.references],
        "cmd_assignment_equal": bool(
            torch.equal(
                cmd.state.assignment.to(torch.int64),
                cmd_ref.state.assignment.to(torch.int64)[index],
            )
        ),
        "cmd_profiles_diff": _diff(cmd.state.profiles, cmd_ref.state.profiles),
        "cmd_coef_diff": worst_cmd,
        "cmd_resume_equal": resume_equal,
        "cmd_swapped_output_diff": _diff(out_swapped, out_ref),
        "cmd_restored_diff": restored,
        "cmd_local_entries": layout.num_local,
        "cmd_references_held": int(torch.isin(torch.as_tensor(cmd.state.references), index).sum()),
        "cmd_sampled_held": int(torch.isin(torch.as_tensor(cmd.sample_index), index).sum()),
        "cmd_num_sampled": len(cmd.sample_index) if cmd.sample_index is not None else 0,
    }
    # DLDR: the sharded subspace against the single-process one
    sub_ref, sub = rec_ref.fit(4), rec.fit(4)
    report_dldr = {
        "snapshots": len(rec),
        "local_entries": int(sub.basis.shape[1]),
        "global_entries": layout.num_global,
        "basis_diff": _diff(sub.basis, sub_ref.basis[:, index]),
        "centre_diff": _diff(sub.centre, sub_ref.centre[index]),
        "explained_variance": sub.explained_variance.tolist(),
        "explained_variance_ref": sub_ref.explained_variance.tolist(),
        "total_variance": sub.total_variance,
        "total_variance_ref": sub_ref.total_variance,
        "train_diff": worst_train,
    }
    psgd_ref = SubspaceSGD(ref.parameters(), sub_ref, lr=0.05, momentum=0.9)
    psgd = ShardedSubspaceSGD(layout, sub, lr=0.05, momentum=0.9)
    worst_sub, moved = 0.0, 0.0
    start = layout.flat().clone()
    for _ in range(4):
        x, y = batch()
        mine = slice(rank * half, (rank + 1) * half)
        for net, o, xb, yb in ((ref, psgd_ref, x, y), (model, psgd, x[mine], y[mine])):
            o.zero_grad()
            nn.functional.cross_entropy(net(xb), yb).backward()
            o.step()
        worst_sub = max(worst_sub, _diff(layout.flat(), ref_flat()))
        moved = max(moved, _diff(layout.flat(), start))
    c_ref = psgd_ref.state[next(iter(ref.parameters()))]["c"]
    report_dldr.update(
        {
            "subspace_sgd_diff": worst_sub,
            "subspace_sgd_moved": moved,
            "coordinates_diff": _diff(psgd.coordinates, c_ref),
        }
    )
    # SubspaceBFGS: the same d x d inverse Hessian, directions and line search on every rank
    bfgs_ref = dldr.SubspaceBFGS(ref.parameters(), sub_ref, model=ref)
    bfgs = ShardedSubspaceBFGS(model.parameters(), sub, model=model)
    worst_bfgs, bfgs_losses, bfgs_losses_ref = 0.0, [], []
    x, y = batch()
    mine = slice(rank * half, (rank + 1) * half)
    for _ in range(4):
        for net, o, xb, yb, losses in (
            (ref, bfgs_ref, x, y, bfgs_losses_ref),
            (model, bfgs, x[mine], y[mine], bfgs_losses),
        ):

            def closure(net=net, o=o, xb=xb, yb=yb):
                o.zero_grad()
                loss = nn.functional.cross_entropy(net(xb), yb)
                loss.backward()
                return loss

            losses.append(float(o.step(closure)))
        worst_bfgs = max(worst_bfgs, _diff(layout.flat(), ref_flat()))
    st_ref = bfgs_ref.state[next(iter(ref.parameters()))]
    st = bfgs.state[next(iter(model.parameters()))]
    report_dldr.update(
        {
            "bfgs_diff": worst_bfgs,
            "bfgs_H_diff": _diff(st["H"], st_ref["H"]),
            "bfgs_first_loss_ref": bfgs_losses_ref[0],  # this rank's half vs the whole batch:
            "bfgs_last_loss_ref": bfgs_losses_ref[-1],  # compared through the reference's losses
            "bfgs_updates": int(st["updates"]),
            "bfgs_updates_ref": int(st_ref["updates"]),
        }
    )
    other_sharding = cmd.state_dict()
    other_sharding["index"] = other_sharding["index"][1:]  # saved on a rank that held other entries
    # a recording refused (NaN in this rank's shard) is not counted: the retried call records
    retry = ShardedSnapshotRecorder(layout, every=2)
    first = retry.step()
    local = next(t for t in layout.locals() if t.numel())
    with torch.no_grad():
        saved = local.reshape(-1)[0].clone()
        local.reshape(-1)[0] = float("nan")
    try:
        retry.step()
        nan_refused = False
    except LowRankError:
        nan_refused = True
    with torch.no_grad():
        local.reshape(-1)[0] = saved
    recorder_retry = [first, nan_refused, retry.step(), len(retry)]
    refused = []  # bad input: clear errors from the LowRankError hierarchy
    for make in (
        partial(ShardLayout, ref.parameters()),  # plain tensors: not sharded
        partial(ShardedCMDTracker, layout, CMDConfig(warmup_epochs=3, embed=True)),
        partial(ShardedSubspaceSGD, layout, sub_ref),  # the unsharded subspace
        partial(ShardedCMDTracker(layout, cfg).load_state_dict, other_sharding),
        partial(ShardedCMDTracker(layout, cfg).load_state_dict, {"format": "another"}),
    ):
        try:
            make()
        except LowRankError as exc:
            refused.append(type(exc).__name__)
    report = {
        "rank": rank,
        **report_cmd,
        **report_dldr,
        "refused": refused,
        "recorder_retry": recorder_retry,
    }
    del model, opt, psgd, bfgs, layout, rec, cmd, resumed
    finish(rank, out, report)


if __name__ == "__main__":
    spawn(worker)
