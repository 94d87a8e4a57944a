"""Writes the 0.1.0 checkpoint files of tests/data (kept to show how they were made).

Run once with lowrank-core 0.1.0 (commit 73d05eb), from the repository root:

    PYTHONPATH=.:backends:reference python tests/data/make_0_1_0_checkpoints.py

Later versions write another format, so running it again would not reproduce these files; the tests
(``tests/torch_integration/test_checkpoint_0_1_0.py``,
``tests/jax_integration/test_checkpoint_0_1_0_jax.py``) only read them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def torch_file() -> None:
    import torch
    from torch import nn

    import lowrank_core as lc
    from lowrank_torch.checkpoint import save_checkpoint
    from lowrank_torch.oialr import OIALR, OIALRConfig

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    ctrl = OIALR(model, opt, OIALRConfig(switch_step=2, update_every=3, rule=lc.FixedRank(4)))
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(16, 6, generator=g)
        y = torch.randint(0, 3, (16,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        ctrl.step()
    extra = {"epoch": 5, "name": "0.1.0", "bf16": torch.arange(4, dtype=torch.bfloat16) / 3}
    save_checkpoint(
        HERE / "checkpoint_0_1_0_torch.pt",
        model=model,
        optimizer=opt,
        oialr=ctrl,
        scheduler=sched,
        extra=extra,
    )


def jax_files() -> None:
    import jax
    import jax.numpy as jnp
    import optax

    import lowrank_core as lc
    from lowrank_jax import checkpoint as ck
    from lowrank_jax import cmd as jc
    from lowrank_jax import dldr as jd
    from lowrank_jax import oialr as jo

    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(0)
    params = {
        "l0": {"kernel": jnp.asarray(rng.standard_normal((6, 8)) / 3), "bias": jnp.zeros(8)},
        "l1": {"kernel": jnp.asarray(rng.standard_normal((8, 3)) / 3), "bias": jnp.zeros(3)},
    }
    x = jnp.asarray(rng.standard_normal((16, 6)))
    y = jnp.asarray(np.arange(16) % 3)

    def loss(p):  # type: ignore[no-untyped-def]
        h = jax.nn.relu(x @ p["l0"]["kernel"] + p["l0"]["bias"])
        logits = h @ p["l1"]["kernel"] + p["l1"]["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    tx = optax.adam(1e-2)
    ctrl = jo.OIALR(params, jo.OIALRConfig(switch_step=2, update_every=3, rule=lc.FixedRank(3)))
    tr, opt = params, tx.init(params)
    for _ in range(4):
        g = jax.grad(lambda t: loss(jo.materialize(t, ctrl.frozen)))(tr)
        upd, opt = tx.update(g, opt, tr)
        tr = optax.apply_updates(tr, upd)
        tr, opt = ctrl.step(tr, opt)
    extra = {"epoch": 4, "bf16": jnp.arange(4, dtype=jnp.bfloat16) / 3, "pair": (1, "a")}
    ck.save_checkpoint(
        HERE / "checkpoint_0_1_0_jax_oialr.npz", params=tr, opt_state=opt, oialr=ctrl, extra=extra
    )

    tracker = jc.CMDTracker(params, warmup_epochs=3, max_modes=2, seed=0)
    rec = jd.SnapshotRecorder(params)
    p = params
    for _ in range(5):
        g = jax.grad(loss)(p)
        p = jax.tree_util.tree_map(lambda a, b: a - 0.1 * b, p, g)
        tracker.after_epoch(p)
        rec.record(p)
    sub = rec.fit(2)
    bfgs = jd.SubspaceBFGS(lambda q: loss(q), sub, p)
    state = bfgs.init()
    for _ in range(2):
        state, _ = bfgs.step(state)
    ck.save_checkpoint(
        HERE / "checkpoint_0_1_0_jax_dldr_cmd.npz",
        params=p,
        cmd=tracker,
        bfgs=bfgs,
        bfgs_state=state,
        extra={"epoch": 5},
    )


if __name__ == "__main__":
    torch_file()
    jax_files()
