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
   distance ``1 - C`` (default) or, as in the paper, the Euclidean distance between rows of ``C``;
   the same partition as ``scipy.cluster.hierarchy.linkage(method='complete')`` followed by
   ``fcluster(criterion='maxclust')`` on the same distance matrix (when no two merges tie; ties below);
4. :func:`find_modes`: the reference of a cluster is its member with the largest summed ``|corr|`` to the
   other members; the profiles are the references' rows;
5. :func:`assign_modes` / :func:`fit_coefficients`: every parameter joins the mode whose profile it
   correlates with most (in ``|pearson|``) and gets its least-squares ``(a_n, b_n)``; processed in row
   chunks, so nothing of size ``N x T`` is allocated beyond one chunk;
6. :func:`reconstruct_trajectory`, :func:`relative_error`.

Beyond the paper, :func:`choose_num_modes` picks the smallest ``M`` whose relative reconstruction error on
the sample stays under a tolerance (one linkage, cut at every ``M``).

Online CMD (:class:`OnlineCMD`): modes, references and assignment are fitted once on a warm-up trajectory,
then every new epoch updates each ``(a_n, b_n)`` so that it equals the batch least-squares fit over all
epochs seen, in ``O(2 N + M t)`` memory (Welford-style running means and co-moments, see the class).
:func:`select_embedding` chooses the parameters that embedded CMD replaces by their model.

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
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import array_api_compat
import numpy as np

from ._array import Array, Namespace, check_floating, check_rank, namespace, upcast
from .backend import get_backend
from .errors import NonFiniteError, RankError, ShapeError

__all__ = [
    "DEFAULT_CHUNK_SIZE",
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

Metric = Literal["correlation", "euclidean"]


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
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"`chunk_size` must be an int, got {type(chunk_size).__name__}")
    if int(chunk_size) < 1:
        raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size}")
    return int(chunk_size)


def _check_fraction(value: object, name: str, *, open_low: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__}")
    v = float(value)
    if not (0.0 < v <= 1.0 if open_low else 0.0 <= v <= 1.0):
        raise ValueError(f"`{name}` must lie in {'(0' if open_low else '[0'}, 1], got {v}")
    return v


def _device(x: Array) -> Any:
    return array_api_compat.device(x)


def _index_array(xp: Namespace, idx: np.ndarray, like: Array) -> Array:
    return xp.asarray(np.asarray(idx, dtype=np.int64), device=_device(like))


def _to_host(x: Array) -> np.ndarray:
    return np.asarray(get_backend(x).to_numpy(x))


