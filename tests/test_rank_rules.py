"""Rank rules: against the reference, their bounds, monotonicity, batching and hand-worked examples."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from _helpers import (
    assert_int64_array,
    assert_python_int,
    assert_unchanged,
    batch_indices,
    snapshot,
)
from _strategies import full_shapes, rank_bounds, spectra
from hypothesis import given
from hypothesis import strategies as st

import lowrank_core as lc
import lowrank_reference as ref

# Relative nudge of a threshold that a correct implementation in this dtype may effectively see: the
# spec's formulas are evaluated in the spectrum's dtype, so a spectrum sitting exactly on a threshold may
# fall on either side of it. A mismatch with the reference is accepted only if the reference gives the core's
# answer for the threshold nudged by this much (relative) one way or the other.
NUDGE = {"float32": 1e-5, "float64": 1e-9}


@dataclasses.dataclass(frozen=True)
class RuleSpec:
    name: str
    make: Callable[..., Any]
    ref_fn: Callable[..., int]
    threshold: str | None = None
    lo: float = 0.0  # valid range of the threshold
    hi: float = math.inf
    direction: int = 0  # -1: rank non-increasing in the threshold, +1: non-decreasing
    values: st.SearchStrategy | None = None

    def params(self, draw: st.DrawFn) -> dict[str, Any]:
        p: dict[str, Any] = {}
        if self.threshold is not None:
            p[self.threshold] = draw(self.values)
        if self.name == "SigmaCutoff" and draw(st.booleans()):
            p["floor_fraction"] = draw(st.sampled_from([0.0, 0.01, 0.05, 0.1, 0.25, 0.5]))
        if self.name == "FixedRank":
            if draw(st.booleans()):
                p["rank"] = draw(st.integers(1, 40))
            else:
                p["fraction"] = draw(
                    st.sampled_from([0.1, 0.25, 0.5, 0.75, 1.0]) | st.floats(1e-3, 1)
                )
        lo, hi = draw(rank_bounds())
        if lo is not None:
            p["min_rank"] = lo
        if hi is not None:
            p["max_rank"] = hi
        return p


def _unit(lo: float, hi: float, least_positive: float = 1e-6) -> st.SearchStrategy:
    """Thresholds in [lo, hi]: round values (boundary cases) and arbitrary ones; positive ones are kept
    above ``least_positive`` so that ``threshold * s`` cannot underflow in float32."""
    return st.sampled_from(sorted({lo, 0.01, 0.1, 0.5, 0.9, hi})) | st.floats(
        max(lo, least_positive), hi
    )


RULES = [
    RuleSpec("SigmaCutoff", lc.SigmaCutoff, ref.sigma_cutoff_rank, "fraction", 0.0, 1.0, -1,
             _unit(0.0, 1.0)),
    RuleSpec("TailNorm", lc.TailNorm, ref.tail_norm_rank, "tol", 1e-6, 1.0, -1, _unit(1e-6, 1.0)),
    RuleSpec("Energy", lc.Energy, ref.energy_rank, "energy", 1e-6, 1.0, +1, _unit(1e-6, 1.0)),
    RuleSpec("OptimalHardThreshold", lc.OptimalHardThreshold, ref.optimal_hard_threshold_rank,
             "scale", 1e-3, math.inf, -1, st.sampled_from([0.5, 1.0, 2.0]) | st.floats(1e-3, 5)),
    RuleSpec("EffectiveRank", lc.EffectiveRank, ref.effective_rank_rule),
    RuleSpec("StableRank", lc.StableRank, ref.stable_rank_rule),
    RuleSpec("FixedRank", lc.FixedRank, ref.fixed_rank),
]  # fmt: skip
RULE_IDS = [r.name for r in RULES]
THRESHOLD_RULES = [r for r in RULES if r.threshold is not None]


def _clip(r: int, k: int, min_rank: int | None, max_rank: int | None) -> int:
    hi = min(max_rank or k, k)
    lo = min(min_rank or 1, hi)
    return max(lo, min(r, hi))


def acceptable(spec: RuleSpec, s: np.ndarray, params: dict, shape, dtype: str) -> tuple[int, int]:
    """(least, greatest) rank a correct implementation may return for the 1-D float64 spectrum s."""
    exact = int(spec.ref_fn(s, shape=shape, **params))
    answers = {exact}
    rel = NUDGE[dtype]
    if spec.threshold is not None:
        t = params[spec.threshold]
        for f in (1 - rel, 1 + rel):
            tt = min(max(t * f, spec.lo), spec.hi)
            answers.add(int(spec.ref_fn(s, shape=shape, **{**params, spec.threshold: tt})))
    elif spec.name in ("EffectiveRank", "StableRank"):
        x = float(ref.effective_rank(s) if spec.name == "EffectiveRank" else ref.stable_rank(s))
        for f in (1 - rel, 1 + rel):
            raw = math.floor(x * f + 0.5)
            answers.add(_clip(raw, s.shape[-1], params.get("min_rank"), params.get("max_rank")))
    return min(answers), max(answers)


def _check_bounds(r: int, k: int, params: dict) -> None:
    hi = min(params.get("max_rank") or k, k)
    lo = min(params.get("min_rank") or 1, hi)
    assert 1 <= r <= k, f"rank {r} outside [1, {k}]"
    assert lo <= r <= hi, f"rank {r} outside [min_rank, max_rank] clipped = [{lo}, {hi}]"


@pytest.mark.parametrize("spec", RULES, ids=RULE_IDS)
@given(data=st.data())
def test_rule_matches_reference(backend, dtype, spec, data):
    s_np = data.draw(spectra(), label="s")
    k = s_np.shape[-1]
    shape = data.draw(full_shapes(k), label="shape")
    params = spec.params(data.draw)
    rule = spec.make(**params)
    s = backend.asarray(s_np, dtype)
    before = snapshot(backend, s)
    r = rule(s, shape=shape) if shape is not None else rule(s)
    assert_python_int(r)
    _check_bounds(r, k, params)
    lo, hi = acceptable(spec, s_np, params, shape, dtype)
    assert lo <= r <= hi, (
        f"{spec.name}({params}) gave {r}; the reference gives {lo}..{hi} "
        f"(threshold nudged by {NUDGE[dtype]}); s={s_np.tolist()}, shape={shape}"
    )
    assert_unchanged(backend, before, s)


@pytest.mark.parametrize("spec", RULES, ids=RULE_IDS)
@given(data=st.data())
def test_rule_batched_equals_looped(backend, dtype, spec, data):
    s_np = data.draw(spectra(batch=True, max_k=12), label="s")
    batch, k = s_np.shape[:-1], s_np.shape[-1]
    shape = data.draw(full_shapes(k), label="shape")
    params = spec.params(data.draw)
    rule = spec.make(**params)
    s = backend.asarray(s_np, dtype)
    if len(batch) == 0:
        assert_python_int(rule(s, shape=shape))
        return
    out = rule(s, shape=shape)
    assert_int64_array(out, batch)
    for idx in batch_indices(batch):
        single = rule(backend.asarray(s_np[idx], dtype), shape=shape)
        lo, hi = acceptable(spec, s_np[idx], params, shape, dtype)
        if lo == hi:
            assert out[idx] == single == lo, (
                f"batched {out[idx]}, looped {single}, reference {lo} at {idx}: s={s_np[idx].tolist()}"
            )
        else:  # a boundary case: each must be one of the acceptable answers
            assert lo <= out[idx] <= hi
            assert lo <= single <= hi
        _check_bounds(int(out[idx]), k, params)


@pytest.mark.parametrize("spec", THRESHOLD_RULES, ids=[r.name for r in THRESHOLD_RULES])
@given(data=st.data())
def test_rule_monotone_in_threshold(backend, dtype, spec, data):
    s_np = data.draw(spectra(batch=data.draw(st.booleans(), label="batched")), label="s")
    shape = data.draw(full_shapes(s_np.shape[-1]), label="shape")
    params = spec.params(data.draw)
    t1 = data.draw(spec.values, label="t1")
    t2 = data.draw(spec.values, label="t2")
    t1, t2 = min(t1, t2), max(t1, t2)
    s = backend.asarray(s_np, dtype)
    r1 = np.asarray(spec.make(**{**params, spec.threshold: t1})(s, shape=shape))
    r2 = np.asarray(spec.make(**{**params, spec.threshold: t2})(s, shape=shape))
    if spec.direction < 0:
        assert np.all(r1 >= r2), f"{spec.threshold} {t1} -> {r1}, {t2} -> {r2}: rank grew"
    else:
        assert np.all(r1 <= r2), f"{spec.threshold} {t1} -> {r1}, {t2} -> {r2}: rank shrank"


@given(data=st.data())
def test_sigma_cutoff_at_most_halves(backend, dtype, data):
    """With no min_rank/max_rank: if k/2 > floor the rank is never below k // 2; all-above keeps k."""
    s_np = data.draw(spectra(), label="s")
    k = s_np.shape[-1]
    shape = data.draw(full_shapes(k), label="shape")
    fraction = data.draw(_unit(0.0, 1.0), label="fraction")
    floor_fraction = data.draw(st.sampled_from([0.0, 0.01, 0.05, 0.2]), label="floor_fraction")
    r = lc.SigmaCutoff(fraction=fraction, floor_fraction=floor_fraction)(
        backend.asarray(s_np, dtype), shape=shape
    )
    m, n = shape if shape is not None else (k, k)
    floor = max(1, int(floor_fraction * min(m, n)))
    if k / 2 > floor:
        assert r >= k // 2, f"rank {r} < k // 2 = {k // 2} with floor {floor}"
    if np.all(s_np >= fraction * s_np[0] * (1 + NUDGE[dtype])):
        assert r == k


