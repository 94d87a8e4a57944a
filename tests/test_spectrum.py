"""effective_rank and stable_rank."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _helpers import assert_close, assert_in_library, assert_unchanged, batch_indices, eps, snapshot
from _strategies import spectra
from hypothesis import given
from hypothesis import strategies as st

import lowrank_core as lc
import lowrank_reference as ref

MEASURES = {
    "effective_rank": (lc.effective_rank, ref.effective_rank),
    "stable_rank": (lc.stable_rank, ref.stable_rank),
}


@pytest.mark.parametrize("name", sorted(MEASURES))
@given(data=st.data())
def test_measure_matches_reference(backend, dtype, name, data):
    core_fn, ref_fn = MEASURES[name]
    s_np = data.draw(spectra(batch=True), label="s")
    s = backend.asarray(s_np, dtype)
    before = snapshot(backend, s)
    out = core_fn(s)
    assert_in_library(out, s, what=name)
    batch, k = s_np.shape[:-1], s_np.shape[-1]
    assert tuple(out.shape) == batch
    out_ = backend.to_numpy(out)
    for idx in batch_indices(batch):
        want = float(ref_fn(s_np[idx]))
        assert_close(out_[idx], want, atol=0, rtol=50 * k * eps(dtype) + 1e-300, err_msg=f"{idx}")
        if s_np[idx][0] > 0:
            assert 1 - 50 * k * eps(dtype) <= out_[idx] <= k * (1 + 50 * eps(dtype)), (
                f"{name} = {out_[idx]} outside [1, {k}] for {s_np[idx]}"
            )
        else:
            assert out_[idx] == 0
    assert_unchanged(backend, before, s)


@pytest.mark.parametrize(
    ("s", "eff", "stable"),
    [
        ([1.0, 1.0, 1.0, 1.0], 4.0, 4.0),
        ([2.0, 0.0, 0.0], 1.0, 1.0),
        ([3.0, 1.0], math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))), 10.0 / 9.0),
        ([0.0, 0.0], 0.0, 0.0),
        ([5.0], 1.0, 1.0),
    ],
)
def test_measures_hand_examples(backend, dtype, s, eff, stable):
    x = backend.asarray(np.array(s), dtype)
    got_eff = float(backend.to_numpy(lc.effective_rank(x)))
    got_stable = float(backend.to_numpy(lc.stable_rank(x)))
    assert got_eff == pytest.approx(eff, rel=100 * eps(dtype), abs=0)
    assert got_stable == pytest.approx(stable, rel=100 * eps(dtype), abs=0)
