"""The main job in JAX: the MNIST-1D MLP trained dense, with OIALR, with online CMD and with P-BFGS.

    python examples/jax_mnist1d.py [--epochs 30] [--seed 0] [--methods dense,oialr,cmd,p-bfgs]

The same data (MNIST-1D generated locally from the seed, 8000 train / 2000 test, standardized with the
training set's mean and std), the same MLP 40-512-512-10 (ReLU, PyTorch's default initialization drawn
from ``jax.random``), the same hyper-parameters (AdamW lr 1e-3, weight decay 1e-2, batch 128, 30 epochs,
one linear warm-up epoch then cosine) and the same method options as the PyTorch main job
(``lowrank-compare --models mlp``); it prints the same table. Every method is ``lowrank_jax`` on the
core; the training step is one jitted function per method. It also times one OIALR stability check of
the MLP's eligible kernel, eager and jitted.
"""

from __future__ import annotations

import argparse
import itertools
import math
import platform
import random
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lowrank_core as lc
from lowrank_jax import cmd as jcmd
from lowrank_jax import dldr as jdldr
from lowrank_jax import oialr as joialr


def load_mnist1d(seed: int, num_samples: int = 10_000) -> tuple[np.ndarray, ...]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed, args.num_samples, args.train_split = seed, num_samples, 0.8
    py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002
    try:
        d = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002
    x, x_test = np.asarray(d["x"]), np.asarray(d["x_test"])
    mean, std = float(x.mean()), float(x.std()) or 1.0
    return (
        ((x - mean) / std).astype(np.float32),
        np.asarray(d["y"], np.int32),
        ((x_test - mean) / std).astype(np.float32),
        np.asarray(d["y_test"], np.int32),
    )


def init_mlp(key: jax.Array, sizes: tuple[int, ...] = (40, 512, 512, 10)) -> dict[str, Any]:
    """PyTorch's default Linear init: kernel and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    params = {}
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        key, kw, kb = jax.random.split(key, 3)
        bound = 1.0 / math.sqrt(n_in)
        params[f"layer{i}"] = {
            "kernel": jax.random.uniform(kw, (n_in, n_out), jnp.float32, -bound, bound),
            "bias": jax.random.uniform(kb, (n_out,), jnp.float32, -bound, bound),
        }
    return params


def apply_mlp(params: dict[str, Any], x: jax.Array) -> jax.Array:
    names = sorted(params)
    for name in names[:-1]:
        x = jax.nn.relu(joialr.dense(x, params[name]["kernel"]) + params[name]["bias"])
    return joialr.dense(x, params[names[-1]]["kernel"]) + params[names[-1]]["bias"]


def loss_fn(params: dict[str, Any], x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(apply_mlp(params, x), y).mean()


def schedule(lr: float, total: int, warmup: int) -> Callable[[jax.Array], jax.Array]:
    """The main job's LambdaLR: linear warm-up, then cosine to 0 (per step)."""

    def fn(count: jax.Array) -> jax.Array:
        step = jnp.asarray(count, jnp.float32)
        warm = (step + 1) / warmup
        progress = jnp.minimum(1.0, (step - warmup) / max(1, total - warmup))
        return lr * jnp.where(step < warmup, warm, 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))

    return fn


@jax.jit
def accuracy(params: dict[str, Any], x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(apply_mlp(params, x), axis=1) == y)


