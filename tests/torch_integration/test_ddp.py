"""OIALR under DistributedDataParallel: 2 processes, gloo, on this machine (no network)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from _ddp import run_workers  # noqa: E402


def test_oialr_under_ddp_keeps_factors_identical_on_every_rank(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    reports = run_workers("ddp_worker.py", tmp_path, timeout=300)
    for rep in reports:
        assert rep["max_factor_diff"] == 0.0, rep  # identical factors after every step
    assert reports[0]["ranks"] == reports[1]["ranks"]
    assert reports[0]["final_loss"] != reports[1]["final_loss"]  # really different data shards
    # the switch and truncating updates needed a rebuild; updates that changed no shape did not
    assert 1 <= reports[0]["rebuilds"] == reports[1]["rebuilds"]
    assert reports[0]["no_rebuild_updates"] >= 1
