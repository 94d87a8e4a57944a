"""dtype rules: half precision is computed in float32 and cast back; mixed precision promotes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _helpers import (
    assert_close,
    assert_in_library,
    assert_unchanged,
    batch_indices,
    dtype_name,
    eps,
    product,
    snapshot,
)
from _strategies import matrix_cases
from hypothesis import given
from hypothesis import strategies as st

import lowrank_core as lc
import lowrank_reference as ref


def _half_dtypes(backend):
    if backend.name.startswith("torch"):
        return ["float16", "bfloat16"]
    if backend.name in ("numpy", "cupy"):
        return ["float16"]
    return []


@pytest.fixture(params=["float16", "bfloat16"])
def half(request, backend):
    if request.param not in _half_dtypes(backend):
        pytest.skip(f"{backend.name} has no {request.param}")
    return request.param


@given(data=st.data())
def test_half_precision_svd_factorize_polar(backend, half, data):
    """Computed in float32 on the (exactly representable) half input, then rounded to half: the errors
    are those of the final rounding, a few eps of the half dtype."""
    case = data.draw(matrix_cases(half, max_side=8, gap=1.2), label="case")
    a = backend.asarray(case.a, half)
    before = snapshot(backend, a)
    seen = backend.to_numpy(a).astype(np.float64)
    m, n = case.m, case.n
    U, S, Vh = lc.svd(a)
    for name, x in (("U", U), ("S", S), ("Vh", Vh)):
        assert_in_library(x, a, what=f"svd {name} ({half})")
    U_, S_, Vh_ = (backend.to_numpy(x).astype(np.float64) for x in (U, S, Vh))
    V_ = np.swapaxes(Vh_, -1, -2)
    smax = float(np.max(case.s))
    f32 = 20 * eps("float32") * case.cond * math.sqrt(max(m, n))
    for idx in batch_indices(case.batch):
        _, Sr, _ = ref.svd(seen[idx])
        assert_close(S_[idx], Sr, atol=(2 * eps(half) + f32) * smax, err_msg=f"S at {idx}")
        assert_close(backend.to_numpy(lc.orthogonal_factor(a))[idx], ref.orthogonal_factor(seen[idx]),
                     atol=2 * eps(half) + f32, err_msg=f"orthogonal_factor at {idx}")  # fmt: skip
    recon_tol = (4 * eps(half) + f32) * smax * math.sqrt(max(m, n))
    assert_close(product(U_, S_, V_), seen, atol=recon_tol)
    f = lc.factorize(a)
    for name, x in zip(("U", "Sigma", "V"), f, strict=True):
        assert_in_library(x, a, what=f"factorize {name} ({half})")
    f_ = [backend.to_numpy(x).astype(np.float64) for x in f]
    assert_close(product(*f_), seen, atol=recon_tol)
    assert_in_library(lc.orthogonal_factor(a), a, what=f"orthogonal_factor ({half})")
    for name, x in zip(("u", "p"), lc.polar(a), strict=True):
        assert_in_library(x, a, what=f"polar {name} ({half})")
    assert_unchanged(backend, before, a)


@given(data=st.data())
def test_half_precision_basis_stability(backend, half, data):
    case = data.draw(matrix_cases(half, max_side=8, gap=None), label="case")
    a = backend.asarray(case.a, half)
    out = lc.basis_stability(a, a)
    assert_in_library(out, a, what=f"basis_stability ({half})")
    tol = 2 * eps(half) + 20 * eps("float32") * case.cond * math.sqrt(max(case.m, case.n))
    assert_close(backend.to_numpy(out), np.ones(case.batch), atol=tol)


_MIXED = {
    "basis_stability": lambda be, r: (
        lc.basis_stability,
        be.asarray(r.standard_normal((5, 3)), "float32"),
        be.asarray(r.standard_normal((5, 3)), "float64"),
    ),
    "principal_angle_cosines": lambda be, r: (
        lc.principal_angle_cosines,
        be.asarray(r.standard_normal((5, 3)), "float64"),
        be.asarray(r.standard_normal((5, 2)), "float32"),
    ),
    "projector_distance": lambda be, r: (
        lc.projector_distance,
        be.asarray(r.standard_normal((5, 3)), "float32"),
        be.asarray(r.standard_normal((5, 2)), "float64"),
    ),
    "reconstruct": lambda be, r: (
        lc.reconstruct,
        be.asarray(r.standard_normal((5, 3)), "float32"),
        be.asarray(r.standard_normal((3, 3)), "float64"),
        be.asarray(r.standard_normal((4, 3)), "float32"),
    ),
    "rotate_sigma": lambda be, r: (
        lc.rotate_sigma,
        be.asarray(r.standard_normal((3, 3)), "float64"),
        be.asarray(r.standard_normal((3, 3)), "float32"),
        be.asarray(r.standard_normal((3, 3)), "float32"),
    ),
}


@pytest.mark.parametrize("name", sorted(_MIXED))
def test_mixed_precision_promotes(backend, name):
    """float32 with float64: the standard's promotion gives float64 (and the float64 values)."""
    if not {"float32", "float64"} <= set(backend.float_dtypes):
        pytest.skip("needs float32 and float64")
    fn, *args = _MIXED[name](backend, np.random.default_rng(0))
    out = fn(*args)
    like = next(a for a in args if dtype_name(a) == "float64")
    assert_in_library(out, like, dtype="float64", what=f"{name}(float32, float64)")
    # the same call with everything in float64 gives the same numbers
    args64 = [backend.asarray(backend.to_numpy(a).astype(np.float64), "float64") for a in args]
    want = backend.to_numpy(fn(*args64))
    assert_close(backend.to_numpy(out), want, atol=1e-12 * max(1.0, float(np.max(np.abs(want)))))


@given(data=st.data())
def test_float32_results_are_float32(backend, data):
    """No silent promotion: float32 in, float32 out, for every function (and the same library)."""
    case = data.draw(matrix_cases("float32", max_side=8, orientation="tall"), label="case")
    a = backend.asarray(case.a, "float32")
    outs = {
        "svd": lc.svd(a),
        "qr": lc.qr(a),
        "polar": lc.polar(a),
        "orthogonal_factor": (lc.orthogonal_factor(a),),
        "factorize": lc.factorize(a),
        "basis_stability": (lc.basis_stability(a, a),),
        "principal_angle_cosines": (lc.principal_angle_cosines(a, a),),
        "projector_distance": (lc.projector_distance(a, a),),
        "weight_to_matrix": (lc.weight_to_matrix(a),),
    }
    U, S, V = lc.factorize(a)
    outs["reconstruct"] = (lc.reconstruct(U, S, V),)
    outs["rediagonalize"] = lc.rediagonalize(U, S, V)
    outs["truncate"] = lc.truncate(U, S, V, 1)
    outs["update_rank"] = lc.update_rank(U, S, V, lc.FixedRank(rank=1)).factors
    s = lc.svd(a).S
    outs["effective_rank"] = (lc.effective_rank(s),)
    outs["stable_rank"] = (lc.stable_rank(s),)
    for name, xs in outs.items():
        for i, x in enumerate(xs):
            assert_in_library(x, a, dtype="float32", what=f"{name}[{i}]")
