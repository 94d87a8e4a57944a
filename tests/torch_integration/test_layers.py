"""lowrank_torch.layers: LowRankLinear, LowRankConv1d/2d/3d, LowRankWeight and low_rank_attention_."""

from __future__ import annotations

import copy

import pytest
from _strategies import seeds
from hypothesis import given
from hypothesis import strategies as st

import lowrank_core as lc

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from lowrank_torch.layers import (  # noqa: E402
    FORWARD_MODES,
    LowRankConv1d,
    LowRankConv2d,
    LowRankConv3d,
    LowRankLayer,
    LowRankLinear,
    LowRankWeight,
    low_rank_attention_,
)

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")

F64 = torch.float64
CONV = {1: (nn.Conv1d, LowRankConv1d), 2: (nn.Conv2d, LowRankConv2d), 3: (nn.Conv3d, LowRankConv3d)}


def close(actual, desired, atol=1e-10, rtol=1e-10):
    torch.testing.assert_close(actual, desired, atol=atol, rtol=rtol)


def randn(*shape, gen):
    return torch.randn(*shape, generator=gen, dtype=F64)


def make_linear(m, n, bias, gen):
    lin = nn.Linear(n, m, bias=bias, dtype=F64)
    with torch.no_grad():
        lin.weight.copy_(randn(m, n, gen=gen))
        if bias:
            lin.bias.copy_(randn(m, gen=gen))
    return lin


@st.composite
def conv_cases(draw):
    nd = draw(st.integers(1, 3), label="nd")
    g = draw(st.integers(1, 3), label="groups")
    cin, cout = g * draw(st.integers(1, 3)), g * draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    padding = draw(
        st.one_of(
            st.sampled_from(["same", "valid"]),
            st.lists(st.integers(0, 2), min_size=nd, max_size=nd).map(tuple),
        ),
        label="padding",
    )
    stride = (1,) * nd if padding == "same" else tuple(draw(st.integers(1, 2)) for _ in range(nd))
    size = tuple(
        d * (k - 1) + 1 + draw(st.integers(0, 3)) for k, d in zip(kernel, dilation, strict=True)
    )
    bias = draw(st.booleans(), label="bias")
    batch = draw(st.integers(1, 2), label="batch")
    return dict(
        nd=nd,
        groups=g,
        cin=cin,
        cout=cout,
        kernel=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        size=size,
        bias=bias,
        batch=batch,
    )


def make_conv(case, gen):
    dense_cls, _ = CONV[case["nd"]]
    conv = dense_cls(
        case["cin"],
        case["cout"],
        case["kernel"],
        stride=case["stride"],
        padding=case["padding"],
        dilation=case["dilation"],
        groups=case["groups"],
        bias=case["bias"],
        dtype=F64,
    )
    with torch.no_grad():
        conv.weight.copy_(randn(*conv.weight.shape, gen=gen))
        if case["bias"]:
            conv.bias.copy_(randn(case["cout"], gen=gen))
    x = randn(case["batch"], case["cin"], *case["size"], gen=gen)
    return conv, x


def gen_of(seed):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# full rank reproduces the dense layer, in both modes
# --------------------------------------------------------------------------------------------------
@given(
    m=st.integers(1, 12),
    n=st.integers(1, 12),
    batch=st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple),
    bias=st.booleans(),
    seed=seeds,
)
def test_linear_full_rank_matches_dense(m, n, batch, bias, seed):
    gen = gen_of(seed)
    lin = make_linear(m, n, bias, gen)
    x = randn(*batch, n, gen=gen)
    layer = LowRankLinear.from_dense(lin)
    assert layer.rank == min(m, n)
    assert (layer.bias is None) == (not bias)
    want = lin(x)
    for mode in ("factorized", "dense", "auto"):
        layer.forward_mode = mode
        got = layer(x)
        assert got.shape == want.shape
        close(got, want)
    close(layer.weight, lin.weight)


@pytest.mark.parametrize("tokens", [1, 3, 5, 40])
@pytest.mark.parametrize(("m", "n"), [(5, 8), (8, 5)])
def test_linear_factorized_every_association(m, n, tokens):
    """The three associations (thin matmuls, U Sigma merged, Sigma V^T merged) all give W x + b."""
    gen = gen_of(1)
    lin = make_linear(m, n, True, gen)
    layer = LowRankLinear.from_dense(lin, rank=3, forward_mode="factorized")
    with torch.no_grad():
        layer.sigma.copy_(randn(3, 3, gen=gen))  # a non-diagonal Sigma: order of products matters
    x = randn(tokens, n, gen=gen)
    W = layer.U @ layer.sigma @ layer.V.mT
    close(layer(x), x @ W.mT + layer.bias)


