"""CMD: Correlation Mode Decomposition of a training trajectory (Brokman et al., ICLR 2024).

A trajectory is an ``(N, T)`` array: one row per scalar parameter, one column per epoch end. CMD groups
the parameters into ``M`` *modes* of strongly correlated dynamics and models every parameter as an affine
function of its mode's *profile* (the trajectory of one reference parameter)::

    w_n(t) ~ a_n * r_{mode(n)}(t) + b_n

so the whole trajectory is stored as ``M`` profiles plus ``2 N`` coefficients.

Pipeline (post-hoc, :func:`fit_cmd`):

1. :func:`sample_indices`: ``K`` parameters, stratified over tensors (segments), deterministic for a seed;
2. :func:`abs_correlation`: ``C = |corrcoef|`` of the sampled rows (``K x K``; 0 for a constant row);
3. :func:`cluster`: complete-linkage agglomerative clustering into at most ``M`` clusters, on the
   Euclidean distance between rows of ``C`` (the paper's choice, the default) or on ``1 - C``;
   the same partition as ``scipy.cluster.hierarchy.linkage(method='complete')`` followed by
   ``fcluster(criterion='maxclust')`` on the same distance matrix (when no two merges tie; ties below);
4. :func:`find_modes`: the reference of a cluster is its member with the largest summed ``|corr|`` to the
   other members; the profiles are the references' rows;
5. :func:`assign_modes` / :func:`fit_coefficients`: every parameter joins the mode whose profile it
   correlates with most (in ``|pearson|``) and gets its least-squares ``(a_n, b_n)``; processed in row
   chunks, so nothing of size ``N x T`` is allocated beyond one chunk;
6. :func:`reconstruct_trajectory`, :func:`relative_error`.

Constant parameters. Real networks hold parameters that never move (weights on always-zero inputs, dead
units). A row counts as *constant* when its motion is at the level of rounding: its centred norm is at most
``8 eps sqrt(T) (|x_0| + rms_t(x_t - x_0))`` (``eps`` of the trajectory's dtype; the bracket lies between
``max_t |x_t| / sqrt(T)`` and ``3 max_t |x_t|``). A constant row correlates 0 with everything
(itself included), is kept out of the clustering (its sample label is ``-1``), never serves as a
reference, joins mode 0 and gets ``a = 0``, ``b =`` its mean (so it is reconstructed exactly). When
every sampled row is constant, the model has one mode whose reference is the first sampled row (every
``a`` is 0). Correlations are true Pearson correlations of the centred rows, clipped to ``[-1, 1]``.

Scale. Rows are shifted by their first value (exact for rows that move little) and, when their motion is so
large or small that squares would overflow or underflow, divided by a power of two (exact), so every fit is
invariant to the trajectory's scale: ``fit_cmd(c * x)`` has the same modes and assignment, the same ``a``
and ``c`` times the ``b`` of ``fit_cmd(x)`` (for powers of two ``c`` exactly; otherwise up to rounding).

Beyond the paper, :func:`choose_num_modes` picks the smallest ``M`` whose relative reconstruction error on
the sample stays under a tolerance (one linkage, cut at every ``M``).

Online CMD (:class:`OnlineCMD`): modes, references and assignment are fitted once on a warm-up trajectory,
then every new epoch updates each ``(a_n, b_n)`` so that it equals the batch least-squares fit over all
epochs seen, in ``O(2 N + M t)`` memory (Welford-style running means and co-moments, see the class).
:func:`select_embedding` chooses the parameters that embedded CMD replaces by their model.

Arrays of the caller's library are never written in place (every result is built with ``concat``,
``where``, ``take``), so immutable arrays (JAX) work; the ``K x K`` linkage runs on a private NumPy copy
of the distances.

Ties (documented, deterministic): the clustering merges, among equally close pairs of clusters, the pair
whose (smaller slot, larger slot) comes first in row-major order, where a cluster's slot is the smallest
original index among its members; when the ``M``-cluster cut falls on a height shared by several merges,
all of them are applied (as ``fcluster`` does), which can leave fewer than ``M`` clusters. Clusters are
numbered by decreasing size, equal sizes by their smallest member. A reference tie goes to the member with
the smallest sample index, an assignment tie to the lowest mode number (a constant parameter joins mode 0
with ``a = 0``). Mode ids are int64 in fits and int32 in the online state (no limit such as 256 modes).
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import array_api_compat
import numpy as np

from ._array import Array, Namespace, check_floating, check_rank, namespace, upcast
from ._validate import check_bool, check_choice, check_float, check_int, check_seed, describe
from .backend import get_backend
from .errors import (
    DTypeError,
    NonFiniteError,
    ParameterError,
    ParameterTypeError,
    ShapeError,
)

__all__ = [
    "CONSTANT_TOLERANCE",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_METRIC",
    "CMDFit",
    "Modes",
    "OnlineCMD",
    "abs_correlation",
    "assign_modes",
    "choose_num_modes",
    "cluster",
    "find_modes",
    "fit_cmd",
    "fit_cmd_shard",
    "fit_coefficients",
    "reconstruct_trajectory",
    "relative_error",
    "sample_indices",
    "select_embedding",
]

DEFAULT_CHUNK_SIZE = 1 << 16
"""Rows of the trajectory processed at once by the chunked functions."""

CONSTANT_TOLERANCE = 8.0
"""A row is constant when its centred norm is <= this many ``eps sqrt(T)`` times its magnitude."""

Metric = Literal["correlation", "euclidean"]
METRICS: tuple[str, ...] = ("euclidean", "correlation")

DEFAULT_METRIC: Metric = "euclidean"
"""The paper's distance (Euclidean between rows of ``|corr|``); chosen by measurement, see the docs."""


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------
def _check_trajectory(xp: Namespace, x: Array, name: str, *, min_epochs: int = 2) -> None:
    if x.ndim != 2:
        raise ShapeError(
            f"`{name}` must be a 2-D trajectory (parameters, epochs), got shape {tuple(x.shape)}"
        )
    check_floating(xp, x, name)
    if x.shape[0] < 1:
        raise ShapeError(
            f"`{name}` must hold at least one parameter (row), got shape {tuple(x.shape)}"
        )
    if x.shape[1] < min_epochs:
        raise ShapeError(
            f"`{name}` must hold at least {min_epochs} epochs (columns) to fit CMD, "
            f"got shape {tuple(x.shape)}"
        )


def _check_finite(x: Array, name: str) -> None:
    if not get_backend(x).all_finite(x):
        raise NonFiniteError(f"`{name}` contains NaN or Inf")


def _check_chunk(chunk_size: object) -> int:
    result: int = check_int("chunk_size", chunk_size, min=1)
    return result


def _check_fraction(value: object, name: str, *, open_low: bool = True) -> float:
    result: float = check_float(name, value, min=0.0, max=1.0, min_open=open_low)
    return result


def _check_metric(metric: object) -> Metric:
    return "euclidean" if check_choice("metric", metric, METRICS) == "euclidean" else "correlation"


def _check_vector(xp: Namespace, v: Array, name: str, n: int, *, finite: bool = True) -> None:
    """A real floating ``(n,)`` array, finite unless told otherwise."""
    if v.ndim != 1 or int(v.shape[0]) != n:
        raise ShapeError(f"`{name}` must have shape ({n},), got {tuple(v.shape)}")
    check_floating(xp, v, name)
    if finite:
        _check_finite(v, name)


def _check_modes_index(
    xp: Namespace, v: Array, name: str, n: int, n_modes: int, *, values: bool = True
) -> None:
    """An integer ``(n,)`` array of mode ids in ``0 .. n_modes - 1`` (the range only with ``values``)."""
    if v.ndim != 1 or int(v.shape[0]) != n:
        raise ShapeError(f"`{name}` must have shape ({n},), got {tuple(v.shape)}")
    if not xp.isdtype(v.dtype, "integral"):
        raise DTypeError(f"`{name}` must have an integer dtype, got {v.dtype}")
    if values and n and (int(xp.min(v)) < 0 or int(xp.max(v)) >= n_modes):
        raise ParameterError(
            f"`{name}` values must lie in 0..{n_modes - 1} (one per mode), got "
            f"{int(xp.min(v))}..{int(xp.max(v))}"
        )


