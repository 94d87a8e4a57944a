"""The P-BFGS step policy of the core (lowrank_core.dldr.pbfgs), every backend: the pair update, the
restart and reset rules, the counters, the host (eager) and traced forms agreeing, and the state's
checks."""

from __future__ import annotations

import numpy as np
import pytest

import lowrank_core as lc
from lowrank_core.dldr import BFGSState, bfgs_step_direction, bfgs_step_finish


def _state(backend, c, H, g_prev, s_prev, has_prev, counts=(0, 0, 0, 0)):
    a = [backend.asarray(np.asarray(v, dtype=np.float64)) for v in (c, H, g_prev, s_prev)]
    return BFGSState(*a, has_prev, *counts)


def _np(backend, x):
    return np.asarray(backend.to_numpy(x))


def test_no_pair_no_update_and_the_quasi_newton_direction(backend):
    d = 3
    st = _state(backend, np.zeros(d), 2 * np.eye(d), np.zeros(d), np.zeros(d), False)
    g = backend.asarray(np.array([1.0, -2.0, 0.5]))
    out = bfgs_step_direction(st, g)
    assert out.updated is False and out.skipped is False and out.restarted is False
    assert out.searchable is True
    np.testing.assert_array_equal(_np(backend, out.p), -2 * np.array([1.0, -2.0, 0.5]))
    assert float(out.slope) == pytest.approx(-2 * 5.25)


def test_a_pair_with_curvature_updates_h_and_one_without_is_skipped(backend):
    d = 2
    g_prev, s = np.array([1.0, 0.0]), np.array([-0.5, 0.0])
    g = backend.asarray(np.array([0.5, 0.2]))  # y = (-0.5, 0.2): s.y = 0.25 > 0
    st = _state(backend, np.zeros(d), np.eye(d), g_prev, s, True, (4, 1, 2, 9))
    out = bfgs_step_direction(st, g)
    assert out.updated is True and out.skipped is False
    H = _np(backend, out.H)
    np.testing.assert_allclose(H @ np.array([-0.5, 0.2]), s, atol=1e-12)  # the secant equation
    # a pair without curvature (s.y < 0): skipped, H as it was
    st = _state(backend, np.zeros(d), np.eye(d), g_prev, -s, True, (4, 1, 2, 9))
    out = bfgs_step_direction(st, g)
    assert out.updated is False and out.skipped is True
    np.testing.assert_array_equal(_np(backend, out.H), np.eye(d))
    new = bfgs_step_finish(st, out, g, alpha=1.0, accepted=True, trials=3)
    assert (new.updates, new.skipped, new.failed_searches, new.trials) == (4, 2, 2, 12)


def test_a_non_descent_direction_restarts_from_the_identity(backend):
    d = 2
    H = np.array([[1.0, 0.0], [0.0, -1.0]])  # indefinite: -H g is an ascent direction for this g
    st = _state(backend, np.zeros(d), H, np.zeros(d), np.zeros(d), False)
    g = backend.asarray(np.array([0.1, 1.0]))
    out = bfgs_step_direction(st, g)
    assert out.restarted is True and out.searchable is True
    np.testing.assert_array_equal(_np(backend, out.H), np.eye(d))
    np.testing.assert_array_equal(_np(backend, out.p), -np.array([0.1, 1.0]))


def test_a_zero_gradient_is_not_searchable_and_forgets_the_pair(backend):
    d = 2
    st = _state(backend, np.ones(d), 3 * np.eye(d), np.ones(d), np.ones(d), False, (1, 0, 0, 5))
    g = backend.asarray(np.zeros(d))
    out = bfgs_step_direction(st, g)
    assert out.searchable is False
    new = bfgs_step_finish(st, out, g, alpha=0.0, accepted=False, trials=0)
    assert new.has_prev is False and new.failed_searches == 0 and new.trials == 5
    np.testing.assert_array_equal(_np(backend, new.c), np.ones(d))  # no move
    np.testing.assert_array_equal(_np(backend, new.H), np.eye(d))  # restarted (p = -g = 0)


