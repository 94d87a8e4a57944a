"""DLDR: low-dimensional trajectory subspaces and the P-SGD / P-BFGS math (Li et al., TPAMI 2022).

Training snapshots ``w_1 .. w_t`` (flattened trainable parameters, length ``D``) are collected one at a
time in a :class:`SnapshotStore` (in memory, or memory-mapped on disk). The store keeps the ``t x t``
Gram matrix up to date as each snapshot arrives (the new row is the dot products of the new snapshot
with the stored ones), so fitting the subspace afterwards needs one ``t x t`` eigendecomposition and
one pass over the snapshots. No ``D x D`` (nor ``t x D`` centred) matrix is ever formed: the peak
memory of a fit is the snapshot storage, plus ``O(t^2 + D)`` scratch, plus the ``d x D`` result.

The :class:`Subspace` (centre, orthonormal basis rows ``P``, explained variance) maps weights to
coordinates ``c = P (w - origin)`` and back ``w = origin + P^T c``. :func:`bfgs_update`,
:func:`curvature_ok`, :func:`armijo_condition` and :func:`armijo_backtracking` are the P-BFGS math as
pure functions of (small, ``d``-dimensional) arrays.

Numerics (improvements on the published code):

* the Gram matrix is accumulated of *shifted* snapshots ``w_i - w_1`` (``shift=True``, the default):
  centring is shift invariant, and trajectory snapshots share a large common part, so the uncentred
  Gram of raw weights would lose the small differences to cancellation, notably in float32;
* the small eigenproblem is solved in float64 on the host (NumPy) whatever the library: it is
  deterministic and identical on every device and every DDP rank;
* the basis rows are re-orthonormalized (symmetric, Loewdin: ``P <- (P P^T)^{-1/2} P``, which keeps the
  directions closest to the computed ones) so ``P P^T = I`` holds to working precision even in float32;
* the BFGS curvature guard is scale invariant: a pair is skipped when ``s.y <= eps |s| |y|``.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import array_api_compat
import numpy as np

from ._array import (
    Array,
    Namespace,
    check_finite,
    check_floating,
    check_rank,
    compute_dtype,
    namespace,
)
from .backend import get_backend
from .errors import ArrayTypeError, NonFiniteError, RankError, ShapeError

__all__ = [
    "LineSearchResult",
    "SnapshotStore",
    "Subspace",
    "armijo_backtracking",
    "armijo_condition",
    "bfgs_direction",
    "bfgs_update",
    "centred_gram",
    "curvature_ok",
    "fit_subspace",
    "gram_matrix",
    "subspace_from_gram",
]

PCAMethod = Literal["exact", "randomized"]
#: Sums a float64 host array over the shards of sharded vectors (e.g. an all-reduce); the identity
#: when nothing is sharded. See :func:`subspace_from_gram`.
ShardReduce = Callable[[np.ndarray], np.ndarray]


# --------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------
def _check_vector(xp: Namespace, x: Array, name: str, *, finite: bool = True) -> None:
    if x.ndim != 1:
        raise ShapeError(f"`{name}` must be a 1-D vector, got shape {tuple(x.shape)}")
    check_floating(xp, x, name)
    if x.shape[0] == 0:
        raise ShapeError(f"`{name}` must not be empty")
    if finite:
        check_finite(xp, x, name)


def _host(x: Array) -> np.ndarray:
    return np.asarray(get_backend(x).to_numpy(x))


def _to_xp(xp: Namespace, a: np.ndarray, like: Array) -> Array:
    """``a`` (NumPy) as an array of ``like``'s library, device and dtype."""
    out = xp.asarray(np.ascontiguousarray(a), device=array_api_compat.device(like))
    return xp.astype(out, like.dtype) if out.dtype != like.dtype else out


# --------------------------------------------------------------------------------------------------
# Gram matrices
# --------------------------------------------------------------------------------------------------
def gram_matrix(snapshots: Array, *, check_finite: bool = True) -> Array:
    """``X X^T`` of a ``(t, D)`` snapshot matrix (one snapshot per row): a ``(t, t)`` array."""
    xp = namespace(snapshots=snapshots)
    _check_snapshot_matrix(xp, snapshots, check_finite)
    X = snapshots
    return X @ xp.matrix_transpose(X)


