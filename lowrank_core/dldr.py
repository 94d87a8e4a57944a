"""DLDR: low-dimensional trajectory subspaces and the P-SGD / P-BFGS math (Li et al., TPAMI 2022).

Training snapshots ``w_1 .. w_t`` (flattened trainable parameters, length ``D``) are collected one at a
time in a :class:`SnapshotStore` (in memory, or memory-mapped on disk). The store keeps the ``t x t``
Gram matrix up to date as each snapshot arrives (the new row is the dot products of the new snapshot
with the stored ones), so fitting the subspace afterwards needs one ``t x t`` eigendecomposition and
one pass over the snapshots. :func:`fit_subspace` (a ``(t, D)`` matrix at hand) takes the same route:
one pass for the Gram matrix, one for the basis. No ``D x D`` (nor a second ``t x D``) matrix is ever
formed: the peak memory of a fit is the snapshot storage, plus the ``d x D`` result *twice* (its column
pieces and the joined result exist together for a moment), plus ``3 D`` entries (the centre and its
pieces), plus one column chunk of scratch, ``O(t^2 + (t + d) W)`` (``W`` = :data:`CHUNK` = 65,536
columns; ``benchmarks/bench_dldr.py`` measures the peak against exactly this bound).

The :class:`Subspace` (centre, orthonormal basis rows ``P``, explained variance) maps weights to
coordinates ``c = P (w - origin)`` and back ``w = origin + P^T c``. :func:`bfgs_update`,
:func:`curvature_ok`, :func:`armijo_condition` and :func:`armijo_backtracking` are the P-BFGS math as
pure functions of (small, ``d``-dimensional) arrays.

Numerics (improvements on the published code):

* the Gram matrix is that of *shifted* snapshots ``y_i = w_i - w_1`` (``shift=True``, the default):
  centring is shift invariant, and trajectory snapshots share a large common part, so the uncentred
  Gram of raw weights would lose the small differences to cancellation, notably in float32;
* every long reduction (Gram entries, ``P P^T``) runs over column chunks of ``W`` entries and sums the
  chunks in float64; the Gram entries are computed in float64 from the stored vectors, so the Gram is
  that of the stored (float32 or float64) vectors to float64 accuracy, on every library;
* the small eigenproblem is solved in float64 on the host (NumPy) whatever the library: it is
  deterministic and identical on every device and every DDP rank;
* "zero variance" is decided by what the stored data can resolve (see :func:`subspace_from_gram`), not
  by the accuracy of a float32 Gram;
* the basis rows are re-orthonormalized (symmetric, Loewdin: ``P <- (P P^T)^{-1/2} P``, which keeps the
  directions closest to the computed ones) so ``P P^T = I`` holds to working precision even in float32;
* the BFGS curvature guard is scale invariant: a pair is skipped when ``s.y <= eps |s| |y|``.

No function writes into an array in place (JAX arrays are immutable): results are assembled from
pieces with ``concat``.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import numbers
import os
import tempfile
import threading
import weakref
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
from ._validate import check_bool, check_choice, check_float, check_int, check_seed, describe
from .backend import get_backend
from .errors import (
    ArrayTypeError,
    DTypeError,
    NonFiniteError,
    ParameterError,
    ParameterTypeError,
    RankError,
    ShapeError,
    SnapshotStoreError,
)

try:  # advisory file locks (POSIX); without them two stores on one path are not detected
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

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
_METHODS = ("exact", "randomized")

CHUNK = 1 << 16
"""Columns per chunk of every long reduction (float32 or float64 products, chunks summed in float64)."""

_EPS64 = float(np.finfo(np.float64).eps)
_OVERFLOW = (
    "overflow in {dtype}: {what} cannot be represented although the snapshots are finite (their "
    "scale is too large for squared norms and variances); rescale them (the subspace is scale "
    "invariant)"
)


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


def _check_d(d: object, t: int) -> int:
    return check_rank(
        d, max(t - 1, 0), name="d", what="t - 1 (centred snapshots span at most t - 1 directions)"
    )


def _host(x: Array) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    return np.asarray(get_backend(x).to_numpy(x))


def _to_xp(xp: Namespace, a: np.ndarray, like: Array) -> Array:
    """``a`` (NumPy) as an array of ``like``'s library, device and dtype."""
    if not _f64_ok(xp) and a.dtype == np.float64:
        a = a.astype(np.float32)  # the library has no float64: say so explicitly, no warning
    out = xp.asarray(np.ascontiguousarray(a), device=array_api_compat.device(like))
    return xp.astype(out, like.dtype) if out.dtype != like.dtype else out


