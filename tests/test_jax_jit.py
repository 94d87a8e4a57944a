"""The core under ``jax.jit`` and ``jax.vmap``: every shape-static function, compared with eager.

Each function is called eagerly on JAX arrays (float64, x64 on) and again inside ``jax.jit`` with
``check_finite=False``, and the results are compared. Both runs execute the same operations on the same
inputs, but XLA may fuse and reorder the jitted one, so the comparison allows a few hundred ulps of the
result's scale (1e-12 relative in float64, far below any real disagreement). ``jax.vmap`` over a stack is
compared with the per-matrix eager results. Then: ``check_finite=True`` under ``jit`` raises the backend's
clear error, and nothing of the data is converted to a Python value under tracing (the jitted functions
are traced once and replayed on new data without retracing).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import lowrank_core as lc  # noqa: E402
from lowrank_core import dldr as ldldr  # noqa: E402
from lowrank_core import init as linit  # noqa: E402

# float64 inputs (the suite's JAX backend turns x64 on as well; float32 stays float32 under it)
jax.config.update("jax_enable_x64", True)


def _arr(shape: tuple[int, ...], seed: int) -> Any:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def _spd(d: int, seed: int) -> Any:
    a = np.random.default_rng(seed).standard_normal((d, d))
    return jnp.asarray(a @ a.T + d * np.eye(d))


def _orth(m: int, r: int, seed: int) -> Any:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((m, r)))
    return jnp.asarray(q)


def _leaves(x: Any) -> list[Any]:
    return jax.tree_util.tree_leaves(x)


def _compare(eager: Any, jitted: Any, what: str) -> None:
    le, lj = _leaves(eager), _leaves(jitted)
    assert len(le) == len(lj), what
    for i, (e, j) in enumerate(zip(le, lj, strict=True)):
        assert isinstance(j, jax.Array), f"{what}[{i}]: {type(j)} is not a jax.Array"
        assert e.shape == j.shape and e.dtype == j.dtype, f"{what}[{i}]"
        scale = max(1.0, float(jnp.max(jnp.abs(e)))) if e.size else 1.0
        np.testing.assert_allclose(
            np.asarray(j), np.asarray(e), rtol=0, atol=1e-12 * scale, err_msg=f"{what}[{i}]"
        )


A = _arr((7, 5), 0)
B = _arr((7, 5), 1)
WIDE = _arr((4, 9), 2)
U3, S3, V3 = _orth(7, 3, 3), _arr((3, 3), 4), _orth(5, 3, 5)
SPEC = jnp.asarray([3.0, 2.0, 0.5, 0.1])

# (name, function of positional arrays, arguments); each function gets check_finite=False
CASES: list[tuple[str, Callable[..., Any], tuple[Any, ...]]] = [
    ("svd", lambda a: lc.svd(a, check_finite=False), (A,)),
    ("svd-wide", lambda a: lc.svd(a, check_finite=False), (WIDE,)),
    ("qr", lambda a: lc.qr(a, check_finite=False), (A,)),
    ("polar", lambda a: lc.polar(a, check_finite=False), (A,)),
    ("polar-left", lambda a: lc.polar(a, "left", check_finite=False), (WIDE,)),
    ("orthogonal_factor", lambda a: lc.orthogonal_factor(a, check_finite=False), (A,)),
    ("basis_stability", lambda a, b: lc.basis_stability(a, b, check_finite=False), (A, B)),
    (
        "polar_stability",
        lambda a, b: lc.polar_stability(
            lc.orthogonal_factor(a, check_finite=False),
            lc.orthogonal_factor(b, check_finite=False),
            check_finite=False,
        ),
        (A, B),
    ),
    (
        "principal_angle_cosines",
        lambda a, b: lc.principal_angle_cosines(a, b, check_finite=False),
        (A, B[:, :3]),
    ),
    ("projector_distance", lambda a, b: lc.projector_distance(a, b, check_finite=False), (A, B)),
    ("factorize", lambda a: lc.factorize(a, 3, check_finite=False), (A,)),
    ("rediagonalize", lambda u, s, v: lc.rediagonalize(u, s, v, check_finite=False), (U3, S3, V3)),
    (
        "rotate_sigma",
        lambda x, p, q: lc.rotate_sigma(x, p, q, check_finite=False),
        (S3, _orth(3, 3, 6), _orth(3, 3, 7)),
    ),
    ("reconstruct", lambda u, s, v: lc.reconstruct(u, s, v, check_finite=False), (U3, S3, V3)),
    ("effective_rank", lambda s: lc.effective_rank(s, check_finite=False), (SPEC,)),
    ("stable_rank", lambda s: lc.stable_rank(s, check_finite=False), (SPEC,)),
    ("spectral_init", lambda a: lc.spectral_init(a, 3, check_finite=False), (A,)),
    ("spectral_factors", lambda a: linit.spectral_factors(a, 3, check_finite=False), (A,)),
    ("nonlinear_init", lambda a: lc.nonlinear_init(a, 3, check_finite=False), (A,)),
    ("nonlinear_factors", lambda a: linit.nonlinear_factors(a, 3, check_finite=False), (A,)),
    ("random_init", lambda a: lc.random_init(a, 3, seed=5), (A,)),
    ("random_factors", lambda a: linit.random_factors(a, 3, seed=5), (A,)),
    (
        "init_weight_factors",
        lambda a: lc.init_weight_factors(a, 3, check_finite=False),
        (_arr((6, 2, 3), 8),),
    ),
    (
        "balanced_to_factors",
        lambda left, right: linit.balanced_to_factors(left, right, check_finite=False),
        (A[:, :3], B[:, :3]),
    ),
    (
        "factors_to_balanced",
        lambda u, s, v: linit.factors_to_balanced(u, s, v, check_finite=False),
        (U3, S3, V3),
    ),
    (
        "frobenius_decay",
        lambda left, right: linit.frobenius_decay(left, right, check_finite=False),
        (A[:, :3], B[:, :3]),
    ),
    (
        "frobenius_decay_grad",
        lambda left, right: linit.frobenius_decay_grad(left, right, check_finite=False),
        (A[:, :3], B[:, :3]),
    ),
    (
        "bfgs_update",
        lambda h, s, y: ldldr.bfgs_update(h, s, y, check_finite=False),
        (_spd(4, 9), _arr((4,), 10), _arr((4,), 10) + 0.1 * _arr((4,), 11)),
    ),
    (
        "bfgs_update-skipped",  # s.y < 0: the guard keeps H, traced
        lambda h, s, y: ldldr.bfgs_update(h, s, y, check_finite=False),
        (_spd(4, 9), _arr((4,), 10), -_arr((4,), 10)),
    ),
    (
        "bfgs_direction",
        lambda h, g: ldldr.bfgs_direction(h, g, check_finite=False),
        (_spd(4, 9), _arr((4,), 12)),
    ),
]


@pytest.mark.parametrize(("name", "fn", "args"), CASES, ids=[c[0] for c in CASES])
def test_jit_matches_eager(name: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    eager = fn(*args)
    jitted = jax.jit(fn)(*args)
    _compare(eager, jitted, name)


VMAP_CASES = [c for c in CASES if not c[0].startswith(("random", "bfgs"))]


@pytest.mark.parametrize(("name", "fn", "args"), VMAP_CASES, ids=[c[0] for c in VMAP_CASES])
def test_vmap_matches_loop(name: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    # a stack of 3: the arguments, scaled and shifted per item (orthonormal factors only scaled by +-1)
    factors = (1.0, -1.0, 1.0)
    stacks = [jnp.stack([f * a for f in factors]) for a in args]
    batched = jax.jit(jax.vmap(fn))(*stacks)
    for i in range(len(factors)):
        one = fn(*(s[i] for s in stacks))
        _compare(one, jax.tree_util.tree_map(lambda x, i=i: x[i], batched), f"{name}[{i}]")


def test_online_cmd_update_under_jit() -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((3, 12))
    coef = rng.standard_normal((40, 1))
    traj = jnp.asarray(np.repeat(base, [14, 13, 13], axis=0) * coef + rng.standard_normal((40, 1)))
    online = lc.OnlineCMD.from_trajectory(traj, 3, check_finite=False)
    new = jnp.asarray(rng.standard_normal(40))
    refs, unit = online.references, online.unit
    keys = ("assignment", "profiles", "r_mean", "r_m2", "w_mean", "c_wr")

    @jax.jit
    def update(state: dict[str, Any], w: Any) -> dict[str, Any]:
        cmd = lc.OnlineCMD(references=refs, unit=unit, **state, check_finite=False)
        cmd.update(w, check_finite=False)
        return {k: getattr(cmd, k) for k in keys}

    jitted = update({k: getattr(online, k) for k in keys}, new)
    online.update(new)
    _compare({k: getattr(online, k) for k in keys}, jitted, "OnlineCMD.update")


def test_check_finite_under_jit_raises_a_clear_error() -> None:
    from lowrank_jax import TracedFiniteCheckError

    with pytest.raises(TracedFiniteCheckError, match="check_finite=False"):
        jax.jit(lambda a: lc.svd(a))(A)
    with pytest.raises(lc.LowRankError):
        jax.vmap(lambda a: lc.basis_stability(a, a))(jnp.stack([A, A]))
    # eagerly, the check still works and finds NaN
    with pytest.raises(lc.NonFiniteError):
        lc.svd(A.at[0, 0].set(jnp.nan))


def test_traced_once_replayed_on_new_data() -> None:
    """No data-dependent Python branch: one trace serves every input of the same shape."""
    traces = []

    def fn(a: Any, b: Any) -> Any:
        traces.append(1)
        f = lc.factorize(a, 3, check_finite=False)
        rd = lc.rediagonalize(f.U, f.Sigma + 0.1, f.V, check_finite=False)
        return lc.basis_stability(a, b, check_finite=False), rd.singular_values

    jitted = jax.jit(fn)
    for seed in range(3):
        a, b = _arr((7, 5), 20 + seed), _arr((7, 5), 30 + seed)
        _compare(fn(a, b), jitted(a, b), f"seed {seed}")
    assert len(traces) == 3 + 1  # three eager calls, one trace


def test_rank_selection_needs_concrete_values() -> None:
    """Rank rules and update_rank choose shapes from the data: outside jit only (documented)."""
    f = lc.factorize(A, check_finite=False)
    eager = lc.update_rank(f.U, f.Sigma, f.V, lc.SigmaCutoff(0.5))
    assert isinstance(eager.rank, int)
    with pytest.raises(Exception, match=r"(?i)trac|concret"):
        jax.jit(lambda s: lc.SigmaCutoff(0.5)(s))(lc.svd(A).S)