# (s, kwargs, shape, expected) worked by hand from the spec's formula
SIGMA_CUTOFF_EXAMPLES = [
    # cutoff 1.0, j = 3 of k = 4, floor 1: r = j
    ([10.0, 5.0, 2.0, 0.5], {}, None, 3),
    # j = 1 < k/2 = 2 and 2 > floor = 1: halve to k // 2
    ([10.0, 0.5, 0.4, 0.3], {}, None, 2),
    # k = 5: j = 1 < 2.5 -> 5 // 2 = 2
    ([10.0, 0.5, 0.4, 0.3, 0.2], {}, None, 2),
    # k = 3: j = 1 < 1.5, 1.5 > floor 1 -> 3 // 2 = 1
    ([10.0, 0.1, 0.1], {}, None, 1),
    # no value below the cutoff: keep k
    ([1.0, 1.0, 1.0, 1.0], {}, None, 4),
    # the cutoff is inclusive: 1.0 >= 0.1 * 10 -> j = k = 2
    ([10.0, 1.0], {}, None, 2),
    # j = 1, k = 2: k/2 = 1 is not > floor 1, j not < floor -> r = j = 1
    ([10.0, 0.5], {}, None, 1),
    # floor = int(0.01 * 1000) = 10 > k = 8: j = 1 < floor -> 10, clipped to k = 8
    ([10.0] + [0.1] * 7, {}, (1000, 1000), 8),
    # floor = int(0.01 * 400) = 4, k = 6: k/2 = 3 is not > 4; j = 1 < 4 -> floor = 4
    ([10.0] + [0.1] * 5, {}, (400, 400), 4),
    # same floor, j = 5: r = j = 5
    ([10.0, 9.0, 8.0, 7.0, 6.0, 0.1], {}, (400, 400), 5),
    # the floor uses min(m, n): int(0.01 * 400) = 4 from (400, 900)
    ([10.0] + [0.1] * 5, {}, (900, 400), 4),
    # fraction 0: every value passes -> k
    ([1.0, 0.0, 0.0], {"fraction": 0.0}, None, 3),
    # fraction 1: j = 2 (the ties at the top) = k/2, not below it -> 2
    ([2.0, 2.0, 1.0, 1.0], {"fraction": 1.0}, None, 2),
    # fraction 0.5: cutoff 5, j = 2 of k = 8 -> halve to 4
    ([10.0, 6.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.1], {"fraction": 0.5}, None, 4),
    # floor_fraction 0.5 with k = 8: floor = 4, k/2 = 4 not > 4; j = 2 < 4 -> 4
    ([10.0, 6.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.1], {"fraction": 0.5, "floor_fraction": 0.5}, None, 4),
    # floor_fraction 0.3 with k = 10: floor = 3, k/2 = 5 > 3; j = 1 -> 5
    ([10.0] + [0.01] * 9, {"floor_fraction": 0.3}, None, 5),
    # max_rank clips
    ([10.0, 5.0, 2.0, 0.5], {"max_rank": 2}, None, 2),
    # min_rank lifts
    ([10.0, 0.5, 0.4, 0.3], {"min_rank": 3}, None, 3),
    # min_rank above k: lo = min(min_rank, hi) = k
    ([10.0, 0.5, 0.4, 0.3], {"min_rank": 9}, None, 4),
    # all-zero spectrum: cutoff 0, every value passes -> k
    ([0.0, 0.0, 0.0], {}, None, 3),
]