def centred_gram(gram: Array) -> Array:
    """``J G J`` with ``J = I - 1 1^T / t``: the Gram matrix of the mean-centred snapshots."""
    xp = namespace(gram=gram)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] == 0:
        raise ShapeError(
            f"`gram` must be a non-empty square (t, t) matrix, got {tuple(gram.shape)}"
        )
    check_floating(xp, gram, "gram")
    row = xp.mean(gram, axis=1, keepdims=True)
    col = xp.mean(gram, axis=0, keepdims=True)
    return gram - row - col + xp.mean(gram)


def _check_snapshot_matrix(xp: Namespace, X: Array, finite: bool) -> None:
    if X.ndim != 2:
        raise ShapeError(
            f"`snapshots` must be a (t, D) matrix, one flattened snapshot per row, got shape "
            f"{tuple(X.shape)}"
        )
    check_floating(xp, X, "snapshots")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ShapeError(f"`snapshots` must have t, D >= 1, got shape {tuple(X.shape)}")
    if finite:
        check_finite(xp, X, "snapshots")


def _top_eigen(gc: np.ndarray, d: int, eps: float, scale_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``d`` eigenpairs (descending) of a centred float64 Gram; RankError if rank-deficient."""
    t = gc.shape[0]
    gc = 0.5 * (gc + gc.T)
    lam, V = np.linalg.eigh(gc)
    lam, V = lam[::-1], V[:, ::-1]
    top = float(lam[0]) if t else 0.0
    tol = max(t, math.sqrt(scale_dim)) * eps * max(top, 0.0)
    rank = int(np.sum(lam > tol)) if top > 0 else 0
    if d > rank:
        raise RankError(
            f"`d` = {d} exceeds the number of directions with non-zero variance among the snapshots "
            f"({rank}); take more (or more diverse) snapshots or a smaller `d`"
        )
    V = V[:, :d]
    # sign-canonical: the largest-|.| entry of each eigenvector positive
    pivot = V[np.argmax(np.abs(V), axis=0), np.arange(d)]
    V = V * np.where(pivot < 0, -1.0, 1.0)
    return lam[:d].copy(), V


# --------------------------------------------------------------------------------------------------
# the subspace
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Subspace:
    """An affine subspace ``centre + span(P^T)`` of the weight space.

    ``centre`` ``(D,)``: the mean of the snapshots; ``basis`` ``P`` ``(d, D)``: orthonormal rows, the
    principal directions by decreasing variance; ``explained_variance`` ``(d,)``: the variance of the
    snapshots along each row (sample variance, divided by ``t - 1`` as scikit-learn's PCA does);
    ``total_variance``: the sum over all directions (a Python float), so
    ``explained_variance / total_variance`` is the explained-variance ratio.
    """

    centre: Array
    basis: Array
    explained_variance: Array
    total_variance: float
    num_snapshots: int

    @property
    def d(self) -> int:
        """Dimension of the subspace (number of basis rows)."""
        return int(self.basis.shape[0])

    @property
    def dim(self) -> int:
        """Dimension ``D`` of the ambient (weight) space."""
        return int(self.basis.shape[1])

    @property
    def explained_variance_ratio(self) -> Array:
        """``explained_variance / total_variance``."""
        total = self.total_variance if self.total_variance > 0 else 1.0
        return self.explained_variance / total

    def _xp(self, name: str, x: Array) -> Namespace:
        return namespace(**{name: x, "basis": self.basis})

    def project(self, w: Array, *, origin: Array | None = None) -> Array:
        """Coordinates ``c = P (w - origin)`` (``origin`` defaults to the centre); ``w`` is ``(D,)``
        or a stack ``(n, D)``."""
        xp = self._xp("w", w)
        self._check_ambient(xp, w, "w")
        o = self.centre if origin is None else origin
        if origin is not None:
            self._xp("origin", origin)
            self._check_ambient(xp, origin, "origin", stack=False)
        return self.project_direction(w - o)

    def project_direction(self, v: Array) -> Array:
        """``P v`` (no centre): coordinates of a direction, e.g. the gradient wrt ``c`` from ``g``."""
        xp = self._xp("v", v)
        self._check_ambient(xp, v, "v")
        P = self.basis if self.basis.dtype == v.dtype else xp.astype(self.basis, v.dtype)
        return v @ xp.matrix_transpose(P)

    def lift(self, c: Array, *, origin: Array | None = None) -> Array:
        """Weights ``origin + P^T c`` (``origin`` defaults to the centre); ``c`` is ``(d,)`` or ``(n, d)``."""
        o = self.centre if origin is None else origin
        if origin is not None:
            xp = self._xp("origin", origin)
            self._check_ambient(xp, origin, "origin", stack=False)
        return o + self.lift_direction(c)

    def lift_direction(self, c: Array) -> Array:
        """``P^T c`` (no centre): the weight-space direction of a coordinate step."""
        xp = self._xp("c", c)
        if c.ndim not in (1, 2) or c.shape[-1] != self.d:
            raise ShapeError(
                f"`c` must have shape ({self.d},) or (n, {self.d}), got {tuple(c.shape)}"
            )
        check_floating(xp, c, "c")
        P = self.basis if self.basis.dtype == c.dtype else xp.astype(self.basis, c.dtype)
        return c @ P

    def _check_ambient(self, xp: Namespace, x: Array, name: str, *, stack: bool = True) -> None:
        ok_ndim = (1, 2) if stack else (1,)
        if x.ndim not in ok_ndim or x.shape[-1] != self.dim:
            want = f"({self.dim},)" + (f" or (n, {self.dim})" if stack else "")
            raise ShapeError(f"`{name}` must have shape {want}, got {tuple(x.shape)}")
        check_floating(xp, x, name)


def _orthonormalize_rows(xp: Namespace, P: Array, reduce: ShardReduce | None = None) -> Array:
    """Symmetric (Loewdin) orthonormalization ``(P P^T)^{-1/2} P``; the d x d part on the host.

    ``reduce`` (sharded rows, see :func:`subspace_from_gram`) sums the partial ``P P^T`` of the shards.
    """
    M = _host(P @ xp.matrix_transpose(P)).astype(np.float64)
    if reduce is not None:
        M = np.asarray(reduce(M), dtype=np.float64)
    M = 0.5 * (M + M.T)
    w, U = np.linalg.eigh(M)
    if float(w.min()) <= 0:
        raise RankError("the computed basis is rank-deficient; use a smaller `d`")
    inv_sqrt = (U / np.sqrt(w)) @ U.T
    return _to_xp(xp, inv_sqrt, P) @ P


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

    ``rows()`` yields ``(start, block)`` with ``block`` the ``(b, D)`` vectors ``y_start ..``;
    ``centre`` is the mean snapshot. If the vectors are shifted snapshots ``y_i = w_i - shift`` the
    Gram is theirs (centring is shift invariant). ``P = L^{-1/2} V^T Y`` for the top-``d`` eigenpairs
    ``(L, V)`` of the centred Gram ``J G J`` (``V^T J = V^T`` as ``V`` is orthogonal to ``1``).

    Sharded vectors: when every process holds one block of coordinates of the vectors (its shard),
    ``rows`` and ``centre`` are that shard's, ``gram`` is the *sum* of the shards' partial Grams (the
    same matrix on every process) and ``reduce`` sums a float64 host array over the shards (e.g. an
    all-reduce). Each process then gets the columns of ``P`` and the entries of the centre of its own
    shard, and the global explained and total variance; the only other reductions are the total
    length ``D`` (for the rank tolerance) and the ``d x d`` matrix ``P P^T`` of the orthonormalization.
    """
    xp = namespace(centre=centre)
    dim = int(centre.shape[0])
    if reduce is not None:
        dim = round(float(np.asarray(reduce(np.array([float(dim)])))[0]))
    G = _host(gram).astype(np.float64)
    t = G.shape[0]
    d = check_rank(
        d, max(t - 1, 0), name="d", what="t - 1 (centred snapshots span at most t - 1 directions)"
    )
    Gc = G - G.mean(axis=1, keepdims=True) - G.mean(axis=0, keepdims=True) + G.mean()
    lam, V = _top_eigen(Gc, d, float(xp.finfo(centre.dtype).eps), dim)
    A = (V / np.sqrt(lam)).T  # (d, t)
    A_x = _to_xp(xp, A, centre)
    P = None
    for start, block in rows():
        part = A_x[:, start : start + int(block.shape[0])] @ block
        P = part if P is None else P + part
    assert P is not None
    if orthonormalize:
        P = _orthonormalize_rows(xp, P, reduce)
    total = float(np.trace(Gc)) / max(t - 1, 1)
    ev = _to_xp(xp, lam / max(t - 1, 1), centre)
    return Subspace(centre, P, ev, total, t)


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

    ``method="exact"``: eigendecomposition of the centred ``t x t`` Gram matrix (cost ``t^2 D``).
    ``method="randomized"``: a randomized range finder in the ``t``-dimensional snapshot space
    (``k = d + oversample`` random mixtures of the snapshots, ``power_iterations`` subspace
    iterations; cost about ``(2 q + 2) k t D``), for many snapshots (``t`` well above ``k``).
    """
    xp = namespace(snapshots=snapshots)
    _check_snapshot_matrix(xp, snapshots, check_finite)
    target = compute_dtype(xp, snapshots.dtype)
    X = snapshots if snapshots.dtype == target else xp.astype(snapshots, target)
    t = int(X.shape[0])
    centre = xp.mean(X, axis=0)
    x0 = X[0, :]
    if method == "exact":
        return _exact_from_matrix(xp, X, x0, centre, d, orthonormalize)
    if method == "randomized":
        b = 16

        def rows() -> Iterator[tuple[int, Array]]:
            for start in range(0, t, b):
                yield start, X[start : min(t, start + b), :] - x0

        return _randomized(
            xp, rows, t, centre, d, oversample, power_iterations, seed, orthonormalize
        )
    raise ValueError(f"`method` must be 'exact' or 'randomized', got {method!r}")


def _column_chunks(t: int, D: int) -> list[tuple[int, int]]:
    """Column ranges of about ``max(D / t, 256)`` columns: a ``(t, chunk)`` block is ``O(D)``."""
    width = max(256, -(-D // max(t, 1)))
    return [(j, min(D, j + width)) for j in range(0, D, width)]


def _exact_from_matrix(
    xp: Namespace, X: Array, x0: Array, centre: Array, d: int, orthonormalize: bool
) -> Subspace:
    """Exact PCA of a snapshot matrix, column chunk by column chunk (scratch ``O(t^2 + D)``)."""
    t, D = int(X.shape[0]), int(X.shape[1])
    chunks = _column_chunks(t, D)
    G = None
    for j0, j1 in chunks:
        Yj = X[:, j0:j1] - x0[j0:j1]
        part = Yj @ xp.matrix_transpose(Yj)
        G = part if G is None else G + part
    assert G is not None
    Gh = _host(G).astype(np.float64)
    d = check_rank(
        d, max(t - 1, 0), name="d", what="t - 1 (centred snapshots span at most t - 1 directions)"
    )
    Gc = Gh - Gh.mean(axis=1, keepdims=True) - Gh.mean(axis=0, keepdims=True) + Gh.mean()
    lam, V = _top_eigen(Gc, d, float(xp.finfo(X.dtype).eps), D)
    A = _to_xp(xp, (V / np.sqrt(lam)).T, X)
    P = xp.zeros((d, D), dtype=X.dtype, device=array_api_compat.device(X))
    for j0, j1 in chunks:
        P[:, j0:j1] = A @ (X[:, j0:j1] - x0[j0:j1])
    if orthonormalize:
        P = _orthonormalize_rows(xp, P)
    total = float(np.trace(Gc)) / max(t - 1, 1)
    ev = _to_xp(xp, lam / max(t - 1, 1), X)
    return Subspace(centre, P, ev, total, t)


def _randomized(
    xp: Namespace,
    rows: Callable[[], Iterator[tuple[int, Array]]],
    t: int,
    centre: Array,
    d: int,
    oversample: int,
    power_iterations: int,
    seed: int | None,
    orthonormalize: bool,
) -> Subspace:
    """Randomized PCA of the centred shifted vectors: all large products are blockwise ``(k, D)``."""
    d = check_rank(
        d, max(t - 1, 0), name="d", what="t - 1 (centred snapshots span at most t - 1 directions)"
    )
    if oversample < 0 or power_iterations < 0:
        raise ValueError("`oversample` and `power_iterations` must be >= 0")
    k = min(d + oversample, t)
    J = np.eye(t) - 1.0 / t  # centring in snapshot space, (t, t)
    rng = np.random.default_rng(seed)
    Q = np.linalg.qr(J @ rng.standard_normal((t, k)))[0]  # (t, k)

    def mix(Qh: np.ndarray) -> Array:
        """``Qh^T Jc Y`` (k, D): mixtures of the centred vectors."""
        A = _to_xp(xp, (J @ Qh).T, centre)
        B = None
        for start, block in rows():
            part = A[:, start : start + int(block.shape[0])] @ block
            B = part if B is None else B + part
        assert B is not None
        return B

    def apply_t(B: Array) -> np.ndarray:
        """``J Y B^T`` (t, k) on the host."""
        out = np.zeros((t, int(B.shape[0])))
        for start, block in rows():
            out[start : start + int(block.shape[0])] = _host(block @ xp.matrix_transpose(B))
        return J @ out

    for _ in range(power_iterations):
        Q = np.linalg.qr(apply_t(mix(Q)))[0]
    B = mix(Q)  # (k, D), B^T B ~ Xc^T Xc restricted to the sketched range
    Gb = _host(B @ xp.matrix_transpose(B)).astype(np.float64)
    lam, W = _top_eigen(Gb, d, float(xp.finfo(centre.dtype).eps), int(centre.shape[0]))
    P = _to_xp(xp, (W / np.sqrt(lam)).T, centre) @ B
    if orthonormalize:
        P = _orthonormalize_rows(xp, P)
    total = 0.0
    for _start, block in rows():
        total += float(_host(xp.sum(block * block)))
    # total variance of the centred vectors: sum |y_i|^2 - t |mean y|^2
    mean_sq = 0.0
    ysum = None
    for _start, block in rows():
        s = xp.sum(block, axis=0)
        ysum = s if ysum is None else ysum + s
    assert ysum is not None
    mean_sq = float(_host(xp.sum(ysum * ysum))) / t
    tv = (total - mean_sq) / max(t - 1, 1)
    ev = _to_xp(xp, lam / max(t - 1, 1), centre)
    return Subspace(centre, P, ev, tv, t)


# --------------------------------------------------------------------------------------------------
# the snapshot store
# --------------------------------------------------------------------------------------------------
class SnapshotStore:
    """Flattened snapshots, added one at a time, with their Gram matrix kept up to date.

    ``path=None`` keeps the snapshots in memory (copies, in the snapshots' own library and device).
    ``path="somewhere.dat"`` (or ``path=True`` for a temporary file) keeps them on disk in a NumPy
    ``memmap`` (host memory then holds only what the OS caches; rows are read back block by block
    and moved to the snapshots' library and device when needed); the file grows as snapshots arrive.

    With ``shift=True`` (default) the store keeps ``y_i = w_i - w_1`` (the first snapshot is kept
    aside), so the Gram matrix :meth:`gram` is that of the shifted snapshots: centring is shift
    invariant and this avoids cancellation. With ``shift=False`` it is ``X X^T`` of the raw snapshots.
    The Gram matrix is held on the host in float64 (its entries are dot products computed in the
    snapshots' dtype). Adding the ``t``-th snapshot costs ``t`` dot products of length ``D``.
    """

    def __init__(
        self,
        *,
        path: str | os.PathLike[str] | bool | None = None,
        shift: bool = True,
        block_rows: int = 16,
        check_finite: bool = True,
    ) -> None:
        if block_rows < 1:
            raise ValueError(f"`block_rows` must be >= 1, got {block_rows}")
        self.shift = bool(shift)
        self.block_rows = int(block_rows)
        self.check_finite = bool(check_finite)
        self._temp = False
        if path is True:
            fd, name = tempfile.mkstemp(prefix="lowrank_dldr_", suffix=".dat")
            os.close(fd)
            self.path: str | None = name
            self._temp = True
        elif path is None or path is False:
            self.path = None
        else:
            self.path = os.fspath(path)
        self._rows: list[Array] = []
        self._mm: np.memmap[Any, Any] | None = None
        self._capacity = 0
        self._t = 0
        self._gram = np.zeros((0, 0))
        self._first: Array | None = None
        self._sum: Array | None = None
        self._xp: Namespace = None
        self._like: Array | None = None
        self._dim = 0

    # -- properties --------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._t

    @property
    def dim(self) -> int | None:
        """Length ``D`` of a snapshot (None while empty)."""
        return None if self._like is None else self._dim

    @property
    def on_disk(self) -> bool:
        return self.path is not None

    @property
    def nbytes(self) -> int:
        """Bytes the stored snapshots take (in memory or on disk)."""
        if self._like is None:
            return 0
        item = _host(self._like[:1]).itemsize
        return self._t * self._dim * item

    # -- adding ------------------------------------------------------------------------------
    def add(self, w: Array) -> None:
        """Append one flattened snapshot ``w`` (shape ``(D,)``, real floating); it is copied."""
        if self._xp is None:
            xp = namespace(w=w)
        else:
            assert self._like is not None
            try:
                xp = namespace(w=w, stored=self._like)
            except ArrayTypeError as exc:
                raise ArrayTypeError(
                    f"`w` ({type(w).__module__}) is not of the stored snapshots' library "
                    f"({type(self._like).__module__})"
                ) from exc
        _check_vector(xp, w, "w", finite=self.check_finite)
        if self._like is not None:
            if w.shape[0] != self._dim:
                raise ShapeError(
                    f"snapshot length mismatch: `w` has {w.shape[0]} entries, the stored snapshots "
                    f"have {self._dim}"
                )
            if w.dtype != self._like.dtype:
                w = xp.astype(w, self._like.dtype)
        else:
            self._xp = xp
            w = xp.astype(w, compute_dtype(xp, w.dtype))
            self._like = w[:1]
            self._dim = int(w.shape[0])
        if self.shift:
            if self._first is None:
                self._first = xp.asarray(w, copy=True)
            y = w - self._first
        else:
            y = xp.asarray(w, copy=True)
        # new Gram row: dot products with every stored vector, and with itself
        if self.path is None:
            dots = [xp.stack([r @ y for r in self._rows])] if self._rows else []
        else:
            # row by row, as in memory: the same rounding, so both stores agree bit for bit
            dots = [
                xp.stack([block[i, :] @ y for i in range(int(block.shape[0]))])
                for _, block in self.blocks()
            ]
        row = np.concatenate([_host(v).reshape(-1) for v in dots]) if dots else np.zeros(0)
        self_dot = float(_host(y @ y))
        t = self._t
        G = np.zeros((t + 1, t + 1))
        G[:t, :t] = self._gram
        G[t, :t] = row
        G[:t, t] = row
        G[t, t] = self_dot
        self._store(y)
        self._gram = G
        self._sum = y if self._sum is None else self._sum + y
        self._t = t + 1

    def _store(self, y: Array) -> None:
        if self.path is None:
            self._rows.append(y)
            return
        host = _host(y)
        D = host.shape[0]
        if self._mm is None or self._t >= self._capacity:
            new_cap = max(8, 2 * self._capacity)
            if self._mm is not None:
                self._mm.flush()
                del self._mm
                self._mm = None
            with open(self.path, "r+b" if self._capacity else "w+b") as fh:
                fh.truncate(new_cap * D * host.itemsize)
            self._mm = np.memmap(self.path, dtype=host.dtype, mode="r+", shape=(new_cap, D))
            self._capacity = new_cap
        self._mm[self._t] = host

    # -- reading -----------------------------------------------------------------------------
    def blocks(self, size: int | None = None) -> Iterator[tuple[int, Array]]:
        """Yield ``(start, block)``: the stored vectors as ``(b, D)`` arrays of the snapshots' library
        (in memory: stacked copies of ``b <= size`` rows; on disk: rows read from the memmap)."""
        size = self.block_rows if size is None else int(size)
        xp, like = self._xp, self._like
        for start in range(0, self._t, size):
            stop = min(self._t, start + size)
            if self.path is None:
                yield start, xp.stack(self._rows[start:stop], axis=0)
            else:
                assert self._mm is not None
                assert like is not None
                yield start, _to_xp(xp, np.asarray(self._mm[start:stop]), like)

    def vector(self, i: int) -> Array:
        """The stored vector ``i`` (shifted by the first snapshot when ``shift=True``)."""
        if not -self._t <= i < self._t:
            raise IndexError(f"snapshot index {i} out of range for {self._t} snapshots")
        i %= self._t
        if self.path is None:
            return self._rows[i]
        assert self._mm is not None
        assert self._like is not None
        return _to_xp(self._xp, np.asarray(self._mm[i]), self._like)

    def snapshot(self, i: int) -> Array:
        """Snapshot ``i`` as it was added (up to rounding of the shift)."""
        v = self.vector(i)
        return v + self._first if self._first is not None else v

    def gram(self) -> np.ndarray:
        """The ``t x t`` Gram matrix of the stored vectors (float64, NumPy, a copy)."""
        return self._gram.copy()

    def centre(self) -> Array:
        """The mean snapshot."""
        if self._t == 0 or self._sum is None:
            raise ShapeError("the store is empty")
        m = self._sum / self._t
        return m + self._first if self._first is not None else m

    # -- fitting -----------------------------------------------------------------------------
    def fit(
        self,
        d: int,
        *,
        method: PCAMethod = "exact",
        oversample: int = 10,
        power_iterations: int = 2,
        seed: int | None = 0,
        orthonormalize: bool = True,
    ) -> Subspace:
        """The top-``d`` PCA subspace of the stored snapshots (see :func:`fit_subspace`).

        ``"exact"`` uses the streamed Gram matrix (one ``t x t`` eigendecomposition, one pass over the
        snapshots); ``"randomized"`` ignores it and sketches (for very many snapshots).
        """
        if self._t < 2:
            raise RankError(f"at least 2 snapshots are needed to fit a subspace, got {self._t}")
        centre = self.centre()
        if method == "exact":
            return subspace_from_gram(
                self._gram, d, self.blocks, centre=centre, orthonormalize=orthonormalize
            )
        if method == "randomized":
            return _randomized(
                self._xp,
                self.blocks,
                self._t,
                centre,
                d,
                oversample,
                power_iterations,
                seed,
                orthonormalize,
            )
        raise ValueError(f"`method` must be 'exact' or 'randomized', got {method!r}")

    def close(self) -> None:
        """Release the memmap (and delete the file if it was a temporary one)."""
        if self._mm is not None:
            self._mm.flush()
            del self._mm
            self._mm = None
        if self._temp and self.path is not None and os.path.exists(self.path):
            os.remove(self.path)

    def __enter__(self) -> SnapshotStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f"disk {self.path!r}" if self.path else "memory"
        return f"SnapshotStore(t={self._t}, D={self.dim}, {where}, shift={self.shift})"


# --------------------------------------------------------------------------------------------------
# P-BFGS math
# --------------------------------------------------------------------------------------------------
def _check_pair(s: Array, y: Array) -> Namespace:
    xp = namespace(s=s, y=y)
    _check_vector(xp, s, "s")
    _check_vector(xp, y, "y")
    if s.shape != y.shape:
        raise ShapeError(f"`s` {tuple(s.shape)} and `y` {tuple(y.shape)} must have the same shape")
    return xp


def curvature_ok(s: Array, y: Array, *, eps: float = 1e-8) -> bool:
    """The curvature guard: ``s.y > eps |s| |y|`` (scale invariant; False for a zero pair)."""
    xp = _check_pair(s, y)
    sy = float(_host(xp.sum(s * y)))
    ns = float(_host(xp.sqrt(xp.sum(s * s))))
    ny = float(_host(xp.sqrt(xp.sum(y * y))))
    return sy > eps * ns * ny and sy > 0.0


def bfgs_update(H: Array, s: Array, y: Array, *, eps: float = 1e-8) -> tuple[Array, bool]:
    """One inverse-Hessian BFGS update ``H+ = (I - r s y^T) H (I - r y s^T) + r s s^T``, ``r = 1/(y.s)``.

    Returns ``(H+, True)``, or ``(H, False)`` when the pair fails :func:`curvature_ok` (then ``H``
    is returned unchanged). ``H+ y = s`` (secant equation); ``H+`` stays symmetric positive definite
    when ``H`` is. Computed in the expanded, symmetric form (``O(d^2)``).
    """
    xp = _check_pair(s, y)
    xp = namespace(H=H, s=s)
    d = s.shape[0]
    if H.ndim != 2 or tuple(H.shape) != (d, d):
        raise ShapeError(f"`H` must have shape ({d}, {d}) to match `s`, got {tuple(H.shape)}")
    check_floating(xp, H, "H")
    check_finite(xp, H, "H")
    if not curvature_ok(s, y, eps=eps):
        return H, False
    dtype = xp.result_type(H, s, y)
    H, s, y = (xp.astype(a, dtype) if a.dtype != dtype else a for a in (H, s, y))
    rho = 1.0 / xp.sum(s * y)
    Hy = H @ y
    yHy = xp.sum(y * Hy)
    outer_sHy = s[:, None] * Hy[None, :]
    H_new = (
        H
        - rho * (outer_sHy + xp.matrix_transpose(outer_sHy))
        + (rho * rho * yHy + rho) * (s[:, None] * s[None, :])
    )
    return H_new, True


def bfgs_direction(H: Array, g: Array) -> Array:
    """The quasi-Newton direction ``p = -H g``."""
    xp = namespace(H=H, g=g)
    _check_vector(xp, g, "g")
    if H.ndim != 2 or tuple(H.shape) != (g.shape[0], g.shape[0]):
        raise ShapeError(f"`H` must be ({g.shape[0]}, {g.shape[0]}), got {tuple(H.shape)}")
    return -(H @ g)


def armijo_condition(
    f_new: float, f0: float, alpha: float, slope: float, *, c1: float = 0.4
) -> bool:
    """Sufficient decrease: ``f(w + alpha p) <= f(w) + c1 alpha g.p`` (``slope = g.p < 0``)."""
    if not math.isfinite(f_new):
        return False
    return f_new <= f0 + c1 * alpha * slope


@dataclass(frozen=True)
class LineSearchResult:
    """Outcome of :func:`armijo_backtracking`.

    ``alpha``: the accepted step length (0.0 when none was accepted); ``value``: the objective there
    (``f0`` when none); ``trials``: objective evaluations made; ``accepted``: whether a step passed.
    """

    alpha: float
    value: float
    trials: int
    accepted: bool


def armijo_backtracking(
    f: Callable[[float], float],
    f0: float,
    slope: float,
    *,
    alpha0: float = 1.0,
    shrink: float = 0.4,
    c1: float = 0.4,
    max_trials: int = 20,
) -> LineSearchResult:
    """Backtracking line search: try ``alpha = alpha0 * shrink^m``, ``m = 0 .. max_trials - 1``, and
    accept the first with :func:`armijo_condition`. ``f(alpha)`` evaluates the objective at
    ``w + alpha p``; ``slope = g.p`` must be negative (a descent direction), else ValueError.
    """
    if not (math.isfinite(f0) and math.isfinite(slope)):
        raise NonFiniteError(f"`f0` ({f0}) and `slope` ({slope}) must be finite")
    if slope >= 0:
        raise ValueError(f"`slope` = g.p must be negative (a descent direction), got {slope}")
    if not 0.0 < shrink < 1.0:
        raise ValueError(f"`shrink` must lie in (0, 1), got {shrink}")
    if not 0.0 < c1 < 1.0:
        raise ValueError(f"`c1` must lie in (0, 1), got {c1}")
    if alpha0 <= 0 or max_trials < 1:
        raise ValueError("`alpha0` must be > 0 and `max_trials` >= 1")
    alpha = float(alpha0)
    for m in range(max_trials):
        value = float(f(alpha))
        if armijo_condition(value, f0, alpha, slope, c1=c1):
            return LineSearchResult(alpha, value, m + 1, True)
        alpha *= shrink
    return LineSearchResult(0.0, float(f0), max_trials, False)
