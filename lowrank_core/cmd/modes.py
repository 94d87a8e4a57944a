"""CMD step 4: modes (clusters and their reference rows) of a sample."""

from __future__ import annotations

from dataclasses import dataclass

import array_api_compat
import numpy as np

from .._array import Array, Namespace, check_rank, namespace
from .._validate import check_bool
from .correlation import _abs_corr, _distance, _Rows, _rows, _unit
from .linkage import _cut, _host_linkage
from .validation import (
    DEFAULT_METRIC,
    Metric,
    _check_finite,
    _check_metric,
    _check_trajectory,
    _eps,
    _index_array,
    _to_host,
)

__all__ = ["Modes", "find_modes"]


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