@pytest.mark.parametrize(("s", "kwargs", "shape", "expected"), SIGMA_CUTOFF_EXAMPLES)
def test_sigma_cutoff_hand_examples(backend, dtype, s, kwargs, shape, expected):
    rule = lc.SigmaCutoff(**kwargs)
    x = backend.asarray(np.array(s), dtype)
    got = rule(x, shape=shape) if shape is not None else rule(x)
    assert_python_int(got)
    assert got == expected
    assert ref.sigma_cutoff_rank(np.array(s), shape=shape, **kwargs) == expected


# (rule, s, shape, expected) for the other rules
OTHER_EXAMPLES = [
    # TailNorm(0.5), s = (3, 2, 1): total 14, tol^2 total = 3.5; tail after 1 = 5, after 2 = 1 -> 2
    (lambda: lc.TailNorm(tol=0.5), [3.0, 2.0, 1.0], None, 2),
    (lambda: lc.TailNorm(tol=0.1), [3.0, 2.0, 1.0], None, 3),
    (lambda: lc.TailNorm(tol=1.0), [3.0, 2.0, 1.0], None, 1),
    (lambda: lc.TailNorm(), [0.0, 0.0], None, 1),
    # Energy(0.9): 9 < 12.6 <= 13 -> 2; Energy(0.5): 9 >= 7 -> 1; Energy(1): needs all 14 -> 3
    (lambda: lc.Energy(energy=0.9), [3.0, 2.0, 1.0], None, 2),
    (lambda: lc.Energy(energy=0.5), [3.0, 2.0, 1.0], None, 1),
    (lambda: lc.Energy(energy=1.0), [3.0, 2.0, 1.0], None, 3),
    (lambda: lc.Energy(energy=1.0), [3.0, 2.0, 0.0], None, 2),
    (lambda: lc.Energy(), [0.0, 0.0, 0.0], None, 1),
    # OHT square: omega(1) = 2.86, median(10, 1, 1, 1) = 1 -> tau 2.86 -> 1
    (lambda: lc.OptimalHardThreshold(), [10.0, 1.0, 1.0, 1.0], None, 1),
    # s = (10, 3.5, 1, 1), median 2.25: square tau = 6.435 -> 1; (4, 100): beta = 0.04,
    # omega = 1.5013158, tau = 3.378 -> 2
    (lambda: lc.OptimalHardThreshold(), [10.0, 3.5, 1.0, 1.0], None, 1),
    (lambda: lc.OptimalHardThreshold(), [10.0, 3.5, 1.0, 1.0], (4, 100), 2),
    (lambda: lc.OptimalHardThreshold(), [10.0, 3.5, 1.0, 1.0], (100, 4), 2),
    # odd k: median 4, tau = 11.44 -> raw 0, clipped to 1; scale 0.1: tau = 1.144 -> 3
    (lambda: lc.OptimalHardThreshold(), [5.0, 4.0, 3.0], None, 1),
    (lambda: lc.OptimalHardThreshold(scale=0.1), [5.0, 4.0, 3.0], None, 3),
    # EffectiveRank: flat -> k; (3, 1): exp(H) = 1.7548 -> 2; (1, 0) -> 1
    (lambda: lc.EffectiveRank(), [1.0, 1.0, 1.0, 1.0], None, 4),
    (lambda: lc.EffectiveRank(), [3.0, 1.0], None, 2),
    (lambda: lc.EffectiveRank(), [1.0, 0.0], None, 1),
    (lambda: lc.EffectiveRank(max_rank=3), [1.0, 1.0, 1.0, 1.0], None, 3),
    # StableRank: (3, 1) -> 10/9 -> 1; (1, 1, 1, 0.1) -> 3.01 -> 3; (2, 2, 1) -> 2.25 -> 2
    (lambda: lc.StableRank(), [3.0, 1.0], None, 1),
    (lambda: lc.StableRank(), [1.0, 1.0, 1.0, 0.1], None, 3),
    (lambda: lc.StableRank(), [2.0, 2.0, 1.0], None, 2),
    # FixedRank: rank as is, clipped to k; fraction of min(m, n), rounded half up
    (lambda: lc.FixedRank(rank=3), [5.0, 4.0, 3.0, 2.0, 1.0], None, 3),
    (lambda: lc.FixedRank(rank=10), [5.0, 4.0, 3.0, 2.0, 1.0], None, 5),
    (lambda: lc.FixedRank(fraction=0.5), [1.0] * 8, (10, 20), 5),
    (lambda: lc.FixedRank(fraction=0.25), [1.0] * 8, (10, 20), 3),
    (lambda: lc.FixedRank(fraction=0.25), [1.0] * 8, None, 2),
    (lambda: lc.FixedRank(fraction=0.01), [1.0] * 8, None, 1),
    (lambda: lc.FixedRank(rank=2, min_rank=3), [1.0] * 8, None, 3),
]