@given(case=conv_cases(), seed=seeds)
def test_conv_full_rank_matches_dense(case, seed):
    gen = gen_of(seed)
    conv, x = make_conv(case, gen)
    _, lr_cls = CONV[case["nd"]]
    layer = lr_cls.from_dense(conv)
    g = case["groups"]
    m, cols = case["cout"] // g, case["cin"] // g * int(torch.tensor(case["kernel"]).prod())
    r = min(m, cols)
    assert layer.rank == r
    if g == 1:
        assert tuple(layer.U.shape) == (m, r)
        assert tuple(layer.V.shape) == (cols, r)
    else:
        assert tuple(layer.U.shape) == (g, m, r)
        assert tuple(layer.V.shape) == (g, cols, r)
        assert tuple(layer.sigma.shape) == (g, r, r)
    want = conv(x)
    for mode in ("factorized", "dense"):
        layer.forward_mode = mode
        close(layer(x), want)
    close(layer.weight, conv.weight)


@given(case=conv_cases(), seed=seeds, data=st.data())
def test_conv_modes_agree_at_low_rank(case, seed, data):
    gen = gen_of(seed)
    conv, x = make_conv(case, gen)
    _, lr_cls = CONV[case["nd"]]
    g = case["groups"]
    kmax = min(case["cout"] // g, case["cin"] // g * int(torch.tensor(case["kernel"]).prod()))
    rank = data.draw(st.integers(1, kmax), label="rank")
    layer = lr_cls.from_dense(conv, rank=rank)
    with torch.no_grad():  # a non-diagonal Sigma per group
        layer.sigma.copy_(randn(*layer.sigma.shape, gen=gen))
    layer.forward_mode = "dense"
    dense = layer(x)
    layer.forward_mode = "factorized"
    fact = layer(x)
    close(fact, dense)
    # and both equal the plain conv with the rank-r weight
    want = conv._conv_forward(x, layer.weight.detach(), conv.bias)
    close(fact, want)


@given(
    m=st.integers(2, 12),
    n=st.integers(2, 12),
    tokens=st.integers(1, 20),
    seed=seeds,
    data=st.data(),
)
def test_linear_modes_agree_at_low_rank(m, n, tokens, seed, data):
    gen = gen_of(seed)
    lin = make_linear(m, n, True, gen)
    rank = data.draw(st.integers(1, min(m, n) - 1 if min(m, n) > 1 else 1), label="rank")
    layer = LowRankLinear.from_dense(lin, rank=rank)
    f = lc.factorize(lin.weight.detach(), rank)
    close(layer.weight, lc.reconstruct(f.U, f.Sigma, f.V))  # best rank-r approximation
    with torch.no_grad():
        layer.sigma.copy_(randn(rank, rank, gen=gen))
    x = randn(tokens, n, gen=gen)
    layer.forward_mode = "dense"
    dense = layer(x)
    layer.forward_mode = "factorized"
    close(layer(x), dense)
    close(dense, x @ (layer.U @ layer.sigma @ layer.V.mT).mT + layer.bias)


# --------------------------------------------------------------------------------------------------
# gradients reach only sigma and bias
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["factorized", "dense"])
@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d_grouped"])
def test_gradients_reach_only_sigma_and_bias(kind, mode):
    gen = gen_of(7)
    if kind == "linear":
        dense = make_linear(6, 9, True, gen)
        x = randn(4, 3, 9, gen=gen)
        layer = LowRankLinear.from_dense(dense, forward_mode=mode)
        groups = 1
    else:
        nd, groups = (1, 1) if kind == "conv1d" else (2, 2)
        case = dict(
            nd=nd,
            groups=groups,
            cin=4,
            cout=6,
            kernel=(3,) * nd,
            stride=(1,) * nd,
            padding=(1,) * nd,
            dilation=(1,) * nd,
            size=(5,) * nd,
            bias=True,
            batch=2,
        )
        dense, x = make_conv(case, gen)
        layer = CONV[nd][1].from_dense(dense, forward_mode=mode)
    names = {name for name, _ in layer.named_parameters()}
    assert names == {"sigma", "bias"}
    assert {name for name, _ in layer.named_buffers()} == {"U", "V"}
    assert not layer.U.requires_grad
    assert not layer.V.requires_grad
    gout = randn(*dense(x).shape, gen=gen)
    (dense(x) * gout).sum().backward()
    (layer(x) * gout).sum().backward()
    assert layer.U.grad is None
    assert layer.V.grad is None
    # dL/dSigma = U^T (dL/dW) V, per group
    G = lc.weight_to_matrix(dense.weight.grad, groups=groups)
    close(layer.sigma.grad, layer.U.mT @ G @ layer.V)
    close(layer.bias.grad, dense.bias.grad)