def _f64_ok(xp: Namespace) -> bool:
    """Whether ``xp`` computes in float64 (JAX only with ``jax_enable_x64``)."""
    if array_api_compat.is_jax_namespace(xp):
        import jax  # already imported: the arrays are JAX's

        config: Any = jax.config
        return bool(config.jax_enable_x64)
    return True


def _to64(xp: Namespace, x: Array) -> Any:
    """``x`` in float64: in its own library, or as a host NumPy array where the library has none."""
    if _f64_ok(xp):
        return x if x.dtype == xp.float64 else xp.astype(x, xp.float64)
    return np.asarray(_host(x), dtype=np.float64)


def _gram64(xp: Namespace, A: Array, B: Array | None = None) -> Any:
    """``A B^T`` (``B = A`` by default) computed in float64 (see :func:`_to64`)."""
    A64 = _to64(xp, A)
    B64 = A64 if B is None else _to64(xp, B)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is detected and reported later
        if isinstance(A64, np.ndarray):
            return A64 @ np.swapaxes(B64, -1, -2)
        return A64 @ xp.matrix_transpose(B64)


def _sumsq64(xp: Namespace, x: Array, *, centred: bool = False) -> Any:
    """``sum(x^2)`` in float64 (of ``x`` minus its column means when ``centred``)."""
    x64 = _to64(xp, x)
    with np.errstate(over="ignore", invalid="ignore"):
        return _sumsq64_(xp, x64, centred)


def _sumsq64_(xp: Namespace, x64: Any, centred: bool) -> Any:
    if isinstance(x64, np.ndarray):
        c = x64 - x64.mean(axis=0, keepdims=True) if centred else x64
        return np.sum(c * c)
    c = x64 - xp.mean(x64, axis=0, keepdims=True) if centred else x64
    return xp.sum(c * c)


def _chunks(D: int, width: int = CHUNK) -> list[tuple[int, int]]:
    return [(j, min(D, j + width)) for j in range(0, D, width)]


# A column slab source: ``slabs()`` yields ``(j0, j1, S)`` with ``S`` the ``(t, j1 - j0)`` columns
# ``j0:j1`` of the t stored (shifted) vectors, in the snapshots' dtype, for consecutive chunks covering
# ``0..D``. Every fit is written against this one interface (the store, a matrix, a shard of columns).
Slabs = Callable[[], Iterator[tuple[int, int, Array]]]


# --------------------------------------------------------------------------------------------------
# Gram matrices
# --------------------------------------------------------------------------------------------------
def gram_matrix(snapshots: Array, *, check_finite: bool = True) -> Array:
    """``X X^T`` of a ``(t, D)`` snapshot matrix (one snapshot per row): a ``(t, t)`` array."""
    xp = namespace(snapshots=snapshots)
    _check_snapshot_matrix(xp, snapshots, check_bool("check_finite", check_finite))
    X = snapshots
    with np.errstate(over="ignore", invalid="ignore"):
        G = X @ xp.matrix_transpose(X)
    if not get_backend(G).all_finite(G):
        raise NonFiniteError(_OVERFLOW.format(what="X X^T", dtype=X.dtype))
    return G


def centred_gram(gram: Array) -> Array:
    """``J G J`` with ``J = I - 1 1^T / t``: the Gram matrix of the mean-centred snapshots."""
    xp = namespace(gram=gram)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] == 0:
        raise ShapeError(
            f"`gram` must be a non-empty square (t, t) matrix, got {tuple(gram.shape)}"
        )
    check_floating(xp, gram, "gram")
    check_finite(xp, gram, "gram")
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


def _centre_host(G: np.ndarray) -> np.ndarray:
    Gc = G - G.mean(axis=1, keepdims=True) - G.mean(axis=0, keepdims=True) + G.mean()
    return np.asarray(0.5 * (Gc + Gc.T))


def _resolution(trace: float, t: int, eps: float) -> float:
    """The smallest eigenvalue of a centred Gram matrix that the stored data resolve.

    ``trace`` is that of the (uncentred) Gram of the stored vectors, ``eps`` their dtype's machine
    epsilon. Two limits, the larger wins:

    * the data: each stored vector carries a relative rounding of at most ``eps`` per entry (the shift
      ``w_i - w_1`` and the storage dtype), a perturbation ``E`` of the snapshot matrix with
      ``|E|_2 <= eps sqrt(trace)``, so the singular values move by at most that (Weyl) and a direction
      with variance below ``eps^2 trace`` cannot be told from zero; the basis row of a direction with
      eigenvalue ``lam`` is assembled in the stored dtype with a relative error of about
      ``eps sqrt(t trace / lam)``; so we require ``lam > 4 t eps^2 trace`` (basis rows resolved to
      better than one half);
    * the computation: the Gram entries are float64 sums of chunk products (relative error about
      ``sqrt(W) eps64``) and the float64 eigensolver adds ``t eps64 |G|``, so
      ``4 max(t, sqrt(W)) eps64 trace``.
    """
    return 4.0 * max(t * eps * eps, max(t, math.sqrt(CHUNK)) * _EPS64) * max(trace, 0.0)