@pytest.mark.parametrize(("make", "s", "shape", "expected"), OTHER_EXAMPLES)
def test_other_rules_hand_examples(backend, dtype, make, s, shape, expected):
    rule = make()
    x = backend.asarray(np.array(s), dtype)
    got = rule(x, shape=shape) if shape is not None else rule(x)
    assert_python_int(got)
    assert got == expected, f"{rule!r} on {s} (shape {shape}) gave {got}, expected {expected}"


@pytest.mark.parametrize("spec", RULES, ids=RULE_IDS)
@pytest.mark.parametrize(
    "bounds",
    [
        {"min_rank": 0},
        {"max_rank": 0},
        {"min_rank": -1},
        {"max_rank": -2},
        {"min_rank": 3, "max_rank": 2},
    ],
    ids=["min0", "max0", "min-1", "max-2", "min>max"],
)
def test_rule_bad_bounds_raise_at_construction(spec, bounds):
    extra = {"rank": 1} if spec.name == "FixedRank" else {}
    with pytest.raises(lc.RankError, match=r"(?i)(min_rank|max_rank)"):
        spec.make(**extra, **bounds)


@pytest.mark.parametrize(
    "make",
    [
        lambda: lc.SigmaCutoff(fraction=-0.1),
        lambda: lc.SigmaCutoff(fraction=1.5),
        lambda: lc.TailNorm(tol=0.0),
        lambda: lc.TailNorm(tol=1.5),
        lambda: lc.TailNorm(tol=-0.1),
        lambda: lc.Energy(energy=0.0),
        lambda: lc.Energy(energy=1.5),
        lambda: lc.FixedRank(),
        lambda: lc.FixedRank(rank=2, fraction=0.5),
    ],
    ids=["fraction<0", "fraction>1", "tol0", "tol>1", "tol<0", "energy0", "energy>1", "fixed-neither",
         "fixed-both"],
)  # fmt: skip
def test_rule_bad_parameters_raise(make):
    """Out-of-range parameters raise ValueError (at construction or, at the latest, on the call)."""
    s = np.array([3.0, 2.0, 1.0])
    with pytest.raises(ValueError):  # noqa: PT011 - the spec only fixes the class
        make()(s)


