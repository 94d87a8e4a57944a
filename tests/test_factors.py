"""factorize, reconstruct, rediagonalize, rotate_sigma, truncate and update_rank."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _helpers import (
    assert_close,
    assert_columns_match,
    assert_in_library,
    assert_python_int,
    assert_sign_canonical,
    assert_unchanged,
    batch_indices,
    eps,
    orthonormality_error,
    product,
    projector,
    random_orthogonal,
    sign_is_ambiguous,
    snapshot,
    vector_tolerances,
)
from _strategies import MAX_COND, batch_shapes, gapped_spectrum, matrix_cases, seeds
from hypothesis import given
from hypothesis import strategies as st

import lowrank_core as lc
import lowrank_reference as ref


def _recon_tol(dtype, smax, m, n):
    return 20 * eps(dtype) * float(np.max(smax, initial=0.0)) * max(m, n, 1)


def _orth_tol(dtype, m, n):
    return 20 * eps(dtype) * max(m, n, 1)


# --------------------------------------------------------------------------------------------------
# factorize
# --------------------------------------------------------------------------------------------------
@given(data=st.data())
def test_factorize(backend, dtype, data):
    case = data.draw(matrix_cases(dtype), label="case")
    k, m, n = case.k, case.m, case.n
    rank = data.draw(st.one_of(st.none(), st.integers(1, k)), label="rank")
    r = k if rank is None else rank
    a = backend.asarray(case.a, dtype)
    before = snapshot(backend, a)
    f = lc.factorize(a) if rank is None else lc.factorize(a, rank=rank)
    assert isinstance(f, lc.LowRankFactors)
    U, Sigma, V = f
    for name, x in (("U", U), ("Sigma", Sigma), ("V", V)):
        assert_in_library(x, a, what=f"factorize {name}")
    assert tuple(U.shape) == (*case.batch, m, r)
    assert tuple(Sigma.shape) == (*case.batch, r, r)
    assert tuple(V.shape) == (*case.batch, n, r)
    U_, Sig_, V_ = backend.to_numpy(U), backend.to_numpy(Sigma), backend.to_numpy(V)
    # Sigma = diag(S[:r]) exactly: zero off the diagonal, descending non-negative on it
    d = np.diagonal(Sig_, axis1=-2, axis2=-1)
    off = Sig_ - d[..., :, None] * np.eye(r)
    assert np.all(off == 0), "Sigma is not diagonal"
    assert np.all(d >= 0)
    assert np.all(np.diff(d, axis=-1) <= 0)
    assert orthonormality_error(U_) <= _orth_tol(dtype, m, n)
    assert orthonormality_error(V_) <= _orth_tol(dtype, m, n)
    seen = backend.to_numpy(a).astype(np.float64)
    rec = product(U_, Sig_, V_)
    for idx in batch_indices(case.batch):
        _Ur, Sr, _Vr = ref.svd(seen[idx])
        # Eckart-Young: the error of the best rank-r approximation is the norm of the dropped values
        err = np.linalg.norm(rec[idx] - seen[idx])
        want = math.sqrt(float(np.sum(Sr[r:] ** 2)))
        assert abs(err - want) <= _recon_tol(dtype, Sr[0], m, n) * math.sqrt(k), (
            f"rank {r}: |a - U Sigma V^T|_F = {err}, expected {want} at {idx}"
        )
        # against the reference factorization
        Uf, Sf, Vf = ref.factorize(seen[idx], rank=rank)
        assert_close(Sig_[idx], Sf, atol=_recon_tol(dtype, Sr[0], m, n), err_msg=f"Sigma at {idx}")
        vt = vector_tolerances(Sr, m, n, dtype)[:r]
        flips = sign_is_ambiguous(Uf, vt)
        signs = assert_columns_match(U_[idx], Uf, vt, allow_flip=flips, err_msg=f"U at {idx}")
        assert_columns_match(V_[idx], Vf * signs, vt, err_msg=f"V at {idx}")
        # sign-invariant form too
        assert_close(projector(U_[idx]), projector(Uf), atol=2 * float(np.max(vt, initial=0)))
    assert_sign_canonical(U_)
    if r == k:
        assert_close(rec, seen, atol=_recon_tol(dtype, case.s, m, n))
    assert_unchanged(backend, before, a)


# --------------------------------------------------------------------------------------------------
# reconstruct
# --------------------------------------------------------------------------------------------------
@st.composite
def factor_triples(draw, *, orthonormal=True, dtype="float64", gap=1.1):
    """(U, Sigma, V, sig) with U (*b, m, r), V (*b, n, r) orthonormal (or not), and a dense Sigma
    (*b, r, r) = P0 diag(sig) Q0^T with a gapped spectrum sig."""
    batch = draw(batch_shapes)
    m = draw(st.integers(1, 20))
    n = draw(st.integers(1, 20))
    r = draw(st.integers(1, min(m, n)))
    rng = np.random.default_rng(draw(seeds))
    size = int(np.prod(batch, dtype=np.int64))
    cond = max(MAX_COND[dtype], gap ** (r - 1) * 1.01)
    Us, Ss, Vs, sigs = [], [], [], []
    for _ in range(size):
        sig = gapped_spectrum(rng, r, max_cond=cond, gap=gap, scale=10 ** rng.uniform(-1, 1))
        P0 = random_orthogonal(rng, r, r)
        Q0 = random_orthogonal(rng, r, r)
        Ss.append((P0 * sig) @ Q0.T)
        sigs.append(sig)
        if orthonormal:
            Us.append(random_orthogonal(rng, m, r))
            Vs.append(random_orthogonal(rng, n, r))
        else:
            Us.append(rng.standard_normal((m, r)))
            Vs.append(rng.standard_normal((n, r)))
    return (
        np.stack(Us).reshape((*batch, m, r)),
        np.stack(Ss).reshape((*batch, r, r)),
        np.stack(Vs).reshape((*batch, n, r)),
        np.stack(sigs).reshape((*batch, r)),
    )


@given(data=st.data())
def test_reconstruct(backend, dtype, data):
    U_np, S_np, V_np, _ = data.draw(factor_triples(orthonormal=False, dtype=dtype), label="factors")
    U, S, V = (backend.asarray(x, dtype) for x in (U_np, S_np, V_np))
    before = snapshot(backend, U, S, V)
    out = lc.reconstruct(U, S, V)
    assert_in_library(out, U, what="reconstruct")
    m, n = U_np.shape[-2], V_np.shape[-2]
    assert tuple(out.shape) == (*U_np.shape[:-2], m, n)
    U64, S64, V64 = (backend.to_numpy(x).astype(np.float64) for x in (U, S, V))
    want = product(U64, S64, V64)
    scale = np.abs(U64) @ np.abs(S64) @ np.swapaxes(np.abs(V64), -1, -2)
    r = U_np.shape[-1]
    np.testing.assert_array_less(
        np.abs(backend.to_numpy(out) - want), 10 * eps(dtype) * r * scale + 1e-300
    )
    for idx in batch_indices(U_np.shape[:-2]):
        assert_close(
            backend.to_numpy(out)[idx],
            ref.reconstruct(U64[idx], S64[idx], V64[idx]),
            atol=float(10 * eps(dtype) * r * np.max(scale[idx])),
        )
    assert_unchanged(backend, before, U, S, V)


# --------------------------------------------------------------------------------------------------
# rediagonalize / rotate_sigma
# --------------------------------------------------------------------------------------------------
@given(data=st.data())
def test_rediagonalize(backend, dtype, data):
    U_np, S_np, V_np, sig_true = data.draw(factor_triples(dtype=dtype), label="factors")
    batch, r = S_np.shape[:-2], S_np.shape[-1]
    m, n = U_np.shape[-2], V_np.shape[-2]
    U, S, V = (backend.asarray(x, dtype) for x in (U_np, S_np, V_np))
    before = snapshot(backend, U, S, V)
    res = lc.rediagonalize(U, S, V)
    assert isinstance(res, lc.Rediagonalized)
    U2, S2, V2, sig, P, Q = res
    assert res.U is U2
    assert res.Sigma is S2
    assert res.V is V2
    assert res.singular_values is sig
    assert res.left is P
    assert res.right is Q
    for name, x in (("U", U2), ("Sigma", S2), ("V", V2), ("singular_values", sig), ("left", P),
                    ("right", Q)):  # fmt: skip
        assert_in_library(x, U, what=f"rediagonalize {name}")
    assert tuple(U2.shape) == (*batch, m, r)
    assert tuple(S2.shape) == (*batch, r, r)
    assert tuple(V2.shape) == (*batch, n, r)
    assert tuple(sig.shape) == (*batch, r)
    assert tuple(P.shape) == (*batch, r, r)
    assert tuple(Q.shape) == (*batch, r, r)
    U2_, S2_, V2_, sig_, P_, Q_ = (backend.to_numpy(x) for x in res)
    U64, S64, V64 = (backend.to_numpy(x).astype(np.float64) for x in (U, S, V))
    smax = float(np.max(sig_true))
    # Sigma' = diag(sig): exactly diagonal, non-increasing, non-negative
    np.testing.assert_array_equal(S2_, sig_[..., :, None] * np.eye(r))
    assert np.all(sig_ >= 0)
    assert np.all(np.diff(sig_, axis=-1) <= 0)
    # left / right orthogonal; the new bases orthonormal
    for name, x in (("left", P_), ("right", Q_), ("U'", U2_), ("V'", V2_)):
        assert orthonormality_error(x) <= _orth_tol(dtype, m, n), f"{name} not orthonormal"
    assert_sign_canonical(P_, err_msg="left")
    # the product is unchanged
    before_prod = product(U64, S64, V64)
    assert_close(product(U2_, S2_, V2_), before_prod, atol=_recon_tol(dtype, smax, m, n))
    assert_close(backend.to_numpy(lc.reconstruct(U2, S2, V2)), before_prod,
                 atol=_recon_tol(dtype, smax, m, n))  # fmt: skip
    # the new bases are the old ones rotated
    assert_close(U2_, U64 @ P_, atol=_recon_tol(dtype, 1.0, m, r))
    assert_close(V2_, V64 @ Q_, atol=_recon_tol(dtype, 1.0, n, r))
    # rotate_sigma maps Sigma to diag(sig)
    rot = lc.rotate_sigma(S, P, Q)
    assert_in_library(rot, S, what="rotate_sigma")
    assert_close(backend.to_numpy(rot), S2_, atol=_recon_tol(dtype, smax, r, r))
    # against the reference
    for idx in batch_indices(batch):
        rU, rS, rV, rsig, rP, rQ = ref.rediagonalize(U64[idx], S64[idx], V64[idx])
        assert_close(sig_[idx], rsig, atol=_recon_tol(dtype, smax, r, r), err_msg=f"sig at {idx}")
        assert_close(S2_[idx], rS, atol=_recon_tol(dtype, smax, r, r), err_msg=f"Sigma' at {idx}")
        vt = vector_tolerances(rsig, r, r, dtype)
        flips = sign_is_ambiguous(rP, vt)
        signs = assert_columns_match(P_[idx], rP, vt, allow_flip=flips, err_msg=f"left at {idx}")
        assert_columns_match(Q_[idx], rQ * signs, vt, err_msg=f"right at {idx}")
        assert_columns_match(U2_[idx], rU * signs, vt * math.sqrt(r), err_msg=f"U' at {idx}")
        assert_columns_match(V2_[idx], rV * signs, vt * math.sqrt(r), err_msg=f"V' at {idx}")
    assert_unchanged(backend, before, U, S, V)


@given(data=st.data())
def test_rediagonalize_batched_equals_looped(backend, dtype, data):
    U_np, S_np, V_np, sig_true = data.draw(factor_triples(dtype=dtype), label="factors")
    batch, r = S_np.shape[:-2], S_np.shape[-1]
    if not batch:
        return
    U, S, V = (backend.asarray(x, dtype) for x in (U_np, S_np, V_np))
    res = [backend.to_numpy(x) for x in lc.rediagonalize(U, S, V)]
    m, n = U_np.shape[-2], V_np.shape[-2]
    for idx in batch_indices(batch):
        one = [
            backend.to_numpy(x)
            for x in lc.rediagonalize(*(backend.asarray(x[idx], dtype) for x in (U_np, S_np, V_np)))
        ]
        vt = vector_tolerances(sig_true[idx], r, r, dtype) * 4
        tol_s = _recon_tol(dtype, np.max(sig_true[idx]), r, r)
        assert_close(res[3][idx], one[3], atol=tol_s, err_msg=f"singular values at {idx}")
        assert_close(res[1][idx], one[1], atol=tol_s, err_msg=f"Sigma' at {idx}")
        flips = sign_is_ambiguous(one[4], vt)
        signs = assert_columns_match(res[4][idx], one[4], vt, allow_flip=flips, err_msg="left")
        assert_columns_match(res[5][idx], one[5] * signs, vt, err_msg="right")
        assert_columns_match(res[0][idx], one[0] * signs, vt * math.sqrt(r), err_msg="U'")
        assert_columns_match(res[2][idx], one[2] * signs, vt * math.sqrt(r), err_msg="V'")
        assert one[0].shape == (m, r)
        assert one[2].shape == (n, r)


@given(data=st.data())
def test_rotate_sigma(backend, dtype, data):
    batch = data.draw(batch_shapes, label="batch")
    r = data.draw(st.integers(1, 12), label="r")
    rng = np.random.default_rng(data.draw(seeds, label="seed"))
    x_np = rng.standard_normal((*batch, r, r))
    L_np = np.stack([random_orthogonal(rng, r, r) for _ in range(int(np.prod(batch)))]).reshape(
        (*batch, r, r)
    )
    R_np = rng.standard_normal((*batch, r, r))  # any matrix: rotate_sigma is just left^T x right
    x, L, R = (backend.asarray(y, dtype) for y in (x_np, L_np, R_np))
    before = snapshot(backend, x, L, R)
    out = lc.rotate_sigma(x, L, R)
    assert_in_library(out, x, what="rotate_sigma")
    x64, L64, R64 = (backend.to_numpy(y).astype(np.float64) for y in (x, L, R))
    want = np.swapaxes(L64, -1, -2) @ x64 @ R64
    scale = np.swapaxes(np.abs(L64), -1, -2) @ np.abs(x64) @ np.abs(R64)
    np.testing.assert_array_less(
        np.abs(backend.to_numpy(out) - want), 10 * r * eps(dtype) * scale + 1e-300
    )
    for idx in batch_indices(batch):
        assert_close(
            backend.to_numpy(out)[idx],
            ref.rotate_sigma(x64[idx], L64[idx], R64[idx]),
            atol=float(10 * r * eps(dtype) * np.max(scale[idx])),
        )
    assert_unchanged(backend, before, x, L, R)


# --------------------------------------------------------------------------------------------------
# truncate / update_rank
# --------------------------------------------------------------------------------------------------
@given(data=st.data())
def test_truncate(backend, dtype, data):
    U_np, S_np, V_np, _ = data.draw(factor_triples(orthonormal=False, dtype=dtype), label="factors")
    r = S_np.shape[-1]
    q = data.draw(st.integers(1, r), label="rank")
    U, S, V = (backend.asarray(x, dtype) for x in (U_np, S_np, V_np))
    before = snapshot(backend, U, S, V)
    f = lc.truncate(U, S, V, q)
    assert isinstance(f, lc.LowRankFactors)
    for name, x in zip(("U", "Sigma", "V"), f, strict=True):
        assert_in_library(x, U, what=f"truncate {name}")
    U64, S64, V64 = (backend.to_numpy(x) for x in (U, S, V))
    np.testing.assert_array_equal(backend.to_numpy(f.U), U64[..., :, :q])
    np.testing.assert_array_equal(backend.to_numpy(f.Sigma), S64[..., :q, :q])
    np.testing.assert_array_equal(backend.to_numpy(f.V), V64[..., :, :q])
    for idx in batch_indices(S_np.shape[:-2]):
        rU, rS, rV = ref.truncate(U64[idx], S64[idx], V64[idx], q)
        np.testing.assert_array_equal(backend.to_numpy(f.U)[idx], rU)
        np.testing.assert_array_equal(backend.to_numpy(f.Sigma)[idx], rS)
        np.testing.assert_array_equal(backend.to_numpy(f.V)[idx], rV)
    assert_unchanged(backend, before, U, S, V)


@given(data=st.data())
def test_update_rank_full_rank_changes_nothing(backend, dtype, data):
    U_np, S_np, V_np, sig_true = data.draw(factor_triples(dtype=dtype), label="factors")
    r = S_np.shape[-1]
    m, n = U_np.shape[-2], V_np.shape[-2]
    U, S, V = (backend.asarray(x, dtype) for x in (U_np, S_np, V_np))
    before = snapshot(backend, U, S, V)
    upd = lc.update_rank(U, S, V, lc.FixedRank(rank=r))
    assert isinstance(upd, lc.RankUpdate)
    assert isinstance(upd.factors, lc.LowRankFactors)
    assert isinstance(upd.rediagonalized, lc.Rediagonalized)
    assert int(upd.rank) == r
    for name, x in zip(("U", "Sigma", "V"), upd.factors, strict=True):
        assert_in_library(x, U, what=f"update_rank {name}")
        assert tuple(x.shape)[-1] == r
    U64, S64, V64 = (backend.to_numpy(x).astype(np.float64) for x in (U, S, V))
    f = [backend.to_numpy(x) for x in upd.factors]
    smax = float(np.max(sig_true))
    assert_close(product(*f), product(U64, S64, V64), atol=_recon_tol(dtype, smax, m, n))
    # the factors are the rediagonalized ones
    rd = [backend.to_numpy(x) for x in upd.rediagonalized]
    np.testing.assert_array_equal(f[0], rd[0])
    np.testing.assert_array_equal(f[1], rd[1])
    np.testing.assert_array_equal(f[2], rd[2])
    assert_unchanged(backend, before, U, S, V)


@given(data=st.data())
def test_update_rank_keeps_top_singular_values(backend, dtype, data):
    U_np, S_np, V_np, sig_true = data.draw(factor_triples(dtype=dtype), label="factors")
    batch, r = S_np.shape[:-2], S_np.shape[-1]
    m, n = U_np.shape[-2], V_np.shape[-2]
    q = data.draw(st.integers(1, r), label="rank")
    U, S, V = (backend.asarray(x, dtype) for x in (U_np, S_np, V_np))
    upd = lc.update_rank(U, S, V, lc.FixedRank(rank=q))
    assert int(upd.rank) == q
    Uq, Sq, Vq = (backend.to_numpy(x) for x in upd.factors)
    assert Uq.shape == (*batch, m, q)
    assert Sq.shape == (*batch, q, q)
    assert Vq.shape == (*batch, n, q)
    sig = backend.to_numpy(upd.rediagonalized.singular_values)
    np.testing.assert_array_equal(Sq, sig[..., :q, None] * np.eye(q))
    smax = float(np.max(sig_true))
    assert_close(sig, sig_true, atol=_recon_tol(dtype, smax, r, r))
    # Eckart-Young on the product
    full = product(*(backend.to_numpy(x).astype(np.float64) for x in (U, S, V)))
    err = np.linalg.norm(product(Uq, Sq, Vq) - full, axis=(-2, -1))
    want = np.sqrt(np.sum(sig_true[..., q:] ** 2, axis=-1))
    assert_close(err, want, atol=_recon_tol(dtype, smax, m, n) * math.sqrt(r))
    for name, x in (("U", Uq), ("V", Vq)):
        assert orthonormality_error(x) <= _orth_tol(dtype, m, n), name


@given(data=st.data())
def test_update_rank_batch_uses_largest_rank(backend, dtype, data):
    U_np, S_np, V_np, _sig_true = data.draw(factor_triples(dtype=dtype, gap=1.5), label="factors")
    batch, _r = S_np.shape[:-2], S_np.shape[-1]
    m, n = U_np.shape[-2], V_np.shape[-2]
    fraction = data.draw(st.floats(0.0, 1.0), label="fraction")
    rule = lc.SigmaCutoff(fraction=fraction)
    U, S, V = (backend.asarray(x, dtype) for x in (U_np, S_np, V_np))
    upd = lc.update_rank(U, S, V, rule)
    sig = upd.rediagonalized.singular_values
    per = rule(sig, shape=(m, n))
    want = int(np.max(per)) if batch else per
    assert int(upd.rank) == want
    assert tuple(upd.factors.U.shape) == (*batch, m, want)
    assert tuple(upd.factors.Sigma.shape) == (*batch, want, want)
    assert tuple(upd.factors.V.shape) == (*batch, n, want)


@given(data=st.data())
def test_update_rank_shape_defaults_to_full_matrix(backend, data):
    """FixedRank(fraction=f) depends on min(m, n): update_rank must pass (m, n) of U and V by default."""
    U_np, S_np, V_np, _ = data.draw(factor_triples(), label="factors")
    r = S_np.shape[-1]
    m, n = U_np.shape[-2], V_np.shape[-2]
    f = data.draw(st.sampled_from([0.1, 0.25, 0.5, 0.8]), label="fraction")
    U, S, V = (backend.asarray(x, "float64") for x in (U_np, S_np, V_np))
    rule = lc.FixedRank(fraction=f)
    upd = lc.update_rank(U, S, V, rule)
    assert int(upd.rank) == min(r, max(1, math.floor(f * min(m, n) + 0.5)))
    upd = lc.update_rank(U, S, V, rule, shape=(r, r))
    assert int(upd.rank) == min(r, max(1, math.floor(f * r + 0.5)))


def test_update_rank_rank_type(backend):
    rng = np.random.default_rng(0)
    U = backend.asarray(random_orthogonal(rng, 6, 4), "float64")
    V = backend.asarray(random_orthogonal(rng, 5, 4), "float64")
    S = backend.asarray(np.diag([4.0, 3.0, 0.01, 0.001]), "float64")
    upd = lc.update_rank(U, S, V, lc.SigmaCutoff(fraction=0.1))
    assert_python_int(upd.rank)
    assert upd.rank == 2


@pytest.mark.parametrize("rank", [0, -1, True, 2.0, 4, 7])
def test_truncate_bad_rank(backend, rank):
    rng = np.random.default_rng(1)
    U = backend.asarray(rng.standard_normal((5, 3)), "float64")
    S = backend.asarray(rng.standard_normal((3, 3)), "float64")
    V = backend.asarray(rng.standard_normal((4, 3)), "float64")
    before = snapshot(backend, U, S, V)
    with pytest.raises(lc.RankError, match=r"(?i)rank"):
        lc.truncate(U, S, V, rank)
    assert_unchanged(backend, before, U, S, V)


# --------------------------------------------------------------------------------------------------
# issue 9: truncate checks finiteness by default; update_rank validates shape and the rule's answer
# --------------------------------------------------------------------------------------------------
def _factors(backend, m=6, n=5):
    a = np.random.default_rng(1).standard_normal((m, n))
    return lc.factorize(backend.asarray(a))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_truncate_refuses_non_finite_factors_by_default(backend, bad):
    U, S, V = (backend.to_numpy(x) for x in _factors(backend))
    S[0, 0] = bad
    args = [backend.asarray(U), backend.asarray(S), backend.asarray(V)]
    with pytest.raises(lc.NonFiniteError, match="`Sigma`"):
        lc.truncate(*args, 2)
    out = lc.truncate(*args, 2, check_finite=False)
    assert tuple(out.Sigma.shape) == (2, 2)


@pytest.mark.parametrize(
    "answer", [None, "2", float("nan"), 2.5, 2.0, True, np.array([np.nan]), np.array([1.5]),
               np.array([], dtype=np.int64), 0, 99, np.array([0, 2])],
)  # fmt: skip
def test_update_rank_refuses_bad_rule_answers(backend, answer):
    f = _factors(backend)
    before = snapshot(backend, *f)

    def rule(s, *, shape=None):
        return answer

    with pytest.raises(lc.RankError, match="rank returned by rule"):
        lc.update_rank(*f, rule)
    assert_unchanged(backend, before, *f)


def test_update_rank_accepts_numpy_integer_answers(backend):
    f = _factors(backend)
    out = lc.update_rank(*f, lambda s, *, shape=None: np.int64(3))
    assert out.rank == 3 and type(out.rank) is int


@pytest.mark.parametrize(
    ("shape", "error"),
    [((8.5, 10), lc.ParameterTypeError), ((6,), lc.ShapeError), ((0, 5), lc.ShapeError),
     ("ab", lc.ParameterTypeError), ((6, 5, 1), lc.ShapeError)],
)  # fmt: skip
def test_update_rank_refuses_bad_shapes(backend, shape, error):
    f = _factors(backend)
    with pytest.raises(error, match="`shape"):
        lc.update_rank(*f, lc.Energy(), shape=shape)


def test_update_rank_refuses_a_non_callable_rule(backend):
    with pytest.raises(lc.ParameterTypeError, match="`rule`"):
        lc.update_rank(*_factors(backend), 0.9)


@pytest.mark.parametrize("shape", [(0, 4, 4), (2, 0, 4, 4)])
def test_empty_stacks_are_refused(backend, shape):
    a = backend.asarray(np.ones(shape))
    for fn in (lc.factorize, lc.svd, lc.qr, lambda x: lc.rediagonalize(x, x, x)):
        with pytest.raises(lc.ShapeError, match="every dimension >= 1"):
            fn(a)


@pytest.mark.parametrize("flag", ["yes", 1, None])
def test_check_finite_must_be_a_bool(backend, flag):
    a = backend.asarray(np.ones((3, 3)))
    with pytest.raises(lc.ParameterTypeError, match="`check_finite`"):
        lc.factorize(a, check_finite=flag)
