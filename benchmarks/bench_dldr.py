"""DLDR subspace fit: lowrank_core.dldr (Gram route) vs scikit-learn's PCA and vs the Gram GEMM alone.

(a) D = 2M, t = 80, d = 40, float32 snapshots in one (t, D) NumPy array: fit time of
    ``fit_subspace`` (exact, Gram route) and of the streamed store (``SnapshotStore.fit`` after the
    snapshots were added one by one; the add time is reported separately: it is spread over training)
    vs ``sklearn.decomposition.PCA(n_components=d).fit`` (its default solver choice), the ratio
    sklearn / ours (goal >= 15), and the smallest principal-angle cosine between the two subspaces.
(b) the floor of the method (issue 12): one float32 GEMM ``X X^T`` of the (t, D) snapshot matrix, and
    the ratio of each fit to it.
(c) peak memory of our fits (tracemalloc: NumPy allocations; the snapshot storage exists before the
    fit and is not counted) against the documented bound (:func:`fit_bound`): the ``d x D`` result
    twice (its column pieces and the joined result), the centre and its pieces (3 D), and one column
    chunk of scratch; in memory, memory-mapped on disk, and ``fit_subspace`` on the matrix.

``python benchmarks/bench_dldr.py --large [D t d]`` runs the one-off measurement at D = 20M, t = 40
(issue 9, defects 9 and 10): time, peak / bound of the three routes, and ``max|P P^T - I|`` of NumPy
and torch float32 fits. It needs about 10 GB of memory and a few minutes on one core.

The snapshots are a synthetic trajectory: a random walk with decaying step sizes.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
from _common import Config, Report, Table, fmt_seconds

from lowrank_core.dldr import CHUNK, SnapshotStore, fit_subspace

DESCRIPTION = "DLDR subspace fit (Gram route) vs sklearn PCA and the Gram GEMM: time, memory"
GOAL_RATIO = 15.0


def _snapshots(t: int, D: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    X = np.empty((t, D), dtype=np.float32)
    w = rng.standard_normal(D, dtype=np.float32)
    for i in range(t):
        w += (1.0 / (1 + i)) * rng.standard_normal(D, dtype=np.float32)
        X[i] = w
    return X


def fit_bound(t: int, D: int, d: int, item: int = 4) -> int:
    """The documented peak of a fit (bytes, beyond the snapshot storage): ``2 d D`` (result and its
    pieces) + ``3 D`` (centre, its pieces, one temporary) in the snapshots' dtype, plus one column
    chunk: the ``(t, W)`` slab in the stored dtype and in float64, a ``(d, W)`` float64 piece."""
    W = min(CHUNK, D)
    return (2 * d * D + 3 * D) * item + t * W * (item + 8) + d * W * 8 + 16 * t * t * 8


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


def _orth_error(P: Any) -> float:
    """``max|P P^T - I|`` computed in float64, chunk by chunk."""
    P = np.asarray(P)
    M = np.zeros((P.shape[0], P.shape[0]))
    for j in range(0, P.shape[1], 1 << 20):
        c = P[:, j : j + (1 << 20)].astype(np.float64)
        M += c @ c.T
    return float(np.abs(M - np.eye(P.shape[0])).max())


def _mb(n: float) -> float:
    return n / 2**20


def _routes(X: np.ndarray, d: int, repeat: int) -> dict[str, Any]:
    """Time, peak and orthonormality of: the Gram GEMM, fit_subspace, the memory store, the disk
    store (each peak measured from before the fit, the storage not counted)."""
    t, D = X.shape
    warm = SnapshotStore()  # first calls import and discover backends: not part of a fit
    for i in range(3):
        warm.add(X[i, :1000])
    warm.fit(1)
    fit_subspace(X[:3, :1000], 1)
    out: dict[str, Any] = {"t": t, "D": D, "d": d, "bound_bytes": fit_bound(t, D, d)}
    out["gemm_s"] = _best_time(lambda: X @ X.T, repeat)
    sub, elapsed, peak = _timed_peak(lambda: fit_subspace(X, d))
    out["matrix"] = {"fit_s": elapsed, "peak_bytes": peak, "orth_err": _orth_error(sub.basis)}
    if repeat > 1:
        out["matrix"]["fit_s"] = _best_time(lambda: fit_subspace(X, d), repeat)
    del sub
    for where in ("memory", "disk"):
        with tempfile.TemporaryDirectory() as tmp:
            store = SnapshotStore(path=f"{tmp}/s.dat" if where == "disk" else None)
            start = time.perf_counter()
            for i in range(t):
                store.add(X[i])
            adds = time.perf_counter() - start
            sub, elapsed, peak = _timed_peak(lambda store=store: store.fit(d))
            row = {"adds_s": adds, "fit_s": elapsed, "peak_bytes": peak}
            row["orth_err"] = _orth_error(sub.basis)
            del sub
            if repeat > 1:
                row["fit_s"] = _best_time(lambda store=store: store.fit(d), repeat)
            store.close()
        out[where] = row
    return out


def run(config: Config) -> Report:
    t, d = (20, 8) if config.quick else (80, 40)
    D = 20_000 if config.quick else 2_000_000
    repeat = config.repeats(3, 1)
    X = _snapshots(t, D)
    r = _routes(X, d, repeat)
    timing = Table(
        f"DLDR fit, t = {t} snapshots, d = {d}, D = {D}, float32 (NumPy)",
        ["route", "fit", "fit / Gram GEMM", "adds", "peak MiB", "peak / bound", "max|PP^T-I|"],
    )
    for name in ("matrix", "memory", "disk"):
        row = r[name]
        timing.rows.append(
            [
                {"matrix": "fit_subspace", "memory": "store (memory)", "disk": "store (disk)"}[
                    name
                ],
                fmt_seconds(row["fit_s"]),
                row["fit_s"] / r["gemm_s"],
                fmt_seconds(row["adds_s"]) if "adds_s" in row else "-",
                _mb(row["peak_bytes"]),
                row["peak_bytes"] / r["bound_bytes"],
                row["orth_err"],
            ]
        )
    timing.notes.append(
        f"Gram GEMM alone (X X^T, float32, one BLAS call): {fmt_seconds(r['gemm_s'])}; bound = "
        f"{_mb(r['bound_bytes']):.0f} MiB (fit_bound: the d x D result twice + 3 D + one chunk)"
    )
    data: dict[str, Any] = {"routes": r}
    try:
        from sklearn.decomposition import PCA
    except ImportError:
        timing.notes.append("scikit-learn is not installed: no comparison")
    else:
        pca_fit = lambda: PCA(n_components=d).fit(X)  # noqa: E731
        pca, _, sk_peak = _timed_peak(pca_fit)
        t_sk = _best_time(pca_fit, max(1, repeat - 1))
        ours = fit_subspace(X, d)
        data["sklearn"] = {
            "fit_s": t_sk,
            "peak_bytes": sk_peak,
            "ratio": t_sk / r["matrix"]["fit_s"],
            "min_cos": _min_cos(np.asarray(ours.basis), pca.components_),
        }
        timing.notes.append(
            f"sklearn PCA: {fmt_seconds(t_sk)} ({t_sk / r['matrix']['fit_s']:.1f}x fit_subspace; "
            f"goal >= {GOAL_RATIO:g}), peak {_mb(sk_peak):.0f} MiB, min cos to ours "
            f"{data['sklearn']['min_cos']:.6f}"
        )
    return Report(tables=[timing], data=data)


def large(D: int = 20_000_000, t: int = 40, d: int = 20) -> dict[str, Any]:
    """The one-off measurement (module docstring); returns and prints JSON."""
    X = _snapshots(t, D)
    out = _routes(X, d, repeat=1)
    try:
        import torch
    except ImportError:
        pass
    else:
        torch.set_num_threads(1)
        Xt = torch.from_numpy(X)
        store = SnapshotStore()
        start = time.perf_counter()
        for i in range(t):
            store.add(Xt[i])
        adds = time.perf_counter() - start
        start = time.perf_counter()
        sub = store.fit(d)
        out["torch_store"] = {
            "adds_s": adds,
            "fit_s": time.perf_counter() - start,
            "orth_err": _orth_error(sub.basis.numpy()),
        }
    for key in ("matrix", "memory", "disk"):
        out[key]["peak_over_bound"] = out[key]["peak_bytes"] / out["bound_bytes"]
        out[key]["fit_over_gemm"] = out[key]["fit_s"] / out["gemm_s"]
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--large":
    large(*(int(float(a)) for a in sys.argv[2:5]))