@pytest.mark.parametrize("spec", RULES, ids=RULE_IDS)
@pytest.mark.parametrize(
    ("s", "error", "pattern"),
    [
        ([3.0, -1.0, -2.0], ValueError, r"(?i)negative"),
        ([1.0, 2.0, 3.0], ValueError, r"(?i)(increasing|descending|sorted|order)"),
        ([3.0, np.nan, 1.0], "NonFiniteError", r"(?i)(nan|finite)"),
        ([np.inf, 2.0, 1.0], "NonFiniteError", r"(?i)(inf|finite)"),
    ],
    ids=["negative", "increasing", "nan", "inf"],
)
def test_rule_bad_spectrum(backend, spec, s, error, pattern):
    rule = spec.make(**({"rank": 1} if spec.name == "FixedRank" else {}))
    err = lc.NonFiniteError if error == "NonFiniteError" else error
    x = backend.asarray(np.array(s), "float64")
    before = snapshot(backend, x)
    with pytest.raises(err, match=pattern):
        rule(x)
    assert_unchanged(backend, before, x)


def test_rules_are_frozen_dataclasses():
    rule = lc.SigmaCutoff(fraction=0.2)
    assert dataclasses.is_dataclass(rule)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.fraction = 0.3  # type: ignore[misc]
    assert rule == lc.SigmaCutoff(fraction=0.2)
    assert hash(rule) == hash(lc.SigmaCutoff(fraction=0.2))
    for spec in RULES:
        r = spec.make(**({"rank": 1} if spec.name == "FixedRank" else {}))
        assert dataclasses.is_dataclass(r)
        assert r.min_rank is None
        assert r.max_rank is None
    defaults = {
        "SigmaCutoff": {"fraction": 0.1, "floor_fraction": 0.01},
        "TailNorm": {"tol": 0.1},
        "Energy": {"energy": 0.9},
        "OptimalHardThreshold": {"scale": 1.0},
    }
    for spec in RULES:
        for field, value in defaults.get(spec.name, {}).items():
            assert getattr(spec.make(), field) == value, (spec.name, field)


