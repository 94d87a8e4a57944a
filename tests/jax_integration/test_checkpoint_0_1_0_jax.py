"""Checkpoints written by lowrank-core 0.1.0 (tests/data, made by make_0_1_0_checkpoints.py) load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")

import lowrank_core as lc  # noqa: E402
from lowrank_jax import checkpoint as ck  # noqa: E402
from lowrank_jax import cmd as jc  # noqa: E402
from lowrank_jax import oialr as jo  # noqa: E402

jax.config.update("jax_enable_x64", True)

DATA = Path(__file__).resolve().parent.parent / "data"


def _params() -> dict[str, Any]:
    rng = np.random.default_rng(5)  # other values than the saved run: loading must replace them
    return {
        "l0": {"kernel": jnp.asarray(rng.standard_normal((6, 8))), "bias": jnp.zeros(8)},
        "l1": {"kernel": jnp.asarray(rng.standard_normal((8, 3))), "bias": jnp.zeros(3)},
    }


def _saved_params(path: Path) -> list[np.ndarray]:
    """The parameter leaves of a 0.1.0 file, read without the library."""
    with np.load(path, allow_pickle=False) as z:
        manifest = json.loads(z["__manifest__"].tobytes())
        return [np.asarray(z[ref["__array__"]]) for ref in manifest["params"]["leaves"]]


def _loss(p: dict[str, Any]) -> jax.Array:
    return jnp.sum(p["l1"]["kernel"] ** 2)


def test_a_0_1_0_jax_oialr_checkpoint_loads() -> None:
    path = DATA / "checkpoint_0_1_0_jax_oialr.npz"
    tx = optax.adam(1e-2)
    ctrl = jo.OIALR(_params(), jo.OIALRConfig(switch_step=2, update_every=3, rule=lc.FixedRank(3)))
    got = ck.load_checkpoint(path, params=_params(), tx=tx, oialr=ctrl)
    assert got.extra is not None and got.extra["epoch"] == 4 and got.extra["pair"] == (1, "a")
    assert got.extra["bf16"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(got.extra["bf16"]), np.asarray(jnp.arange(4, dtype=jnp.bfloat16) / 3)
    )
    assert set(ctrl.ranks().values()) == {3}
    for leaf, want in zip(jax.tree_util.tree_leaves(got.params), _saved_params(path), strict=True):
        np.testing.assert_array_equal(np.asarray(leaf), want)
    assert got.opt_state is not None


def test_a_0_1_0_jax_dldr_and_cmd_checkpoint_loads() -> None:
    path = DATA / "checkpoint_0_1_0_jax_dldr_cmd.npz"
    tracker = jc.CMDTracker(_params(), warmup_epochs=3, max_modes=2, seed=0)
    got = ck.load_checkpoint(path, params=_params(), cmd=tracker, loss_fn=_loss)
    assert got.extra == {"epoch": 5}
    assert tracker.fitted and tracker.epochs == 5
    assert got.subspace is not None and got.subspace.d == 2 and got.subspace.dim == 83
    assert got.bfgs is not None and got.bfgs_state is not None
    assert int(got.bfgs_state.updates) + int(got.bfgs_state.skipped) <= 2
    state, _ = got.bfgs.step(got.bfgs_state)  # the solver runs on from the saved state
    assert bool(jnp.all(jnp.isfinite(state.c)))
    for leaf, want in zip(jax.tree_util.tree_leaves(got.params), _saved_params(path), strict=True):
        np.testing.assert_array_equal(np.asarray(leaf), want)