# --------------------------------------------------------------------------------------------------
# 1. sampling
# --------------------------------------------------------------------------------------------------
def sample_indices(
    sizes: Sequence[int] | int, num_samples: int = 1000, *, seed: int | None = 0
) -> np.ndarray:
    """Flat indices of ``num_samples`` parameters, stratified over segments (tensors), sorted.

    ``sizes`` are the numbers of scalars of the ``L`` segments (tensors) that, concatenated, make the
    ``N`` rows of the trajectory (an int means one segment). Segment ``l`` (``n_l`` scalars) contributes
    ``min(n_l, min(floor(K/(2L)), n_l) + floor(n_l/N * K/2))`` distinct indices drawn uniformly without
    replacement, so every tensor is represented and large tensors proportionally more; the total is at
    most ``K`` (flooring can leave it a little below). With ``K >= N`` every index is returned.
    Deterministic for a given ``seed`` (NumPy ``default_rng``). Returns a NumPy int64 array (host metadata).
    """
    seg: list[Any] = [sizes] if isinstance(sizes, numbers.Integral) else list(sizes)  # type: ignore[arg-type]
    if not seg or any(isinstance(n, bool) or not isinstance(n, numbers.Integral) for n in seg):
        raise TypeError(f"`sizes` must be an int or a non-empty sequence of ints, got {sizes!r}")
    n_seg = [int(n) for n in seg]
    if any(n < 0 for n in n_seg) or sum(n_seg) < 1:
        raise ValueError(f"`sizes` must be >= 0 with a positive total, got {n_seg}")
    total = sum(n_seg)
    k = check_rank(num_samples, 2**62, name="num_samples", what="a huge bound")
    if k >= total:
        return np.arange(total, dtype=np.int64)
    rng = np.random.default_rng(seed)
    n_layers = len(n_seg)
    out: list[np.ndarray] = []
    offset = 0
    for n in n_seg:
        take = min(n, min(k // (2 * n_layers), n) + math.floor(n / total * k / 2))
        if take > 0:
            out.append(offset + np.sort(rng.choice(n, size=take, replace=False)).astype(np.int64))
        offset += n
    if not out:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate(out)


# --------------------------------------------------------------------------------------------------
# 2. correlation
# --------------------------------------------------------------------------------------------------
def _unit_rows(xp: Namespace, x: Array) -> tuple[Array, Array]:
    """Centered rows scaled to unit norm (0 for a constant row) and the centered norms."""
    xc = x - xp.mean(x, axis=1, keepdims=True)
    norm = xp.sqrt(xp.sum(xc * xc, axis=1, keepdims=True))
    pos = norm > 0
    z = xp.where(pos, xc / xp.where(pos, norm, xp.ones_like(norm)), xp.zeros_like(xc))
    return z, norm[:, 0]


def abs_correlation(x: Array, *, check_finite: bool = True) -> Array:
    """``|corrcoef(x)|`` of the rows of ``x`` (``(K, T)`` -> ``(K, K)``), clipped to [0, 1].

    A constant row has correlation 0 with everything, itself included (``corrcoef``'s NaN replaced by 0).
    Needs ``T >= 2``. Same library, device and floating dtype as ``x`` (half precision computed in float32).
    """
    xp = namespace(x=x)
    _check_trajectory(xp, x, "x")
    if check_finite:
        _check_finite(x, "x")
    z, _ = _unit_rows(xp, upcast(xp, x))
    c = xp.clip(xp.abs(z @ xp.matrix_transpose(z)), 0.0, 1.0)
    return xp.astype(c, x.dtype) if c.dtype != x.dtype else c


def _distance(xp: Namespace, c: Array, metric: str) -> Array:
    if metric == "correlation":
        return 1.0 - c
    if metric == "euclidean":
        sq = xp.sum(c * c, axis=1)
        d2 = sq[:, None] + sq[None, :] - 2.0 * (c @ xp.matrix_transpose(c))
        return xp.sqrt(xp.clip(d2, 0.0, None))
    raise ValueError(f"`metric` must be 'correlation' or 'euclidean', got {metric!r}")


# --------------------------------------------------------------------------------------------------
# 3. complete-linkage clustering
# --------------------------------------------------------------------------------------------------
def _linkage(xp: Namespace, distance: Array) -> tuple[np.ndarray, np.ndarray]:
    """Complete-linkage merges ``(K-1, 2)`` (slots, smaller first) and their heights, in merge order.

    Written against the array API alone (any namespace ``xp``). Repeatedly merges the closest pair of
    live clusters (the first in row-major order on ties: ``argmin`` returns the first occurrence); the
    merged cluster keeps the smaller slot, its distance to every other cluster is the max of the two rows.
    Only ``max`` and comparisons touch the distances, so the heights are exactly entries of ``distance``
    and the result does not depend on the library. Heights are non-decreasing (complete linkage has no
    inversions).
    """
    k = int(distance.shape[0])
    dev = _device(distance)
    d = xp.asarray(distance, copy=True)
    eye = xp.eye(k, dtype=xp.bool, device=dev)
    d = xp.where(eye, xp.asarray(float("inf"), dtype=d.dtype, device=dev), d)
    inf_row = xp.full((k,), float("inf"), dtype=d.dtype, device=dev)
    merges = np.zeros((max(k - 1, 0), 2), dtype=np.int64)
    heights = np.zeros(max(k - 1, 0), dtype=np.float64)
    flat_shape = (k * k,)
    for step in range(k - 1):
        i, j = divmod(int(xp.argmin(xp.reshape(d, flat_shape))), k)
        i, j = min(i, j), max(i, j)
        heights[step] = float(d[i, j])
        merges[step] = (i, j)
        row = xp.maximum(d[i, :], d[j, :])
        d[i, :] = row
        d[:, i] = row
        d[i, i] = float("inf")
        d[j, :] = inf_row
        d[:, j] = inf_row
    return merges, heights


def _host_linkage(distance: Array) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_linkage` run on a host (NumPy) view of ``distance``.

    The loop is ``K - 1`` strictly sequential steps of tiny kernels, each ending in a host read of the
    chosen pair, so on an accelerator it is latency-bound, and torch's CPU ``argmin`` is several times
    slower than NumPy's. Its input is only ``K x K`` (the sample), so it runs on the host (zero-copy for
    CPU arrays) with the same array-API code; the result is identical (see :func:`_linkage`).
    """
    host = np.asarray(_to_host(distance))
    return _linkage(array_api_compat.array_namespace(host), host)


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
    parent = np.arange(k)

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = int(parent[a])
        return a

    for i, j in merges[:need]:
        ri, rj = root(int(i)), root(int(j))
        parent[max(ri, rj)] = min(ri, rj)
    roots = np.array([root(a) for a in range(k)], dtype=np.int64)
    uniq, inverse, counts = np.unique(roots, return_inverse=True, return_counts=True)
    # uniq is the smallest member of each cluster (roots are minima); order by (-size, smallest member)
    order = np.lexsort((uniq, -counts))
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[inverse].astype(np.int64)


def _check_distance(xp: Namespace, distance: Array, check_finite: bool) -> None:
    if distance.ndim != 2 or distance.shape[0] != distance.shape[1] or distance.shape[0] < 1:
        raise ShapeError(
            f"`distance` must be a square (K, K) matrix with K >= 1, got shape {tuple(distance.shape)}"
        )
    check_floating(xp, distance, "distance")
    if check_finite:
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
    merges, heights = _host_linkage(upcast(xp, distance))
    return _index_array(xp, _cut(merges, heights, k, m), distance)


# --------------------------------------------------------------------------------------------------
# 4. modes
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Modes:
    """Modes found on a sample: cluster labels, reference rows and their profiles.

    ``labels``: int64 ``(K,)`` cluster of each sampled row (0 = largest); ``references``: NumPy int64
    ``(M,)`` row index (into the sample) of each mode's reference; ``profiles``: ``(M, T)`` the
    references' rows (the sample's library, device and dtype).
    """

    labels: Array
    references: np.ndarray
    profiles: Array

    @property
    def num_modes(self) -> int:
        return int(self.references.shape[0])


def _references(c: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per cluster: the member with the largest summed |corr| to the other members (first on ties)."""
    n_modes = int(labels.max()) + 1
    refs = np.zeros(n_modes, dtype=np.int64)
    for m in range(n_modes):
        members = np.flatnonzero(labels == m)
        sub = c[np.ix_(members, members)]
        score = sub.sum(axis=1) - np.diag(sub)
        refs[m] = members[int(np.argmax(score))]
    return refs


def _cluster_sample(
    xp: Namespace, x: Array, metric: str
) -> tuple[Array, np.ndarray, np.ndarray, np.ndarray]:
    """|corr| (compute dtype), its host copy, and the linkage of the sample ``x``."""
    z, _ = _unit_rows(xp, upcast(xp, x))
    c = xp.clip(xp.abs(z @ xp.matrix_transpose(z)), 0.0, 1.0)
    merges, heights = _host_linkage(_distance(xp, c, metric))
    c_host = _to_host(c).astype(np.float64)
    c_host = (
        c_host + c_host.T
    ) / 2.0  # exactly symmetric: a two-member cluster's scores tie exactly
    return c, c_host, merges, heights


def find_modes(
    sample: Array,
    max_modes: int,
    *,
    metric: Metric = "correlation",
    check_finite: bool = True,
) -> Modes:
    """Cluster the sampled trajectories ``(K, T)`` into at most ``max_modes`` modes; pick references.

    ``metric='correlation'``: distance ``1 - |corr|`` (complete linkage then guarantees that every pair
    inside a cluster has ``|corr| >= 1 - height``); ``'euclidean'``: Euclidean distance between rows of
    ``|corr|`` (the paper's choice). The reference of a cluster is its member with the largest summed
    ``|corr|`` to the other members (equivalently the largest mean ``|corr|`` to its own cluster).
    """
    xp = namespace(sample=sample)
    _check_trajectory(xp, sample, "sample")
    if check_finite:
        _check_finite(sample, "sample")
    k = int(sample.shape[0])
    m = check_rank(max_modes, k, name="max_modes", what="the number of sampled parameters K")
    if metric not in ("correlation", "euclidean"):
        raise ValueError(f"`metric` must be 'correlation' or 'euclidean', got {metric!r}")
    _, c_host, merges, heights = _cluster_sample(xp, sample, metric)
    labels = _cut(merges, heights, k, m)
    refs = _references(c_host, labels)
    profiles = xp.take(sample, _index_array(xp, refs, sample), axis=0)
    return Modes(labels=_index_array(xp, labels, sample), references=refs, profiles=profiles)


# --------------------------------------------------------------------------------------------------
# 5. assignment and least squares, in chunks
# --------------------------------------------------------------------------------------------------
class _Profiles:
    """Per-mode quantities of the profiles needed by every chunk (compute dtype)."""

    def __init__(self, xp: Namespace, profiles: Array) -> None:
        p = upcast(xp, profiles)
        self.mean = xp.mean(p, axis=1)
        self.centered = p - self.mean[:, None]
        self.m2 = xp.sum(self.centered * self.centered, axis=1)
        self.norm = xp.sqrt(self.m2)
        self.dtype = p.dtype


def _chunk_stats(
    xp: Namespace, w: Array, prof: _Profiles, assignment: Array | None
) -> tuple[Array, Array, Array]:
    """For a chunk ``w`` (c, T): mode (given or by max |corr|), mean, co-moment with its profile."""
    w = xp.astype(w, prof.dtype) if w.dtype != prof.dtype else w
    mean = xp.mean(w, axis=1)
    g = w @ xp.matrix_transpose(prof.centered)  # (c, M): sum_t w (r - rbar) = co-moments
    if assignment is None:
        wc = w - mean[:, None]
        wnorm = xp.sqrt(xp.sum(wc * wc, axis=1))
        denom = wnorm[:, None] * prof.norm[None, :]
        pos = denom > 0
        corr = xp.where(pos, xp.abs(g) / xp.where(pos, denom, xp.ones_like(denom)), 0.0 * g)
        assignment = xp.argmax(corr, axis=1)
    cov = xp.take_along_axis(g, xp.astype(assignment, xp.int64)[:, None], axis=1)[:, 0]
    return xp.astype(assignment, xp.int64), mean, cov


def _coefficients(
    xp: Namespace, mode: Array, mean: Array, cov: Array, prof: _Profiles
) -> tuple[Array, Array]:
    m2 = xp.take(prof.m2, mode)
    pos = m2 > 0
    a = xp.where(pos, cov / xp.where(pos, m2, xp.ones_like(m2)), xp.zeros_like(cov))
    b = mean - a * xp.take(prof.mean, mode)
    return a, b


def _check_profiles(xp: Namespace, trajectory: Array, profiles: Array, check_finite: bool) -> None:
    _check_trajectory(xp, profiles, "profiles")
    if profiles.shape[1] != trajectory.shape[1]:
        raise ShapeError(
            f"`profiles` {tuple(profiles.shape)} and `trajectory` {tuple(trajectory.shape)} "
            "must have the same number of epochs (columns)"
        )
    if check_finite:
        _check_finite(profiles, "profiles")


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
    _check_profiles(xp, trajectory, profiles, check_finite)
    chunk = _check_chunk(chunk_size)
    n = int(trajectory.shape[0])
    n_modes = int(profiles.shape[0])
    if assignment is not None:
        if assignment.ndim != 1 or assignment.shape[0] != n:
            raise ShapeError(f"`assignment` must have shape ({n},), got {tuple(assignment.shape)}")
        if not xp.isdtype(assignment.dtype, "integral"):
            raise TypeError(f"`assignment` must have an integer dtype, got {assignment.dtype}")
        if n and (int(xp.min(assignment)) < 0 or int(xp.max(assignment)) >= n_modes):
            raise ShapeError(f"`assignment` values must lie in 0..{n_modes - 1}")
    prof = _Profiles(xp, profiles)
    # outputs preallocated and filled chunk by chunk: no list of parts plus a concatenated copy
    dev = _device(trajectory)
    out_mode = xp.empty((n,), dtype=xp.int64, device=dev)
    a_all = xp.empty((n,), dtype=trajectory.dtype, device=dev)
    b_all = xp.empty((n,), dtype=trajectory.dtype, device=dev)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        w = trajectory[s:e, :]
        if check_finite:
            _check_finite(w, "trajectory")
        given = None if assignment is None else assignment[s:e]
        mode, mean, cov = _chunk_stats(xp, w, prof, given)
        out_mode[s:e] = mode
        if want != "assign":
            a, b = _coefficients(xp, mode, mean, cov, prof)
            a_all[s:e] = xp.astype(a, trajectory.dtype)
            b_all[s:e] = xp.astype(b, trajectory.dtype)
    if want == "assign":
        return (out_mode,)
    if want == "fit":
        return a_all, b_all
    return out_mode, a_all, b_all


def assign_modes(
    trajectory: Array,
    profiles: Array,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    check_finite: bool = True,
) -> Array:
    """Mode of every parameter: ``argmax_m |pearson(trajectory[n], profiles[m])|`` (int64 ``(N,)``).

    Processed ``chunk_size`` rows at a time (temporaries ``chunk_size x T`` and ``chunk_size x M``).
    A constant row correlates 0 with everything and joins mode 0; ties go to the lowest mode.
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

    Computed from centered sums (``a = sum (w - w̄)(r - r̄) / sum (r - r̄)^2``, ``b = w̄ - a r̄``), chunked.
    For a constant profile the problem is degenerate; then ``a = 0`` and ``b = mean(w)``.
    """
    return _run_chunks(trajectory, profiles, assignment, chunk_size, check_finite, "fit")


def reconstruct_trajectory(
    profiles: Array,
    assignment: Array,
    a: Array,
    b: Array,
    *,
    start: int = 0,
    stop: int | None = None,
) -> Array:
    """Rows ``start:stop`` of the CMD model ``a_n profiles[mode_n] + b_n`` (``(stop-start, T)``)."""
    xp = namespace(profiles=profiles, assignment=assignment, a=a, b=b)
    _check_trajectory(xp, profiles, "profiles", min_epochs=1)
    n = int(a.shape[0])
    if a.ndim != 1 or b.shape != a.shape or assignment.shape != a.shape:
        raise ShapeError(
            f"`assignment`, `a`, `b` must be 1-D of one length, got {tuple(assignment.shape)}, "
            f"{tuple(a.shape)}, {tuple(b.shape)}"
        )
    stop = n if stop is None else stop
    if not 0 <= start <= stop <= n:
        raise ShapeError(f"need 0 <= start <= stop <= {n}, got start={start}, stop={stop}")
    rows = xp.take(profiles, assignment[start:stop], axis=0)
    return a[start:stop, None] * rows + b[start:stop, None]


# --------------------------------------------------------------------------------------------------
# whole pipeline
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CMDFit:
    """A post-hoc CMD model of an ``(N, T)`` trajectory.

    ``sample``: NumPy int64 ``(K,)`` rows that were clustered; ``labels``: int64 ``(K,)`` their clusters;
    ``references``: NumPy int64 ``(M,)`` rows (of the whole trajectory) whose trajectories are the
    profiles; ``profiles``: ``(M, T)``; ``assignment``: int64 ``(N,)``; ``a``, ``b``: ``(N,)``.
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


def _sample_rows(xp: Namespace, trajectory: Array, idx: np.ndarray) -> Array:
    return xp.take(trajectory, _index_array(xp, idx, trajectory), axis=0)


def fit_cmd(
    trajectory: Array,
    max_modes: int | None = None,
    *,
    tol: float | None = None,
    sizes: Sequence[int] | None = None,
    num_samples: int = 1000,
    seed: int | None = 0,
    metric: Metric = "correlation",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    check_finite: bool = True,
) -> CMDFit:
    """Post-hoc CMD of ``trajectory`` ``(N, T)``: sample, cluster, references, assignment, (a, b).

    Exactly one of ``max_modes`` (the paper's ``M``) and ``tol`` (automatic ``M``: the smallest whose
    relative error on the sample is ``<= tol``, see :func:`choose_num_modes`, up to ``min(K, 32)``) may be
    given; neither means ``max_modes=10``. ``sizes`` splits the rows into tensors for stratified sampling
    (default one segment). The trajectory is only read in ``chunk_size``-row slices (a NumPy memmap works).
    """
    xp = namespace(trajectory=trajectory)
    _check_trajectory(xp, trajectory, "trajectory")
    n = int(trajectory.shape[0])
    if sizes is not None and sum(int(s) for s in sizes) != n:
        raise ShapeError(
            f"`sizes` sum to {sum(int(s) for s in sizes)}, but `trajectory` has {n} rows"
        )
    idx = sample_indices(n if sizes is None else sizes, num_samples, seed=seed)
    sample = _sample_rows(xp, trajectory, idx)
    if check_finite:
        _check_finite(sample, "trajectory")
    return fit_cmd_shard(
        trajectory,
        sample,
        idx,
        max_modes,
        tol=tol,
        metric=metric,
        chunk_size=chunk_size,
        check_finite=check_finite,
    )


def fit_cmd_shard(
    shard: Array,
    sample: Array,
    sample_index: np.ndarray,
    max_modes: int | None = None,
    *,
    tol: float | None = None,
    metric: Metric = "correlation",
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
    idx = np.asarray(sample_index, dtype=np.int64)
    if idx.shape != (int(sample.shape[0]),) or sample.shape[1] != shard.shape[1]:
        raise ShapeError(
            f"`sample` {tuple(sample.shape)} must hold one row per `sample_index` entry "
            f"({idx.shape[0]}) and as many epochs as `shard` {tuple(shard.shape)}"
        )
    if max_modes is not None and tol is not None:
        raise ValueError("give `max_modes` or `tol`, not both")
    if tol is not None:
        max_modes = choose_num_modes(
            sample, tol, max_modes=min(int(idx.size), 32), metric=metric, check_finite=False
        )
    modes = find_modes(
        sample, 10 if max_modes is None else max_modes, metric=metric, check_finite=False
    )
    # the profiles are rows of the trajectory itself (same dtype), so chunked fitting matches the sample's
    assignment, a, b = _run_chunks(shard, modes.profiles, None, chunk_size, check_finite, "both")
    return CMDFit(
        sample=idx,
        labels=modes.labels,
        references=idx[modes.references],
        profiles=modes.profiles,
        assignment=assignment,
        a=a,
        b=b,
    )


def relative_error(
    trajectory: Array,
    fit: CMDFit,
    *,
    centered: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> float:
    """``||trajectory - model||_F / ||trajectory - row means||_F`` (``centered=False``: ``/ ||trajectory||_F``).

    The centered form measures how much of the *motion* CMD misses; the plain form is dominated by the
    weights' offsets, which ``b`` captures exactly, and looks small for any model. 0 when the denominator
    is 0. Computed in chunks.
    """
    xp = namespace(trajectory=trajectory, profiles=fit.profiles)
    _check_trajectory(xp, trajectory, "trajectory", min_epochs=1)
    chunk = _check_chunk(chunk_size)
    n = int(trajectory.shape[0])
    num = 0.0
    den = 0.0
    for s in range(0, n, chunk):
        w = upcast(xp, trajectory[s : min(s + chunk, n), :])
        model = xp.astype(fit.reconstruct(s, min(s + chunk, n)), w.dtype)
        r = w - model
        num += float(xp.sum(r * r))
        base = w - xp.mean(w, axis=1, keepdims=True) if centered else w
        den += float(xp.sum(base * base))
    return math.sqrt(num / den) if den > 0 else 0.0


def choose_num_modes(
    sample: Array,
    tol: float,
    *,
    max_modes: int | None = None,
    metric: Metric = "correlation",
    check_finite: bool = True,
) -> int:
    """The smallest ``M`` whose CMD model of ``sample`` ``(K, T)`` has centered relative error ``<= tol``.

    One linkage is computed and cut at ``M = 1, 2, ...``; for each cut the references are chosen, every
    sampled row is assigned and fitted as in :func:`fit_cmd`, and the error
    ``||X - X_hat||_F / ||X - row means||_F`` is measured. Returns ``max_modes`` (default ``K``) when no
    ``M`` reaches ``tol``. Non-increasing in ``tol`` by construction (a minimum over a set that grows
    with ``tol``). ``tol`` in [0, 1].
    """
    xp = namespace(sample=sample)
    _check_trajectory(xp, sample, "sample")
    if check_finite:
        _check_finite(sample, "sample")
    t = _check_fraction(tol, "tol", open_low=False)
    k = int(sample.shape[0])
    upper = k if max_modes is None else check_rank(max_modes, k, name="max_modes", what="K")
    _, c_host, merges, heights = _cluster_sample(xp, sample, metric)
    x = upcast(xp, sample)
    xc = x - xp.mean(x, axis=1, keepdims=True)
    den = float(xp.sum(xc * xc))
    if den == 0.0:
        return 1
    for m in range(1, upper + 1):
        labels = _cut(merges, heights, k, m)
        refs = _references(c_host, labels)
        prof = _Profiles(xp, xp.take(x, _index_array(xp, refs, x), axis=0))
        mode, mean, cov = _chunk_stats(xp, x, prof, None)
        a, b = _coefficients(xp, mode, mean, cov, prof)
        model = a[:, None] * xp.take(prof.centered + prof.mean[:, None], mode, axis=0) + b[:, None]
        r = x - model
        if math.sqrt(float(xp.sum(r * r)) / den) <= t:
            return m
    return upper


# --------------------------------------------------------------------------------------------------
# online CMD
# --------------------------------------------------------------------------------------------------
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
    in float32 when weights move little) and never multiplies by ``G`` and ``G^{-1}`` in turn.
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
    ) -> None:
        self.references = np.asarray(references, dtype=np.int64)
        self.assignment = assignment
        self.profiles = profiles
        self.r_mean = r_mean
        self.r_m2 = r_m2
        self.w_mean = w_mean
        self.c_wr = c_wr
        self._xp = namespace(assignment=assignment, profiles=profiles, w_mean=w_mean, c_wr=c_wr)
        self._ref_idx = _index_array(self._xp, self.references, w_mean)

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
        metric: Metric = "correlation",
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
        xp = namespace(trajectory=trajectory, profiles=fit.profiles)
        chunk = _check_chunk(chunk_size)
        prof = _Profiles(xp, fit.profiles)
        n = int(trajectory.shape[0])
        dev = _device(trajectory)
        w_mean = xp.empty((n,), dtype=prof.dtype, device=dev)
        c_wr = xp.empty((n,), dtype=prof.dtype, device=dev)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            _, mean, cov = _chunk_stats(xp, trajectory[s:e, :], prof, fit.assignment[s:e])
            w_mean[s:e] = mean
            c_wr[s:e] = cov
        return cls(
            references=fit.references,
            assignment=xp.astype(fit.assignment, xp.int32),  # half the bytes; 2**31 modes is plenty
            profiles=xp.astype(fit.profiles, prof.dtype),
            r_mean=prof.mean,
            r_m2=prof.m2,
            w_mean=w_mean,
            c_wr=c_wr,
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
        """Epochs seen so far (warm-up included)."""
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
        if check_finite:
            _check_finite(weights, "weights")
        w = xp.astype(weights, self.dtype) if weights.dtype != self.dtype else weights
        if reference_values is None:
            r = xp.take(w, self._ref_idx)
        else:
            namespace(reference_values=reference_values, w_mean=self.w_mean)
            if reference_values.shape != (self.num_modes,):
                raise ShapeError(
                    f"`reference_values` must have shape ({self.num_modes},), got "
                    f"{tuple(reference_values.shape)}"
                )
            r = reference_values
            if r.dtype != self.dtype:
                r = xp.astype(r, self.dtype)
        t = self.epochs + 1
        dr = r - self.r_mean
        r_mean = self.r_mean + dr / t
        self.r_m2 = self.r_m2 + dr * (r - r_mean)
        self.r_mean = r_mean
        dw = w - self.w_mean
        self.w_mean = self.w_mean + dw / t
        self.c_wr = self.c_wr + dw * xp.take(r - r_mean, self.assignment)
        self.profiles = xp.concat([self.profiles, r[:, None]], axis=1)

    def coefficients(self) -> tuple[Array, Array]:
        """``(a, b)``, each ``(N,)``: the least-squares fit over every epoch seen."""
        xp = self._xp
        m2 = xp.take(self.r_m2, self.assignment)
        pos = m2 > 0
        a = xp.where(pos, self.c_wr / xp.where(pos, m2, xp.ones_like(m2)), xp.zeros_like(m2))
        b = self.w_mean - a * xp.take(self.r_mean, self.assignment)
        return a, b

    def weights(self, epoch: int = -1) -> Array:
        """The CMD weights ``a r(epoch) + b`` (``(N,)``) at a seen epoch (default: the latest)."""
        xp = self._xp
        t = self.epochs
        e = epoch + t if epoch < 0 else epoch
        if not 0 <= e < t:
            raise IndexError(f"`epoch` {epoch} out of range for {t} epochs seen")
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
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> OnlineCMD:
        """Rebuild from :meth:`state_dict` (the arrays may have been moved to another device)."""
        missing = {
            "references",
            "assignment",
            "profiles",
            "r_mean",
            "r_m2",
            "w_mean",
            "c_wr",
        } - set(state)
        if missing:
            raise KeyError(f"CMD state is missing {sorted(missing)}")
        return cls(
            **{k: state[k] for k in ("assignment", "profiles", "r_mean", "r_m2", "w_mean", "c_wr")},
            references=np.asarray(state["references"], dtype=np.int64),
        )


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
    coefficients since the last embedding). References and already embedded parameters are never chosen;
    ties go to the lower index. Returns a boolean ``(N,)`` array.
    """
    xp = namespace(a=a, b=b, a_prev=a_prev, b_prev=b_prev, embedded=embedded)
    n = int(a.shape[0])
    for name, v in (("b", b), ("a_prev", a_prev), ("b_prev", b_prev), ("embedded", embedded)):
        if v.shape != a.shape:
            raise ShapeError(f"`{name}` must have shape {tuple(a.shape)}, got {tuple(v.shape)}")
    if a.ndim != 1:
        raise ShapeError(f"`a` must be 1-D, got shape {tuple(a.shape)}")
    if not xp.isdtype(embedded.dtype, "bool"):
        raise TypeError(f"`embedded` must be a boolean mask, got {embedded.dtype}")
    frac = _check_fraction(fraction, "fraction")
    refs = np.asarray(references, dtype=np.int64)
    if refs.size and (refs.min() < 0 or refs.max() >= n):
        raise RankError(f"`references` must lie in 0..{n - 1}")
    da = a - a_prev
    db = b - b_prev
    d = xp.sqrt(da * da + db * db)
    is_ref = xp.zeros((n,), dtype=xp.bool, device=_device(a))
    if refs.size:
        is_ref = xp.asarray(np.isin(np.arange(n), refs), device=_device(a))
    blocked = embedded | is_ref
    d = xp.where(blocked, xp.asarray(float("inf"), dtype=d.dtype, device=_device(d)), d)
    eligible = n - int(xp.sum(xp.astype(blocked, xp.int64)))
    k = min(math.ceil(frac * n), eligible)
    if k <= 0:
        return embedded
    order = xp.argsort(d, stable=True)[:k]
    chosen = _scatter_mask(xp, order, n, a)
    return embedded | chosen


def _scatter_mask(xp: Namespace, idx: Array, n: int, like: Array) -> Array:
    host = np.zeros(n, dtype=bool)
    host[_to_host(idx)] = True
    return xp.asarray(host, device=_device(like))
