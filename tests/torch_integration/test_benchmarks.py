"""The prepared GPU script and the realistic workload run (CPU dry runs at tiny sizes)."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("torch")

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_lm  # noqa: E402
import gpu_suite  # noqa: E402


def test_lm_workload_measures_every_event():
    cfg = replace(
        bench_lm.QUICK, d_model=32, layers=1, heads=2, context=16, batch=4, steps=20, check_every=3,
        train_bytes=50_000, val_bytes=5_000, val_batches=2,
    )  # fmt: skip
    table, data = bench_lm.measure(cfg)
    kinds = set(data["oialr"]["events"].values())
    assert {"check", "switch", "update"} <= kinds
    assert data["oialr"]["switch_step"] == 8
    assert 0 < data["oialr"]["trainable_share"] < 1
    assert data["dense"]["val_bpb"] > 0 and data["oialr"]["val_bpb"] > 0
    assert data["text"]["train_bytes"] == 50_000
    assert len(table.rows) == 10


def test_stdlib_split_is_fixed_by_the_file_list():
    a = bench_lm.stdlib_text(20_000, 5_000)
    b = bench_lm.stdlib_text(20_000, 5_000)
    assert a == b
    assert len(a[0]) == 20_000 and len(a[1]) == 5_000


def test_gpu_suite_dry_run_writes_its_json(tmp_path):
    rc = gpu_suite.main(["--dry-run", "--only", "core,layers,svd_drivers", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert data["environment"]["dry_run"] is True
    assert {p["status"] for p in data["parts"].values()} == {"ok"}
    assert data["parts"]["layers"]["rows"]
