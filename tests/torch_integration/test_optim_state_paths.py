"""lowrank_torch.optim_state: the fast paths of the state maps give what the documented rule gives.

The rule (module docstring of ``optim_state``): first moments ``U^T M V``, second moments
``(U∘U)^T v (V∘V)`` clamped at 0, magnitudes ``sqrt((U∘U)^T x^2 (V∘V))``. The implementation multiplies
in the cheaper order for rectangular maps and shares the squared maps between state tensors; checked
here against the rule computed directly in float64, including all-zero moments (which must stay zero).
"""

from __future__ import annotations

import pytest
from _strategies import seeds
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
nn = torch.nn

from lowrank_torch.optim_state import dense_to_sigma_state, rotate_sigma_state  # noqa: E402

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _bases(gen, m, n, r):
    U = torch.linalg.qr(torch.randn(m, max(m, r), generator=gen, dtype=F64))[0][:, :r]
    V = torch.linalg.qr(torch.randn(n, max(n, r), generator=gen, dtype=F64))[0][:, :r]
    return U, V


def _rule(key, x, left, right):
    if key == "exp_avg_sq":
        return ((left * left).mT @ x @ (right * right)).clamp_min(0)
    if key == "exp_inf":
        return ((left * left).mT @ (x * x) @ (right * right)).clamp_min(0).sqrt()
    return left.mT @ x @ right


@settings(max_examples=30, deadline=None)
@given(
    seed=seeds,
    m=st.integers(1, 24),
    n=st.integers(1, 24),
    data=st.data(),
    zero=st.sampled_from(["none", "exp_avg", "exp_avg_sq", "both"]),
)
def test_switch_state_equals_the_rule_in_both_orders_and_for_zero_state(seed, m, n, data, zero):
    r = data.draw(st.integers(1, min(m, n)))
    gen = torch.Generator().manual_seed(seed)
    U, V = _bases(gen, m, n, r)
    dense = nn.Parameter(torch.randn(m, n, generator=gen, dtype=F64))
    sigma = nn.Parameter(torch.zeros(r, r, dtype=F64))
    opt = torch.optim.Adam([dense])
    state = {
        "step": torch.tensor(3.0),
        "exp_avg": torch.randn(m, n, generator=gen, dtype=F64),
        "exp_avg_sq": torch.rand(m, n, generator=gen, dtype=F64),
    }
    for key in ("exp_avg", "exp_avg_sq"):
        if zero in (key, "both"):
            state[key].zero_()
    opt.state[dense] = {k: v.clone() for k, v in state.items()}
    dense_to_sigma_state(opt, dense, sigma, U, V)
    got = opt.state[sigma]
    assert float(got["step"]) == 3.0
    for key in ("exp_avg", "exp_avg_sq"):
        want = _rule(key, state[key], U, V)
        assert got[key].shape == (r, r) and got[key].dtype == F64 and got[key].is_contiguous()
        torch.testing.assert_close(got[key], want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("shape", [(4, 40, 3), (40, 4, 4), (30, 30, 30), (30, 30, 7)])
def test_rectangular_switch_in_float32_matches_the_float64_rule(shape):
    """float32 state: the product order may differ from ``(U^T M) V``; the result must stay within
    float32 rounding of the float64 rule (every entry is a sum of ``m n`` terms of size <= |M|max)."""
    m, n, r = shape
    gen = torch.Generator().manual_seed(7)
    U, V = _bases(gen, m, n, r)
    dense = nn.Parameter(torch.randn(m, n, generator=gen))
    sigma = nn.Parameter(torch.zeros(r, r))
    opt = torch.optim.Adamax([dense])
    state = {
        "step": torch.tensor(1.0),
        "exp_avg": torch.randn(m, n, generator=gen),
        "exp_inf": torch.rand(m, n, generator=gen),
    }
    opt.state[dense] = {k: v.clone() for k, v in state.items()}
    dense_to_sigma_state(opt, dense, sigma, U.float(), V.float())
    for key in ("exp_avg", "exp_inf"):
        want = _rule(key, state[key].double(), U.float().double(), V.float().double())
        got = opt.state[sigma][key]
        assert got.dtype == torch.float32 and got.shape == (r, r)
        tol = 8 * torch.finfo(torch.float32).eps * (m + n)
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def test_zero_state_of_a_rotation_stays_zero_and_keeps_dtype():
    gen = torch.Generator().manual_seed(3)
    sigma = nn.Parameter(torch.randn(5, 5, generator=gen))
    opt = torch.optim.Adam([sigma])
    opt.state[sigma] = {
        "step": torch.tensor(2.0),
        "exp_avg": torch.zeros(5, 5, dtype=torch.bfloat16),
        "exp_avg_sq": torch.rand(5, 5, generator=gen),
    }
    left, right = _bases(gen, 5, 5, 5)
    want_sq = _rule("exp_avg_sq", opt.state[sigma]["exp_avg_sq"].double(), left, right)
    rotate_sigma_state(opt, sigma, left.float(), right.float())
    got = opt.state[sigma]
    assert got["exp_avg"].dtype == torch.bfloat16 and not bool(got["exp_avg"].any())
    torch.testing.assert_close(got["exp_avg_sq"].double(), want_sq, atol=1e-5, rtol=1e-5)
