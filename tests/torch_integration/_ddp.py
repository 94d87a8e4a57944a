"""Shared pieces of the DDP tests: launching a 2-process gloo worker script, and what every worker does.

A worker script (``ddp_*worker.py``) defines ``worker(rank, world, init_file, out)`` and ends with
``spawn(worker)``; the test calls :func:`run_workers` and gets one JSON report per rank.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def run_workers(script: str, tmp_path: Path, *, timeout: float = 300) -> list[dict[str, Any]]:
    """Run the worker script next to this file in a fresh interpreter; the reports of every rank."""
    worker = Path(__file__).with_name(script)
    out = tmp_path / "report"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(worker), str(tmp_path / "rendezvous"), str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(WORLD)]


def init(rank: int, init_file: str) -> None:
    """Join the gloo group through a file rendezvous (no network)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)


def max_diff_across_ranks(t: torch.Tensor) -> float:
    """Largest |t - t on rank 0| over all ranks (0.0 when every rank holds the same tensor)."""
    t = t.detach().to(torch.float64)
    ref = t.clone()
    dist.broadcast(ref, src=0)
    diff = (t - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)


def finish(rank: int, out: str, report: dict[str, Any]) -> None:
    """Write this rank's report, then shut down in order.

    Every rank is done communicating before any rank tears the group down, and the DDP reducers (which
    hold the group; the caller drops its references first) are collected before the destroy: tearing
    gloo down under a peer's last collective can abort the peer ("terminate called ...").
    """
    with open(f"{out}.{rank}", "w") as fh:
        json.dump(report, fh)
    dist.barrier()
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def spawn(worker: Callable[[int, int, str, str], None]) -> None:
    """``python ddp_*worker.py RENDEZVOUS OUT``: run ``worker`` in 2 processes, one thread each."""
    torch.set_num_threads(1)
    mp.spawn(worker, args=(WORLD, sys.argv[1], sys.argv[2]), nprocs=WORLD, join=True)