# --------------------------------------------------------------------------------------------------
# set_factors
# --------------------------------------------------------------------------------------------------
def test_set_factors_new_rank_gives_a_new_parameter_and_training_goes_on():
    gen = gen_of(3)
    lin = make_linear(12, 9, True, gen)
    layer = LowRankLinear.from_dense(lin, forward_mode="factorized")
    sigma = layer.sigma
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = randn(5, 9, gen=gen)
    loss = layer(x).sum()  # kept alive on purpose: its graph still references the old sigma
    loss.backward()
    opt.step()
    upd = lc.update_rank(layer.U, layer.sigma.detach(), layer.V, lc.FixedRank(4))
    U_new, S_new, V_new = (t.clone() for t in upd.factors)
    layer.set_factors(U_new, S_new, V_new)
    assert layer.sigma is not sigma and isinstance(layer.sigma, torch.nn.Parameter)
    assert layer.sigma.requires_grad and layer.sigma.grad is None
    assert layer.rank == 4
    assert tuple(layer.U.shape) == (12, 4)
    assert tuple(layer.V.shape) == (9, 4)
    sd = layer.state_dict()
    assert tuple(sd["U"].shape) == (12, 4)
    assert tuple(sd["sigma"].shape) == (4, 4)
    # the layer copies: changing the inputs afterwards changes nothing
    U_new.zero_()
    W = lc.reconstruct(*upd.factors)
    close(layer(x), x @ W.mT + layer.bias)
    # the caller moves the new parameter into the optimizer; then training goes on at the new rank,
    # although the old graph (``loss``) is still alive
    opt.param_groups[0]["params"][0] = layer.sigma
    before = layer.sigma.detach().clone()
    opt.zero_grad()
    loss = layer(x).sum()
    loss.backward()
    opt.step()
    assert tuple(layer.sigma.grad.shape) == (4, 4)
    assert not torch.equal(before, layer.sigma.detach())
    # a same-rank update writes in place: same Parameter, gradient kept
    kept = layer.sigma
    doubled = layer.sigma.detach() * 2
    layer.set_factors(layer.U, doubled, layer.V)
    assert layer.sigma is kept and layer.sigma.grad is not None
    close(layer.sigma.detach(), doubled)


def test_set_factors_grouped_conv_truncate():
    gen = gen_of(4)
    case = dict(
        nd=2,
        groups=2,
        cin=4,
        cout=6,
        kernel=(3, 3),
        stride=(1, 1),
        padding=(1, 1),
        dilation=(1, 1),
        size=(5, 5),
        bias=False,
        batch=1,
    )
    conv, x = make_conv(case, gen)
    layer = LowRankConv2d.from_dense(conv)
    sigma = layer.sigma
    f = lc.truncate(layer.U, layer.sigma.detach(), layer.V, 2)
    layer.set_factors(*f)
    assert layer.sigma is not sigma  # a new rank, a new Parameter
    assert layer.rank == 2
    assert tuple(layer.sigma.shape) == (2, 2, 2)
    assert tuple(layer.U.shape) == (2, 3, 2)
    layer.forward_mode = "dense"
    d = layer(x)
    layer.forward_mode = "factorized"
    close(layer(x), d)


def test_set_factors_rejects_mismatched_factors():
    layer = LowRankLinear.from_dense(make_linear(6, 4, False, gen_of(0)))
    U, S, V = layer.factors
    with pytest.raises(lc.ShapeError, match="`U`"):
        layer.set_factors(U[:5], S, V)
    with pytest.raises(lc.ShapeError, match="`V`"):
        layer.set_factors(U, S, V[:, :3])
    with pytest.raises(lc.ShapeError, match="dimensions"):
        layer.set_factors(U[None], S, V)
    with pytest.raises(lc.ArrayTypeError):
        layer.set_factors(U.numpy(), S, V)
    assert layer.rank == 4  # nothing changed


