"""Fitting a :class:`~lowrank_core.dldr.Subspace`: exact (Gram) and randomized PCA, column chunk by column chunk."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .._array import Array, Namespace, check_floating, compute_dtype, namespace
from .._validate import check_bool, check_choice, check_int, check_seed, describe
from ..errors import NonFiniteError, ParameterTypeError, RankError, ShapeError
from .chunked import (
    _METHODS,
    _OVERFLOW,
    PCAMethod,
    ShardReduce,
    Slabs,
    _check_d,
    _check_vector,
    _chunks,
    _gram64,
    _host,
    _sumsq64,
    _to_xp,
)
from .gram import _centre_host, _check_gram, _check_snapshot_matrix, _top_eigen
from .subspace import Subspace

__all__ = ["fit_subspace", "subspace_from_gram"]


def _gram_from_slabs(xp: Namespace, slabs: Slabs) -> tuple[np.ndarray, Array]:
    """``(G, y_sum)``: the float64 Gram of the stored vectors (float64 products per chunk), and
    the column sums ``sum_i y_i`` (pieces joined, in the stored dtype)."""
    G = None
    sums = []
    for _j0, _j1, S in slabs():
        part = _gram64(xp, S)
        G = part if G is None else G + part
        sums.append(xp.sum(S, axis=0))
    assert G is not None
    return _host(G).astype(np.float64), xp.concat(sums, axis=0)


def _basis(xp: Namespace, A: np.ndarray, slabs: Slabs, like: Array, orthonormalize: bool) -> Array:
    """``P = A Y`` (``A`` ``(d, t)`` on the host, ``Y`` the stored vectors), column chunk by column
    chunk, optionally re-orthonormalized (Loewdin, ``P P^T`` summed over chunks in float64)."""
    Ax = _to_xp(xp, A, like)
    pieces = [Ax @ S for _j0, _j1, S in slabs()]
    return _finish_basis(xp, pieces, orthonormalize)


def _finish_basis(
    xp: Namespace, pieces: list[Array], orthonormalize: bool, reduce: ShardReduce | None = None
) -> Array:
    """Join the column pieces of ``P``, Loewdin-orthonormalized first if asked (``reduce`` sums the
    partial ``P P^T`` of sharded rows, see :func:`subspace_from_gram`)."""
    if orthonormalize:
        M = None
        for p in pieces:
            part = _gram64(xp, p)
            M = part if M is None else M + part
        assert M is not None
        Mh = _host(M).astype(np.float64)
        if reduce is not None:
            Mh = np.asarray(reduce(Mh), dtype=np.float64)
        Mh = 0.5 * (Mh + Mh.T)
        w, U = np.linalg.eigh(Mh)
        if not float(w.min()) > 0:
            raise RankError("the computed basis is rank-deficient; use a smaller `d`")
        R = _to_xp(xp, (U / np.sqrt(w)) @ U.T, pieces[0])
        for k in range(len(pieces)):  # replace piece by piece: never two full copies of pieces
            pieces[k] = R @ pieces[k]
    P = xp.concat(pieces, axis=1) if len(pieces) > 1 else pieces[0]
    pieces.clear()
    return P


def _check_no_overflow(G: np.ndarray, what: str = "the Gram matrix of the snapshots") -> None:
    if not np.all(np.isfinite(G)):
        raise NonFiniteError(_OVERFLOW.format(what=what, dtype="float64"))


def _variances(xp: Namespace, lam: np.ndarray, t: int, like: Array) -> Array:
    """The explained variances ``lam / (t - 1)`` in ``like``'s dtype (NonFiniteError on overflow)."""
    ev = lam / max(t - 1, 1)
    if float(ev.max()) > float(xp.finfo(like.dtype).max):
        raise NonFiniteError(_OVERFLOW.format(what="the explained variance", dtype=like.dtype))
    return _to_xp(xp, ev, like)


def _fit_exact(
    xp: Namespace,
    G: np.ndarray,
    d: int,
    slabs: Slabs,
    centre: Array,
    orthonormalize: bool,
) -> Subspace:
    """Exact PCA from the float64 Gram ``G`` of the stored vectors and their column slabs."""
    _check_no_overflow(G)
    t = G.shape[0]
    d = _check_d(d, t)
    Gc = _centre_host(G)
    eps = float(xp.finfo(centre.dtype).eps)
    lam, V = _top_eigen(Gc, d, trace=float(np.trace(G)), eps=eps)
    P = _basis(xp, (V / np.sqrt(lam)).T, slabs, centre, orthonormalize)
    total = float(np.trace(Gc)) / max(t - 1, 1)
    ev = _variances(xp, lam, t, centre)
    return Subspace(centre, P, ev, total, t)


