"""CMD at scale: post-hoc fit time on a trajectory that does not fit in memory twice, and online memory.

(a) Post-hoc ``lowrank_core.cmd.fit_cmd`` on a synthetic ``N x T`` float32 trajectory (N = 11M parameters,
    T = 100 epochs: 4.4 GB), stored as a NumPy memmap on disk and generated in chunks, so the run never
    holds it in memory; the fit reads it in row chunks. Reported: wall time of the fit (sampling, |corr|,
    clustering, references, assignment + least squares over all rows) and of the chunked reconstruction
    error, and the peak of memory allocated by NumPy during the fit (``tracemalloc``), next to the size
    of the trajectory and of one chunk.
(b) Online CMD (``lowrank_core.cmd.OnlineCMD``) fitted after F = 20 epochs and updated to T = 100: bytes
    of its state at T vs bytes of the trajectory (what the published code keeps), the ratio, and the
    time of one online update.

The synthetic trajectory: 10 random-walk profiles, every row ``a r_mode(t) + b`` plus noise of 5% of the
profile's scale. ``--quick``: N = 200k, T = 20. Single-threaded NumPy on this machine's CPU.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from _common import Config, Report, Table, fmt_seconds

from lowrank_core import cmd

DESCRIPTION = (
    "CMD: post-hoc fit time at N=11M, T=100 (memmap), online state memory vs the trajectory"
)

MODES = 10
WARMUP = 20


def _make_trajectory(path: Path, n: int, t: int, seed: int = 0) -> np.memmap:
    """``(n, t)`` float32 memmap of modal trajectories, written in chunks of 1M rows."""
    rng = np.random.default_rng(seed)
    profiles = np.cumsum(rng.standard_normal((MODES, t)), axis=1).astype(np.float32)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, t))
    step = 1 << 20
    for s in range(0, n, step):
        e = min(s + step, n)
        mode = rng.integers(0, MODES, e - s)
        a = rng.standard_normal(e - s, dtype=np.float32)
        b = rng.standard_normal(e - s, dtype=np.float32)
        noise = rng.standard_normal((e - s, t), dtype=np.float32)
        noise *= 0.05
        block = profiles[mode]
        block *= a[:, None]
        block += b[:, None]
        block += noise
        out[s:e] = block
    out.flush()
    return out


def run(config: Config) -> Report:
    n, t = (200_000, 20) if config.quick else (11_000_000, 100)
    warm = min(WARMUP, t // 2)
    chunk = cmd.DEFAULT_CHUNK_SIZE
    sizes = [n // 4, n // 4, n - 2 * (n // 4)]  # three "tensors" for the stratified sample
    tmpdir = tempfile.mkdtemp(prefix="bench_cmd_")
    path = Path(tmpdir) / "trajectory.npy"
    try:
        start = time.perf_counter()
        traj = _make_trajectory(path, n, t)
        gen_s = time.perf_counter() - start

        tracemalloc.start()
        start = time.perf_counter()
        fit = cmd.fit_cmd(traj, MODES, sizes=sizes, chunk_size=chunk)
        fit_s = time.perf_counter() - start
        _, fit_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        start = time.perf_counter()
        err = cmd.relative_error(traj, fit, chunk_size=chunk)
        err_s = time.perf_counter() - start

        # online: fit on the first `warm` epochs, then one update per epoch up to t
        start = time.perf_counter()
        online = cmd.OnlineCMD.from_trajectory(
            traj[:, :warm], MODES, sizes=sizes, chunk_size=chunk, check_finite=False
        )
        online_fit_s = time.perf_counter() - start
        column = np.ascontiguousarray(traj[:, warm])
        updates = []
        for step in range(warm, t):
            w = column + np.float32(1e-3 * step)
            start = time.perf_counter()
            online.update(w)
            updates.append(time.perf_counter() - start)
        state_bytes = online.nbytes()
        traj_bytes = n * t * 4
        warm_bytes = n * warm * 4
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)  # the memmap file (4.4 GB at full size)

    fit_table = Table(
        title=f"post-hoc CMD fit, N = {n:,}, T = {t}, M = {MODES}, K = 1000, float32 memmap",
        columns=["step", "time", "note"],
        rows=[
            [
                "generate trajectory (chunks)",
                fmt_seconds(gen_s),
                f"{traj_bytes / 1e9:.2f} GB on disk",
            ],
            ["fit_cmd (whole pipeline)", fmt_seconds(fit_s), f"{fit.num_modes} modes"],
            ["relative_error (chunked)", fmt_seconds(err_s), f"centered error {err:.4f}"],
            [
                "peak NumPy memory in fit_cmd",
                f"{fit_peak / 1e6:.0f} MB",
                f"one chunk {chunk * t * 4 / 1e6:.0f} MB; trajectory {traj_bytes / 1e6:.0f} MB",
            ],
        ],
    )
    mem_table = Table(
        title=f"online CMD memory at T = {t} (fitted after F = {warm}), N = {n:,}, float32",
        columns=["what", "bytes", "per parameter"],
        rows=[
            [
                "trajectory N x T (published code)",
                f"{traj_bytes / 1e6:.1f} MB",
                f"{traj_bytes / n:.1f}",
            ],
            [
                "warm-up buffer N x F (first F epochs only)",
                f"{warm_bytes / 1e6:.1f} MB",
                f"{warm_bytes / n:.1f}",
            ],
            [
                "online state after T epochs",
                f"{state_bytes / 1e6:.1f} MB",
                f"{state_bytes / n:.2f}",
            ],
            ["ratio trajectory / online state", f"{traj_bytes / state_bytes:.1f}x", ""],
        ],
        notes=[
            f"online fit after F epochs: {fmt_seconds(online_fit_s)}; one update: "
            f"{fmt_seconds(float(np.median(updates)))} (median of {len(updates)})",
            "state = w_mean, c_wr (2N float32) + assignment (N int32) + M x t profiles + O(M)",
        ],
    )
    data = {
        "n": n,
        "t": t,
        "modes": MODES,
        "generate_s": gen_s,
        "fit_s": fit_s,
        "relative_error_s": err_s,
        "relative_error": err,
        "fit_peak_bytes": fit_peak,
        "online_fit_s": online_fit_s,
        "online_update_s": float(np.median(updates)),
        "trajectory_bytes": traj_bytes,
        "online_state_bytes": state_bytes,
        "memory_ratio": traj_bytes / state_bytes,
    }
    return Report(tables=[fit_table, mem_table], data=data)