# --------------------------------------------------------------------------------------------------
# issue 9, defect 8: extreme but finite scales (rules are scale-invariant)
# --------------------------------------------------------------------------------------------------
SCALE_CASES = [
    # (rule, spectrum at scale 1, the rank at every scale)
    (lambda: lc.StableRank(), [1.0] * 6, 6),
    (lambda: lc.TailNorm(0.1), [1.0] * 7, 7),
    (lambda: lc.Energy(0.9), [1.0] * 7, 7),
    (lambda: lc.Energy(0.8), [4.0, 3.0, 2.0, 1.0], 2),
    (lambda: lc.TailNorm(0.5), [4.0, 3.0, 2.0, 1.0], 2),
    (lambda: lc.EffectiveRank(), [1.0] * 5, 5),
    (lambda: lc.SigmaCutoff(0.5, floor_fraction=0.0), [4.0, 3.0, 2.0, 1.0], 3),
    (lambda: lc.OptimalHardThreshold(), [10.0, 9.0, 1.0, 1.0, 1.0], 2),
]


@pytest.mark.parametrize(("make", "s", "expected"), SCALE_CASES)
@pytest.mark.parametrize(
    ("dtype_name", "scale"),
    [("float64", 1e200), ("float64", 5e153), ("float64", 1e-200), ("float64", 1e-310),
     ("float32", 2e19), ("float32", 1e-30), ("float64", 1.0)],
)  # fmt: skip
def test_rules_are_scale_invariant(backend, make, s, expected, dtype_name, scale):
    """Squares of 1e200 overflow and of 1e-200 underflow: the rules normalize by s[0] first."""
    x = backend.asarray(np.array(s) * scale, dtype_name)
    assert float(backend.to_numpy(x)[0]) > 0 and np.isfinite(backend.to_numpy(x)).all()
    rule = make()
    assert rule(x) == expected, f"{rule!r} at scale {scale:g} ({dtype_name})"


