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


def test_lm_grid_by_budget_with_fixed_rank_at_equal_flops():
    cfg = replace(
        bench_lm.QUICK_TABLE, d_model=32, layers=1, heads=2, context=16, batch=4, steps=20,
        train_bytes=50_000, val_bytes=5_000, val_batches=2, lr=3e-3,
    )  # fmt: skip
    table, data = bench_lm.measure_grid(
        cfg, bench_lm.TableConfig(), (0.5,), (4.0,), budgets=(0.6, 0.3), fixed_flops=True
    )
    assert [r["method"] for r in data["rows"]] == [
        "dense",
        "OIALR flops 0.6, switch 0.5, Sigma lr x4",
        "fixed rank, flops 0.6, spectral init",
        "OIALR flops 0.3, switch 0.5, Sigma lr x4",
        "fixed rank, flops 0.3, spectral init",
    ]
    assert len(table.rows) == 5 and all(r["val_bpb"] > 0 for r in data["rows"])
    # the fixed-rank model's layers cost at most the budget, and one rank more would exceed it
    _, _, _, init = bench_lm._text_and_init(cfg)
    for target in (0.6, 0.3):
        fraction = bench_lm._flops_fraction(cfg, init, target)
        model = bench_lm.ByteGPT(cfg)
        model.load_state_dict(init)
        layers = bench_lm.low_rank_model(model, fraction, init="random", seed=0)
        shapes = [bench_lm.lc.matrix_shape(layer.weight_shape) for layer in layers.values()]
        dense = sum(m * n for m, n in shapes)
        cost = sum(bench_lm.layer_cost("flops", m, n, layer.rank)
                   for (m, n), layer in zip(shapes, layers.values(), strict=True))  # fmt: skip
        more = sum(bench_lm.layer_cost("flops", m, n, layer.rank + 1)
                   for (m, n), layer in zip(shapes, layers.values(), strict=True))  # fmt: skip
        assert cost / dense <= target < more / dense


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


def test_cmd_generalization_rows_on_a_short_run():
    """Every shadow model is evaluated without disturbing the run it shadows, embedding happens."""
    import cmd_generalization as cg

    setting = replace(cg.DIGITS, points=6, warmup=3, embed_every=2)
    task = cg.MLPTask(setting, "digits")
    out = cg.run_seed(task, 0)
    again = cg.run_seed(task, 0)
    assert out == again  # deterministic: the same seed gives the same rows
    assert out["last weights"]["error"] is None
    for p, m in cg.ONLINE:
        err = out[f"online CMD, {p}, M={m}"]["error"]
        assert err is not None and 0.0 <= err < 1.0  # a model that explains part of the motion
    for p, m in cg.EMBEDDED:
        # fitted at point 3, one embedding event (point 5) fixes 10% of the parameters
        share = out[f"embedded CMD, {p}, M={m}: as trained"]["embedded"]
        assert 0.09 < share <= 0.11
    rows = cg.summarize(setting, [out, again])
    assert rows[0]["method"] == "last weights" and rows[0]["paired_gain"] == 0.0
    # lower is better for bits per byte: the paired gain flips sign
    lm = replace(setting, metric="bpb")
    fake = [{"last weights": {"value": 3.0, "error": None}, "x": {"value": 2.5, "error": None}}] * 2
    assert cg.summarize(lm, fake)[1]["paired_gain"] == 0.5
    assert cg.summarize(setting, fake)[1]["paired_gain"] == -0.5