# --------------------------------------------------------------------------------------------------
# "auto", flops
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("m", "n", "r", "expected"),
    [
        (64, 64, 64, "dense"),  # 64 * 192 > 4096
        (64, 64, 16, "factorized"),  # 16 * 144 = 2304 < 4096
        (64, 64, 26, "factorized"),  # 26 * 154 = 4004 < 4096
        (64, 64, 27, "dense"),  # 27 * 155 = 4185 > 4096
        (6, 4, 2, "dense"),  # 2 * 12 = 24 = 6 * 4: a tie goes dense
        (6, 4, 1, "factorized"),  # 1 * 11 < 24
        (12, 4, 2, "factorized"),  # 2 * 18 = 36 < 48
        (12, 4, 3, "dense"),  # 3 * 19 = 57 > 48
    ],
)
def test_auto_follows_flop_rule(monkeypatch, m, n, r, expected):
    layer = LowRankLinear.from_dense(make_linear(m, n, True, gen_of(0)), rank=r)
    assert layer.forward_mode == "auto"
    assert layer.resolved_mode() == expected
    calls = []
    monkeypatch.setattr(layer, "_forward_dense", lambda x: calls.append("dense") or x)
    monkeypatch.setattr(layer, "_forward_factorized", lambda x: calls.append("factorized") or x)
    # A Linear's forward compares the whole cost of the call (flops for its T tokens).
    for T in (1, 2, 64, 4096):
        cost = layer.flops(T)
        want = "factorized" if cost["factorized"] < cost["dense"] else "dense"
        assert layer.resolved_mode(T) == want
        calls.clear()
        layer(torch.zeros(T, n, dtype=F64))
        assert calls == [want]
    calls.clear()
    for mode in ("dense", "factorized"):
        layer.forward_mode = mode
        assert layer.resolved_mode() == mode
        calls.clear()
        layer(torch.zeros(2, n, dtype=F64))
        assert calls == [mode]


def test_auto_reevaluated_after_rank_change():
    layer = LowRankLinear.from_dense(make_linear(64, 64, False, gen_of(0)))
    assert layer.resolved_mode() == "dense"
    layer.set_factors(*lc.truncate(layer.U, layer.sigma.detach(), layer.V, 8))
    assert layer.resolved_mode() == "factorized"


def test_auto_rule_conv_uses_per_group_matrix():
    # groups=2, out 8 -> m = 4 per group, cols = 2 * 3 = 6: full rank 4: 4 * 14 = 56 > 24 -> dense
    conv = nn.Conv1d(4, 8, 3, groups=2, dtype=F64)
    layer = LowRankConv1d.from_dense(conv)
    assert (layer.rows, layer.cols) == (4, 6)
    assert layer.resolved_mode() == "dense"
    layer.set_factors(*lc.truncate(layer.U, layer.sigma.detach(), layer.V, 1))
    assert layer.resolved_mode() == "factorized"  # 1 * 11 < 24


def test_flops_hand_computed():
    lin = LowRankLinear.from_dense(make_linear(10, 6, True, gen_of(0)), rank=2)
    # T = 3 <= min(m, n): three matmuls 3 * 2 * (10 + 6 + 2) = 108; dense 3*60 + 10*2*(2+6) = 340
    assert lin.flops(3) == {"factorized": 108, "dense": 340}
    # T = 100: merge Sigma into the smaller side (n = 6): 100 * 2 * 16 + 4 * 6 = 3224
    assert lin.flops(100) == {"factorized": 3224, "dense": 6000 + 160}
    conv = LowRankConv2d.from_dense(nn.Conv2d(4, 6, 3, groups=2, dtype=F64), rank=2)
    # per group m = 3, cols = 2 * 9 = 18, g = 2: factorized 2 * (T * 2 * 21 + 3 * 4)
    assert conv.flops(5) == {
        "factorized": 2 * (5 * 2 * 21 + 12),
        "dense": 2 * (5 * 3 * 18 + 3 * 2 * (2 + 18)),
    }
    with pytest.raises(ValueError, match="tokens"):
        lin.flops(-1)


# --------------------------------------------------------------------------------------------------
# to_dense round trip, state_dict, repr
# --------------------------------------------------------------------------------------------------
@given(case=conv_cases(), seed=seeds)
def test_conv_round_trip(case, seed):
    gen = gen_of(seed)
    conv, x = make_conv(case, gen)
    back = CONV[case["nd"]][1].from_dense(conv).to_dense()
    assert type(back) is type(conv)
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation"):
        assert getattr(back, attr) == getattr(conv, attr), attr
    assert back.groups == conv.groups
    assert (back.bias is None) == (conv.bias is None)
    assert back.weight.dtype == F64
    assert back.weight.requires_grad
    close(back.weight, conv.weight)
    close(back(x), conv(x))


