"""CMD step 3: complete-linkage clustering on a private NumPy copy of the ``K x K`` distances."""

from __future__ import annotations

import numpy as np

from .._array import Array, Namespace, check_floating, check_rank, namespace
from .._validate import check_bool
from ..errors import ShapeError
from .validation import _check_finite, _index_array, _to_host

__all__ = ["cluster"]


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