def train(method: str, data: tuple[np.ndarray, ...], seed: int, epochs: int) -> dict[str, Any]:
    x_tr, y_tr, x_te, y_te = (jnp.asarray(a) for a in data)
    n, batch = int(x_tr.shape[0]), 128
    steps_per_epoch = math.ceil(n / batch)
    total = steps_per_epoch * epochs
    params = init_mlp(jax.random.key(seed))
    dense_params = joialr.count_params(params)
    tx = optax.adamw(schedule(1e-3, total, steps_per_epoch), weight_decay=1e-2)
    start = time.perf_counter()
    rng = np.random.default_rng(seed)

    ctrl = None
    frozen: dict[str, Any] = {}
    if method == "oialr":  # switch at half the run, a rank update per epoch, SigmaCutoff(0.1)
        ctrl = joialr.OIALR(
            params,
            joialr.OIALRConfig(
                switch_step=max(1, round(0.5 * total)),
                update_every=steps_per_epoch,
                rule=lc.SigmaCutoff(0.1),
            ),
        )
        tx = ctrl.optimizer(tx)  # Sigma's learning rate x sigma_lr_scale after the switch
    tracker = None
    if method == "cmd":
        tracker = jcmd.CMDTracker(
            params, warmup_epochs=min(20, max(2, round(epochs / 3))), max_modes=10
        )
    recorder, bfgs, bfgs_state, switch_step, every = None, None, None, 0, 1
    if method == "p-bfgs":  # record 80 snapshots over the first half, then P-BFGS in 40 dims
        switch_step = max(2, min(total - 1, round(0.5 * total)))
        every = max(1, switch_step // 80)
        recorder = jdldr.SnapshotRecorder(params)

    @jax.jit
    def step(trainable: Any, frozen: Any, opt_state: Any, xb: jax.Array, yb: jax.Array) -> Any:
        loss, g = jax.value_and_grad(lambda t: loss_fn(joialr.materialize(t, frozen), xb, yb))(
            trainable
        )
        updates, opt_state = tx.update(g, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    trainable, opt_state = params, tx.init(params)
    t = 0
    for _epoch in range(epochs):
        order = rng.permutation(n)
        for i in range(0, n, batch):
            idx = jnp.asarray(order[i : i + batch])
            xb, yb = x_tr[idx], y_tr[idx]
            if bfgs is not None:
                bfgs_state, _ = bfgs.step(bfgs_state, xb, yb)
            else:
                trainable, opt_state, _ = step(trainable, frozen, opt_state, xb, yb)
            t += 1
            if ctrl is not None:
                trainable, opt_state = ctrl.step(trainable, opt_state)
                frozen = ctrl.frozen
            if recorder is not None and t <= switch_step and (t % every == 0 or t == switch_step):
                recorder.record(trainable)
                if t == switch_step:
                    subspace = recorder.fit(min(40, len(recorder) - 1))
                    bfgs = jdldr.SubspaceBFGS(loss_fn, subspace, trainable)
                    bfgs_state = bfgs.init()
                    recorder.store.close()
                    recorder = None
        if tracker is not None:
            tracker.after_epoch(trainable)
    if bfgs is not None:
        final, trained = bfgs.params(bfgs_state), bfgs.d
    elif tracker is not None:
        final, trained = tracker.evaluation_params(trainable), dense_params
    elif ctrl is not None:
        final, trained = joialr.materialize(trainable, frozen), ctrl.trainable_count(trainable)
    else:
        final, trained = trainable, dense_params
    acc = float(accuracy(final, x_te, y_te))
    return {
        "method": method,
        "test_accuracy": acc,
        "trainable_params": trained,
        "dense_params": dense_params,
        "wall_time_s": time.perf_counter() - start,
        "ranks": None if ctrl is None else ctrl.ranks(),
    }


def time_stability_check(seed: int, repeats: int = 5) -> tuple[float, float]:
    """Seconds of one OIALR stability check (orthogonal factor + polar stability of the MLP's eligible
    512 x 512 kernel against the previous factor): eager core calls vs the jitted check."""
    params = init_mlp(jax.random.key(seed))
    ctrl = joialr.OIALR(params, joialr.OIALRConfig(switch_step=1))
    kernels = [ctrl._leaf(params, name) for name in ctrl.eligible]
    prev = [lc.orthogonal_factor(k) for k in kernels]

    def eager() -> list[jax.Array]:
        return [
            lc.polar_stability(p, lc.orthogonal_factor(k))
            for p, k in zip(prev, kernels, strict=True)
        ]

    @jax.jit
    def jitted(prev: list[jax.Array], kernels: list[jax.Array]) -> list[jax.Array]:
        return [
            lc.polar_stability(p, lc.orthogonal_factor(k, check_finite=False), check_finite=False)
            for p, k in zip(prev, kernels, strict=True)
        ]

    def best(fn: Callable[[], list[jax.Array]]) -> float:
        jax.block_until_ready(fn())  # compile / warm up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    return best(eager), best(lambda: jitted(prev, kernels))


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ["model", "method", "test acc %", "trainable params", "trainable %", "wall time s"]
    body = [
        [
            "mlp",
            r["method"],
            f"{100.0 * r['test_accuracy']:.2f}",
            f"{r['trainable_params']:,} / {r['dense_params']:,}",
            f"{100.0 * r['trainable_params'] / r['dense_params']:.1f}",
            f"{r['wall_time_s']:.1f}",
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(b) for b in body)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=10_000)
    p.add_argument("--methods", default="dense,oialr,cmd,p-bfgs")
    args = p.parse_args()
    data = load_mnist1d(args.seed, args.num_samples)
    print(
        f"MNIST-1D: {data[0].shape[0]} train / {data[2].shape[0]} test signals of length {data[0].shape[1]}, "
        f"seed {args.seed}; jax {jax.__version__} on {jax.devices()[0].platform}, Python {platform.python_version()}"
    )
    print(f"  mlp: {args.epochs} epochs, batch 128, adamw lr 0.001 wd 0.01, cosine schedule")
    rows = []
    for method in args.methods.split(","):
        rows.append(train(method.strip(), data, args.seed, args.epochs))
        print(f"  done {method}: test acc {100 * rows[-1]['test_accuracy']:.2f}%", flush=True)
    print()
    print(format_table(rows))
    eager, jitted = time_stability_check(args.seed)
    print(
        f"\nOne OIALR stability check of the MLP (512 x 512 kernel): eager {1e3 * eager:.2f} ms, jitted {1e3 * jitted:.2f} ms"
    )


if __name__ == "__main__":
    main()
