"""CMD (Correlation Mode Decomposition), the slow and obvious float64 way: NumPy + SciPy.

Written independently of lowrank_core (shares no code with it). A trajectory is ``(N, T)``: one row per
parameter, one column per epoch. Functions follow the same definitions as ``lowrank_core.cmd``:

- correlation: ``|np.corrcoef|`` with NaN (constant rows) replaced by 0;
- clustering: ``scipy.cluster.hierarchy.linkage(method='complete')`` + ``fcluster(criterion='maxclust')``,
  clusters renumbered by decreasing size (ties: smallest member first);
- reference of a cluster: the member with the largest summed |corr| to the other members (first on ties);
- assignment: argmax over modes of |pearson| with the profile (first mode on ties; 0 for constant rows);
- coefficients: ``np.linalg.lstsq`` on ``[profile, 1]`` per parameter.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._checks import Float64Array, as_matrix

__all__ = [
    "cmd_abs_correlation",
    "cmd_assign",
    "cmd_cluster",
    "cmd_fit",
    "cmd_lstsq",
    "cmd_reconstruct",
    "cmd_references",
    "cmd_sample_indices",
]


def cmd_sample_indices(
    sizes: Sequence[int], num_samples: int, seed: int | None = 0
) -> NDArray[np.int64]:
    """Stratified sample: segment l gets min(n_l, min(K//(2L), n_l) + floor(n_l/N * K/2)) indices.

    Drawn per segment, in order, with ``np.random.default_rng(seed).choice(n_l, size, replace=False)``;
    all indices when ``K >= N``. Sorted within each segment, returned as global flat indices.
    """
    total = int(sum(sizes))
    if num_samples >= total:
        return np.arange(total, dtype=np.int64)
    rng = np.random.default_rng(seed)
    L = len(sizes)
    parts = []
    start = 0
    for n in sizes:
        count = min(n, min(num_samples // (2 * L), n) + math.floor(n / total * num_samples / 2))
        if count > 0:
            parts.append(start + np.sort(rng.choice(n, size=count, replace=False)))
        start += n
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def cmd_abs_correlation(x: ArrayLike) -> Float64Array:
    """``|corrcoef(x)|`` of the rows, NaN -> 0."""
    a = as_matrix(x, "x")
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.abs(np.corrcoef(a))
    out: Float64Array = np.nan_to_num(np.atleast_2d(c), nan=0.0)
    return out


def cmd_cluster(distance: ArrayLike, max_clusters: int) -> NDArray[np.int64]:
    """Labels 0..M'-1 (0 = largest cluster) of scipy's complete-linkage maxclust cut of ``distance``."""
    d = as_matrix(distance, "distance")
    k = d.shape[0]
    if k == 1:
        return np.zeros(1, dtype=np.int64)
    d = (d + d.T) / 2.0
    np.fill_diagonal(d, 0.0)
    # imported by name: SciPy ships no type stubs, and this keeps mypy --strict quiet either way
    hierarchy: Any = importlib.import_module("scipy.cluster.hierarchy")
    distance_mod: Any = importlib.import_module("scipy.spatial.distance")
    condensed = distance_mod.squareform(d, checks=False)
    tree = hierarchy.linkage(condensed, method="complete")
    raw = hierarchy.fcluster(tree, max_clusters, "maxclust")
    groups: dict[int, list[int]] = {}
    for i, lab in enumerate(raw):
        groups.setdefault(int(lab), []).append(i)
    ordered = sorted(groups.values(), key=lambda g: (-len(g), g[0]))
    out = np.zeros(k, dtype=np.int64)
    for new, members in enumerate(ordered):
        out[members] = new
    return out


def cmd_references(corr: ArrayLike, labels: ArrayLike) -> NDArray[np.int64]:
    """Per cluster, the member with the largest sum of |corr| to the other members."""
    c = np.asarray(corr, dtype=np.float64)
    lab = np.asarray(labels)
    refs = []
    for m in range(int(lab.max()) + 1):
        members = [i for i in range(lab.size) if lab[i] == m]
        best, best_score = members[0], -np.inf
        for i in members:
            score = sum(c[i, j] for j in members if j != i)
            if score > best_score:
                best, best_score = i, score
        refs.append(best)
    return np.asarray(refs, dtype=np.int64)


def _pearson_abs(w: Float64Array, r: Float64Array) -> float:
    wc, rc = w - w.mean(), r - r.mean()
    den = math.sqrt(float(wc @ wc)) * math.sqrt(float(rc @ rc))
    return abs(float(wc @ rc)) / den if den > 0 else 0.0


def cmd_assign(trajectory: ArrayLike, profiles: ArrayLike) -> NDArray[np.int64]:
    """Mode of each row: argmax of |pearson| with the profiles (first on ties)."""
    x = as_matrix(trajectory, "trajectory")
    p = as_matrix(profiles, "profiles")
    out = np.zeros(x.shape[0], dtype=np.int64)
    for n in range(x.shape[0]):
        scores = [_pearson_abs(x[n], p[m]) for m in range(p.shape[0])]
        out[n] = int(np.argmax(scores))
    return out


def cmd_lstsq(
    trajectory: ArrayLike, profiles: ArrayLike, assignment: ArrayLike
) -> tuple[Float64Array, Float64Array]:
    """``(a, b)``: ``np.linalg.lstsq([r, 1], w)`` per row with ``r = profiles[assignment[n]]``."""
    x = as_matrix(trajectory, "trajectory")
    p = as_matrix(profiles, "profiles")
    mode = np.asarray(assignment, dtype=np.int64)
    a = np.zeros(x.shape[0])
    b = np.zeros(x.shape[0])
    for n in range(x.shape[0]):
        design = np.stack([p[mode[n]], np.ones(x.shape[1])], axis=1)
        (a[n], b[n]), *_ = np.linalg.lstsq(design, x[n], rcond=None)
    return a, b


def cmd_reconstruct(
    profiles: ArrayLike, assignment: ArrayLike, a: ArrayLike, b: ArrayLike
) -> Float64Array:
    """``a_n * profiles[mode_n] + b_n`` for every row."""
    p = np.asarray(profiles, dtype=np.float64)
    mode = np.asarray(assignment, dtype=np.int64)
    return (
        np.asarray(a, dtype=np.float64)[:, None] * p[mode]
        + np.asarray(b, dtype=np.float64)[:, None]
    )


def cmd_fit(
    trajectory: ArrayLike,
    max_modes: int,
    *,
    sample: ArrayLike | None = None,
    metric: str = "correlation",
) -> dict[str, NDArray[np.float64] | NDArray[np.int64]]:
    """The whole post-hoc pipeline on the rows ``sample`` (default: all rows).

    Returns ``labels``, ``references`` (global rows), ``profiles``, ``assignment``, ``a``, ``b``.
    ``metric``: ``'correlation'`` (distance 1 - |corr|) or ``'euclidean'`` (between rows of |corr|).
    """
    x = as_matrix(trajectory, "trajectory")
    idx = np.arange(x.shape[0]) if sample is None else np.asarray(sample, dtype=np.int64)
    c = cmd_abs_correlation(x[idx])
    if metric == "correlation":
        d = 1.0 - c
    elif metric == "euclidean":
        d = np.sqrt(((c[:, None, :] - c[None, :, :]) ** 2).sum(axis=-1))
    else:
        raise ValueError(f"metric: unknown {metric!r}")
    labels = cmd_cluster(d, max_modes)
    refs = idx[cmd_references(c, labels)]
    profiles = x[refs]
    assignment = cmd_assign(x, profiles)
    a, b = cmd_lstsq(x, profiles, assignment)
    return {
        "labels": labels,
        "references": refs,
        "profiles": profiles,
        "assignment": assignment,
        "a": a,
        "b": b,
    }
