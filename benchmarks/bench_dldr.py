"""DLDR subspace fit: lowrank_core.dldr (Gram route) vs scikit-learn's PCA on the same snapshots.

(a) D = 2M, t = 80, d = 40, float32 snapshots in one (t, D) NumPy array: fit time of
    ``fit_subspace`` (exact, Gram route) and of the streamed store (``SnapshotStore.fit`` after the
    snapshots were added one by one; the add time is reported separately: it is spread over training)
    vs ``sklearn.decomposition.PCA(n_components=d).fit`` (its default solver choice), the ratio
    sklearn / ours (goal >= 15), and the smallest principal-angle cosine between the two subspaces.
(b) peak memory of our fit (tracemalloc: NumPy allocations) against the snapshot storage and the
    bound storage + O(t^2 + D) + the d x D result; sklearn's peak for comparison.
(c) D = 11M, t = 80: ours only (sklearn would need several dense copies of the 3.5 GB matrix).

The snapshots are a synthetic trajectory: a random walk with decaying step sizes plus noise.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
from _common import Config, Report, Table, fmt_seconds

from lowrank_core.dldr import SnapshotStore, fit_subspace

DESCRIPTION = "DLDR subspace fit (Gram route) vs sklearn PCA: time, peak memory, agreement"
GOAL_RATIO = 15.0


def _snapshots(t: int, D: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    X = np.empty((t, D), dtype=np.float32)
    w = rng.standard_normal(D, dtype=np.float32)
    for i in range(t):
        w += (1.0 / (1 + i)) * rng.standard_normal(D, dtype=np.float32)
        X[i] = w
    return X


def _timed_peak(fn: Callable[[], Any]) -> tuple[Any, float, int]:
    tracemalloc.start()
    tracemalloc.reset_peak()
    start = time.perf_counter()
    out = fn()
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return out, elapsed, peak


def _best_time(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _min_cos(P: np.ndarray, Q: np.ndarray) -> float:
    M = P.astype(np.float64) @ Q.astype(np.float64).T
    return float(np.linalg.svd(M, compute_uv=False).min())


def _mb(n: float) -> float:
    return n / 2**20


def run(config: Config) -> Report:
    t, d = (20, 8) if config.quick else (80, 40)
    sizes = [20_000] if config.quick else [2_000_000]
    big = 200_000 if config.quick else 11_000_000
    repeat = config.repeats(3, 1)
    timing = Table(
        f"DLDR fit, t = {t} snapshots, d = {d}, float32",
        ["D", "ours fit", "ours store fit", "store adds", "sklearn PCA", "sklearn/ours", "min cos"],
    )
    memory = Table(
        "Peak memory of the fit (tracemalloc, MiB)",
        ["D", "snapshots", "ours peak", "bound", "peak/bound", "sklearn peak"],
    )
    data: dict[str, Any] = {"t": t, "d": d, "rows": []}
    for D in [*sizes, big]:
        X = _snapshots(t, D)
        storage = X.nbytes
        fit_ours = lambda X=X: fit_subspace(X, d)  # noqa: E731
        sub, _, peak = _timed_peak(fit_ours)
        t_ours = _best_time(fit_ours, repeat)
        store = SnapshotStore()
        start = time.perf_counter()
        for i in range(t):
            store.add(X[i])
        t_adds = time.perf_counter() - start
        t_store = _best_time(lambda store=store: store.fit(d), repeat)
        del store
        # bound: snapshot storage (not counted by the fit: it exists before) + O(t^2 + D) scratch
        # (one column chunk of about D entries, centre, x0: 3 D) + the d x D result (x2 while
        # re-orthonormalizing) -- everything in float32.
        bound = 3 * D * 4 + 2 * d * D * 4 + 16 * t * t * 8
        row: dict[str, Any] = {
            "D": D,
            "ours_fit_s": t_ours,
            "ours_store_fit_s": t_store,
            "store_adds_s": t_adds,
            "ours_peak_bytes": peak,
            "bound_bytes": bound,
            "storage_bytes": storage,
        }
        sk_cell: Any = "-"
        ratio: Any = "-"
        cos: Any = "-"
        sk_peak: Any = "-"
        if D in sizes:
            try:
                from sklearn.decomposition import PCA
            except ImportError:
                timing.notes.append("scikit-learn is not installed: its rows are skipped")
            else:
                pca_fit = lambda X=X: PCA(n_components=d).fit(X)  # noqa: E731
                pca, _, sk_peak_b = _timed_peak(pca_fit)
                t_sk = _best_time(pca_fit, max(1, repeat - 1))
                sk_cell = fmt_seconds(t_sk)
                ratio = t_sk / t_ours
                cos = _min_cos(np.asarray(sub.basis), pca.components_)
                sk_peak = _mb(sk_peak_b)
                row.update(sklearn_s=t_sk, ratio=ratio, min_cos=cos, sklearn_peak_bytes=sk_peak_b)
        data["rows"].append(row)
        timing.rows.append(
            [D, fmt_seconds(t_ours), fmt_seconds(t_store), fmt_seconds(t_adds), sk_cell, ratio, cos]
        )
        memory.rows.append([D, _mb(storage), _mb(peak), _mb(bound), peak / bound, sk_peak])
        del X, sub
    timing.notes.append(
        f"goal: sklearn/ours >= {GOAL_RATIO:g}; median of {repeat}; 'store adds' = adding the t "
        "snapshots one by one (streamed Gram rows), spread over training in practice"
    )
    timing.notes.append(
        "min cos: smallest principal-angle cosine between our subspace and sklearn's "
        "(sklearn's default solver for this shape is randomized)"
    )
    memory.notes.append(
        "bound = O(t^2 + D) scratch (3 D + 16 t^2 entries) + the d x D result (twice, while "
        "re-orthonormalizing); the snapshot storage itself exists before the fit and is not counted"
    )
    return Report(tables=[timing, memory], data=data)
