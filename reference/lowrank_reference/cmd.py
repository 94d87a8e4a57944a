"""CMD (Correlation Mode Decomposition), the slow and obvious float64 way: NumPy + SciPy.

Written independently of lowrank_core (shares no code with it). A trajectory is ``(N, T)``: one row per
parameter, one column per epoch. Functions follow the same definitions as ``lowrank_core.cmd``:

- constant rows: centred norm ``<= 8 eps sqrt(T) (|x_0| + rms_t(x_t - x_0))`` (``eps`` of the data's
  dtype, float64 by default); they correlate 0 with everything, are kept out of the clustering (label
  -1), never serve as references, join mode 0 with ``a = 0`` and ``b =`` their mean;
- correlation: ``|np.corrcoef|`` with constant rows set to 0, clipped to [0, 1];
- sampling: the paper's per-tensor counts topped up to exactly K (largest remainders of the share of the
  scalars each tensor has left);
- clustering: ``scipy.cluster.hierarchy.linkage(method='complete')`` + ``fcluster(criterion='maxclust')``,
  clusters renumbered by decreasing size (ties: smallest member first);
- reference of a cluster: the member with the largest summed |corr| to the other members; sums within
  ``2 (T + 4) eps`` per other member of the largest tie (rounding), the first tied member is chosen;
- assignment: argmax over modes of |pearson| with the profile (first mode on ties; 0 for constant rows);
- coefficients: ``np.linalg.lstsq`` on ``[profile, 1]`` per parameter (``a = 0``, ``b = mean`` for a
  constant row or profile).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._checks import Float64Array, as_matrix

EPS64 = float(np.finfo(np.float64).eps)

__all__ = [
    "cmd_abs_correlation",
    "cmd_assign",
    "cmd_cluster",
    "cmd_constant_rows",
    "cmd_fit",
    "cmd_lstsq",
    "cmd_reconstruct",
    "cmd_references",
    "cmd_sample_indices",
]


def cmd_constant_rows(x: ArrayLike, eps: float = EPS64) -> NDArray[np.bool_]:
    """Rows whose motion is at rounding level: ``||x - mean|| <= 8 eps sqrt(T) (|x_0| + rms(x - x_0))``."""
    a = as_matrix(x, "x")
    t = a.shape[1]
    out = np.zeros(a.shape[0], dtype=bool)
    for n in range(a.shape[0]):
        row = a[n]
        top = float(np.max(np.abs(row - row[0])))
        if top == 0.0:
            out[n] = True
            continue
        u = (row - row[0]) / top  # scaled: squares cannot overflow
        spread = float(np.sqrt(np.sum((u - u.mean()) ** 2)))
        rms = top * float(np.sqrt(np.mean(u**2)))
        out[n] = spread * top <= 8.0 * eps * math.sqrt(t) * (abs(row[0]) + rms)
    return out


def cmd_sample_indices(
    sizes: Sequence[int], num_samples: int, seed: int | None = 0
) -> NDArray[np.int64]:
    """Stratified sample of exactly ``min(K, N)`` indices.

    Segment l first gets c_l = min(n_l, min(K//(2L), n_l) + floor(n_l/N * K/2)); the shortfall
    r = K - sum c_l is shared in proportion to what each segment has left, e_l = n_l - c_l: each gets
    floor(r e_l / sum e) and the leftover goes one each to the largest remainders (r e_l mod sum e), the
    lower segment first on ties. Drawn per segment, in order, with
    ``np.random.default_rng(seed).choice(n_l, size, replace=False)``; all indices when ``K >= N``.
    Sorted within each segment, returned as global flat indices.
    """
    total = int(sum(sizes))
    if num_samples >= total:
        return np.arange(total, dtype=np.int64)
    rng = np.random.default_rng(seed)
    L = len(sizes)
    counts = [
        min(n, min(num_samples // (2 * L), n) + math.floor(n / total * num_samples / 2))
        for n in sizes
    ]
    short = num_samples - sum(counts)
    if short > 0:
        left = [n - c for n, c in zip(sizes, counts, strict=True)]
        pool = sum(left)
        shares = [(short * e) // pool for e in left]
        remainders = sorted(((-((short * e) % pool), i) for i, e in enumerate(left)))
        for _, i in remainders[: short - sum(shares)]:
            shares[i] += 1
        counts = [c + e for c, e in zip(counts, shares, strict=True)]
    parts = []
    start = 0
    for n, count in zip(sizes, counts, strict=True):
        if count > 0:
            parts.append(start + np.sort(rng.choice(n, size=count, replace=False)))
        start += n
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def cmd_abs_correlation(x: ArrayLike, eps: float = EPS64) -> Float64Array:
    """``|corrcoef(x)|`` of the rows, constant rows (see :func:`cmd_constant_rows`) 0, clipped to [0, 1]."""
    a = as_matrix(x, "x")
    const = cmd_constant_rows(a, eps)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.abs(np.corrcoef(a))
    c = np.nan_to_num(np.atleast_2d(c), nan=0.0)
    c[const, :] = 0.0
    c[:, const] = 0.0
    out: Float64Array = np.clip(c, 0.0, 1.0)
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


def cmd_references(corr: ArrayLike, labels: ArrayLike, tie: float = 0.0) -> NDArray[np.int64]:
    """Per cluster, the member with the largest sum of |corr| to the other members.

    A member whose sum is within ``tie * (members - 1)`` of the largest ties with it (``tie``: the
    rounding bound of one |corr| entry); the first tied member is chosen.
    """
    c = np.asarray(corr, dtype=np.float64)
    lab = np.asarray(labels)
    refs = []
    for m in range(int(lab.max()) + 1):
        members = [i for i in range(lab.size) if lab[i] == m]
        scores = [sum(c[i, j] for j in members if j != i) for i in members]
        top = max(scores)
        slack = tie * max(1, len(members) - 1)
        refs.append(next(i for i, sc in zip(members, scores, strict=True) if sc >= top - slack))
    return np.asarray(refs, dtype=np.int64)


def _pearson_abs(w: Float64Array, r: Float64Array) -> float:
    wc, rc = w - w.mean(), r - r.mean()
    den = math.sqrt(float(wc @ wc)) * math.sqrt(float(rc @ rc))
    return min(1.0, abs(float(wc @ rc)) / den) if den > 0 else 0.0


def cmd_assign(trajectory: ArrayLike, profiles: ArrayLike, eps: float = EPS64) -> NDArray[np.int64]:
    """Mode of each row: argmax of |pearson| with the profiles (first on ties; constant rows: 0)."""
    x = as_matrix(trajectory, "trajectory")
    p = as_matrix(profiles, "profiles")
    const_x = cmd_constant_rows(x, eps)
    const_p = cmd_constant_rows(p, eps)
    out = np.zeros(x.shape[0], dtype=np.int64)
    for n in range(x.shape[0]):
        if const_x[n]:
            continue
        scores = [0.0 if const_p[m] else _pearson_abs(x[n], p[m]) for m in range(p.shape[0])]
        out[n] = int(np.argmax(scores))
    return out


def cmd_lstsq(
    trajectory: ArrayLike, profiles: ArrayLike, assignment: ArrayLike, eps: float = EPS64
) -> tuple[Float64Array, Float64Array]:
    """``(a, b)``: ``np.linalg.lstsq([r, 1], w)`` per row with ``r = profiles[assignment[n]]``.

    A constant row or profile gets ``a = 0``, ``b = mean(w)``.
    """
    x = as_matrix(trajectory, "trajectory")
    p = as_matrix(profiles, "profiles")
    mode = np.asarray(assignment, dtype=np.int64)
    const_x = cmd_constant_rows(x, eps)
    const_p = cmd_constant_rows(p, eps)
    a = np.zeros(x.shape[0])
    b = np.zeros(x.shape[0])
    for n in range(x.shape[0]):
        if const_x[n] or const_p[mode[n]]:
            b[n] = float(np.mean(x[n]))
            continue
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
    metric: str = "euclidean",
    eps: float = EPS64,
) -> dict[str, NDArray[np.float64] | NDArray[np.int64]]:
    """The whole post-hoc pipeline on the rows ``sample`` (default: all rows).

    Returns ``labels`` (-1 for constant sampled rows), ``references`` (global rows), ``profiles``,
    ``assignment``, ``a``, ``b``. ``metric``: ``'euclidean'`` (between rows of |corr|, the paper's) or
    ``'correlation'`` (distance 1 - |corr|). Constant sampled rows are left out of the clustering; when all
    are constant, one mode with the first sampled row as reference.
    """
    x = as_matrix(trajectory, "trajectory")
    idx = np.arange(x.shape[0]) if sample is None else np.asarray(sample, dtype=np.int64)
    const = cmd_constant_rows(x[idx], eps)
    moving = idx[~const]
    if moving.size == 0:
        refs = idx[:1]
        assignment = np.zeros(x.shape[0], dtype=np.int64)
        a, b = cmd_lstsq(x, x[refs], assignment, eps)
        return {
            "labels": np.full(idx.size, -1, dtype=np.int64),
            "references": refs,
            "profiles": x[refs],
            "assignment": assignment,
            "a": a,
            "b": b,
        }
    max_modes = min(max_modes, int(moving.size))
    c = cmd_abs_correlation(x[moving], eps)
    if metric == "correlation":
        d = 1.0 - c
    elif metric == "euclidean":
        d = np.sqrt(((c[:, None, :] - c[None, :, :]) ** 2).sum(axis=-1))
    else:
        raise ValueError(f"metric: unknown {metric!r}")
    sub = cmd_cluster(d, max_modes)
    refs = moving[cmd_references(c, sub, 2.0 * (x.shape[1] + 4) * eps)]
    labels = np.full(idx.size, -1, dtype=np.int64)
    labels[~const] = sub
    profiles = x[refs]
    assignment = cmd_assign(x, profiles, eps)
    a, b = cmd_lstsq(x, profiles, assignment, eps)
    return {
        "labels": labels,
        "references": refs,
        "profiles": profiles,
        "assignment": assignment,
        "a": a,
        "b": b,
    }