def _top_eigen(
    gc: np.ndarray, d: int, *, trace: float, eps: float, what: str = "centred Gram matrix"
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``d`` eigenpairs (descending) of a centred float64 Gram; RankError beyond what is resolved."""
    t = gc.shape[0]
    lam, V = np.linalg.eigh(0.5 * (gc + gc.T))
    lam, V = lam[::-1], V[:, ::-1]
    tol = _resolution(trace, t, eps)
    rank = int(np.sum(lam > tol)) if t and float(lam[0]) > 0 else 0
    if d > rank:
        shown = float(lam[d - 1]) if d - 1 < lam.shape[0] else 0.0
        raise RankError(
            f"`d` = {d} exceeds the number of directions with non-zero variance that the snapshots "
            f"resolve ({rank}): eigenvalue {d} of their {what} is {shown:.3g}, not above the "
            f"rounding-error level {tol:.3g} of the stored data and of the float64 Gram (trace "
            f"{trace:.3g}, stored dtype eps {eps:.3g}); take more (or more diverse) snapshots or a "
            "smaller `d`"
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

    The mapping methods refuse NaN / Inf inputs (``NonFiniteError``) unless ``check_finite=False``
    (which saves a pass over the vector and, on a GPU, a host synchronisation).
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

    def project(self, w: Array, *, origin: Array | None = None, check_finite: bool = True) -> Array:
        """Coordinates ``c = P (w - origin)`` (``origin`` defaults to the centre); ``w`` is ``(D,)``
        or a stack ``(n, D)``."""
        xp = self._xp("w", w)
        finite = check_bool("check_finite", check_finite)
        self._check_ambient(xp, w, "w", finite=finite)
        o = self.centre if origin is None else origin
        if origin is not None:
            self._xp("origin", origin)
            self._check_ambient(xp, origin, "origin", stack=False, finite=finite)
        return self.project_direction(w - o, check_finite=False)

    def project_direction(self, v: Array, *, check_finite: bool = True) -> Array:
        """``P v`` (no centre): coordinates of a direction, e.g. the gradient wrt ``c`` from ``g``."""
        xp = self._xp("v", v)
        self._check_ambient(xp, v, "v", finite=check_bool("check_finite", check_finite))
        P = self.basis if self.basis.dtype == v.dtype else xp.astype(self.basis, v.dtype)
        return v @ xp.matrix_transpose(P)

    def lift(self, c: Array, *, origin: Array | None = None, check_finite: bool = True) -> Array:
        """Weights ``origin + P^T c`` (``origin`` defaults to the centre); ``c`` is ``(d,)`` or ``(n, d)``."""
        finite = check_bool("check_finite", check_finite)
        o = self.centre if origin is None else origin
        if origin is not None:
            xp = self._xp("origin", origin)
            self._check_ambient(xp, origin, "origin", stack=False, finite=finite)
        return o + self.lift_direction(c, check_finite=finite)

    def lift_direction(self, c: Array, *, check_finite: bool = True) -> Array:
        """``P^T c`` (no centre): the weight-space direction of a coordinate step."""
        xp = self._xp("c", c)
        if c.ndim not in (1, 2) or c.shape[-1] != self.d:
            raise ShapeError(
                f"`c` must have shape ({self.d},) or (n, {self.d}), got {tuple(c.shape)}"
            )
        check_floating(xp, c, "c")
        if check_bool("check_finite", check_finite):
            check_finite_(xp, c, "c")
        P = self.basis if self.basis.dtype == c.dtype else xp.astype(self.basis, c.dtype)
        return c @ P

    def _check_ambient(
        self, xp: Namespace, x: Array, name: str, *, stack: bool = True, finite: bool = True
    ) -> None:
        ok_ndim = (1, 2) if stack else (1,)
        if x.ndim not in ok_ndim or x.shape[-1] != self.dim:
            want = f"({self.dim},)" + (f" or (n, {self.dim})" if stack else "")
            raise ShapeError(f"`{name}` must have shape {want}, got {tuple(x.shape)}")
        check_floating(xp, x, name)
        if finite:
            check_finite_(xp, x, name)


check_finite_ = (
    check_finite  # the module-level check, under a name the keyword arguments don't shadow
)


# --------------------------------------------------------------------------------------------------
# the fit: eigenpairs of the small Gram, then the basis column chunk by column chunk
# --------------------------------------------------------------------------------------------------
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


def _check_gram(gram: Array) -> np.ndarray:
    """A finite, symmetric, real floating ``(t, t)`` Gram matrix (any library) as float64 NumPy."""
    if isinstance(gram, np.ndarray):
        if not np.issubdtype(gram.dtype, np.floating):
            raise DTypeError(f"`gram` must have a real floating dtype, got {gram.dtype}")
        G = gram
    else:
        xp = namespace(gram=gram)
        check_floating(xp, gram, "gram")
        G = _host(gram)
    if G.ndim != 2 or G.shape[0] != G.shape[1] or G.shape[0] < 2:
        raise ShapeError(f"`gram` must be a square (t, t) matrix with t >= 2, got {G.shape}")
    eps = float(np.finfo(G.dtype).eps)
    G = G.astype(np.float64)
    if not np.all(np.isfinite(G)):
        raise NonFiniteError("`gram` contains NaN or Inf")
    scale = float(np.abs(G).max())
    if float(np.abs(G - G.T).max()) > 100 * G.shape[0] * eps * scale:
        raise ParameterError("`gram` is not symmetric: not a Gram matrix")
    if float(np.diag(G).min()) < 0:
        raise ParameterError("`gram` has a negative diagonal entry: not a Gram matrix")
    return G


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


# --------------------------------------------------------------------------------------------------
# the snapshot store
# --------------------------------------------------------------------------------------------------
def _release(fd: int | None, path: str | None) -> None:
    """Finalizer of a store: close its file (which drops the lock) and delete a temporary file."""
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _open_locked(path: str, fd: int | None = None) -> int:
    """Open (or take) ``fd`` for ``path``, lock it exclusively and empty it; SnapshotStoreError if the
    path cannot be a store file or another store holds it."""
    if fd is None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except IsADirectoryError:
            raise SnapshotStoreError(
                f"`path` {path!r} is a directory; give the name of a file to keep the snapshots in"
            ) from None
        except OSError as exc:
            raise SnapshotStoreError(
                f"cannot open the snapshot file {path!r}: {exc.strerror or exc}"
            ) from exc
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SnapshotStoreError(
                    f"the snapshot file {path!r} is in use by another SnapshotStore (it is locked); "
                    "give each store its own file"
                ) from None
        os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


class SnapshotStore:
    """Flattened snapshots, added one at a time, with their Gram matrix kept up to date.

    ``path=None`` keeps the snapshots in memory (copies, in the snapshots' own library and device).
    ``path="somewhere.dat"`` (or ``path=True`` for a temporary file) keeps them on disk in a memory
    map (host memory then holds only what the OS caches; rows are read back column chunk by column
    chunk and moved to the snapshots' library and device when needed). The file is created (or
    emptied) when the store is made, and locked for the store's exclusive use (a second store on the
    same path raises :class:`~lowrank_core.errors.SnapshotStoreError`); it grows as snapshots arrive.
    The store works through its open file, so deleting the file's name does not lose a snapshot (the
    space is freed at :meth:`close`); a file truncated under the store is detected before any access
    (``SnapshotStoreError``, never a crash). A temporary file is deleted at :meth:`close`, or when the
    store is garbage-collected without one.

    With ``shift=True`` (default) the store keeps ``y_i = w_i - w_1`` (the first snapshot is kept
    aside), so the Gram matrix :meth:`gram` is that of the shifted snapshots: centring is shift
    invariant and this avoids cancellation. With ``shift=False`` it is ``X X^T`` of the raw snapshots.
    The Gram matrix is held on the host in float64; its entries are computed in float64 from the
    stored vectors (column chunks of :data:`CHUNK` entries). Adding the ``t``-th snapshot costs ``t``
    dot products of length ``D``.

    Memory: the stored vectors (``t D`` entries) plus the first snapshot and a running sum (``2 D``);
    a fit adds the ``d x D`` result twice (its pieces and the joined result, for a moment), ``3 D``
    (the centre and its pieces) and one column chunk of scratch, ``O(t^2 + (t + d) W)``; on disk the
    host memory holds only what the OS caches of the file. :meth:`add` is thread-safe (one lock); a
    store is usable as a context manager, and every call after :meth:`close` raises
    ``SnapshotStoreError``.
    """

    def __init__(
        self,
        *,
        path: str | os.PathLike[str] | bool | None = None,
        shift: bool = True,
        block_rows: int = 16,
        check_finite: bool = True,
    ) -> None:
        self.block_rows = check_int("block_rows", block_rows, min=1)
        self.shift = check_bool("shift", shift)
        self.check_finite = check_bool("check_finite", check_finite)
        self._lock = threading.RLock()
        self._closed = False
        self._temp = False
        self._fd: int | None = None
        flag: object = path
        if flag is True or (isinstance(flag, np.bool_) and bool(flag)):
            fd, name = tempfile.mkstemp(prefix="lowrank_dldr_", suffix=".dat")
            self.path: str | None = name
            self._temp = True
            self._fd = _open_locked(name, fd)
        elif flag is None or flag is False or isinstance(flag, np.bool_):
            self.path = None
        elif isinstance(path, (str, os.PathLike)):
            self.path = os.fspath(path)
            if not isinstance(self.path, str):
                raise ParameterTypeError(f"`path` must be a str path, got bytes {self.path!r}")
            self._fd = _open_locked(self.path)
        else:
            raise ParameterTypeError(
                f"`path` must be None, True (a temporary file) or a file path, got {describe(path)}"
            )
        self._finalizer = weakref.finalize(
            self, _release, self._fd, self.path if self._temp else None
        )
        self._rows: list[Array] = []
        self._mm: np.ndarray | None = None
        self._capacity = 0
        self._t = 0
        self._gram = np.zeros((0, 0))
        self._first: Array | None = None
        self._sum: Array | None = None
        self._xp: Namespace = None
        self._like: Array | None = None
        self._dim = 0
        self._itemsize = 0

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
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @property
    def nbytes(self) -> int:
        """Bytes the stored snapshots take (in memory or on disk)."""
        return self._t * self._dim * self._itemsize

    def _check_open(self) -> None:
        if self._closed:
            raise SnapshotStoreError("the SnapshotStore is closed")

    # -- the file ----------------------------------------------------------------------------
    def _file_size(self) -> int:
        assert self._fd is not None
        return int(os.fstat(self._fd).st_size)

    def _check_file(self, rows: int) -> None:
        """Raise (before any access to the map) unless the file still holds ``rows`` rows."""
        need = rows * self._dim * self._itemsize
        size = self._file_size()
        if size < need:
            raise SnapshotStoreError(
                f"the snapshot file {self.path!r} was truncated under the store: it has {size} "
                f"bytes, the {rows} stored snapshots need {need}; they are lost on disk (the Gram "
                "matrix is kept: store.gram())"
            )

    def _write_row(self, host: np.ndarray) -> None:
        """Write stored row ``t`` (growing the file and the map when full); the store is unchanged
        when this raises."""
        assert self._fd is not None
        rowbytes = host.shape[0] * host.itemsize
        self._check_file(self._t)
        try:
            if self._mm is None or self._t >= self._capacity:
                new_cap = max(8, 2 * self._capacity)
                os.ftruncate(self._fd, new_cap * rowbytes)
                buf = mmap.mmap(self._fd, new_cap * rowbytes)  # shared, read-write, over our fd
                mm = np.ndarray((new_cap, host.shape[0]), dtype=host.dtype, buffer=buf)
                self._mm, self._capacity = mm, new_cap
            elif self._file_size() < self._capacity * rowbytes:
                os.ftruncate(self._fd, self._capacity * rowbytes)  # cut below the map: extend again
        except OSError as exc:
            raise SnapshotStoreError(
                f"cannot grow the snapshot file {self.path!r}: {exc.strerror or exc}"
            ) from exc
        self._mm[self._t] = host  # a write to the file (host memory map), not to an array argument

    # -- adding ------------------------------------------------------------------------------
    def add(self, w: Array) -> None:
        """Append one flattened snapshot ``w`` (shape ``(D,)``, real floating); it is copied.

        Thread-safe; on any error the store is unchanged."""
        with self._lock:
            self._check_open()
            self._add(w)

    def _add(self, w: Array) -> None:
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
        first_add = self._like is None
        if not first_add:
            if w.shape[0] != self._dim:
                raise ShapeError(
                    f"snapshot length mismatch: `w` has {w.shape[0]} entries, the stored snapshots "
                    f"have {self._dim}"
                )
            assert self._like is not None
            w = w if w.dtype == self._like.dtype else xp.astype(w, self._like.dtype)
        else:
            w = xp.astype(w, compute_dtype(xp, w.dtype), copy=True)
        D = int(w.shape[0])
        first = self._first
        if self.shift:
            if first is None:
                first = xp.asarray(w, copy=True)
            y = w - first
        else:
            y = xp.asarray(w, copy=True)
        # the new Gram row: float64 dot products with every stored vector, and with itself
        row = self._dots(xp, y, D) if self._t else np.zeros(0)
        sq = None
        for j0, j1 in _chunks(D):
            part = _sumsq64(xp, y[j0:j1])
            sq = part if sq is None else sq + part
        self_dot = float(_host(sq))
        if not (math.isfinite(self_dot) and np.all(np.isfinite(row))):
            raise NonFiniteError(
                _OVERFLOW.format(what="the snapshot's dot products", dtype="float64")
            )
        t = self._t
        G = np.block([[self._gram, row[:, None]], [row[None, :], np.array([[self_dot]])]])
        if self.path is not None:
            if first_add:
                self._itemsize = int(_host(y[:1]).itemsize)
                self._dim = D
            try:
                self._write_row(_host(y))
            except BaseException:
                if first_add:
                    self._itemsize, self._dim = 0, 0
                raise
        else:
            self._rows.append(y)
        # commit
        if first_add:
            self._xp = xp
            self._like = y[:1]
            self._dim = D
            self._itemsize = int(_host(y[:1]).itemsize)
        self._first = first
        self._gram = G
        self._sum = y if self._sum is None else self._sum + y
        self._t = t + 1

    def _dots(self, xp: Namespace, y: Array, D: int) -> np.ndarray:
        """``(t,)`` float64: the stored vectors dotted with ``y``, row by row and column chunk by
        column chunk in float64 (the same operations in memory and on disk)."""
        if self.path is not None:
            self._check_file(self._t)
        acc = None
        with np.errstate(over="ignore", invalid="ignore"):  # overflow: reported by the caller
            for j0, j1 in _chunks(D):
                yj = _to64(xp, y[j0:j1])
                vals = [_to64(xp, r) @ yj for r in self._row_chunks(j0, j1)]
                part = np.stack(vals) if isinstance(yj, np.ndarray) else xp.stack(vals)
                acc = part if acc is None else acc + part
        return _host(acc).astype(np.float64).reshape(-1)

    def _row_chunks(self, j0: int, j1: int) -> Iterator[Array]:
        """Columns ``j0:j1`` of each stored vector (views where the library allows)."""
        if self.path is None:
            for r in self._rows:
                yield r[j0:j1]
            return
        assert self._mm is not None
        assert self._like is not None
        for i in range(self._t):
            yield _to_xp(self._xp, self._mm[i, j0:j1], self._like)

    # -- reading -----------------------------------------------------------------------------
    def _slabs(self, t: int | None = None) -> Iterator[tuple[int, int, Array]]:
        """Columns ``j0:j1`` of the first ``t`` stored vectors, chunk by chunk (see ``Slabs``)."""
        t = self._t if t is None else t
        xp, like = self._xp, self._like
        for j0, j1 in _chunks(self._dim):
            if self.path is None:
                yield j0, j1, xp.stack([r[j0:j1] for r in self._rows[:t]], axis=0)
            else:
                self._check_file(t)
                assert self._mm is not None
                yield j0, j1, _to_xp(xp, np.asarray(self._mm[:t, j0:j1]), like)

    def blocks(self, size: int | None = None) -> Iterator[tuple[int, Array]]:
        """Yield ``(start, block)``: the stored vectors as ``(b, D)`` arrays of the snapshots' library
        (copies of ``b <= size`` rows, ``size`` defaulting to ``block_rows``)."""
        self._check_open()
        size = self.block_rows if size is None else check_int("size", size, min=1)
        t = self._t
        for start in range(0, t, size):
            stop = min(t, start + size)
            self._check_open()
            if self.path is None:
                yield start, self._xp.stack(self._rows[start:stop], axis=0)
            else:
                self._check_file(t)
                assert self._mm is not None
                assert self._like is not None
                yield start, _to_xp(self._xp, np.array(self._mm[start:stop]), self._like)

    def vector(self, i: int) -> Array:
        """The stored vector ``i`` (shifted by the first snapshot when ``shift=True``)."""
        with self._lock:
            self._check_open()
            i = check_int("i", i)
            if not -self._t <= i < self._t:
                raise ParameterError(f"snapshot index {i} out of range for {self._t} snapshots")
            i %= self._t
            if self.path is None:
                return self._rows[i]
            self._check_file(self._t)
            assert self._mm is not None
            assert self._like is not None
            return _to_xp(self._xp, np.array(self._mm[i]), self._like)

    def snapshot(self, i: int) -> Array:
        """Snapshot ``i`` as it was added (up to rounding of the shift)."""
        v = self.vector(i)
        return v + self._first if self._first is not None else v

    def gram(self) -> np.ndarray:
        """The ``t x t`` Gram matrix of the stored vectors (float64, NumPy, a copy)."""
        with self._lock:
            self._check_open()
            return self._gram.copy()

    def centre(self) -> Array:
        """The mean snapshot."""
        with self._lock:
            self._check_open()
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
        with self._lock:
            self._check_open()
            method, oversample, power_iterations, seed, orthonormalize = _check_fit_options(
                method, oversample, power_iterations, seed, orthonormalize
            )
            if self._t < 2:
                raise RankError(f"at least 2 snapshots are needed to fit a subspace, got {self._t}")
            t = self._t
            d = _check_d(d, t)
            centre = self.centre()
            slabs: Slabs = lambda: self._slabs(t)  # noqa: E731
            if method == "exact":
                return _fit_exact(self._xp, self._gram, d, slabs, centre, orthonormalize)
            return _randomized(
                self._xp, slabs, t, centre, d, oversample, power_iterations, seed, orthonormalize
            )

    def close(self) -> None:
        """Release the memory map and the file lock (and delete the file if it was a temporary one).

        Idempotent; every other call on a closed store raises ``SnapshotStoreError``."""
        with self._lock:
            self._closed = True
            self._mm = None
            self._rows = []
            self._sum = None
            self._finalizer()

    def __enter__(self) -> SnapshotStore:
        self._check_open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f"disk {self.path!r}" if self.path else "memory"
        state = ", closed" if self._closed else ""
        return f"SnapshotStore(t={self._t}, D={self.dim}, {where}, shift={self.shift}{state})"


# --------------------------------------------------------------------------------------------------
# P-BFGS math
# --------------------------------------------------------------------------------------------------
def _check_pair(s: Array, y: Array, *, finite: bool = True) -> Namespace:
    xp = namespace(s=s, y=y)
    _check_vector(xp, s, "s", finite=finite)
    _check_vector(xp, y, "y", finite=finite)
    if s.shape != y.shape:
        raise ShapeError(f"`s` {tuple(s.shape)} and `y` {tuple(y.shape)} must have the same shape")
    return xp


def _check_h(xp: Namespace, H: Array, d: int, what: str, *, finite: bool = True) -> None:
    if H.ndim != 2 or tuple(H.shape) != (d, d):
        raise ShapeError(f"`H` must have shape ({d}, {d}) to match {what}, got {tuple(H.shape)}")
    check_floating(xp, H, "H")
    if finite:
        check_finite(xp, H, "H")


def _common(xp: Namespace, *arrays: Array) -> tuple[Array, ...]:
    """The arrays in their promoted floating dtype (float16 / bfloat16 computed in float32)."""
    dtype = compute_dtype(xp, xp.result_type(*arrays))
    return tuple(a if a.dtype == dtype else xp.astype(a, dtype) for a in arrays)


def curvature_ok(s: Array, y: Array, *, eps: float = 1e-8) -> bool:
    """The curvature guard: ``s.y > eps |s| |y|`` (scale invariant; False for a zero pair)."""
    xp = _check_pair(s, y)
    eps = check_float("eps", eps, min=0.0)
    s, y = _common(xp, s, y)
    sy = float(_host(xp.sum(s * y)))
    ns = float(_host(xp.sqrt(xp.sum(s * s))))
    ny = float(_host(xp.sqrt(xp.sum(y * y))))
    return sy > eps * ns * ny and sy > 0.0


def bfgs_update(
    H: Array, s: Array, y: Array, *, eps: float = 1e-8, check_finite: bool = True
) -> tuple[Array, Any]:
    """One inverse-Hessian BFGS update ``H+ = (I - r s y^T) H (I - r y s^T) + r s s^T``, ``r = 1/(y.s)``.

    Returns ``(H+, True)``, or ``(H, False)`` when the pair fails :func:`curvature_ok` (then ``H``
    is returned unchanged). ``H+ y = s`` (secant equation); ``H+`` stays symmetric positive definite
    when ``H`` is. Computed in the expanded, symmetric form (``O(d^2)``), in the promoted dtype of the
    three arrays (mixed float32 / float64 inputs give float64).

    ``check_finite=False`` reads nothing back to the host (the form for traced code, e.g. inside
    ``jax.jit``): the inputs are not checked for NaN/Inf, the guard is applied element-wise (``H+``
    where the pair passes it, ``H`` in the promoted dtype where not) and the second value is a 0-d
    boolean array of the inputs' library instead of a Python ``bool``.
    """
    xp = _check_pair(s, y, finite=check_finite)
    xp = namespace(H=H, s=s, y=y)
    _check_h(xp, H, int(s.shape[0]), "`s`", finite=check_finite)
    eps = check_float("eps", eps, min=0.0)
    if check_finite and not curvature_ok(s, y, eps=eps):
        return H, False
    H, s, y = _common(xp, H, s, y)
    sy = xp.sum(s * y)
    ok = None
    if not check_finite:  # the guard of curvature_ok, on the device
        norms = xp.sqrt(xp.sum(s * s)) * xp.sqrt(xp.sum(y * y))
        ok = xp.logical_and(sy > eps * norms, sy > 0.0)
        sy = xp.where(ok, sy, xp.ones_like(sy))
    # with t = s / (s.y) and c = y.Hy + s.y: H+ = H - (t (Hy)^T + Hy t^T) + c t t^T, the same update
    # without rho^2 (it overflows for a tiny s while s s^T underflows: Inf * 0 = NaN); c t t^T is
    # formed as sign(c) u u^T with u = sqrt(|c|) t (exactly symmetric; t t^T alone may overflow)
    t = s / sy
    Hy = H @ y
    c = xp.sum(y * Hy) + sy
    u = xp.sqrt(xp.abs(c)) * t
    outer_tHy = t[:, None] * Hy[None, :]
    H_new = (
        H - (outer_tHy + xp.matrix_transpose(outer_tHy)) + xp.sign(c) * (u[:, None] * u[None, :])
    )
    if ok is None:
        return H_new, True
    return xp.where(ok, H_new, H), ok


def bfgs_direction(H: Array, g: Array, *, check_finite: bool = True) -> Array:
    """The quasi-Newton direction ``p = -H g`` (in the promoted dtype of ``H`` and ``g``).

    ``check_finite=False``: ``H`` and ``g`` are not checked for NaN/Inf (no host read; for traced code).
    """
    xp = namespace(H=H, g=g)
    _check_vector(xp, g, "g", finite=check_finite)
    _check_h(xp, H, int(g.shape[0]), "`g`", finite=check_finite)
    H, g = _common(xp, H, g)
    return -(H @ g)


def _real(name: str, value: object) -> float:
    """A real number (Python or NumPy scalar, the project's rule: an array, 0-d included, is refused;
    pass ``float(x)``) as a float; NaN and infinities pass (the caller decides)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (numbers.Real, np.integer, np.floating)
    ):
        hint = " (use float(x) for a 0-d array or tensor)" if hasattr(value, "shape") else ""
        raise ParameterTypeError(f"`{name}` must be a real number{hint}, got {describe(value)}")
    return float(value)


