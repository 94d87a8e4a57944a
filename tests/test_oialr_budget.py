"""lowrank_core.oialr's rank budget: one global allocation of ranks, and the schedule by fraction of
the run. Properties: the budget is met within one rank step, a flatter spectrum keeps more rank, the
layers' order does not matter, no rank rises, the floor holds."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lowrank_core as lc
from lowrank_core import oialr


@st.composite
def layers(draw):
    n = draw(st.integers(1, 6))
    out = {}
    for i in range(n):
        m = draw(st.integers(2, 40))
        k = draw(st.integers(2, 40))
        r = draw(st.integers(1, min(m, k)))
        decay = draw(st.floats(0.0, 3.0))
        s = np.exp(-decay * np.arange(r) / max(r, 1)) * draw(st.floats(1e-3, 1e3))
        out[f"layer{i}"] = ((m, k), s)
    return out


def _step_cost(measure, shapes, ranks, name):
    m, n = shapes[name]
    return oialr.layer_cost(measure, m, n, ranks[name] + 1) - oialr.layer_cost(
        measure, m, n, ranks[name]
    )


@given(
    spec=layers(),
    target=st.floats(0.01, 1.0),
    measure=st.sampled_from(oialr.MEASURES),
    floor=st.integers(1, 4),
)
def test_the_budget_is_met_within_one_rank_step(spec, target, measure, floor):
    spectra = {k: s for k, (_, s) in spec.items()}
    shapes = {k: sh for k, (sh, _) in spec.items()}
    ranks = oialr.allocate_ranks(spectra, shapes, target, measure=measure, min_rank=floor)
    current = {k: s.size for k, s in spectra.items()}
    floors = {k: min(floor, current[k]) for k in spectra}
    assert all(floors[k] <= ranks[k] <= current[k] for k in spectra)  # floor held, no rank rises
    cost = oialr.budget_cost(measure, shapes, ranks)
    if cost > target * (1 + 1e-9):
        assert ranks == floors  # only the floors can exceed the budget
        return
    # the next value in the global order would not fit: one more rank step exceeds the budget
    normalized = {k: s / s.max() for k, s in spectra.items()}
    below = [k for k in spectra if ranks[k] < current[k]]
    if below:
        nxt = min(below, key=lambda k: (-normalized[k][ranks[k]], k))
        dense = sum(m * n for m, n in shapes.values())
        over = cost + _step_cost(measure, shapes, ranks, nxt) / dense
        assert over > target * (1 - 1e-9)


@given(spec=layers(), target=st.floats(0.05, 1.0), seed=st.integers(0, 1000))
def test_the_result_does_not_depend_on_the_layers_order(spec, target, seed):
    names = list(spec)
    np.random.default_rng(seed).shuffle(names)
    a = oialr.allocate_ranks({k: spec[k][1] for k in spec}, {k: spec[k][0] for k in spec}, target)
    b = oialr.allocate_ranks({k: spec[k][1] for k in names}, {k: spec[k][0] for k in names}, target)
    assert a == b


@given(
    r=st.integers(4, 30),
    n=st.integers(30, 60),
    target=st.floats(0.05, 0.9),
    decay=st.floats(0.5, 5),
)
def test_a_flatter_spectrum_keeps_more_rank(r, n, target, decay):
    flat = np.exp(-0.1 * decay * np.arange(r))
    steep = np.exp(-decay * np.arange(r))
    ranks = oialr.allocate_ranks(
        {"flat": flat, "steep": steep}, {"flat": (n, n), "steep": (n, n)}, target
    )
    assert ranks["flat"] >= ranks["steep"]


def test_scale_of_a_layer_does_not_matter_and_ties_break_by_name():
    s = np.linspace(1, 0.5, 10)
    shapes = {"a": (20, 20), "b": (20, 20)}
    one = oialr.allocate_ranks({"a": s, "b": 1e6 * s}, shapes, 0.5)
    two = oialr.allocate_ranks({"a": 1e6 * s, "b": s}, shapes, 0.5)
    assert one == two and one["a"] >= one["b"] >= one["a"] - 1  # equal spectra: "a" first on ties


def test_fixed_layers_count_and_bad_spectra_are_refused():
    s = np.linspace(1, 0.1, 10)
    free = oialr.allocate_ranks({"a": s}, {"a": (10, 10)}, 0.5, measure="params")
    held = oialr.allocate_ranks(
        {"a": s}, {"a": (10, 10)}, 0.5, measure="params", fixed={"b": ((10, 10), 10)}
    )
    assert held["a"] < free["a"]
    with pytest.raises(lc.NonFiniteError, match="'a'"):
        oialr.allocate_ranks({"a": np.array([1.0, np.nan])}, {"a": (4, 4)}, 0.5)
    with pytest.raises(lc.ParameterError):
        oialr.allocate_ranks({"a": s}, {"b": (10, 10)}, 0.5)
    with pytest.raises(lc.ParameterError):
        oialr.allocate_ranks({"a": s}, {"a": (10, 10)}, 1.5)


def test_grouped_layers_count_every_group():
    s = oialr.stack_spectrum(np.array([[2.0, 1.0, 0.5], [4.0, 3.0, 0.4]]))
    np.testing.assert_allclose(s, [1.0, 0.75, 0.25])
    one = oialr.allocate_ranks({"c": s}, {"c": (8, 8)}, 0.6, measure="params")
    four = oialr.allocate_ranks(
        {"c": s, "d": s}, {"c": (8, 8), "d": (8, 8)}, 0.6, measure="params", counts={"c": 4}
    )
    assert one["c"] == 3 and four["c"] >= four["d"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target": 0},
        {"target": 1.5},
        {"target": 0.5, "measure": "bytes"},
        {"target": 0.5, "min_rank": 0},
        {"target": 0.5, "reach_at": 1.5},
        {"target": 0.5, "reach_at": "end"},
        {"target": 0.5, "reach_at": True},
    ],
    ids=repr,
)
def test_budget_refuses_bad_settings(kwargs):
    with pytest.raises(lc.ParameterError):
        oialr.RankBudget(**kwargs)


def test_the_target_falls_linearly_to_the_budget():
    b = oialr.RankBudget(0.4, reach_at=0.9)
    assert b.target_at(70, first_switch=70, total_steps=100) == 1.0
    assert b.target_at(80, first_switch=70, total_steps=100) == pytest.approx(0.7)
    assert b.target_at(90, first_switch=70, total_steps=100) == 0.4
    assert b.target_at(99, first_switch=70, total_steps=100) == 0.4
    assert oialr.RankBudget(0.4).target_at(70, first_switch=70) == 0.4
    assert oialr.RankBudget(0.4, reach_at=50).target_at(60, first_switch=70) == 0.4
    with pytest.raises(lc.ParameterError, match="total_steps"):
        b.target_at(80, first_switch=70)


def test_switch_by_fraction_of_the_run():
    c = oialr.OIALRConfig(switch_fraction=0.7, total_steps=200)
    assert c.switch_at() == 140
    s = oialr.OIALRSchedule(c, ["a"])
    for _ in range(139):
        s.begin(s.plan())
    assert s.plan().switch_all
    with pytest.raises(lc.ParameterError, match="total_steps"):
        oialr.OIALRSchedule(oialr.OIALRConfig(switch_fraction=0.7), ["a"])
    resolved = oialr.OIALRConfig(switch_fraction=0.5).for_run(30)
    assert resolved.switch_at() == 15 and resolved.total_steps == 30
    with pytest.raises(lc.ParameterError, match="total_steps"):
        oialr.OIALRSchedule(oialr.OIALRConfig(budget=oialr.RankBudget(0.5, reach_at=0.9)), ["a"])
