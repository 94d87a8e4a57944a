"""The JAX backend (lowrank_jax): discovery, random keys, devices, finiteness checks without host syncs.

The property suite runs against JAX with ``LOWRANK_TEST_BACKENDS=jax``; this module checks what is
specific to the backend itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import lowrank_core as lc  # noqa: E402

jax.config.update("jax_enable_x64", True)

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
        check=False,
    )


def test_backend_is_found_lazily_for_arrays_and_tracers() -> None:
    proc = _run(
        """
        import sys
        import numpy as np
        import lowrank_core as lc
        lc.svd(np.eye(3))
        assert "jax" not in sys.modules and "lowrank_jax" not in sys.modules, "imported too early"
        import jax, jax.numpy as jnp
        assert "lowrank_jax" not in sys.modules
        b = lc.get_backend(jnp.zeros(2))
        assert b.name == "jax", b
        assert "lowrank_jax" in sys.modules
        assert "optax" not in sys.modules and "flax" not in sys.modules, "integration imported eagerly"
        names = []
        jax.jit(lambda x: names.append(lc.get_backend(x).name) or x)(jnp.zeros(2))
        jax.vmap(lambda x: names.append(lc.get_backend(x).name) or x)(jnp.zeros((2, 2)))
        assert names == ["jax", "jax"], names
        """
    )
    assert proc.returncode == 0, proc.stderr


def test_entry_points_are_declared() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    eps = meta["project"]["entry-points"]["lowrank_core.backends"]
    # concrete arrays are jaxlib's type, tracers jax's: both names point to the backend
    assert eps["jax"] == eps["jaxlib"] == "lowrank_jax:JaxBackend"
    assert "jax" in meta["project"]["optional-dependencies"]
    from lowrank_core.backend import _BUILTIN

    assert _BUILTIN["jax"] == _BUILTIN["jaxlib"] == eps["jax"]


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_random_normal_from_explicit_keys(dtype: str) -> None:
    b = lc.get_backend(jnp.zeros(1))
    dt = getattr(jnp, dtype)
    r = b.random_normal((300, 40), dtype=dt, seed=7)
    assert isinstance(r, jax.Array) and r.dtype == dt and r.shape == (300, 40)
    # seed s is the key jax.random.key(s)
    draw = jnp.float32 if dtype == "bfloat16" else dt
    want = jax.random.normal(jax.random.key(7), (300, 40), dtype=draw).astype(dt)
    np.testing.assert_array_equal(np.asarray(r, dtype=np.float64), np.asarray(want, np.float64))
    # a key (new style or legacy) is accepted as the seed
    np.testing.assert_array_equal(
        np.asarray(b.random_normal((300, 40), dtype=dt, seed=jax.random.key(7)), np.float64),
        np.asarray(r, np.float64),
    )
    np.testing.assert_array_equal(
        np.asarray(b.random_normal((5,), dtype=dt, seed=jax.random.PRNGKey(3)), np.float64),
        np.asarray(b.random_normal((5,), dtype=dt, seed=3), np.float64),
    )
    other = b.random_normal((300, 40), dtype=dt, seed=8)
    assert not np.array_equal(np.asarray(other, np.float64), np.asarray(r, np.float64))
    values = np.asarray(r, np.float64)
    assert abs(values.mean()) < 0.05 and abs(values.std() - 1.0) < 0.05
    # seed=None: fresh entropy each call
    a1, a2 = (np.asarray(b.random_normal((64,), dtype=dt), np.float64) for _ in range(2))
    assert not np.array_equal(a1, a2)


def test_random_normal_rejects_bad_seeds() -> None:
    b = lc.get_backend(jnp.zeros(1))
    for bad in (1.5, "0", True, jnp.zeros(3)):
        with pytest.raises(TypeError, match="seed"):
            b.random_normal((2,), seed=bad)
    with pytest.raises(ValueError, match="64 bits"):
        b.random_normal((2,), seed=2**64)
    # every 64-bit seed is usable and distinct
    big = b.random_normal((4,), seed=2**64 - 1)
    assert not np.array_equal(np.asarray(big), np.asarray(b.random_normal((4,), seed=2**63 - 1)))


def test_random_init_uses_jax_keys() -> None:
    like = jnp.zeros((6, 5), dtype=jnp.float32)
    f1 = lc.random_init(like, 2, seed=11)
    f2 = lc.random_init(like, 2, seed=11)
    assert isinstance(f1.left, jax.Array) and f1.left.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(f1.left), np.asarray(f2.left))


def test_all_finite_and_to_numpy() -> None:
    b = lc.get_backend(jnp.zeros(1))
    assert b.all_finite(jnp.ones((3, 3)))
    assert b.all_finite(jnp.zeros((0, 3)))
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        assert not b.all_finite(jnp.ones((3, 3)).at[1, 2].set(bad))
    assert not b.all_finite(jnp.ones(4, dtype=jnp.bfloat16).at[0].set(jnp.nan))
    host = b.to_numpy(jnp.ones(3, dtype=jnp.bfloat16))
    assert isinstance(host, np.ndarray) and host.dtype == np.float32
    assert b.to_numpy(jnp.ones(3, dtype=jnp.float64)).dtype == np.float64
    with pytest.raises(TypeError, match="outside the transformation"):
        jax.jit(lambda x: b.to_numpy(x))(jnp.ones(2))


def test_check_finite_false_reads_nothing_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """With check_finite=False the core asks the backend for no host read (no finiteness check, no
    host copy); with check_finite=True it does (one all_finite per input)."""
    from lowrank_jax import JaxBackend

    calls: list[str] = []

    def forbidden(name: str) -> Any:
        def method(self: Any, x: Any) -> Any:
            calls.append(name)
            raise AssertionError(f"host read: {name}")

        return method

    a = jnp.asarray(np.random.default_rng(0).standard_normal((6, 4)))
    f = lc.factorize(a, 3, check_finite=False)
    monkeypatch.setattr(JaxBackend, "all_finite", forbidden("all_finite"))
    monkeypatch.setattr(JaxBackend, "to_numpy", forbidden("to_numpy"))
    lc.svd(a, check_finite=False)
    lc.basis_stability(a, a + 0.1, check_finite=False)
    lc.rediagonalize(f.U, f.Sigma, f.V, check_finite=False)
    lc.reconstruct(f.U, f.Sigma, f.V, check_finite=False)
    lc.effective_rank(f.Sigma[0], check_finite=False)
    lc.spectral_init(a, 2, check_finite=False)
    lc.dldr.bfgs_update(jnp.eye(4), a[0], a[0], check_finite=False)
    assert calls == []
    with pytest.raises(AssertionError, match="host read: all_finite"):
        lc.svd(a)


def test_results_stay_on_the_input_device() -> None:
    """On a second (virtual) CPU device every result stays on that device and is a jax.Array."""
    proc = _run(
        """
        import jax, jax.numpy as jnp, numpy as np
        import lowrank_core as lc
        dev = jax.devices("cpu")[1]
        a = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal((6, 4)), jnp.float32), dev)
        f = lc.factorize(a, 2)
        outs = [lc.svd(a), lc.qr(a), lc.polar(a), f, lc.rediagonalize(*f), lc.basis_stability(a, a),
                lc.spectral_init(a, 2), lc.nonlinear_init(a, 2, refine_steps=2),
                lc.random_init(a, 2, seed=0), lc.update_rank(*f, lc.SigmaCutoff(0.5)).factors]
        for leaf in jax.tree_util.tree_leaves(outs):
            assert isinstance(leaf, jax.Array), type(leaf)
            assert leaf.devices() == {dev}, (leaf.devices(), dev)
            assert leaf.dtype == jnp.float32, leaf.dtype
        print("ok")
        """,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
    )
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_nothing_turns_into_numpy(dtype: str) -> None:
    """Every array a public function returns for JAX input is a jax.Array of the input's dtype."""
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.standard_normal((9, 6)), dtype=getattr(jnp, dtype))
    traj = jnp.asarray(rng.standard_normal((30, 8)), dtype=getattr(jnp, dtype))
    f = lc.factorize(a, 4)
    rd = lc.rediagonalize(*f)
    snaps = jnp.asarray(rng.standard_normal((6, 20)), dtype=getattr(jnp, dtype))
    sub = lc.fit_subspace(snaps, 3)
    fit = lc.fit_cmd(traj, 3)
    online = lc.OnlineCMD.from_trajectory(traj, 3)
    online.update(traj[:, 0])
    results: list[Any] = [
        lc.svd(a),
        lc.qr(a),
        lc.polar(a),
        lc.orthogonal_factor(a),
        f,
        rd,
        lc.rotate_sigma(f.Sigma, rd.left, rd.right),
        lc.reconstruct(*f),
        lc.truncate(*rd.factors, 2),
        lc.update_rank(*f, lc.SigmaCutoff(0.5)).factors,
        lc.basis_stability(a, a * 2),
        lc.polar_stability(lc.orthogonal_factor(a), lc.orthogonal_factor(a)),
        lc.principal_angle_cosines(a, a[:, :3]),
        lc.projector_distance(a, a),
        lc.effective_rank(rd.singular_values),
        lc.stable_rank(rd.singular_values),
        lc.spectral_init(a, 3),
        lc.nonlinear_init(a, 3, refine_steps=2),
        lc.random_init(a, 3, seed=0),
        lc.init_weight_factors(a, 3, method="nonlinear"),
        (sub.centre, sub.basis, sub.explained_variance),
        sub.project(snaps),
        sub.lift(sub.project(snaps[0])),
        (fit.profiles, fit.a, fit.b),
        online.coefficients(),
        online.weights(),
        lc.dldr.bfgs_update(jnp.eye(20, dtype=a.dtype), snaps[0], snaps[0])[0],
        lc.dldr.bfgs_direction(jnp.eye(20, dtype=a.dtype), snaps[0]),
    ]
    for i, leaf in enumerate(jax.tree_util.tree_leaves(results)):
        assert isinstance(leaf, jax.Array), (
            f"result {i}: {type(leaf).__module__}.{type(leaf).__name__}"
        )
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == a.dtype, f"result {i}: {leaf.dtype} != {a.dtype}"