def test_linear_round_trip_and_state_dict():
    gen = gen_of(2)
    lin = make_linear(7, 5, True, gen)
    layer = LowRankLinear.from_dense(lin)
    back = layer.to_dense()
    assert type(back) is nn.Linear
    assert (back.in_features, back.out_features) == (5, 7)
    close(back.weight, lin.weight)
    close(back.bias, lin.bias)
    sd = layer.state_dict()
    assert set(sd) == {"U", "V", "sigma", "bias"}
    other = LowRankLinear.from_dense(make_linear(7, 5, True, gen))
    other.load_state_dict(sd)
    x = randn(3, 5, gen=gen)
    close(other(x), lin(x))
    # bias-free layer round trip
    nb = LowRankLinear.from_dense(make_linear(3, 4, False, gen)).to_dense()
    assert nb.bias is None


def test_extra_repr_and_properties():
    layer = LowRankConv2d.from_dense(nn.Conv2d(4, 6, 3, groups=2, padding="same"), rank=2)
    text = repr(layer)
    assert "rank=2/3" in text
    assert "groups=2" in text
    assert "padding=same" in text
    lin = LowRankLinear.from_dense(nn.Linear(5, 3))
    assert (lin.in_features, lin.out_features, lin.max_rank) == (5, 3, 3)
    assert "forward_mode='auto'" in repr(lin)
    assert lin.weight.dtype == torch.float32  # the dense layer's dtype is kept
    assert set(FORWARD_MODES) == {"auto", "factorized", "dense"}


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [0, -1, 6, True, 2.0])
def test_bad_rank_raises(rank):
    lin = nn.Linear(5, 8)  # k = 5
    with pytest.raises(lc.RankError):
        LowRankLinear.from_dense(lin, rank=rank)
    with pytest.raises(lc.RankError):
        LowRankConv1d.from_dense(nn.Conv1d(1, 5, 5), rank=rank)  # k = 5


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("mode", ["circular", "reflect", "replicate"])
def test_non_zero_padding_modes_exact(mode, nd):
    # every torch padding mode converts (issue 9 defect 6: circular used to fail at OIALR's switch)
    torch.manual_seed(11)
    conv = CONV[nd][0](2, 4, 3, padding=1, padding_mode=mode, stride=2).double()
    x = torch.randn(2, 2, *([6] * nd), dtype=torch.float64)
    want = conv(x)
    layer = CONV[nd][1].from_dense(conv)
    assert layer.padding_mode == mode and mode in repr(layer)
    for forward_mode in ("dense", "factorized"):
        layer.forward_mode = forward_mode
        torch.testing.assert_close(layer(x), want, rtol=1e-10, atol=1e-10)
    back = layer.to_dense()
    assert back.padding_mode == mode
    torch.testing.assert_close(back(x), want, rtol=1e-10, atol=1e-10)
    f = lc.factorize(lc.weight_to_matrix(conv.weight.detach()))
    with pytest.raises(ValueError, match="padding_mode"):
        CONV[nd][1](*f, in_channels=2, kernel_size=3, padding=1, padding_mode="mirror")


def test_wrong_module_type():
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        LowRankLinear.from_dense(nn.Conv1d(2, 2, 1))
    with pytest.raises(TypeError, match="Conv2d"):
        LowRankConv2d.from_dense(nn.Conv1d(2, 2, 1))
    with pytest.raises(TypeError, match="Conv3d"):
        LowRankConv3d.from_dense(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="MultiheadAttention"):
        low_rank_attention_(nn.Linear(2, 2))


def test_bad_forward_mode():
    lin = LowRankLinear.from_dense(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="forward_mode"):
        lin.forward_mode = "fast"
    assert lin.forward_mode == "auto"