@pytest.mark.parametrize(
    ("s", "expected"), [([1e200, 6e199], 1.36), ([1e-200] * 6, 6.0), ([2e19] * 3, 3.0)]
)
def test_stable_rank_extreme_scales(backend, s, expected):
    dt = "float32" if s[0] == 2e19 else "float64"
    got = float(backend.to_numpy(lc.stable_rank(backend.asarray(np.array(s), dt))))
    assert got == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------------------------------
# issue 9: parameter validation (types at construction; NumPy scalars accepted, canonicalized)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["0.5", None, 0.5j, True, np.array(0.5), [0.5]])
@pytest.mark.parametrize(
    "make",
    [
        lambda v: lc.SigmaCutoff(fraction=v),
        lambda v: lc.SigmaCutoff(floor_fraction=v),
        lambda v: lc.TailNorm(tol=v),
        lambda v: lc.Energy(energy=v),
        lambda v: lc.OptimalHardThreshold(scale=v),
    ],
    ids=["fraction", "floor_fraction", "tol", "energy", "scale"],
)
def test_rule_parameter_of_wrong_type_raises_at_construction(make, value):
    with pytest.raises(
        lc.ParameterTypeError, match=r"`(fraction|floor_fraction|tol|energy|scale)`"
    ):
        make(value)


@pytest.mark.parametrize("value", ["0.5", 0.5j, True, np.array(0.5)])
def test_fixed_rank_fraction_of_wrong_type_raises(value):
    with pytest.raises(lc.ParameterTypeError, match="`fraction`"):
        lc.FixedRank(fraction=value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_rule_parameter_not_finite_raises(value):
    for make in (lc.SigmaCutoff, lc.TailNorm, lc.Energy, lc.OptimalHardThreshold):
        with pytest.raises(lc.ParameterError):
            make(value)


@pytest.mark.parametrize("value", [2.5, 2.0, True, "2", 1j, np.array(2)])
@pytest.mark.parametrize("field", ["min_rank", "max_rank", "rank"])
def test_rule_ranks_of_wrong_type_are_refused(field, value):
    """No silent truncation (2.5 -> 2) and no bool taken as 1."""
    with pytest.raises(lc.RankError, match=f"`{field}`"):
        lc.FixedRank(**{"rank": 1, field: value})


def test_rule_numpy_scalars_are_accepted_and_canonical():
    rule = lc.SigmaCutoff(fraction=np.float32(0.5), min_rank=np.int64(2), max_rank=np.int32(5))
    assert rule == lc.SigmaCutoff(fraction=0.5, min_rank=2, max_rank=5)
    assert type(rule.fraction) is float and type(rule.min_rank) is int
    assert lc.Energy(np.float32(0.9)).energy == pytest.approx(0.9, rel=1e-7)
    assert lc.TailNorm(np.float64(0.1)).tol == 0.1
    assert lc.FixedRank(rank=np.int64(3))(np.array([3.0, 2.0, 1.0])) == 3


@pytest.mark.parametrize(
    ("shape", "error"),
    [((8.5, 10), lc.ParameterTypeError), ((3,), lc.ShapeError), ((4, 5, 6), lc.ShapeError),
     ((0, 4), lc.ShapeError), ((-4, 5), lc.ShapeError), ("ab", lc.ParameterTypeError),
     (5, lc.ParameterTypeError), ((True, 4), lc.ParameterTypeError)],
)  # fmt: skip
def test_rule_shape_must_be_a_pair_of_positive_ints(backend, shape, error):
    x = backend.asarray(np.array([3.0, 2.0, 1.0]))
    for spec in RULES:
        rule = spec.make(**({"rank": 1} if spec.name == "FixedRank" else {}))
        with pytest.raises(error, match="`shape"):
            rule(x, shape=shape)


@pytest.mark.parametrize("shape", [(0, 4), (3, 0), (0, 0, 4)])
def test_rule_refuses_empty_stacks(backend, shape):
    x = backend.asarray(np.ones(shape))
    with pytest.raises(lc.ShapeError, match="non-empty"):
        lc.Energy()(x)
    with pytest.raises(lc.ShapeError, match="non-empty"):
        lc.stable_rank(x)
