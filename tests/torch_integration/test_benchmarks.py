"""The prepared GPU script and the realistic workload run (CPU dry runs at tiny sizes)."""

from __future__ import annotations

import itertools
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


def test_lm_table_runs_every_method():
    cfg = replace(
        bench_lm.QUICK_TABLE, d_model=32, layers=1, heads=2, context=16, batch=4, steps=20,
        train_bytes=50_000, val_bytes=5_000, val_batches=2,
    )  # fmt: skip
    tcfg = bench_lm.TableConfig(sweep_lrs=(1e-3, 4e-3), dldr_dim=4, dldr_snapshots=8,
                                cmd_points=10, cmd_warmup=3, cmd_modes=2)  # fmt: skip
    tables, data = bench_lm.measure_table(cfg, tcfg)
    assert set(data["sweep"]["val_bpb"]) == {"0.001", "0.004"}
    names = [r["method"] for r in data["rows"]]
    assert names[0] == "dense" and sum(n.startswith("OIALR") for n in names) == 3
    assert any(n.startswith("P-BFGS") for n in names) and any("spectral" in n for n in names)
    assert ("GaLore" in names) == (data["galore"] == "ran")
    for r in data["rows"]:
        assert r["val_bpb"] > 0 and r["wall_ratio"] > 0 and 0 <= r["trainable_share"] <= 1
    assert len(tables[1].rows) == len(names)


def test_lr_schedule_warms_up_then_decays():
    tcfg = bench_lm.TableConfig(warmup_fraction=0.1, min_lr_ratio=0.1)
    m = [bench_lm.lr_multiplier(s, 100, tcfg) for s in range(1, 101)]
    assert m[0] == 0.1 and m[9] == 1.0 and abs(m[-1] - 0.1) < 1e-12
    assert all(a >= b for a, b in itertools.pairwise(m[9:]))


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