# --------------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_attention_full_rank_matches(batch_first, bias):
    torch.manual_seed(0)
    E, L, S, B = 8, 5, 4, 3
    mha = nn.MultiheadAttention(E, 2, bias=bias, batch_first=batch_first, dtype=F64)
    ref = copy.deepcopy(mha)
    parts = low_rank_attention_(mha)
    assert set(parts) == {"out_proj", "parametrizations.in_proj_weight.0"}
    assert isinstance(mha.out_proj, LowRankLinear)
    assert mha.out_proj is parts["out_proj"]
    in_lr = parts["parametrizations.in_proj_weight.0"]
    assert isinstance(in_lr, LowRankWeight)
    assert mha.get_submodule("parametrizations.in_proj_weight.0") is in_lr
    assert tuple(in_lr.U.shape) == (3 * E, E)
    assert in_lr.rank == E
    close(mha.in_proj_weight, ref.in_proj_weight)
    gen = gen_of(5)
    shape_q = (B, L, E) if batch_first else (L, B, E)
    shape_k = (B, S, E) if batch_first else (S, B, E)
    q, k, v = randn(*shape_q, gen=gen), randn(*shape_k, gen=gen), randn(*shape_k, gen=gen)
    mask = torch.zeros(B, S, dtype=torch.bool)
    mask[0, -1] = True
    for kwargs in (
        dict(need_weights=True),
        dict(need_weights=False),
        dict(need_weights=True, average_attn_weights=False, key_padding_mask=mask),
    ):
        out, w = mha(q, k, v, **kwargs)
        out_ref, w_ref = ref(q, k, v, **kwargs)
        close(out, out_ref)
        if w_ref is None:
            assert w is None
        else:
            close(w, w_ref)
    # trainable: only the two sigmas and the biases
    names = {n for n, p in mha.named_parameters() if p.requires_grad}
    want = {"out_proj.sigma", "parametrizations.in_proj_weight.0.sigma"}
    if bias:
        want |= {"in_proj_bias", "out_proj.bias"}
    assert names == want
    out, _ = mha(q, k, v)
    out.sum().backward()
    assert in_lr.sigma.grad is not None
    assert mha.out_proj.sigma.grad is not None
    # the gradient of in_proj's Sigma is U^T (dL/dW) V
    ref(q, k, v)[0].sum().backward()
    close(in_lr.sigma.grad, in_lr.U.mT @ ref.in_proj_weight.grad @ in_lr.V)
    sd = mha.state_dict()
    assert {"out_proj.U", "out_proj.V", "out_proj.sigma"} <= set(sd)
    assert "parametrizations.in_proj_weight.0.sigma" in sd
    assert "parametrizations.in_proj_weight.0.U" in sd


def test_attention_low_rank_and_fast_path():
    torch.manual_seed(1)
    E = 8
    mha = nn.MultiheadAttention(E, 2, batch_first=True)
    dense_in = mha.in_proj_weight.detach().clone()
    parts = low_rank_attention_(mha, rank=3)
    assert all(p.rank == 3 for p in parts.values())
    f = lc.factorize(dense_in, 3)
    close(mha.in_proj_weight, lc.reconstruct(*f), atol=1e-5, rtol=1e-5)
    x = torch.randn(2, 4, E)
    slow = mha(x, x, x, need_weights=False)[0]
    mha.eval()
    with torch.no_grad():  # eval + no_grad + batch_first: torch may take its fused fast path
        fast = mha(x, x, x, need_weights=False)[0]
    close(fast, slow.detach(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="already"):
        low_rank_attention_(mha)
    with pytest.raises(lc.RankError):
        low_rank_attention_(nn.MultiheadAttention(4, 1), rank=5)


def test_attention_separate_kv_dims_swaps_only_out_proj():
    mha = nn.MultiheadAttention(8, 2, kdim=4, vdim=6, dtype=F64)
    ref = copy.deepcopy(mha)
    parts = low_rank_attention_(mha)
    assert set(parts) == {"out_proj"}
    gen = gen_of(0)
    q, k, v = randn(3, 2, 8, gen=gen), randn(5, 2, 4, gen=gen), randn(5, 2, 6, gen=gen)
    close(mha(q, k, v)[0], ref(q, k, v)[0])


def test_low_rank_layer_is_common_base():
    for layer in (
        LowRankLinear.from_dense(nn.Linear(3, 4)),
        LowRankConv1d.from_dense(nn.Conv1d(2, 3, 2)),
        LowRankConv3d.from_dense(nn.Conv3d(2, 3, 2)),
    ):
        assert isinstance(layer, LowRankLayer)
    w = LowRankWeight(*lc.factorize(torch.randn(6, 2)), weight_shape=(6, 2))
    with pytest.raises(ValueError, match="forward_mode"):
        w.forward_mode = "factorized"