def subspace_from_gram(
    gram: Array,
    d: int,
    rows: Callable[[], Iterator[tuple[int, Array]]],
    *,
    centre: Array,
    orthonormalize: bool = True,
    reduce: ShardReduce | None = None,
) -> Subspace:
    """Exact PCA from the (uncentred) Gram matrix of ``t`` stored vectors ``y_i``.

    ``rows()`` yields ``(start, block)`` with ``block`` the ``(b, D)`` vectors ``y_start ..``, in
    order, covering all ``t``; ``centre`` is the mean snapshot. If the vectors are shifted snapshots
    ``y_i = w_i - shift`` the Gram is theirs (centring is shift invariant). ``P = L^{-1/2} V^T Y`` for
    the top-``d`` eigenpairs ``(L, V)`` of the centred Gram ``J G J`` (``V^T J = V^T`` as ``V`` is
    orthogonal to ``1``). Directions whose eigenvalue is not above the rounding-error level of the
    stored data (``4 t eps^2 trace(G)`` for the stored dtype's ``eps``, at least
    ``4 max(t, 256) eps64 trace(G)``) count as zero variance: ``RankError`` if ``d`` exceeds the rest.

    Sharded vectors: when every process holds one block of coordinates of the vectors (its shard),
    ``rows`` and ``centre`` are that shard's, ``gram`` is the *sum* of the shards' partial Grams (the
    same matrix on every process) and ``reduce`` sums a float64 host array over the shards (e.g. an
    all-reduce). Each process then gets the columns of ``P`` and the entries of the centre of its own
    shard, and the global explained and total variance; the only other reductions are the total
    length ``D`` (reported in errors) and the ``d x d`` matrix ``P P^T`` of the orthonormalization.

    (:class:`SnapshotStore` and :func:`fit_subspace` take a leaner route: the basis column chunk by
    column chunk, ``2 d D`` peak; this row-block form needs ``3 d D`` while it accumulates.)
    """
    xp = namespace(centre=centre)
    _check_vector(xp, centre, "centre")
    if not callable(rows):
        raise ParameterTypeError(
            f"`rows` must be a callable returning an iterator of (start, block), got {describe(rows)}"
        )
    orthonormalize = check_bool("orthonormalize", orthonormalize)
    if reduce is not None and not callable(reduce):
        raise ParameterTypeError(f"`reduce` must be callable or None, got {describe(reduce)}")
    G = _check_gram(gram)
    t = G.shape[0]
    d = _check_d(d, t)
    D = int(centre.shape[0])
    dim = D if reduce is None else round(float(np.asarray(reduce(np.array([float(D)])))[0]))
    dtype = compute_dtype(xp, centre.dtype)
    centre = centre if centre.dtype == dtype else xp.astype(centre, dtype)
    Gc = _centre_host(G)
    lam, V = _top_eigen(
        Gc,
        d,
        trace=float(np.trace(G)),
        eps=float(xp.finfo(dtype).eps),
        what=f"centred Gram matrix (t = {t}, D = {dim})",
    )
    A_x = _to_xp(xp, (V / np.sqrt(lam)).T, centre)  # (d, t)
    P = None
    expect = 0
    for item in rows():
        if not (isinstance(item, tuple) and len(item) == 2):
            raise ParameterTypeError(
                f"`rows()` must yield (start, block) pairs, got {describe(item)}"
            )
        start, block = item
        start = check_int("start (from rows())", start, min=0)
        namespace(block=block, centre=centre)
        if block.ndim != 2 or int(block.shape[1]) != D or int(block.shape[0]) == 0:
            raise ShapeError(
                f"`rows()` must yield non-empty (b, {D}) blocks (D of `centre`), got "
                f"{tuple(block.shape)}"
            )
        check_floating(xp, block, "block (from rows())")
        b = int(block.shape[0])
        if start != expect or start + b > t:
            raise ShapeError(
                f"`rows()` must yield the {t} vectors of the Gram matrix in order: a block of {b} "
                f"rows at {start}, expected one at {expect}"
            )
        block = block if block.dtype == dtype else xp.astype(block, dtype)
        part = A_x[:, start : start + b] @ block
        P = part if P is None else P + part
        expect = start + b
    if P is None or expect != t:
        raise ShapeError(f"`rows()` yielded {expect} vectors, the Gram matrix has {t}")
    P = _finish_basis(xp, [P], orthonormalize, reduce)
    total = float(np.trace(Gc)) / max(t - 1, 1)
    ev = _variances(xp, lam, t, centre)
    return Subspace(centre, P, ev, total, t)


def _check_fit_options(
    method: object, oversample: object, power_iterations: object, seed: object, orth: object
) -> tuple[Any, int, int, int | None, bool]:
    return (
        check_choice("method", method, _METHODS),
        check_int("oversample", oversample, min=0),
        check_int("power_iterations", power_iterations, min=0),
        check_seed("seed", seed),
        check_bool("orthonormalize", orth),
    )