def test_accepted_and_failed_searches(backend):
    d = 2
    st = _state(backend, np.array([1.0, 2.0]), 2 * np.eye(d), np.zeros(d), np.zeros(d), False)
    g = backend.asarray(np.array([1.0, 1.0]))
    out = bfgs_step_direction(st, g)
    ok = bfgs_step_finish(st, out, g, alpha=0.25, accepted=True, trials=2)
    assert ok.has_prev is True and ok.failed_searches == 0 and ok.trials == 2
    np.testing.assert_array_equal(_np(backend, ok.s_prev), [-0.5, -0.5])
    np.testing.assert_array_equal(_np(backend, ok.c), [0.5, 1.5])
    np.testing.assert_array_equal(_np(backend, ok.g_prev), [1.0, 1.0])
    np.testing.assert_array_equal(_np(backend, ok.H), 2 * np.eye(d))  # kept
    bad = bfgs_step_finish(st, out, g, alpha=0.01, accepted=False, trials=20)
    assert bad.has_prev is False and bad.failed_searches == 1 and bad.trials == 20
    np.testing.assert_array_equal(_np(backend, bad.c), [1.0, 2.0])  # no move
    np.testing.assert_array_equal(_np(backend, bad.H), np.eye(d))  # reset


@pytest.mark.parametrize("seed", range(6))
def test_the_traced_form_decides_as_the_host_form(backend, seed):
    """``check_finite=False`` (0-d boolean arrays, ``where``) gives the very same values and decisions
    as the host form (Python bools), over random pairs, some without curvature, some restarts."""
    rng = np.random.default_rng(seed)
    d = 4
    A = rng.standard_normal((d, d))
    H = A @ A.T if seed % 3 else A + A.T  # indefinite for some seeds: restarts
    g_prev, s = rng.standard_normal(d), rng.standard_normal(d)
    st = _state(backend, rng.standard_normal(d), H, g_prev, s, bool(seed % 2), (1, 2, 3, 4))
    g = backend.asarray(rng.standard_normal(d))
    host = bfgs_step_direction(st, g)
    traced_state = st._replace(
        has_prev=backend.asarray(np.asarray(bool(seed % 2)), dtype="bool"),
        **{k: backend.asarray(np.asarray(v), dtype="int64") for k, v in zip(
            ("updates", "skipped", "failed_searches", "trials"), (1, 2, 3, 4), strict=True
        )},
    )  # fmt: skip
    traced = bfgs_step_direction(traced_state, g, check_finite=False)
    for name in ("H", "p", "slope"):
        np.testing.assert_array_equal(
            _np(backend, getattr(traced, name)), _np(backend, getattr(host, name))
        )
    for name in ("updated", "skipped", "restarted", "searchable"):
        assert bool(getattr(traced, name)) is getattr(host, name), name
    for accepted in (False, True):
        h = bfgs_step_finish(st, host, g, alpha=0.5, accepted=accepted, trials=3)
        t = bfgs_step_finish(
            traced_state,
            traced,
            g,
            alpha=backend.asarray(np.asarray(0.5)),
            accepted=backend.asarray(np.asarray(accepted), dtype="bool"),
            trials=backend.asarray(np.asarray(3), dtype="int64"),
        )
        for name in BFGSState._fields:
            np.testing.assert_array_equal(
                _np(backend, getattr(t, name)), np.asarray(getattr(h, name))
            )


def test_the_state_dict_round_trips_and_bad_content_is_a_checkpoint_error(backend):
    st = BFGSState.initial(backend.asarray(np.array([1.0, 2.0, 3.0])))
    saved = st.state_dict()
    assert set(saved) == set(BFGSState._fields)
    again = BFGSState.from_state_dict(saved, d=3)
    for name in BFGSState._fields:
        np.testing.assert_array_equal(_np(backend, getattr(again, name)), _np(backend, saved[name]))
    bad_cases = [
        ({k: v for k, v in saved.items() if k != "H"}, "missing \\['H'\\]"),
        ({**saved, "extra": 1}, "unexpected \\['extra'\\]"),
        ({**saved, "H": backend.asarray(np.eye(2))}, "'H' has shape"),
        ({**saved, "c": backend.asarray(np.zeros((3, 1)))}, "'c' has shape"),
        ({**saved, "s_prev": backend.asarray(np.zeros(3), "float32")}, "'s_prev' is"),
        ({**saved, "updates": -1}, "'updates' must be a non-negative integer"),
        ({**saved, "has_prev": backend.asarray(np.asarray(1.5))}, "'has_prev' must be a 0-d bool"),
        ({**saved, "trials": "3"}, "'trials' must be a 0-d integral"),
        ("not a dict", "must be a dict"),
    ]
    for state, match in bad_cases:
        with pytest.raises(lc.CheckpointError, match=match):
            BFGSState.from_state_dict(state)  # type: ignore[arg-type]
    with pytest.raises(lc.CheckpointError, match="subspace needs \\(4,\\)"):
        BFGSState.from_state_dict(saved, d=4)