def armijo_condition(
    f_new: float, f0: float, alpha: float, slope: float, *, c1: float = 0.4
) -> bool:
    """Sufficient decrease: ``f(w + alpha p) <= f(w) + c1 alpha g.p`` (``slope = g.p < 0``).

    A NaN / infinite ``f_new`` is a rejection (False); ``f0``, ``alpha`` (> 0), ``slope`` and ``c1``
    (in (0, 1)) must be finite real numbers."""
    value = _real("f_new", f_new)
    f0 = check_float("f0", f0, error=NonFiniteError)
    alpha = check_float("alpha", alpha, min=0.0, min_open=True)
    slope = check_float("slope", slope, error=NonFiniteError)
    c1 = check_float("c1", c1, min=0.0, max=1.0, min_open=True, max_open=True)
    if not math.isfinite(value):
        return False
    return value <= f0 + c1 * alpha * slope


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
    ``w + alpha p`` (a Python or NumPy real number, e.g. ``float(loss)``; NaN / Inf counts as a
    rejected trial); ``slope = g.p`` must be
    negative (a descent direction), else ``ParameterError``.
    """
    if not callable(f):
        raise ParameterTypeError(f"`f` must be callable (alpha -> objective), got {describe(f)}")
    f0 = check_float("f0", f0, error=NonFiniteError)
    slope = check_float("slope", slope, error=NonFiniteError)
    if slope >= 0:
        raise ParameterError(f"`slope` = g.p must be negative (a descent direction), got {slope}")
    shrink = check_float("shrink", shrink, min=0.0, max=1.0, min_open=True, max_open=True)
    c1 = check_float("c1", c1, min=0.0, max=1.0, min_open=True, max_open=True)
    alpha = check_float("alpha0", alpha0, min=0.0, min_open=True)
    max_trials = check_int("max_trials", max_trials, min=1)
    for m in range(max_trials):
        value = _real("f(alpha)", f(alpha))
        if armijo_condition(value, f0, alpha, slope, c1=c1):
            return LineSearchResult(alpha, value, m + 1, True)
        alpha *= shrink
    return LineSearchResult(0.0, float(f0), max_trials, False)