def _host_indices(value: object, name: str, n: int | None) -> np.ndarray:
    """A 1-D NumPy int64 array of distinct indices in ``0 .. n-1`` (``n=None``: any ``>= 0``), from
    integer array-likes only."""
    if isinstance(value, (str, bytes)) or value is None:
        raise ParameterTypeError(
            f"`{name}` must be a 1-D array of integer indices, got {describe(value)}"
        )
    try:
        arr = np.asarray(value)
    except Exception as exc:
        raise ParameterTypeError(
            f"`{name}` must be a 1-D array of integer indices, got {describe(value)}"
        ) from exc
    if arr.ndim != 1:
        raise ShapeError(f"`{name}` must be 1-D, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise DTypeError(f"`{name}` must hold integers, got dtype {arr.dtype}")
    idx = arr.astype(np.int64)
    if idx.size and int(idx.min()) < 0:
        raise ParameterError(f"`{name}` must be >= 0, got {int(idx.min())}")
    if n is not None and idx.size and int(idx.max()) >= n:
        raise ParameterError(
            f"`{name}` must lie in 0..{n - 1}, got {int(idx.min())}..{int(idx.max())}"
        )
    if np.unique(idx).size != idx.size:
        raise ParameterError(f"`{name}` must not repeat an index")
    return idx


def _device(x: Array) -> Any:
    return array_api_compat.device(x)


def _index_dtype(xp: Namespace, like: Array) -> Any:
    """The namespace's default index dtype (int64; int32 in JAX without x64)."""
    try:
        return xp.__array_namespace_info__().default_dtypes(device=_device(like))["indexing"]
    except (AttributeError, TypeError, KeyError):  # pragma: no cover - pre-2023.12 namespaces
        return xp.int64


def _index_array(xp: Namespace, idx: np.ndarray, like: Array) -> Array:
    host = np.asarray(idx, dtype=np.int64)
    dtype = _index_dtype(xp, like)
    if dtype != xp.int64:
        host = host.astype(np.int32)
    return xp.asarray(host, device=_device(like))


def _to_host(x: Array) -> np.ndarray:
    return np.asarray(get_backend(x).to_numpy(x))


def _eps(xp: Namespace, dtype: Any) -> float:
    return float(xp.finfo(dtype).eps)


# --------------------------------------------------------------------------------------------------
# 1. sampling
# --------------------------------------------------------------------------------------------------
def _sample_counts(n_seg: list[int], k: int) -> list[int]:
    """Per-segment sample sizes: the paper's formula, topped up to exactly ``k`` (``k < sum(n_seg)``)."""
    total = sum(n_seg)
    n_layers = len(n_seg)
    counts = [min(n, min(k // (2 * n_layers), n) + math.floor(n / total * k / 2)) for n in n_seg]
    short = k - sum(counts)
    if short > 0:
        cap = [n - c for n, c in zip(n_seg, counts, strict=True)]
        room = sum(cap)  # >= short because k < total
        num = [short * c for c in cap]
        extra = [v // room for v in num]
        left = short - sum(extra)
        # largest remainders first, ties to the lower segment (Hamilton's apportionment)
        order = sorted(range(n_layers), key=lambda i: (-(num[i] % room), i))
        for i in order[:left]:
            extra[i] += 1
        counts = [c + e for c, e in zip(counts, extra, strict=True)]
    return counts


def sample_indices(
    sizes: Sequence[int] | int, num_samples: int = 1000, *, seed: int | None = 0
) -> np.ndarray:
    """Flat indices of ``num_samples`` parameters, stratified over segments (tensors), sorted.

    ``sizes`` are the numbers of scalars of the ``L`` segments (tensors) that, concatenated, make the
    ``N`` rows of the trajectory (an int means one segment). Segment ``l`` (``n_l`` scalars) first gets
    the paper's ``min(n_l, min(floor(K/(2L)), n_l) + floor(n_l/N * K/2))`` indices; what flooring and
    small segments leave short of ``K`` is then shared among the segments in proportion to the scalars
    each has left (largest remainders first, ties to the lower segment), so exactly ``K`` distinct
    indices are drawn (uniformly without replacement within each segment). With ``K >= N`` every index is
    returned. Deterministic for a given ``seed`` (NumPy ``default_rng``; ``None`` draws fresh entropy).
    Returns a NumPy int64 array (host metadata).
    """
    if isinstance(sizes, (list, tuple)):
        seg: list[object] = list(sizes)
    elif isinstance(sizes, (int, np.integer)) and not isinstance(sizes, (bool, np.bool_)):
        seg = [sizes]
    else:
        raise ParameterTypeError(
            f"`sizes` must be an int or a non-empty list/tuple of ints, got {describe(sizes)}"
        )
    if not seg:
        raise ParameterError("`sizes` must name at least one segment, got an empty sequence")
    n_seg = [int(check_int(f"sizes[{i}]", n, min=0)) for i, n in enumerate(seg)]
    total = sum(n_seg)
    if total < 1:
        raise ParameterError(f"`sizes` must be >= 0 with a positive total, got {n_seg}")
    k = check_rank(num_samples, 2**62, name="num_samples", what="a huge bound")
    rng_seed = check_seed("seed", seed)
    if k >= total:
        return np.arange(total, dtype=np.int64)
    rng = np.random.default_rng(rng_seed)
    out: list[np.ndarray] = []
    offset = 0
    for n, take in zip(n_seg, _sample_counts(n_seg, k), strict=True):
        if take > 0:
            out.append(offset + np.sort(rng.choice(n, size=take, replace=False)).astype(np.int64))
        offset += n
    return np.concatenate(out)


# --------------------------------------------------------------------------------------------------
# 2. rows: centring, scale, constant rows, correlation
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Rows:
    """What CMD needs of a block of rows ``x`` ``(c, T)`` (compute dtype).

    ``shifted`` are the rows minus their first value, divided by ``scale`` (a power of two per row, 1
    unless squares would overflow or underflow); ``shift_mean`` their means (so the centred rows are
    ``shifted - shift_mean``, see :meth:`centred`), ``norm`` the norms of the centred rows (scaled
    units), ``mean`` the row means (data units), ``constant`` the rows whose motion is at rounding level
    (see the module docstring).
    """

    shifted: Array
    shift_mean: Array
    mean: Array
    norm: Array
    scale: Array
    constant: Array

    def centred(self, xp: Namespace) -> Array:
        return self.shifted - self.shift_mean[:, None]


def _rows(
    xp: Namespace,
    x: Array,
    eps: float,
    *,
    finite_name: str | None = None,
    against: Array | None = None,
) -> tuple[_Rows, Array | None]:
    """Row statistics of ``x``, and with ``against`` ``(T, M + 1)`` also ``shifted @ against``.

    Three passes over the block: the shift (which also reads it), the sum of squares, and one GEMM.
    With ``against = [U^T | 1]`` (the unit profiles and a column of ones, see :class:`_Profiles`) the
    GEMM gives both the products with the profiles and the row sums ``sum d``; without it ``sum d`` is
    one more pass. The shift by the first value is exact for values within a factor 2 of it (Sterbenz),
    so a constant row gives exact zeros, and the centred sum of squares ``sum d^2 - (sum d)^2 / T`` of
    the shifted rows loses at most ``log2(T + 1)`` bits (``|mean(d)| <= max|d - mean(d)|``) beyond the
    rounding of the two sums (each within ``T eps sum |d|``, whatever order the library sums in). Rows
    whose squares would overflow or underflow are redone scaled by a power of two (exact). With
    ``finite_name`` the block is checked for NaN / Inf on the way (a finite sum of squares proves it
    finite).
    """
    x = upcast(xp, x)
    t = int(x.shape[1])
    x0 = xp.asarray(
        x[:, 0], copy=True
    )  # contiguous: the broadcast below and the vector ops are faster
    d = x - x0[:, None]
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is detected below and redone
        ss = xp.vecdot(d, d, axis=-1)
        prod = None if against is None else d @ against
    if finite_name is not None and not bool(xp.all(xp.isfinite(ss) & xp.isfinite(x0))):
        _check_finite(x, finite_name)  # raises for NaN / Inf; else only the squares overflowed
    info = xp.finfo(x.dtype)
    lo = float(info.smallest_normal) * 2.0**32
    hi = float(info.max) * 2.0**-32
    sd = xp.sum(d, axis=1) if prod is None else prod[:, -1]
    one = xp.ones_like(x0)
    if bool(xp.any((ss > hi) | ((ss < lo) & ((ss > 0) | (sd != 0))))):
        amax = xp.max(xp.abs(d), axis=1)
        pos = amax > 0
        scale = xp.where(pos, 2.0 ** xp.floor(xp.log2(xp.where(pos, amax, one))), one)
        d = d / scale[:, None]  # a power of two: exact
        ss = xp.vecdot(d, d, axis=-1)
        if against is None:
            sd = xp.sum(d, axis=1)
        else:
            prod = d @ against
            sd = prod[:, -1]
    else:
        scale = one
    mu = sd / t
    norm = xp.sqrt(xp.clip(ss - sd * mu, 0.0, None))
    mean = x0 + scale * mu
    magnitude = xp.abs(x0) / scale + xp.sqrt(ss / t)  # |x_0| + rms(x - x_0), scaled
    constant = norm <= (CONSTANT_TOLERANCE * eps * math.sqrt(t)) * magnitude
    rows = _Rows(shifted=d, shift_mean=mu, mean=mean, norm=norm, scale=scale, constant=constant)
    return rows, prod


def _unit(xp: Namespace, rows: _Rows) -> Array:
    """Unit centred rows (0 for a constant row)."""
    const = rows.constant
    safe = xp.where(const, xp.ones_like(rows.norm), rows.norm)
    centred = rows.centred(xp)
    return xp.where(const[:, None], xp.zeros_like(centred), centred / safe[:, None])


def _abs_corr(xp: Namespace, unit: Array) -> Array:
    return xp.clip(xp.abs(unit @ xp.matrix_transpose(unit)), 0.0, 1.0)


def abs_correlation(x: Array, *, check_finite: bool = True) -> Array:
    """``|corrcoef(x)|`` of the rows of ``x`` (``(K, T)`` -> ``(K, K)``), clipped to [0, 1].

    A constant row (motion at rounding level, see the module docstring) has correlation 0 with
    everything, itself included (``corrcoef``'s NaN replaced by 0). Needs ``T >= 2``. Same library,
    device and floating dtype as ``x`` (half precision computed in float32). Scale-invariant.
    """
    xp = namespace(x=x)
    _check_trajectory(xp, x, "x")
    if check_bool("check_finite", check_finite):
        _check_finite(x, "x")
    c = _abs_corr(xp, _unit(xp, _rows(xp, x, _eps(xp, x.dtype))[0]))
    return xp.astype(c, x.dtype) if c.dtype != x.dtype else c


def _distance(xp: Namespace, c: Array, metric: str) -> Array:
    if metric == "correlation":
        return 1.0 - c
    if metric == "euclidean":
        sq = xp.sum(c * c, axis=1)
        d2 = sq[:, None] + sq[None, :] - 2.0 * (c @ xp.matrix_transpose(c))
        return xp.sqrt(xp.clip(d2, 0.0, None))
    raise ParameterError(f"`metric` must be one of {METRICS}, got {metric!r}")


# --------------------------------------------------------------------------------------------------
# 3. complete-linkage clustering
# --------------------------------------------------------------------------------------------------
def _linkage(distance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Complete-linkage merges ``(K-1, 2)`` (slots, smaller first) and their heights, in merge order.

    Runs on the host, on a private NumPy float64 copy of the ``K x K`` distances (the only array it
    writes; the caller's arrays are never written, whatever their library). Repeatedly merges the
    closest pair of live clusters, the first in row-major order on ties (the pair a flat ``argmin`` of
    the matrix would pick); the merged cluster keeps the smaller slot, its distance to every other
    cluster is the max of the two rows. Only ``max`` and comparisons touch the distances, so the heights
    are exactly entries of ``distance``. Heights are non-decreasing (complete linkage has no inversions).

    Each row's minimum and its first column are kept; a merge only raises distances, so only the merged
    row and the rows whose minimum sat in one of the two merged columns are rescanned: ``O(K^2)`` work
    on average instead of a ``K x K`` scan per merge (:func:`_linkage_scan`, the plain version, gives the
    very same merges and heights).
    """
    k = int(distance.shape[0])
    d = np.array(distance, dtype=np.float64, copy=True)
    np.fill_diagonal(d, np.inf)
    merges = np.zeros((max(k - 1, 0), 2), dtype=np.int64)
    heights = np.zeros(max(k - 1, 0), dtype=np.float64)
    if k < 2:
        return merges, heights
    arg = np.argmin(d, axis=1)  # first column of each row's minimum
    low = d[np.arange(k), arg]
    for step in range(k - 1):
        i = int(np.argmin(low))  # first row holding the global minimum, then its first column
        j = int(arg[i])
        i, j = min(i, j), max(i, j)
        heights[step] = d[i, j]
        merges[step] = (i, j)
        row = np.maximum(d[i, :], d[j, :])
        d[i, :] = row
        d[:, i] = row
        d[i, i] = np.inf
        d[j, :] = np.inf
        d[:, j] = np.inf
        low[j] = np.inf
        arg[j] = 0
        # rows whose minimum sat in column i or j (their values there went up), and row i itself
        stale = np.flatnonzero((arg == i) | (arg == j))
        stale = np.union1d(stale, [i])
        stale = stale[np.isfinite(low[stale]) | (stale == i)]
        if stale.size:
            sub = np.argmin(d[stale, :], axis=1)
            arg[stale] = sub
            low[stale] = d[stale, sub]
        # any other row keeps its minimum and its first column: values only went up
    return merges, heights


def _linkage_scan(distance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_linkage` by a full ``argmin`` scan per merge (``O(K^3)``): the plain definition."""
    k = int(distance.shape[0])
    d = np.array(distance, dtype=np.float64, copy=True)
    np.fill_diagonal(d, np.inf)
    merges = np.zeros((max(k - 1, 0), 2), dtype=np.int64)
    heights = np.zeros(max(k - 1, 0), dtype=np.float64)
    flat = d.reshape(-1)
    for step in range(k - 1):
        i, j = divmod(int(np.argmin(flat)), k)
        i, j = min(i, j), max(i, j)
        heights[step] = d[i, j]
        merges[step] = (i, j)
        row = np.maximum(d[i, :], d[j, :])
        d[i, :] = row
        d[:, i] = row
        d[i, i] = np.inf
        d[j, :] = np.inf
        d[:, j] = np.inf
    return merges, heights


def _host_linkage(distance: Array) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_linkage` of any library's ``K x K`` distance matrix (copied to the host)."""
    return _linkage(_to_host(distance))


def _cut(merges: np.ndarray, heights: np.ndarray, k: int, max_clusters: int) -> np.ndarray:
    """Labels (0 = largest cluster) of the partition into at most ``max_clusters`` clusters.

    Applies the first ``k - max_clusters`` merges and every further merge at the same height (like
    ``fcluster(maxclust)``), then numbers clusters by decreasing size, ties by smallest member.
    """
    need = max(0, k - max_clusters)
    if need > 0:
        h = heights[need - 1]
        while need < len(heights) and heights[need] <= h:
            need += 1
    parent = list(range(k))

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for i, j in merges[:need].tolist():
        ri, rj = root(int(i)), root(int(j))
        parent[max(ri, rj)] = min(ri, rj)
    roots = np.array([root(a) for a in range(k)], dtype=np.int64)
    uniq, inverse, counts = np.unique(roots, return_inverse=True, return_counts=True)
    # uniq is the smallest member of each cluster (roots are minima); order by (-size, smallest member)
    order = np.lexsort((uniq, -counts))
    rank = np.argsort(order)
    return rank[inverse.reshape(-1)].astype(np.int64)


def _check_distance(xp: Namespace, distance: Array, check_finite: bool) -> None:
    if distance.ndim != 2 or distance.shape[0] != distance.shape[1] or distance.shape[0] < 1:
        raise ShapeError(
            f"`distance` must be a square (K, K) matrix with K >= 1, got shape {tuple(distance.shape)}"
        )
    check_floating(xp, distance, "distance")
    if check_bool("check_finite", check_finite):
        _check_finite(distance, "distance")


def cluster(distance: Array, max_clusters: int, *, check_finite: bool = True) -> Array:
    """Complete-linkage clustering of ``K`` items into at most ``max_clusters`` clusters.

    ``distance`` is a symmetric ``(K, K)`` matrix (its diagonal is ignored). Returns int64 labels
    ``(K,)`` in ``0 .. M'-1`` (``M' <= max_clusters``; fewer only when merges tie at the cut height),
    numbered by decreasing cluster size. The partition equals scipy's ``fcluster(linkage(squareform(D),
    'complete'), max_clusters, 'maxclust')`` whenever no two candidate merges tie; ties are resolved as in
    the module docstring. ``1 <= max_clusters <= K`` else ``RankError``. Cost ``O(K^3)`` elementwise
    (``K - 1`` arg-minimisations over ``K x K``), ``O(K^2)`` memory.
    """
    xp = namespace(distance=distance)
    _check_distance(xp, distance, check_finite)
    k = int(distance.shape[0])
    m = check_rank(max_clusters, k, name="max_clusters", what="the number of items K")
    merges, heights = _host_linkage(distance)
    return _index_array(xp, _cut(merges, heights, k, m), distance)


# --------------------------------------------------------------------------------------------------
# 4. modes
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Modes:
    """Modes found on a sample: cluster labels, reference rows and their profiles.

    ``labels``: int64 ``(K,)`` cluster of each sampled row (0 = largest; ``-1`` for a constant row, kept
    out of the clustering); ``references``: NumPy int64 ``(M,)`` row index (into the sample) of each
    mode's reference; ``profiles``: ``(M, T)`` the references' rows (the sample's library, device and
    dtype).
    """

    labels: Array
    references: np.ndarray
    profiles: Array

    @property
    def num_modes(self) -> int:
        return int(self.references.shape[0])


def _references(c: np.ndarray, labels: np.ndarray, tie: float = 0.0) -> np.ndarray:
    """Per cluster: the member with the largest summed |corr| to the other members.

    Ties: every member whose score is within ``tie * (members - 1)`` of the best (``tie`` bounds the
    rounding of one |corr| entry) counts as tied, and the first of them (lowest sample row) is chosen.
    Scores that are equal in exact arithmetic (rows that are affine images of each other) differ by
    rounding, which changes with the data's scale: the tolerance keeps the choice scale-independent.
    """
    n_modes = int(labels.max()) + 1
    refs = []
    for m in range(n_modes):
        members = np.flatnonzero(labels == m)
        sub = c[np.ix_(members, members)]
        score = sub.sum(axis=1) - np.diag(sub)
        near = score >= score.max() - tie * max(1, members.size - 1)
        refs.append(int(members[int(np.argmax(near))]))
    return np.asarray(refs, dtype=np.int64)


def _tie_tolerance(rows: _Rows) -> float:
    """The rounding bound of one |corr| entry of rows of length T: ``2 (T + 4) eps`` (compute dtype)."""
    x = rows.shifted
    return 2.0 * (int(x.shape[1]) + 4) * _eps(array_api_compat.array_namespace(x), x.dtype)


@dataclass(frozen=True)
class _Clustering:
    """The linkage of a sample's moving rows: ``keep`` (sample rows clustered), their |corr| (host,
    exactly symmetric), merges and heights, and the sample's row statistics."""

    rows: _Rows
    keep: np.ndarray
    c_host: np.ndarray
    merges: np.ndarray
    heights: np.ndarray

    def labels_and_refs(self, m: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample labels (``-1`` for constant rows) and references (sample rows) of the ``m``-cut."""
        labels = np.full(k, -1, dtype=np.int64)
        if self.keep.size == 0:  # nothing moves: one mode, the first sampled row (every a = 0)
            return labels, np.zeros(1, dtype=np.int64)
        sub = _cut(self.merges, self.heights, int(self.keep.size), min(m, int(self.keep.size)))
        labels[self.keep] = sub
        return labels, self.keep[_references(self.c_host, sub, _tie_tolerance(self.rows))]


def _cluster_sample(xp: Namespace, x: Array, metric: str) -> _Clustering:
    rows = _rows(xp, x, _eps(xp, x.dtype))[0]
    keep = np.flatnonzero(~_to_host(rows.constant))
    if keep.size == 0:
        empty = np.zeros((0, 2), dtype=np.int64)
        return _Clustering(rows, keep, np.zeros((0, 0)), empty, np.zeros(0))
    unit = xp.take(_unit(xp, rows), _index_array(xp, keep, x), axis=0)
    c = _abs_corr(xp, unit)
    merges, heights = _host_linkage(_distance(xp, c, metric))
    c_host = _to_host(c).astype(np.float64)
    c_host = (
        c_host + c_host.T
    ) / 2.0  # exactly symmetric: a two-member cluster's scores tie exactly
    return _Clustering(rows, keep, c_host, merges, heights)


def find_modes(
    sample: Array,
    max_modes: int,
    *,
    metric: Metric = DEFAULT_METRIC,
    check_finite: bool = True,
) -> Modes:
    """Cluster the sampled trajectories ``(K, T)`` into at most ``max_modes`` modes; pick references.

    Constant rows (see the module docstring) are kept out of the clustering (label ``-1``), so at most
    ``min(max_modes, moving rows)`` modes come out. ``metric='euclidean'`` (default, the paper's choice):
    Euclidean distance between rows of ``|corr|``; ``'correlation'``: distance ``1 - |corr|`` (complete
    linkage then guarantees that every pair inside a cluster has ``|corr| >= 1 - height``). The reference
    of a cluster is its member with the largest summed ``|corr|`` to the other members (equivalently the
    largest mean ``|corr|`` to its own cluster); scores within the rounding bound ``2 (T + 4) eps`` per
    member of the best tie, and the first tied member (lowest sample row) is the reference, at any scale.
    """
    xp = namespace(sample=sample)
    _check_trajectory(xp, sample, "sample")
    if check_bool("check_finite", check_finite):
        _check_finite(sample, "sample")
    k = int(sample.shape[0])
    m = check_rank(max_modes, k, name="max_modes", what="the number of sampled parameters K")
    met = _check_metric(metric)
    labels, refs = _cluster_sample(xp, sample, met).labels_and_refs(m, k)
    profiles = xp.take(sample, _index_array(xp, refs, sample), axis=0)
    return Modes(labels=_index_array(xp, labels, sample), references=refs, profiles=profiles)


# --------------------------------------------------------------------------------------------------
# 5. assignment and least squares, in chunks
# --------------------------------------------------------------------------------------------------
class _Profiles:
    """Per-mode quantities of the profiles needed by every chunk (compute dtype)."""

    def __init__(self, xp: Namespace, profiles: Array, eps: float) -> None:
        rows = _rows(xp, profiles, eps)[0]
        self.mean = rows.mean
        self.unit = _unit(xp, rows)  # (M, T), 0 for a constant profile
        # <d - mean(d), u> = <d, u - mean(u)> for any row d: the shifted rows need not be centred if
        # the profiles are re-centred (the unit rows are centred up to rounding; this removes what
        # rounding left, at one rounding per entry, the order of the GEMM's own rounding)
        t = int(self.unit.shape[1])
        recentred = self.unit - xp.sum(self.unit, axis=1)[:, None] / t
        # [U'^T | 1] (T, M + 1), contiguous: one GEMM per chunk gives <d - d̄, u_m> and the row sums
        ones = xp.matrix_transpose(xp.ones_like(self.unit[:1, :]))
        self.against = xp.concat([xp.matrix_transpose(recentred), ones], axis=1)
        self.norm = rows.norm
        self.scale = rows.scale
        self.constant = rows.constant
        self.dtype = rows.mean.dtype

    def m2(self, xp: Namespace, unit: float = 1.0) -> Array:
        """Centred sums of squares in units of ``unit**2`` (a power of two: the online state's unit)."""
        length = (self.scale / unit) * self.norm
        return xp.where(self.constant, xp.zeros_like(length), length * length)

    def unit_for_state(self, xp: Namespace) -> float:
        """A power of two near the largest profile's motion, so the online co-moments neither overflow
        nor underflow at any scale of the trajectory (1 when every profile is constant)."""
        moving = ~self.constant
        if not bool(xp.any(moving)):
            return 1.0
        logs = xp.log2(xp.where(moving, self.scale, xp.ones_like(self.scale))) + xp.log2(
            xp.where(moving, self.norm, xp.ones_like(self.norm))
        )
        top = float(xp.max(xp.where(moving, logs, xp.full_like(logs, -float("inf")))))
        return 2.0 ** max(-1000, min(1000, math.floor(top)))


def _chunk_stats(
    xp: Namespace,
    w: Array,
    prof: _Profiles,
    assignment: Array | None,
    eps: float,
    *,
    want_cov: bool = False,
    cov_unit: float = 1.0,
    finite_name: str | None = None,
) -> tuple[Array, Array, Array, Array | None]:
    """For a chunk ``w`` (c, T): mode (given or by max |corr|), mean, ``a`` and the co-moment.

    The co-moment ``sum_t (w - w̄)(r - r̄)`` with the mode's profile is returned in data units (it is the
    online state; it may overflow at extreme scales, ``a`` never does).
    """
    rows, prod = _rows(
        xp,
        xp.astype(w, prof.dtype) if w.dtype != prof.dtype else w,
        eps,
        finite_name=finite_name,
        against=prof.against,
    )
    assert prod is not None
    # (c, M): <w - w̄, unit profile> (scaled units), from the shifted rows without centring them
    g = prod[:, :-1]

    mode = _assign(xp, rows, g) if assignment is None else assignment
    mode = xp.astype(mode, _index_dtype(xp, w))
    gm = xp.take_along_axis(g, mode[:, None], axis=1)[:, 0]
    p_norm = xp.take(prof.norm, mode)
    p_scale = xp.take(prof.scale, mode)
    degenerate = rows.constant | xp.take(prof.constant, mode)
    safe_norm = xp.where(degenerate, xp.ones_like(p_norm), p_norm)
    a = xp.where(degenerate, xp.zeros_like(gm), (gm / safe_norm) * (rows.scale / p_scale))
    cov = None
    if want_cov:
        ratio = (rows.scale / cov_unit) * (p_scale / cov_unit)  # powers of two: exact
        cov = xp.where(degenerate, xp.zeros_like(gm), (gm * p_norm) * ratio)
    return mode, rows.mean, a, cov


def _check_profiles(xp: Namespace, trajectory: Array, profiles: Array, check_finite: bool) -> None:
    _check_trajectory(xp, profiles, "profiles")
    if profiles.shape[1] != trajectory.shape[1]:
        raise ShapeError(
            f"`profiles` {tuple(profiles.shape)} and `trajectory` {tuple(trajectory.shape)} "
            "must have the same number of epochs (columns)"
        )
    if check_finite:
        _check_finite(profiles, "profiles")


def _advise_rows(x: Array, rows: np.ndarray) -> None:
    """Ask the OS to start reading the file pages of ``rows`` of a NumPy memmap, all at once.

    The sample is ``K`` rows scattered over the whole file: read one by one from a file that is not in the
    page cache, each costs a disk round trip (about 0.9 s for K = 1000 here); announced together with
    ``POSIX_FADV_WILLNEED`` the reads are queued at once (about 20 ms). Only for a C-contiguous ``np.memmap``
    that maps its file directly (not a view of another memmap), where ``posix_fadvise`` exists; otherwise,
    and on any OS error, nothing happens. A hint about which pages will be read: it changes no result.
    """
    advise = getattr(os, "posix_fadvise", None)
    base: object = getattr(x, "base", None)  # the mmap itself for a memmap of its own file
    if (
        advise is None
        or not isinstance(x, np.memmap)
        or not isinstance(base, mmap.mmap)
        or not x.flags.c_contiguous
        or not x.filename
    ):
        return
    start, row = int(x.offset), int(x.strides[0])
    try:
        fd = os.open(x.filename, os.O_RDONLY)
    except OSError:
        return
    try:
        for r in rows.tolist():
            advise(fd, start + int(r) * row, row, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def _run_chunks(
    trajectory: Array,
    profiles: Array,
    assignment: Array | None,
    chunk_size: int,
    check_finite: bool,
    want: str,
) -> tuple[Array, ...]:
    names: dict[str, Array] = {"trajectory": trajectory, "profiles": profiles}
    if assignment is not None:
        names["assignment"] = assignment
    xp = namespace(**names)
    _check_trajectory(xp, trajectory, "trajectory")
    finite = check_bool("check_finite", check_finite)
    _check_profiles(xp, trajectory, profiles, finite)
    chunk = _check_chunk(chunk_size)
    n = int(trajectory.shape[0])
    if assignment is not None:
        _check_modes_index(xp, assignment, "assignment", n, int(profiles.shape[0]))
    eps = _eps(xp, trajectory.dtype)
    prof = _Profiles(xp, profiles, eps)
    modes: list[Array] = []
    a_parts: list[Array] = []
    b_parts: list[Array] = []
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        w = trajectory[s:e, :]
        given = None if assignment is None else assignment[s:e]
        name = "trajectory" if finite else None  # checked on the way, at no extra pass
        mode, mean, a, _ = _chunk_stats(xp, w, prof, given, eps, finite_name=name)
        modes.append(mode)
        if want != "assign":
            b = mean - a * xp.take(prof.mean, mode)
            a_parts.append(xp.astype(a, trajectory.dtype))
            b_parts.append(xp.astype(b, trajectory.dtype))
    out_mode = _join(xp, modes)
    if want == "assign":
        return (out_mode,)
    a_all, b_all = _join(xp, a_parts), _join(xp, b_parts)
    if want == "fit":
        return a_all, b_all
    return out_mode, a_all, b_all


def _join(xp: Namespace, parts: list[Array]) -> Array:
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)


def assign_modes(
    trajectory: Array,
    profiles: Array,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    check_finite: bool = True,
) -> Array:
    """Mode of every parameter: ``argmax_m |pearson(trajectory[n], profiles[m])|`` (int64 ``(N,)``).

    Processed ``chunk_size`` rows at a time (temporaries ``chunk_size x T`` and ``chunk_size x M``).
    A constant row (or profile, see the module docstring) correlates 0 with everything; a constant row
    joins mode 0; ties go to the lowest mode.
    """
    return _run_chunks(trajectory, profiles, None, chunk_size, check_finite, "assign")[0]


def fit_coefficients(
    trajectory: Array,
    profiles: Array,
    assignment: Array,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    check_finite: bool = True,
) -> tuple[Array, Array]:
    """Least-squares ``(a, b)`` (each ``(N,)``) of ``trajectory[n] ~ a_n profiles[mode_n] + b_n``.

    Computed from centred rows (``a = sum (w - w̄)(r - r̄) / sum (r - r̄)^2``, ``b = w̄ - a r̄``), chunked
    and scale-invariant. For a constant row or profile (see the module docstring) ``a = 0`` and
    ``b = mean(w)``.
    """
    namespace(trajectory=trajectory, assignment=assignment)  # an array, not None
    return _run_chunks(trajectory, profiles, assignment, chunk_size, check_finite, "fit")


def reconstruct_trajectory(
    profiles: Array,
    assignment: Array,
    a: Array,
    b: Array,
    *,
    start: int = 0,
    stop: int | None = None,
    check_finite: bool = True,
) -> Array:
    """Rows ``start:stop`` of the CMD model ``a_n profiles[mode_n] + b_n`` (``(stop-start, T)``).

    ``profiles`` ``(M, T)`` and ``a``, ``b`` ``(N,)`` are real floating (finite unless
    ``check_finite=False``), ``assignment`` ``(N,)`` integer mode ids in ``0 .. M-1``;
    ``0 <= start <= stop <= N`` (integers).
    """
    xp = namespace(profiles=profiles, assignment=assignment, a=a, b=b)
    _check_trajectory(xp, profiles, "profiles", min_epochs=1)
    if a.ndim != 1:
        raise ShapeError(f"`a` must be 1-D, got shape {tuple(a.shape)}")
    n = int(a.shape[0])
    finite = check_bool("check_finite", check_finite)
    _check_vector(xp, a, "a", n, finite=finite)
    _check_vector(xp, b, "b", n, finite=finite)
    _check_modes_index(xp, assignment, "assignment", n, int(profiles.shape[0]))
    if finite:
        _check_finite(profiles, "profiles")
    first = check_int("start", start, min=0)
    last = n if stop is None else check_int("stop", stop, min=0)
    if not first <= last <= n:
        raise ParameterError(f"need 0 <= start <= stop <= {n}, got start={start}, stop={stop}")
    rows = xp.take(profiles, assignment[first:last], axis=0)
    return a[first:last, None] * rows + b[first:last, None]


# --------------------------------------------------------------------------------------------------
# whole pipeline
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CMDFit:
    """A post-hoc CMD model of an ``(N, T)`` trajectory.

    ``sample``: NumPy int64 ``(K,)`` rows that were clustered; ``labels``: int64 ``(K,)`` their clusters
    (``-1`` for constant rows, kept out of the clustering); ``references``: NumPy int64 ``(M,)`` rows (of
    the whole trajectory) whose trajectories are the profiles; ``profiles``: ``(M, T)``; ``assignment``:
    int64 ``(N,)``; ``a``, ``b``: ``(N,)``.
    """

    sample: np.ndarray
    labels: Array
    references: np.ndarray
    profiles: Array
    assignment: Array
    a: Array
    b: Array

    @property
    def num_modes(self) -> int:
        return int(self.references.shape[0])

    def reconstruct(self, start: int = 0, stop: int | None = None) -> Array:
        """Rows ``start:stop`` of the modelled trajectory."""
        return reconstruct_trajectory(
            self.profiles, self.assignment, self.a, self.b, start=start, stop=stop
        )


def _check_fit(xp: Namespace, fit: object, trajectory: Array) -> CMDFit:
    if not isinstance(fit, CMDFit):
        raise ParameterTypeError(f"`fit` must be a CMDFit (from fit_cmd), got {describe(fit)}")
    n, t = int(trajectory.shape[0]), int(trajectory.shape[1])
    if fit.profiles.ndim != 2 or int(fit.profiles.shape[1]) != t:
        raise ShapeError(
            f"`fit` models {tuple(fit.profiles.shape)[1:]} epochs, `trajectory` has {t}"
        )
    if fit.assignment.ndim != 1 or int(fit.assignment.shape[0]) != n:
        raise ShapeError(
            f"`fit` models {tuple(fit.assignment.shape)} parameters, `trajectory` has {n} rows"
        )
    return fit


def _sample_rows(xp: Namespace, trajectory: Array, idx: np.ndarray) -> Array:
    return xp.take(trajectory, _index_array(xp, idx, trajectory), axis=0)


def _check_sizes(sizes: object, n: int) -> list[int] | None:
    if sizes is None:
        return None
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, (list, tuple)):
        raise ParameterTypeError(f"`sizes` must be a list or tuple of ints, got {describe(sizes)}")
    seg = [int(check_int(f"sizes[{i}]", s, min=0)) for i, s in enumerate(sizes)]
    if sum(seg) != n:
        raise ShapeError(f"`sizes` sum to {sum(seg)}, but `trajectory` has {n} rows")
    return seg


def fit_cmd(
    trajectory: Array,
    max_modes: int | None = None,
    *,
    tol: float | None = None,
    sizes: Sequence[int] | None = None,
    num_samples: int = 1000,
    seed: int | None = 0,
    metric: Metric = DEFAULT_METRIC,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    check_finite: bool = True,
) -> CMDFit:
    """Post-hoc CMD of ``trajectory`` ``(N, T)``: sample, cluster, references, assignment, (a, b).

    Exactly one of ``max_modes`` (the paper's ``M``) and ``tol`` (automatic ``M``: the smallest whose
    relative error on the sample is ``<= tol``, see :func:`choose_num_modes`, up to ``min(K, 32)``) may be
    given; neither means ``max_modes=10``. ``sizes`` splits the rows into tensors for stratified sampling
    (default one segment). The trajectory is only read in ``chunk_size``-row slices (a NumPy memmap works).
    Constant parameters are handled as in the module docstring; the fit is scale-invariant.
    """
    xp = namespace(trajectory=trajectory)
    _check_trajectory(xp, trajectory, "trajectory")
    n = int(trajectory.shape[0])
    seg = _check_sizes(sizes, n)
    finite = check_bool("check_finite", check_finite)
    idx = sample_indices(n if seg is None else seg, num_samples, seed=seed)
    _advise_rows(trajectory, idx)
    sample = _sample_rows(xp, trajectory, idx)
    _check_shard_options(max_modes, tol, metric, chunk_size, int(idx.size))
    if finite:
        _check_finite(sample, "trajectory")
    return fit_cmd_shard(
        trajectory,
        sample,
        idx,
        max_modes,
        tol=tol,
        metric=metric,
        chunk_size=chunk_size,
        check_finite=finite,
    )


def _check_shard_options(
    max_modes: object, tol: object, metric: object, chunk_size: object, k: int
) -> Metric:
    met = _check_metric(metric)
    _check_chunk(chunk_size)
    if max_modes is not None and tol is not None:
        raise ParameterError("give `max_modes` or `tol`, not both")
    if tol is not None:
        _check_fraction(tol, "tol", open_low=False)
    if max_modes is not None:
        check_rank(max_modes, k, name="max_modes", what="the number of sampled rows K")
    return met


def fit_cmd_shard(
    shard: Array,
    sample: Array,
    sample_index: np.ndarray | Sequence[int],
    max_modes: int | None = None,
    *,
    tol: float | None = None,
    metric: Metric = DEFAULT_METRIC,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    check_finite: bool = True,
) -> CMDFit:
    """CMD of one shard of a trajectory whose rows are spread over several processes.

    ``sample`` ``(K, T)`` are the rows ``sample_index`` (global row numbers, e.g. from
    :func:`sample_indices` of the whole trajectory's ``sizes``) of the *whole* trajectory, gathered
    from the shards that hold them: the same array on every process, so every process finds the same
    modes, references (global row numbers) and profiles. Then the shard's own rows ``shard``
    ``(N_shard, T)`` are assigned and fitted; ``assignment``, ``a`` and ``b`` are the shard's. With
    ``shard`` the whole trajectory this is the second half of :func:`fit_cmd` (which calls it).
    ``sample`` is checked for finiteness by the caller; ``shard`` is checked in chunks.
    """
    xp = namespace(shard=shard, sample=sample)
    _check_trajectory(xp, shard, "shard")
    _check_trajectory(xp, sample, "sample")
    if isinstance(sample_index, (str, bytes)) or sample_index is None:
        raise ParameterTypeError(
            f"`sample_index` must be a 1-D array of integer row numbers, got {describe(sample_index)}"
        )
    raw = np.asarray(sample_index)
    if raw.size and raw.dtype.kind not in "iu":
        raise DTypeError(f"`sample_index` must hold integers, got dtype {raw.dtype}")
    idx = raw.astype(np.int64)
    if idx.shape != (int(sample.shape[0]),) or sample.shape[1] != shard.shape[1]:
        raise ShapeError(
            f"`sample` {tuple(sample.shape)} must hold one row per `sample_index` entry "
            f"({idx.shape[0] if idx.ndim else 0}) and as many epochs as `shard` {tuple(shard.shape)}"
        )
    if idx.size and int(idx.min()) < 0:
        raise ParameterError("`sample_index` must hold non-negative row numbers")
    finite = check_bool("check_finite", check_finite)
    met = _check_shard_options(max_modes, tol, metric, chunk_size, int(idx.size))
    if tol is not None:
        max_modes = choose_num_modes(
            sample, tol, max_modes=min(int(idx.size), 32), metric=met, check_finite=False
        )
    modes = find_modes(
        sample, 10 if max_modes is None else max_modes, metric=met, check_finite=False
    )
    # the profiles are rows of the trajectory itself (same dtype), so chunked fitting matches the sample's
    assignment, a, b = _run_chunks(shard, modes.profiles, None, chunk_size, finite, "both")
    return CMDFit(
        sample=idx,
        labels=modes.labels,
        references=idx[modes.references],
        profiles=modes.profiles,
        assignment=assignment,
        a=a,
        b=b,
    )


class _SumSquares:
    """A sum of squares kept as ``scale**2 * value`` (no overflow or underflow at any finite scale)."""

    def __init__(self) -> None:
        self.scale = 0.0
        self.value = 0.0

    def add(self, xp: Namespace, v: Array) -> None:
        top = float(xp.max(xp.abs(v))) if math.prod(v.shape) else 0.0
        if top == 0.0:
            return
        if not math.isfinite(top):
            raise NonFiniteError("the CMD model of the trajectory is not finite (NaN or Inf)")
        p = 2.0 ** math.floor(math.log2(top))
        u = v / p
        q = float(xp.sum(u * u))
        if p > self.scale:
            self.value = self.value * (self.scale / p) ** 2 + q
            self.scale = p
        else:
            self.value += q * (p / self.scale) ** 2

    def ratio(self, other: _SumSquares) -> float:
        """``sqrt(self / other)``."""
        if other.value == 0.0:
            return 0.0 if self.value == 0.0 else math.inf
        return (self.scale / other.scale) * math.sqrt(self.value / other.value)


def relative_error(
    trajectory: Array,
    fit: CMDFit,
    *,
    centered: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> float:
    """``||trajectory - model||_F / ||trajectory - row means||_F`` (``centered=False``: ``/ ||trajectory||_F``).

    The centered form measures how much of the *motion* CMD misses; the plain form is dominated by the
    weights' offsets, which ``b`` captures exactly, and looks small for any model. When the denominator
    is 0 it is 0 for an exact model and ``inf`` otherwise. Computed in chunks, scale-invariant (no
    overflow at any finite scale). A trajectory holding NaN or Inf raises ``NonFiniteError``.
    """
    if not isinstance(fit, CMDFit):
        raise ParameterTypeError(f"`fit` must be a CMDFit (from fit_cmd), got {describe(fit)}")
    xp = namespace(trajectory=trajectory, profiles=fit.profiles)
    _check_trajectory(xp, trajectory, "trajectory", min_epochs=1)
    _check_fit(xp, fit, trajectory)
    cen = check_bool("centered", centered)
    chunk = _check_chunk(chunk_size)
    eps = _eps(xp, trajectory.dtype)
    n = int(trajectory.shape[0])
    num, den = _SumSquares(), _SumSquares()
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        w = upcast(xp, trajectory[s:e, :])
        _check_finite(w, "trajectory")
        model = fit.reconstruct(s, e)
        num.add(xp, w - xp.astype(model, w.dtype))
        den.add(xp, w - _rows(xp, w, eps)[0].mean[:, None] if cen else w)
    return num.ratio(den)


def _assign(xp: Namespace, rows: _Rows, g: Array) -> Array:
    """Mode of each row: the largest |pearson| with a profile (0 for constant rows; first on ties).

    ``g`` holds ``<w - w̄, unit profile>`` (0 for a constant profile), i.e. the correlations times the
    row's positive norm, which does not change the argmax: the true correlations are compared without
    forming them (``abs_correlation`` reports them clipped to ``[0, 1]``).
    """
    mode = xp.astype(xp.argmax(xp.abs(g), axis=1), _index_dtype(xp, g))
    return xp.where(rows.constant, xp.zeros_like(mode), mode)


def choose_num_modes(
    sample: Array,
    tol: float,
    *,
    max_modes: int | None = None,
    metric: Metric = DEFAULT_METRIC,
    check_finite: bool = True,
) -> int:
    """The smallest ``M`` whose CMD model of ``sample`` ``(K, T)`` has centered relative error ``<= tol``.

    One linkage is computed and cut at ``M = 1, 2, ...``; for each cut the references are chosen, every
    sampled row is assigned and fitted as in :func:`fit_cmd`, and the error
    ``||X - X_hat||_F / ||X - row means||_F`` is measured. Returns ``max_modes`` (default ``K``; at most
    the number of moving rows) when no ``M`` reaches ``tol``. Non-increasing in ``tol`` by construction (a
    minimum over a set that grows with ``tol``). ``tol`` in [0, 1]. Scale-invariant.
    """
    xp = namespace(sample=sample)
    _check_trajectory(xp, sample, "sample")
    if check_bool("check_finite", check_finite):
        _check_finite(sample, "sample")
    t = _check_fraction(tol, "tol", open_low=False)
    k = int(sample.shape[0])
    upper = k if max_modes is None else check_rank(max_modes, k, name="max_modes", what="K")
    met = _check_metric(metric)
    cl = _cluster_sample(xp, sample, met)
    if cl.keep.size == 0:
        return 1
    upper = min(upper, int(cl.keep.size))
    rows = cl.rows
    # rows weighted by their scale (relative to the largest, powers of two: exact); constant rows, whose
    # motion is at rounding level by definition, are left out of both sums
    zero = xp.zeros_like(rows.scale)
    top = float(xp.max(xp.where(rows.constant, zero, rows.scale)))
    weight = xp.where(rows.constant, zero, rows.scale / top)
    weight = weight * weight
    den = float(xp.sum(weight * rows.norm * rows.norm))
    if den == 0.0:
        return 1
    eps = _eps(xp, sample.dtype)
    centred = rows.centred(xp)
    for m in range(1, upper + 1):
        _, refs = cl.labels_and_refs(m, k)
        prof = _Profiles(xp, xp.take(sample, _index_array(xp, refs, sample), axis=0), eps)
        g = centred @ xp.matrix_transpose(prof.unit)
        mode = _assign(xp, rows, g)
        gm = xp.take_along_axis(g, mode[:, None], axis=1)[:, 0]
        degenerate = rows.constant | xp.take(prof.constant, mode)
        gm = xp.where(degenerate, xp.zeros_like(gm), gm)
        res = centred - gm[:, None] * xp.take(prof.unit, mode, axis=0)
        num = float(xp.sum(weight * xp.sum(res * res, axis=1)))
        if math.sqrt(num / den) <= t:
            return m
    return upper


# --------------------------------------------------------------------------------------------------
# online CMD
# --------------------------------------------------------------------------------------------------
_STATE_KEYS = ("references", "assignment", "profiles", "r_mean", "r_m2", "w_mean", "c_wr", "unit")


class OnlineCMD:
    """Online CMD: modes fitted once on a warm-up trajectory, then exact recursive least squares.

    State (all in the warm-up trajectory's library/device/dtype, half precision kept in float32):
    ``references`` (M,) flat indices; ``assignment`` (N,) int32 (fixed after warm-up; int32 rather than
    the published uint8, which caps M at 256, or int64, which doubles its bytes); ``profiles`` (M, t) the references'
    values at every epoch seen (the only part that grows: ``M`` numbers per epoch); per mode the running
    mean ``r_mean`` and centered sum of squares ``r_m2`` of its profile; per parameter the running mean
    ``w_mean`` and co-moment ``c_wr = sum_tau (w(tau) - w_mean)(r(tau) - r_mean)``. That is ``2 N + M t``
    numbers plus ``O(M)`` and the int32 assignment.

    :meth:`update` adds one epoch with Welford's updates, so that at every ``t``::

        a = c_wr / r_m2[mode],   b = w_mean - a * r_mean[mode]

    equal (up to rounding) the batch least-squares fit over all ``t`` epochs. This is the same recursion as
    ``A_t = (A_{t-1} G_{t-1} + w r~^T) G_t^{-1}`` with ``G_t = sum r~ r~^T``, written in centered
    coordinates: it never forms ``sum r^2`` and ``(sum r)^2`` (whose difference cancels catastrophically
    in float32 when weights move little) and never multiplies by ``G`` and ``G^{-1}`` in turn. The
    sums of squares and co-moments are kept in units of ``unit**2``, ``unit`` a power of two near the
    profiles' motion (chosen at the fit), so the state neither overflows nor underflows at any scale of
    the weights (``a`` and ``b`` do not depend on it). A profile
    whose ``r_m2`` is at rounding level (``<= (8 eps)^2 t r_mean^2``) counts as constant: its parameters
    get ``a = 0``, ``b = w_mean``.

    The constructor validates the whole state (types, shapes, dtypes, finiteness, index ranges) and raises
    a :class:`~lowrank_core.errors.LowRankError` naming the first problem; no array is copied or written.
    """

    def __init__(
        self,
        *,
        references: np.ndarray,
        assignment: Array,
        profiles: Array,
        r_mean: Array,
        r_m2: Array,
        w_mean: Array,
        c_wr: Array,
        unit: float = 1.0,
        check_finite: bool = True,
    ) -> None:
        """``check_finite=False`` skips the checks that read values on the host (finite, ``r_m2 >= 0``,
        assignment in range): the form for rebuilding a state inside traced code (``jax.jit`` of
        :meth:`update`); shapes and dtypes are still checked."""
        unit = check_float("unit", unit, min=0.0, min_open=True)
        if 2.0 ** math.floor(math.log2(unit)) != unit:
            raise ParameterError(f"`unit` must be a power of two, got {unit!r}")
        xp = namespace(
            assignment=assignment,
            profiles=profiles,
            r_mean=r_mean,
            r_m2=r_m2,
            w_mean=w_mean,
            c_wr=c_wr,
        )
        if profiles.ndim != 2 or profiles.shape[0] < 1 or profiles.shape[1] < 1:
            raise ShapeError(
                f"`profiles` must be (M, t) with M, t >= 1, got shape {tuple(profiles.shape)}"
            )
        check_floating(xp, profiles, "profiles")
        n_modes, _ = int(profiles.shape[0]), int(profiles.shape[1])
        if w_mean.ndim != 1 or w_mean.shape[0] < 1:
            raise ShapeError(f"`w_mean` must be (N,) with N >= 1, got shape {tuple(w_mean.shape)}")
        n = int(w_mean.shape[0])
        for name, v, size in (
            ("r_mean", r_mean, n_modes),
            ("r_m2", r_m2, n_modes),
            ("w_mean", w_mean, n),
            ("c_wr", c_wr, n),
        ):
            _check_vector(xp, v, name, size, finite=False)
            if v.dtype != profiles.dtype:
                raise DTypeError(
                    f"`{name}` has dtype {v.dtype}, the profiles {profiles.dtype}: the state has one dtype"
                )
        for name, v in (
            ("profiles", profiles),
            ("r_mean", r_mean),
            ("r_m2", r_m2),
            ("w_mean", w_mean),
            ("c_wr", c_wr),
        ):
            if check_finite:
                _check_finite(v, name)
        if check_finite and bool(xp.any(r_m2 < 0)):
            raise ParameterError("`r_m2` (sums of squares) must be >= 0")
        _check_modes_index(xp, assignment, "assignment", n, n_modes, values=check_finite)
        # global row numbers: a shard's state (fit_cmd_shard) may name rows beyond its own N
        refs = _host_indices(references, "references", None)
        if refs.size != n_modes:
            raise ShapeError(
                f"`references` names {refs.size} parameters, the profiles have {n_modes} modes"
            )
        self.references = refs
        self.assignment = assignment
        self.profiles = profiles
        self.r_mean = r_mean
        self.r_m2 = r_m2
        self.w_mean = w_mean
        self.c_wr = c_wr
        self.unit = unit
        self._xp = xp
        self._ref_idx = _index_array(xp, self.references, w_mean)

    # ----------------------------------------------------------------------------------- building
    @classmethod
    def from_trajectory(
        cls,
        trajectory: Array,
        max_modes: int | None = None,
        *,
        tol: float | None = None,
        sizes: Sequence[int] | None = None,
        num_samples: int = 1000,
        seed: int | None = 0,
        metric: Metric = DEFAULT_METRIC,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        check_finite: bool = True,
    ) -> OnlineCMD:
        """Fit modes on the warm-up ``trajectory`` ``(N, F)`` (see :func:`fit_cmd`) and start the sums."""
        fit = fit_cmd(
            trajectory,
            max_modes,
            tol=tol,
            sizes=sizes,
            num_samples=num_samples,
            seed=seed,
            metric=metric,
            chunk_size=chunk_size,
            check_finite=check_finite,
        )
        return cls.from_fit(trajectory, fit, chunk_size=chunk_size)

    @classmethod
    def from_fit(
        cls, trajectory: Array, fit: CMDFit, *, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> OnlineCMD:
        """Start from a post-hoc ``fit`` of ``trajectory`` (its modes and assignment are kept)."""
        if not isinstance(fit, CMDFit):
            raise ParameterTypeError(f"`fit` must be a CMDFit (from fit_cmd), got {describe(fit)}")
        xp = namespace(trajectory=trajectory, profiles=fit.profiles)
        _check_trajectory(xp, trajectory, "trajectory")
        _check_fit(xp, fit, trajectory)
        chunk = _check_chunk(chunk_size)
        eps = _eps(xp, trajectory.dtype)
        prof = _Profiles(xp, fit.profiles, eps)
        unit = prof.unit_for_state(xp)
        n = int(trajectory.shape[0])
        means: list[Array] = []
        covs: list[Array] = []
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            with np.errstate(over="ignore"):
                _, mean, _, cov = _chunk_stats(
                    xp,
                    trajectory[s:e, :],
                    prof,
                    fit.assignment[s:e],
                    eps,
                    want_cov=True,
                    cov_unit=unit,
                )
            assert cov is not None
            means.append(mean)
            covs.append(cov)
        w_mean, c_wr = _join(xp, means), _join(xp, covs)
        with np.errstate(over="ignore"):
            r_m2 = prof.m2(xp, unit)
        if not (get_backend(c_wr).all_finite(c_wr) and get_backend(r_m2).all_finite(r_m2)):
            raise NonFiniteError(
                "the online CMD co-moments overflow: the parameters' scales span too many orders of "
                "magnitude for one state unit"
            )
        return cls(
            references=fit.references,
            assignment=xp.astype(fit.assignment, xp.int32),  # half the bytes; 2**31 modes is plenty
            profiles=xp.astype(fit.profiles, prof.dtype),
            r_mean=prof.mean,
            r_m2=r_m2,
            w_mean=w_mean,
            c_wr=c_wr,
            unit=unit,
        )

    # ----------------------------------------------------------------------------------- properties
    @property
    def num_params(self) -> int:
        return int(self.w_mean.shape[0])

    @property
    def num_modes(self) -> int:
        return int(self.references.shape[0])

    @property
    def epochs(self) -> int:
        """Time points seen so far (warm-up included): epochs, or whatever cadence fed the updates."""
        return int(self.profiles.shape[1])

    @property
    def dtype(self) -> Any:
        return self.w_mean.dtype

    def nbytes(self) -> int:
        """Bytes held by the state arrays (the assignment included)."""
        arrays = (self.assignment, self.profiles, self.r_mean, self.r_m2, self.w_mean, self.c_wr)
        return sum(int(math.prod(x.shape)) * _itemsize(x) for x in arrays) + self.references.nbytes

    # ----------------------------------------------------------------------------------- updates
    def update(
        self, weights: Array, *, check_finite: bool = True, reference_values: Array | None = None
    ) -> None:
        """Add one epoch: ``weights`` ``(N,)`` are every parameter's value at this epoch's end.

        ``reference_values`` ``(M,)``: the references' values at this epoch, for a sharded state
        (:func:`fit_cmd_shard`) whose ``weights`` are one shard's and need not hold the references
        (``None``: read from ``weights`` at :attr:`references`).
        """
        xp = self._xp
        namespace(weights=weights, w_mean=self.w_mean)
        if weights.ndim != 1 or weights.shape[0] != self.num_params:
            raise ShapeError(
                f"`weights` must have shape ({self.num_params},), got {tuple(weights.shape)}"
            )
        check_floating(xp, weights, "weights")
        if check_bool("check_finite", check_finite):
            _check_finite(weights, "weights")
        w = xp.astype(weights, self.dtype) if weights.dtype != self.dtype else weights
        if reference_values is None:
            if int(self.references.max()) >= self.num_params:
                raise ParameterError(
                    f"the references {self.references.tolist()} are not all rows of these "
                    f"{self.num_params} weights (a shard's state): pass `reference_values`"
                )
            r = xp.take(w, self._ref_idx)
        else:
            namespace(reference_values=reference_values, w_mean=self.w_mean)
            if reference_values.shape != (self.num_modes,):
                raise ShapeError(
                    f"`reference_values` must have shape ({self.num_modes},), got "
                    f"{tuple(reference_values.shape)}"
                )
            check_floating(xp, reference_values, "reference_values")
            if check_finite:
                _check_finite(reference_values, "reference_values")
            r = reference_values
            if r.dtype != self.dtype:
                r = xp.astype(r, self.dtype)
        t = self.epochs + 1
        dr = r - self.r_mean
        r_mean = self.r_mean + dr / t
        u = self.unit  # a power of two: dividing by it is exact
        dr_new = (r - r_mean) / u
        r_m2 = self.r_m2 + (dr / u) * dr_new
        dw = w - self.w_mean
        w_mean = self.w_mean + dw / t
        c_wr = self.c_wr + (dw / u) * xp.take(dr_new, self.assignment)
        profiles = xp.concat([self.profiles, r[:, None]], axis=1)
        # every new value computed first, then all assigned (a failure above leaves the state as it was)
        self.r_mean, self.r_m2, self.w_mean, self.c_wr, self.profiles = (
            r_mean,
            r_m2,
            w_mean,
            c_wr,
            profiles,
        )

    def coefficients(self) -> tuple[Array, Array]:
        """``(a, b)``, each ``(N,)``: the least-squares fit over every epoch seen."""
        xp = self._xp
        eps = _eps(xp, self.dtype)
        r_mean = xp.take(self.r_mean, self.assignment)
        m2 = xp.take(self.r_m2, self.assignment)
        level = r_mean / self.unit
        floor = (CONSTANT_TOLERANCE * eps) ** 2 * self.epochs * (level * level)
        pos = m2 > floor
        a = xp.where(pos, self.c_wr / xp.where(pos, m2, xp.ones_like(m2)), xp.zeros_like(m2))
        b = self.w_mean - a * r_mean
        return a, b

    def weights(self, epoch: int = -1) -> Array:
        """The CMD weights ``a r(epoch) + b`` (``(N,)``) at a seen epoch (default: the latest).

        ``epoch`` is an integer in ``-t .. t-1`` (negative counts from the latest), else
        ``ParameterError``.
        """
        xp = self._xp
        t = self.epochs
        ep = check_int("epoch", epoch)
        e = ep + t if ep < 0 else ep
        if not 0 <= e < t:
            raise ParameterError(f"`epoch` {ep} out of range for {t} epochs seen (-{t}..{t - 1})")
        a, _ = self.coefficients()
        dr = self.profiles[:, e] - self.r_mean
        return self.w_mean + a * xp.take(dr, self.assignment)

    def reconstruct(self, start: int = 0, stop: int | None = None) -> Array:
        """Rows ``start:stop`` of the modelled trajectory over every epoch seen."""
        a, b = self.coefficients()
        return reconstruct_trajectory(self.profiles, self.assignment, a, b, start=start, stop=stop)

    # ----------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Arrays of the state (library arrays) plus the references (NumPy); see :meth:`from_state_dict`."""
        return {
            "references": self.references.copy(),
            "assignment": self.assignment,
            "profiles": self.profiles,
            "r_mean": self.r_mean,
            "r_m2": self.r_m2,
            "w_mean": self.w_mean,
            "c_wr": self.c_wr,
            "unit": self.unit,
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> OnlineCMD:
        """Rebuild from :meth:`state_dict` (the arrays may have been moved to another device).

        The state must hold exactly the keys of :meth:`state_dict`; every entry is validated (see the
        class), errors name the key. ``state`` is not modified.
        """
        if not isinstance(state, Mapping):
            raise ParameterTypeError(f"the CMD state must be a dict, got {describe(state)}")
        keys = set(state)
        if "unit" not in keys:  # states saved before the unit existed: data units
            state = {**state, "unit": 1.0}
            keys.add("unit")
        missing = sorted(set(_STATE_KEYS) - keys)
        if missing:
            raise ParameterError(f"the CMD state is missing {missing}")
        extra = sorted(str(k) for k in keys - set(_STATE_KEYS))
        if extra:
            raise ParameterError(f"the CMD state has unexpected keys {extra}")
        return cls(**{k: state[k] for k in _STATE_KEYS})


def _itemsize(x: Array) -> int:
    xp = array_api_compat.array_namespace(x)
    if xp.isdtype(x.dtype, "bool"):
        return 1
    if xp.isdtype(x.dtype, "integral"):
        return int(xp.iinfo(x.dtype).bits) // 8
    return int(xp.finfo(x.dtype).bits) // 8


# --------------------------------------------------------------------------------------------------
# embedded CMD
# --------------------------------------------------------------------------------------------------
def select_embedding(
    a: Array,
    b: Array,
    a_prev: Array,
    b_prev: Array,
    embedded: Array,
    references: np.ndarray,
    fraction: float = 0.1,
) -> Array:
    """The new embedded mask: ``embedded`` plus the ``ceil(fraction N)`` most settled other parameters.

    Settled = smallest ``d_n = sqrt((a_n - a_prev_n)^2 + (b_n - b_prev_n)^2)`` (the change of the CMD
    coefficients since the last embedding; computed without overflow). References and already embedded
    parameters are never chosen; ties go to the lower index. ``a``, ``b``, ``a_prev``, ``b_prev``: finite
    real floating ``(N,)``; ``embedded``: boolean ``(N,)``; ``references``: distinct integer indices in
    ``0 .. N-1``; ``fraction`` in ``(0, 1]``. Returns a new boolean ``(N,)`` array.
    """
    xp = namespace(a=a, b=b, a_prev=a_prev, b_prev=b_prev, embedded=embedded)
    if a.ndim != 1 or a.shape[0] < 1:
        raise ShapeError(f"`a` must be 1-D with N >= 1, got shape {tuple(a.shape)}")
    n = int(a.shape[0])
    for name, v in (("a", a), ("b", b), ("a_prev", a_prev), ("b_prev", b_prev)):
        _check_vector(xp, v, name, n)
    if embedded.ndim != 1 or int(embedded.shape[0]) != n:
        raise ShapeError(f"`embedded` must have shape ({n},), got {tuple(embedded.shape)}")
    if not xp.isdtype(embedded.dtype, "bool"):
        raise DTypeError(f"`embedded` must be a boolean mask, got {embedded.dtype}")
    frac = _check_fraction(fraction, "fraction")
    refs = _host_indices(references, "references", n)
    da = xp.abs(a - a_prev)
    db = xp.abs(b - b_prev)
    big = xp.maximum(da, db)
    small = xp.minimum(da, db)
    safe = xp.where(big > 0, big, xp.ones_like(big))
    ratio = small / safe
    d = big * xp.sqrt(1.0 + ratio * ratio)  # hypot without overflow
    dev = _device(a)
    is_ref = xp.asarray(np.isin(np.arange(n), refs), device=dev)
    blocked = embedded | is_ref
    d = xp.where(blocked, xp.asarray(float("inf"), dtype=d.dtype, device=dev), d)
    eligible = n - int(xp.sum(xp.astype(blocked, _index_dtype(xp, a))))
    k = min(math.ceil(frac * n), eligible)
    if k <= 0:
        return xp.asarray(embedded, copy=True)
    # rank of each parameter in the stable order (the inverse permutation): no scatter, no writes
    rank = xp.argsort(xp.argsort(d, stable=True), stable=True)
    return embedded | (rank < k)