def fit_subspace(
    snapshots: Array,
    d: int,
    *,
    method: PCAMethod = "exact",
    oversample: int = 10,
    power_iterations: int = 2,
    seed: int | None = 0,
    orthonormalize: bool = True,
    check_finite: bool = True,
) -> Subspace:
    """The top-``d`` PCA subspace of a ``(t, D)`` snapshot matrix (rows are snapshots).

    ``method="exact"``: eigendecomposition of the centred ``t x t`` Gram matrix (cost ``t^2 D``; the
    same route as :meth:`SnapshotStore.fit`: the Gram of the snapshots shifted by the first, in float64,
    column chunk by column chunk, then the basis chunk by chunk).
    ``method="randomized"``: a randomized range finder in the ``t``-dimensional snapshot space
    (``k = d + oversample`` random mixtures of the snapshots, ``power_iterations`` subspace
    iterations; cost about ``(2 q + 2) k t D``), for many snapshots (``t`` well above ``k``).
    The input is never modified; the result is in the snapshots' library, device and dtype (float16 /
    bfloat16 are computed in float32).
    """
    xp = namespace(snapshots=snapshots)
    _check_snapshot_matrix(xp, snapshots, check_bool("check_finite", check_finite))
    method, oversample, power_iterations, seed, orthonormalize = _check_fit_options(
        method, oversample, power_iterations, seed, orthonormalize
    )
    target = compute_dtype(xp, snapshots.dtype)
    X = snapshots if snapshots.dtype == target else xp.astype(snapshots, target)
    t, D = int(X.shape[0]), int(X.shape[1])
    d = _check_d(d, t)
    x0 = X[0, :]

    def slabs() -> Iterator[tuple[int, int, Array]]:
        for j0, j1 in _chunks(D):
            yield j0, j1, X[:, j0:j1] - x0[j0:j1]

    if method == "exact":
        G, ysum = _gram_from_slabs(xp, slabs)
        centre = x0 + ysum / t
        return _fit_exact(xp, G, d, slabs, centre, orthonormalize)
    ysum = xp.concat([xp.sum(S, axis=0) for _a, _b, S in slabs()], axis=0)
    centre = x0 + ysum / t
    return _randomized(xp, slabs, t, centre, d, oversample, power_iterations, seed, orthonormalize)


def _randomized(
    xp: Namespace,
    slabs: Slabs,
    t: int,
    centre: Array,
    d: int,
    oversample: int,
    power_iterations: int,
    seed: int | None,
    orthonormalize: bool,
) -> Subspace:
    """Randomized PCA of the centred stored vectors: every large product is column-chunked."""
    d = _check_d(d, t)
    k = min(d + oversample, t)
    J = np.eye(t) - 1.0 / t  # centring in snapshot space, (t, t)
    rng = np.random.default_rng(seed)
    Q = np.linalg.qr(J @ rng.standard_normal((t, k)))[0]  # (t, k)

    def mix(Qh: np.ndarray) -> list[Array]:
        """Column pieces of ``Qh^T J Y`` (k, D): mixtures of the centred vectors."""
        A = _to_xp(xp, (J @ Qh).T, centre)
        return [A @ S for _j0, _j1, S in slabs()]

    def apply_t(B: list[Array]) -> np.ndarray:
        """``J Y B^T`` (t, k) on the host (chunk products summed in float64)."""
        out = None
        for (_j0, _j1, S), Bj in zip(slabs(), B, strict=True):
            part = _gram64(xp, S, Bj)
            out = part if out is None else out + part
        out_h = _host(out).astype(np.float64)
        _check_no_overflow(out_h, "the sketch of the snapshots")
        return J @ out_h

    for _ in range(power_iterations):
        Q = np.linalg.qr(apply_t(mix(Q)))[0]
    B = mix(Q)  # (k, D) in pieces, B^T B ~ Xc^T Xc restricted to the sketched range
    Gb = None
    trace = None  # of the uncentred Gram (the scale of the stored data's rounding)
    for (_j0, _j1, S), Bj in zip(slabs(), B, strict=True):
        part = _gram64(xp, Bj)
        Gb = part if Gb is None else Gb + part
        sq = _sumsq64(xp, S)
        trace = sq if trace is None else trace + sq
    tr = float(_host(trace))
    Gbh = _host(Gb).astype(np.float64)
    _check_no_overflow(np.append(Gbh.ravel(), tr))
    eps = float(xp.finfo(centre.dtype).eps)
    lam, W = _top_eigen(Gbh, d, trace=tr, eps=eps, what="sketch (k = d + oversample mixtures)")
    C = _to_xp(xp, (W / np.sqrt(lam)).T, centre)
    for j in range(len(B)):  # replace piece by piece
        B[j] = C @ B[j]
    P = _finish_basis(xp, B, orthonormalize)
    # total variance of the centred vectors, chunk by chunk in float64
    tv = None
    for _j0, _j1, S in slabs():
        part = _sumsq64(xp, S, centred=True)
        tv = part if tv is None else tv + part
    total = float(_host(tv)) / max(t - 1, 1)
    ev = _variances(xp, lam, t, centre)
    return Subspace(centre, P, ev, total, t)
