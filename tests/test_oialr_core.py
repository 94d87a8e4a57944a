"""lowrank_core.oialr: the framework-free OIALR logic (selection, schedule, saved state, moment map).

The moment map is checked against its float64 NumPy definition on every backend; the schedule and the
selection against their rules, written out here step by step."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _helpers import assert_close
from hypothesis import given
from hypothesis import strategies as st

import lowrank_core as lc
from lowrank_core import oialr


# --------------------------------------------------------------------------------------------------
# the moment map
# --------------------------------------------------------------------------------------------------
def _reference(kind: str, x: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    if kind == "first":
        return left.T @ x @ right
    if kind == "second":
        return np.maximum((left * left).T @ x @ (right * right), 0)
    return np.sqrt(np.maximum((left * left).T @ (x * x) @ (right * right), 0))


@pytest.mark.parametrize("kind", oialr.MOMENT_KINDS)
@pytest.mark.parametrize("shape", [(5, 5, 5, 5), (9, 4, 3, 4), (4, 9, 4, 2)])  # m, n, r1, r2
def test_moment_map_matches_its_definition(backend, dtype, kind, shape):
    m, n, r1, r2 = shape
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal((m, n))
    if kind != "first":
        x = np.abs(x)
    left, right = rng.standard_normal((m, r1)), rng.standard_normal((n, r2))
    maps = oialr.MomentMap(backend.asarray(left, dtype), backend.asarray(right, dtype))
    got = maps(backend.asarray(x, dtype), kind)
    assert got.dtype == backend.dtype(dtype) and tuple(got.shape) == (r1, r2)
    want = _reference(kind, x, left, right)
    tol = 1e-4 if dtype == "float32" else 1e-11
    assert_close(backend.to_numpy(got), want, rtol=tol, atol=tol * np.abs(want).max())
    if kind != "first":
        assert (backend.to_numpy(got) >= 0).all()


def test_moment_map_computes_half_precision_state_in_float32(backend):
    if "float16" not in dir(backend.xp):
        pytest.skip("no float16")
    rng = np.random.default_rng(0)
    left = backend.asarray(rng.standard_normal((6, 6)), "float32")
    x16 = backend.asarray(np.abs(rng.standard_normal((6, 6))), "float16")
    got = oialr.MomentMap(left, left)(x16, "second")
    assert got.dtype == backend.dtype("float16")
    want = _reference(
        "second",
        backend.to_numpy(x16).astype(np.float64),
        *(2 * [backend.to_numpy(left).astype(np.float64)]),
    )
    np.testing.assert_allclose(
        backend.to_numpy(got).astype(np.float64), want, rtol=2e-3, atol=2e-3 * want.max()
    )


@given(m=st.integers(1, 9), n=st.integers(1, 9), r1=st.integers(1, 9), r2=st.integers(1, 9))
def test_the_cheaper_order_is_the_same_product(m, n, r1, r2):
    rng = np.random.default_rng(m * 1000 + n * 100 + r1 * 10 + r2)
    x, left, right = (rng.standard_normal(s) for s in ((m, n), (m, r1), (n, r2)))
    np.testing.assert_allclose(
        oialr.rotate_cheaper(x, left, right), left.T @ x @ right, rtol=1e-12, atol=1e-12
    )


def test_moment_kind_table_and_overrides():
    table = {"exp_avg_sq": "second", "exp_inf": "magnitude"}
    assert oialr.moment_kind("exp_avg_sq", table) == "second"
    assert oialr.moment_kind("exp_avg", table) == "first"  # unknown: first-moment-like
    assert oialr.moment_kind("nu", {"nu": "second"}, {"nu": "magnitude"}) == "magnitude"


# --------------------------------------------------------------------------------------------------
# the layer selection
# --------------------------------------------------------------------------------------------------
def test_selection_rules_in_order():
    C = oialr.Candidate
    cands = [
        C("first", (10, 10)),
        C("thin", (32, 3)),  # 3 > 3.2 fails
        C("edge", (30, 3)),  # 3 > 3.0 fails: strict
        C("ok", (30, 4)),
        C("conv", None, rank_one=True),
        C("tied", (8, 8), refused="tied"),
        C("head.a", (8, 8), aliases=("['head']['a']",)),
        C("last", (10, 10)),
    ]
    chosen, why = oialr.LayerSelection(exclude="head.*").choose(cands)
    assert chosen == ["first", "ok"]
    assert why["last"].startswith("kept dense") and why["tied"] == "tied"
    assert "min_aspect" in why["thin"] and "min_aspect" in why["edge"]
    assert "rank at most 1" in why["conv"] and "exclude" in why["head.a"]
    sel = oialr.LayerSelection(keep_first=True, keep_last=False, allow_rank_one=True, min_aspect=0)
    chosen, _ = sel.choose(cands)
    assert chosen == ["thin", "edge", "ok", "conv", "head.a", "last"]
    chosen, _ = oialr.LayerSelection(exclude=("*'head'*",)).choose(cands)
    assert "head.a" not in chosen  # an alias matches too


@pytest.mark.parametrize(
    "kwargs",
    [
        {"exclude": 3},
        {"exclude": ("a", 1)},
        {"keep_first": 1},
        {"min_aspect": 2.0},
        {"allow_rank_one": None},
    ],
    ids=repr,
)
def test_selection_refuses_bad_settings(kwargs):
    with pytest.raises(lc.ParameterError):
        oialr.LayerSelection(**kwargs)


# --------------------------------------------------------------------------------------------------
# the schedule
# --------------------------------------------------------------------------------------------------
def _expected_plan(t, eligible, switched, updates, c):
    """The published schedule, written out (the reference for OIALRSchedule.plan)."""
    pending = [n for n in eligible if n not in switched]
    stab = bool(pending) and c.stability_threshold is not None and t % c.stability_every == 0
    switch = bool(pending) and c.switch_step is not None and t >= c.switch_step
    update = None
    if switched and t % c.update_every == 0:
        due = [n for n in eligible if n in switched and switched[n] < t]
        if due:
            if c.progressive:
                k = min(len(eligible), max(1, math.ceil(0.1 * len(eligible))) * (updates + 1))
                due = [n for n in due if n in eligible[-k:]]
            update = tuple(due)
    return stab, switch, update


@given(
    n=st.integers(1, 25),
    switch_step=st.one_of(st.none(), st.integers(0, 30)),
    every=st.integers(1, 7),
    update_every=st.integers(1, 7),
    progressive=st.booleans(),
    ready_seed=st.integers(0, 2**16),
)
def test_schedule_follows_the_published_rules(
    n, switch_step, every, update_every, progressive, ready_seed
):
    threshold = 0.5 if switch_step is None or ready_seed % 2 else None
    c = oialr.OIALRConfig(
        switch_step=switch_step,
        stability_threshold=threshold,
        stability_every=every,
        update_every=update_every,
        progressive=progressive,
    )
    eligible = [f"l{i}" for i in range(n)]
    s = oialr.OIALRSchedule(c, eligible)
    rng = np.random.default_rng(ready_seed)
    for _ in range(40):
        plan = s.plan()
        t = s.step_count + 1
        assert (plan.check_stability, plan.switch_all, plan.update) == _expected_plan(
            t, eligible, dict(s.switched), s.updates, c
        )
        s.begin(plan)
        values = {m: float(rng.random()) for m in s.pending} if plan.check_stability else {}
        ready = s.ready(values)
        assert ready == [m for m in eligible if m in values and values[m] >= 0.5]
        for m in s.to_switch(plan, ready):
            s.record_switch(t, m, {m: 4})
        if plan.update is not None:
            s.record_update()
    assert s.step_count == 40
    if switch_step is not None and switch_step <= 40:
        assert not s.pending and max(s.switched.values()) <= max(switch_step, 1)


def test_schedule_snapshot_restores_everything():
    s = oialr.OIALRSchedule(oialr.OIALRConfig(switch_step=2, update_every=1), ["a", "b"])
    s.begin(s.plan())
    saved = s.snapshot()
    plan = s.plan()
    s.begin(plan)
    s.record_switch(2, "a", {"a": 3})
    s.record_share(2, 0.5)
    s.record_update()
    s.restore(saved)
    assert (s.step_count, s.switched, s.updates, s.history) == (1, {}, 0, [])


def test_config_validates_moment_kinds_and_selection():
    with pytest.raises(lc.ParameterError, match="moment_kinds"):
        oialr.OIALRConfig(moment_kinds={"nu": "third"})
    with pytest.raises(lc.ParameterTypeError, match="selection"):
        oialr.OIALRConfig(selection={"keep_last": False})


# --------------------------------------------------------------------------------------------------
# the saved state
# --------------------------------------------------------------------------------------------------
def _trained_schedule() -> oialr.OIALRSchedule:
    s = oialr.OIALRSchedule(oialr.OIALRConfig(switch_step=3, update_every=2), ["a", "b", "c"])
    for _ in range(5):
        plan = s.plan()
        s.begin(plan)
        for m in s.to_switch(plan, []):
            s.record_switch(plan.step, m, {m: 4})
    return s


def _parts(name):
    return {name: 4}


def test_state_round_trip_and_every_fault_is_a_checkpoint_error():
    s = _trained_schedule()
    state = s.state_dict({"a": 3, "b": 4, "c": 2}, {})
    fresh = oialr.OIALRSchedule(s.config, s.eligible)
    checked = fresh.check_state(state, _parts, lambda n: [(4, 4)])
    fresh.apply_state(checked)
    assert (fresh.step_count, fresh.switched, fresh.history) == (5, s.switched, s.history)
    assert checked.ranks == {"a": 3, "b": 4, "c": 2}
    for change, match in [
        (lambda d: d.update(version=3), "schema version 3"),
        (lambda d: d.update(format="other"), "format"),
        (lambda d: d.pop("warmup"), "lacks"),
        (lambda d: d.update(eligible=["a", "b"]), "other eligible"),
        (lambda d: d["ranks"].update(a=5), "ranks"),
        (lambda d: d["ranks"].update(a=0), "ranks"),
        (lambda d: d["switched"].update(a=9), "switched"),
        (lambda d: d.update(step_count=-1), "step_count"),
        (lambda d: d.update(history={}), "history"),
        (lambda d: d["warmup"].update(a=[np.eye(4)]), "warm-up"),
    ]:
        bad = s.state_dict({"a": 3, "b": 4, "c": 2}, {})
        change(bad)
        fresh = oialr.OIALRSchedule(s.config, s.eligible)
        with pytest.raises(lc.CheckpointError, match=match):
            fresh.check_state(bad, _parts, lambda n: [(4, 4)])
        assert fresh.step_count == 0 and not fresh.switched


def test_warmup_factors_are_checked():
    s = oialr.OIALRSchedule(oialr.OIALRConfig(switch_step=None, stability_threshold=0.9), ["a"])
    for factor, match in [
        (np.eye(3), "does not fit"),
        (np.full((4, 4), np.nan), "NaN"),
        (np.eye(4, dtype=np.int64), "floating"),
        ("eye", "must be an array"),
    ]:
        state = s.state_dict({}, {"a": [factor]})
        with pytest.raises(lc.CheckpointError, match=match):
            s.check_state(state, _parts, lambda n: [(4, 4)])


def test_states_of_version_0_1_0_are_read():
    """0.1.0 saved the warm-up factors as torch's ``snapshots`` (a list per layer) and JAX's ``polar``
    (one matrix per kernel); both load as ``warmup``."""
    common = {
        "step_count": 4,
        "updates": 0,
        "switched": {},
        "ranks": {},
        "eligible": ["a"],
        "history": [{"step": 4, "event": "stability", "layer": "a", "value": 0.5}],
    }
    q = np.eye(4)
    torch_01 = {"format": "lowrank_torch.OIALR/1", **common, "snapshots": {"a": [q]}}
    jax_01 = {"format": "lowrank_jax.OIALR/1", **common, "polar": {"a": q}}
    for state in (torch_01, jax_01):
        s = oialr.OIALRSchedule(oialr.OIALRConfig(switch_step=None, stability_threshold=0.9), ["a"])
        checked = s.check_state(state, _parts, lambda n: [(4, 4)])
        assert list(checked.warmup) == ["a"] and checked.warmup["a"][0] is q
        assert checked.step_count == 4 and checked.history == common["history"]


def test_rotation_trigger_is_relative_to_the_first_rate_and_per_step():
    """rotation_threshold compares arccos(stability) / stability_every with the layer's first value:
    the same turning pattern gives the same decisions whatever the check interval."""
    decisions = []
    for every in (2, 8):
        c = oialr.OIALRConfig(switch_step=None, rotation_threshold=0.5, stability_every=every)
        s = oialr.OIALRSchedule(c, ["a", "b"])
        seen = []
        for rate_a, rate_b in [(0.02, 0.02), (0.015, 0.005), (0.009, 0.004)]:  # radians per step
            values = {"a": math.cos(rate_a * every), "b": math.cos(rate_b * every)}
            seen.append(s.ready(values))
        assert s.reference_rates == pytest.approx({"a": 0.02, "b": 0.02})
        decisions.append(seen)
    assert decisions[0] == decisions[1] == [[], ["b"], ["a", "b"]]
    # either trigger switches; the raw threshold alone still works
    c = oialr.OIALRConfig(switch_step=None, stability_threshold=0.999, rotation_threshold=0.1)
    s = oialr.OIALRSchedule(c, ["a"])
    assert s.ready({"a": 0.9995}) == ["a"]
    with pytest.raises(lc.ParameterError, match="rotation_threshold"):
        oialr.OIALRConfig(rotation_threshold=1.5)


def test_reference_rates_are_saved_and_checked():
    c = oialr.OIALRConfig(switch_step=None, rotation_threshold=0.5)
    s = oialr.OIALRSchedule(c, ["a"])
    s.ready({"a": 0.99})
    state = s.state_dict({}, {})
    fresh = oialr.OIALRSchedule(c, ["a"])
    fresh.apply_state(fresh.check_state(state, _parts, lambda n: [(4, 4)]))
    assert fresh.reference_rates == s.reference_rates
    state["reference_rates"] = {"zz": 0.1}
    with pytest.raises(lc.CheckpointError, match="rotation rate"):
        fresh.check_state(state, _parts, lambda n: [(4, 4)])
