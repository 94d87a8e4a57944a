"""The sharded-training paths raise LowRankErrors (no process group needed to reach them)."""

from __future__ import annotations

import types

import pytest

pytest.importorskip("torch")

import lowrank_core as lc
from lowrank_torch.cmd import CMDConfig, NotFittedError
from lowrank_torch.fsdp_oialr import FSDPOIALR
from lowrank_torch.sharded import ShardedCMDTracker, ShardingError


def test_fsdp_oialr_load_state_dict_is_a_sharding_error():
    ctrl = object.__new__(FSDPOIALR)
    with pytest.raises(ShardingError, match="not supported") as info:
        ctrl.load_state_dict({})
    assert isinstance(info.value, lc.LowRankError)


def test_sharded_cmd_before_its_fit_is_not_fitted_error():
    tracker = object.__new__(ShardedCMDTracker)
    tracker.state = None
    tracker.epochs_seen = 1
    tracker.config = types.SimpleNamespace(warmup_epochs=CMDConfig().warmup_epochs)
    with pytest.raises(NotFittedError, match="not fitted") as info:
        tracker._require()
    assert isinstance(info.value, lc.LowRankError)
