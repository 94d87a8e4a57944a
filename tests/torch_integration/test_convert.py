"""lowrank_torch.convert: to_low_rank eligibility, function preservation, trainable counts."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest

import lowrank_core as lc

torch = pytest.importorskip("torch")
nn = torch.nn

from lowrank_torch.convert import (  # noqa: E402
    ConversionError,
    NoEligibleLayerWarning,
    UnsupportedLayerError,
    count_trainable,
    eligible_names,
    to_low_rank,
    trainable_share,
)
from lowrank_torch.init import low_rank_model  # noqa: E402
from lowrank_torch.layers import (  # noqa: E402
    LowRankConv1d,
    LowRankConv2d,
    LowRankLayer,
    LowRankLinear,
    LowRankTransformersConv1D,
    LowRankWeight,
    TransformersConv1D,
)

F64 = torch.float64


def close(actual, desired, atol=1e-10, rtol=1e-10):
    torch.testing.assert_close(actual, desired, atol=atol, rtol=rtol)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc0 = nn.Linear(10, 32)
        self.fc1 = nn.Linear(32, 32)
        self.thin = nn.Linear(32, 3)  # min 3 vs max 32 * 0.1 = 3.2: too thin
        self.fc3 = nn.Linear(3, 8)  # 3 > 0.8: fine
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.fc1(torch.relu(self.fc0(x))))
        return self.head(self.norm(self.fc3(self.thin(x))))


def mlp():
    torch.manual_seed(0)
    return MLP().to(F64)


def assert_same_model(model, ref):
    """Same module types at the same names and bit-equal tensors: nothing was changed."""
    assert [(n, type(m)) for n, m in model.named_modules()] == [
        (n, type(m)) for n, m in ref.named_modules()
    ]
    state, want = model.state_dict(), ref.state_dict()
    assert list(state) == list(want)
    for key, value in want.items():
        assert torch.equal(state[key], value), key


def converted_names(result):
    return sorted(result)


def check_result(model, result):
    for name, layer in result.items():
        assert isinstance(layer, LowRankLayer)
        assert model.get_submodule(name) is layer


# --------------------------------------------------------------------------------------------------
# eligibility
# --------------------------------------------------------------------------------------------------
def test_mlp_defaults():
    model = mlp()
    ref = copy.deepcopy(model)
    result = to_low_rank(model)
    check_result(model, result)
    assert converted_names(result) == ["fc0", "fc1", "fc3"]  # thin: aspect; head: keep_last
    assert type(model.thin) is nn.Linear
    assert type(model.head) is nn.Linear
    assert all(isinstance(model.get_submodule(n), LowRankLinear) for n in result)
    x = torch.randn(6, 10, dtype=F64)
    close(model(x), ref(x))
    for mode in ("factorized", "dense"):
        for layer in result.values():
            layer.forward_mode = mode
        close(model(x), ref(x))


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (dict(min_aspect=0.05), ["fc0", "fc1", "fc3", "thin"]),
        (dict(min_aspect=0.5), ["fc1"]),  # fc0: 10 <= 16; fc3: 3 <= 4
        (dict(min_aspect=0.3125), ["fc1", "fc3"]),  # fc0: 10 > 32 * 0.3125 = 10 fails (strict)
        (dict(keep_first=True), ["fc1", "fc3"]),
        (dict(keep_last=False), ["fc0", "fc1", "fc3", "head"]),
        (dict(keep_first=True, keep_last=False), ["fc1", "fc3", "head"]),
        (dict(exclude_names=("fc1",)), ["fc0", "fc3"]),
        (dict(exclude_names="fc0"), ["fc1", "fc3"]),
    ],
)
def test_mlp_options(kwargs, expected):
    model = mlp()
    ref = copy.deepcopy(model)
    result = to_low_rank(model, **kwargs)
    check_result(model, result)
    assert converted_names(result) == expected
    for name, module in model.named_children():
        assert isinstance(module, LowRankLayer) == (name in expected), name
    x = torch.randn(4, 10, dtype=F64)
    close(model(x), ref(x))


@pytest.mark.parametrize("kwargs", [dict(exclude_names=("fc*",)), dict(exclude_names=("fc?", "x"))])
def test_nothing_eligible_warns_naming_the_layer_types(kwargs):
    model = mlp()
    ref = copy.deepcopy(model)
    with pytest.warns(NoEligibleLayerWarning, match=r"no layer of MLP.*Linear x5.*LayerNorm"):
        assert to_low_rank(model, **kwargs) == {}
    with pytest.warns(NoEligibleLayerWarning, match="MLP"):
        assert eligible_names(model, **kwargs) == []
    assert_same_model(model, ref)


def test_nothing_eligible_with_an_explicit_include_is_an_error():
    model = mlp()
    ref = copy.deepcopy(model)
    with pytest.raises(ConversionError, match=r"no layer of MLP is eligible.*Linear x5") as info:
        to_low_rank(model, include=(nn.Conv1d,))
    assert isinstance(info.value, lc.LowRankError)
    assert_same_model(model, ref)


def test_no_warning_once_the_model_is_low_rank():
    model = mlp()
    to_low_rank(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert eligible_names(model) == []


def test_keep_first_last_refer_to_the_network_not_the_survivors():
    # the head excluded by name does not make fc3 "the last layer"
    model = mlp()
    result = to_low_rank(model, exclude_names=("head",))
    assert converted_names(result) == ["fc0", "fc1", "fc3"]


def test_rank_is_applied_and_clipped():
    model = mlp()
    result = to_low_rank(model, rank=4, keep_last=False, min_aspect=0.0)
    ranks = {n: layer.rank for n, layer in result.items()}
    assert ranks == {"fc0": 4, "fc1": 4, "thin": 3, "fc3": 3, "head": 4}
    model = mlp()
    result = to_low_rank(model, rank=1000)  # above every layer's min(m, n): full rank
    assert {n: layer.rank for n, layer in result.items()} == {"fc0": 10, "fc1": 32, "fc3": 3}


def test_already_converted_layers_are_skipped():
    model = mlp()
    first = to_low_rank(model)
    again = to_low_rank(model, keep_last=False)
    assert converted_names(again) == ["head"]  # fc0/fc1/fc3 are already low rank, thin too thin
    assert model.fc0 is first["fc0"]


# --------------------------------------------------------------------------------------------------
# a 1-D CNN
# --------------------------------------------------------------------------------------------------
def cnn():
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv1d(3, 8, 5, padding=2),
        nn.ReLU(),
        nn.Conv1d(8, 8, 3, stride=2, groups=2),
        nn.ReLU(),
        nn.Conv1d(8, 6, 3, padding="same", dilation=2, bias=False),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    ).to(F64)


def test_cnn():
    model = cnn()
    ref = copy.deepcopy(model)
    result = to_low_rank(model)
    check_result(model, result)
    assert converted_names(result) == ["0", "2", "4"]
    assert all(isinstance(layer, LowRankConv1d) for layer in result.values())
    assert result["2"].groups == 2
    assert tuple(result["2"].sigma.shape) == (2, 4, 4)
    assert type(model[7]) is nn.Linear
    x = torch.randn(2, 3, 20, dtype=F64)
    close(model(x), ref(x))
    for layer in result.values():
        layer.forward_mode = "factorized"
    close(model(x), ref(x))
    # keep_last with a conv head: only convolutions included, so the last conv stays dense
    model = cnn()
    result = to_low_rank(model, include=(nn.Conv1d,))
    assert converted_names(result) == ["0", "2"]


@pytest.mark.parametrize("mode", ["circular", "reflect", "replicate"])
@pytest.mark.parametrize("padding", [1, "same", (2, 1)])
def test_every_padding_mode_is_converted_and_exact(mode, padding):
    # issue 9 defect 6: a circular-padded conv used to count as eligible and fail at the switch
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=padding, padding_mode=mode),
        nn.ReLU(),
        nn.Conv2d(8, 6, (3, 2), padding=padding, padding_mode=mode, dilation=(1, 2)),
        nn.Flatten(),
        nn.LazyLinear(4),
    ).to(F64)
    x = torch.randn(2, 3, 7, 9, dtype=F64)
    model(x)  # initializes the lazy head
    ref = copy.deepcopy(model)
    result = to_low_rank(model, rank=None)
    assert converted_names(result) == ["0", "2"]
    for layer in result.values():
        assert isinstance(layer, LowRankConv2d) and layer.padding_mode == mode
    for forward_mode in ("dense", "factorized"):
        for layer in result.values():
            layer.forward_mode = forward_mode
        close(model(x), ref(x))


# --------------------------------------------------------------------------------------------------
# a tiny transformer
# --------------------------------------------------------------------------------------------------
class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.block = nn.TransformerEncoderLayer(
            d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.block(self.embed(x)))


def test_tiny_transformer():
    torch.manual_seed(2)
    model = TinyTransformer().to(F64)
    ref = copy.deepcopy(model)
    dense_count = count_trainable(model)
    result = to_low_rank(model)
    check_result(model, result)
    assert converted_names(result) == [
        "block.linear1",
        "block.linear2",
        "block.self_attn.out_proj",
        "block.self_attn.parametrizations.in_proj_weight.0",
        "embed",
    ]
    assert isinstance(result["block.self_attn.parametrizations.in_proj_weight.0"], LowRankWeight)
    assert type(model.head) is nn.Linear
    x = torch.randn(2, 5, 6, dtype=F64)
    close(model(x), ref(x))
    for layer in result.values():
        if not isinstance(layer, LowRankWeight):
            layer.forward_mode = "factorized"
    close(model(x), ref(x))
    # full rank: every sigma is (r, r) with r = min(m, n); the share is hand-countable
    E, FF = 16, 32
    sigmas = 6**2 + E**2 + E**2 + E**2 + E**2  # embed, in_proj (48x16), out_proj, linear1, linear2
    biases = E + 3 * E + E + FF + E  # embed, in_proj, out_proj, linear1, linear2
    norms = 2 * (2 * E)
    head = E * 3 + 3
    assert count_trainable(model) == sigmas + biases + norms + head
    assert trainable_share(model, dense_count) == pytest.approx(
        (sigmas + biases + norms + head) / dense_count
    )
    # gradients reach only sigmas, biases, norms and the dense head
    model(x).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert name.endswith(("sigma", "bias", "weight")), name
        if name.endswith("weight"):
            assert name.startswith(("block.norm", "head")), name
    for name, b in model.named_buffers():
        assert not b.requires_grad, name
    # eval (torch may use its fused encoder fast path, which reads .weight / in_proj_weight)
    model.eval()
    ref.eval()
    with torch.no_grad():
        close(model(x), ref(x))
    model32 = TinyTransformer().eval()
    ref32 = copy.deepcopy(model32)
    to_low_rank(model32)
    x32 = torch.randn(2, 5, 6)
    with torch.no_grad():
        close(model32(x32), ref32(x32), atol=1e-4, rtol=1e-4)


def test_attention_excluded_keeps_out_proj_dense():
    torch.manual_seed(3)
    model = TinyTransformer().to(F64)
    result = to_low_rank(model, include=(nn.Linear,))
    # out_proj is an nn.Linear subclass but belongs to the attention, which was not included
    assert converted_names(result) == ["block.linear1", "block.linear2", "embed"]
    assert not isinstance(model.block.self_attn.out_proj, LowRankLayer)
    result = to_low_rank(TinyTransformer(), exclude_names=("block.self_attn",))
    assert not any(n.startswith("block.self_attn") for n in result)


# --------------------------------------------------------------------------------------------------
# counts, errors
# --------------------------------------------------------------------------------------------------
def test_trainable_share_hand_computed():
    model = nn.Sequential(
        nn.Linear(10, 8),  # 88
        nn.Linear(8, 8),  # 72
        nn.LayerNorm(8),  # 16
        nn.Conv2d(4, 4, 3, groups=2),  # 4 * 2 * 9 + 4 = 76
        nn.Linear(8, 2),  # 18
    )
    model[2].bias.requires_grad_(False)  # frozen parameters do not count: 8 trainable
    dense = count_trainable(model)
    assert dense == 88 + 72 + 8 + 76 + 18
    result = to_low_rank(model, rank=3)
    assert converted_names(result) == ["0", "1", "3"]
    # Linear rank 3: 9 + 8 bias; conv (g=2, m=2, cols=18): rank min(3, 2) = 2: 2 * 4 + 4 bias
    expected = (9 + 8) + (9 + 8) + 8 + (2 * 4 + 4) + 18
    assert count_trainable(model) == expected
    assert trainable_share(model, dense) == expected / dense
    for bad in (0, -3, True, 1.5):
        with pytest.raises(ValueError, match="dense_count"):
            trainable_share(model, bad)


def test_shared_parameter_counted_once():
    lin = nn.Linear(3, 3)
    model = nn.Sequential(lin, lin)
    assert count_trainable(model) == 12


def test_errors():
    with pytest.raises(TypeError, match="Embedding"):
        to_low_rank(mlp(), include=(nn.Linear, nn.Embedding))
    with pytest.raises(TypeError, match="ConvTranspose1d"):
        to_low_rank(mlp(), include=(nn.ConvTranspose1d,))
    for bad in (0, -2, True, 2.5):
        with pytest.raises(lc.RankError):
            to_low_rank(mlp(), rank=bad)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        to_low_rank(torch.zeros(3))
    with pytest.raises(ValueError, match="min_aspect"):
        to_low_rank(mlp(), min_aspect=2.0)
    with pytest.raises(ConversionError, match="model itself"):
        to_low_rank(nn.Linear(4, 4), keep_last=False)
    model = mlp()
    with pytest.raises(ConversionError, match="no layer of MLP"):
        to_low_rank(model, include=())
    with pytest.raises(ConversionError, match=r"'norm': not a candidate"):
        to_low_rank(model, names=["norm"])
    with pytest.raises(ConversionError, match=r"'thin': too thin"):
        to_low_rank(model, names=["fc0", "thin"])
    assert not any(isinstance(m, LowRankLayer) for m in model.modules())


# --------------------------------------------------------------------------------------------------
# transformers' Conv1D (a fake with the same name and module: transformers is not needed here)
# --------------------------------------------------------------------------------------------------
class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D's behaviour: ``x @ weight + bias``, weight ``(nx, nf)``."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = (*x.shape[:-1], self.nf)
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(size_out)


Conv1D.__module__ = "transformers.pytorch_utils"


class NotHFConv1D(Conv1D):
    pass


NotHFConv1D.__name__ = "Other"
NotHFConv1D.__module__ = "elsewhere"


def test_transformers_conv1d_is_recognised_without_transformers():
    assert isinstance(Conv1D(4, 3), TransformersConv1D)
    assert issubclass(Conv1D, TransformersConv1D)
    assert isinstance(NotHFConv1D(4, 3), TransformersConv1D)  # a subclass of the real one
    fake = type("Conv1D", (nn.Module,), {})  # right name, wrong package
    assert not isinstance(fake(), TransformersConv1D)
    assert not isinstance(nn.Linear(2, 2), TransformersConv1D)


@pytest.mark.parametrize(("nx", "nf"), [(16, 48), (48, 16), (12, 12)])
def test_conv1d_converted_exact_and_transposed(nx, nf):
    torch.manual_seed(5)
    model = nn.Sequential(Conv1D(nf, nx), nn.GELU(), nn.Linear(nf, 3)).to(F64)
    ref = copy.deepcopy(model)
    result = to_low_rank(model)
    assert converted_names(result) == ["0"]
    layer = result["0"]
    assert isinstance(layer, LowRankTransformersConv1D)
    # the matrix view is the (in, out) weight itself: U (in, r), V (out, r)
    assert (layer.nx, layer.nf) == (nx, nf) == (layer.in_features, layer.out_features)
    assert tuple(layer.U.shape) == (nx, min(nx, nf)) and tuple(layer.V.shape) == (nf, min(nx, nf))
    close(layer.weight, ref[0].weight)
    for tokens in (1, 5, 40):  # the three association orders of the factorized path
        x = torch.randn(tokens, 2, nx, dtype=F64)
        for mode in ("factorized", "dense", "auto"):
            layer.forward_mode = mode
            close(model(x), ref(x))


def test_conv1d_auto_rule_is_linears():
    torch.manual_seed(6)
    conv = Conv1D(64, 32).to(F64)
    lin = nn.Linear(32, 64).to(F64)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.T)
        lin.bias.copy_(conv.bias)
    a = LowRankTransformersConv1D.from_dense(conv, 4)
    b = LowRankLinear.from_dense(lin, 4)
    for tokens in (1, 8, 64, 1000):
        # same factorized cost; dense: the product plus rebuilding the (in, out) weight as (U S) V^T
        assert a.flops(tokens)["factorized"] == b.flops(tokens)["factorized"]
        assert a.flops(tokens)["dense"] == tokens * 32 * 64 + 32 * 4 * (4 + 64)
        assert a.resolved_mode(tokens) == b.resolved_mode(tokens)
    assert a.resolved_mode(1000) == "factorized"
    full = LowRankTransformersConv1D.from_dense(conv)
    assert full.resolved_mode(1000) == "dense"  # full rank: factorized is dearer
    x = torch.randn(7, 32, dtype=F64)
    close(a(x), b(x))


def test_conv1d_min_aspect_applies():
    model = nn.Sequential(Conv1D(3, 40), nn.Linear(3, 3))  # 40 x 3: thin
    with pytest.warns(NoEligibleLayerWarning, match="Conv1D"):
        assert eligible_names(model) == []
    assert eligible_names(model, min_aspect=0.05) == ["0"]


# --------------------------------------------------------------------------------------------------
# tied and shared weights, modules used twice
# --------------------------------------------------------------------------------------------------
class TiedLM(nn.Module):
    def __init__(self, vocab=20, dim=8):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.body = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.body(self.wte(ids))))


def test_tied_head_stays_dense_and_named_request_is_refused():
    torch.manual_seed(7)
    model = TiedLM().to(F64)
    ref = copy.deepcopy(model)
    assert eligible_names(model, keep_last=False) == ["body"]
    with pytest.raises(ConversionError, match=r"'lm_head'.*shared with wte\.weight") as info:
        to_low_rank(model, keep_last=False, names=["body", "lm_head"])
    assert isinstance(info.value, lc.LowRankError)
    assert_same_model(model, ref)  # refused before anything changed (body too)
    assert model.lm_head.weight is model.wte.weight
    result = to_low_rank(model, keep_last=False)
    assert converted_names(result) == ["body"]
    assert model.lm_head.weight is model.wte.weight


def test_parameter_shared_by_two_linears_stays_dense():
    a, b = nn.Linear(6, 6), nn.Linear(6, 6)
    b.weight = a.weight
    model = nn.Sequential(a, nn.ReLU(), b, nn.Linear(6, 6), nn.Linear(6, 2))
    assert eligible_names(model) == ["3"]
    with pytest.raises(ConversionError, match=r"'0'.*shared with 2\.weight"):
        to_low_rank(model, names=["0"])


def test_module_used_twice_is_converted_once_at_every_place():
    torch.manual_seed(8)
    shared = nn.Linear(6, 6)
    model = nn.Sequential(nn.Linear(4, 6), shared, nn.ReLU(), shared, nn.Linear(6, 2)).to(F64)
    ref = copy.deepcopy(model)
    assert eligible_names(model) == ["0", "1"]
    result = to_low_rank(model, rank=3)
    assert converted_names(result) == ["0", "1"]
    assert model[1] is model[3] is result["1"]
    assert sum(1 for p in model.parameters() if p is result["1"].sigma) == 1
    full = copy.deepcopy(ref)
    to_low_rank(full)
    x = torch.randn(3, 4, dtype=F64)
    close(full(x), ref(x))


def test_module_used_inside_an_attention_and_elsewhere_stays_dense():
    mha = nn.MultiheadAttention(8, 2)
    model = nn.ModuleDict({"attn": mha, "proj": mha.out_proj, "head": nn.Linear(8, 2)})
    with pytest.warns(NoEligibleLayerWarning):
        assert eligible_names(model, include=(nn.Linear,)) == []
    with pytest.warns(NoEligibleLayerWarning):  # the attention's out_proj is also "proj"
        assert eligible_names(model) == []


# --------------------------------------------------------------------------------------------------
# rank-one (depthwise) layers, RNNs, parametrized and lazy layers
# --------------------------------------------------------------------------------------------------
def depthwise_net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise: eight 1 x 9 matrices
        nn.Conv2d(8, 16, 3, padding=1, groups=4),  # grouped, 4 x 18 per group: fine
        nn.Conv2d(16, 4, 1),
        nn.Flatten(),
        nn.Linear(4 * 25, 2),
    )


def test_depthwise_not_eligible_by_default_opt_in():
    model = depthwise_net()
    assert eligible_names(model) == ["0", "2", "3"]
    with pytest.raises(ConversionError, match=r"'1'.*rank at most 1.*allow_rank_one"):
        to_low_rank(model, names=["1"])
    assert eligible_names(model, allow_rank_one=True) == ["0", "1", "2", "3"]
    torch.manual_seed(9)
    model = depthwise_net().to(F64)
    ref = copy.deepcopy(model)
    result = to_low_rank(model, allow_rank_one=True)
    assert result["1"].rank == 1 and result["1"].groups == 8
    x = torch.randn(2, 3, 5, 5, dtype=F64)
    close(model(x), ref(x))


@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU, nn.RNN])
def test_rnns_refused_by_rule_and_left_dense(rnn):
    with pytest.raises(UnsupportedLayerError, match=r"RNN weights.*refused by rule") as info:
        to_low_rank(nn.Sequential(rnn(4, 8)), include=(rnn,))
    assert isinstance(info.value, lc.LowRankError) and isinstance(info.value, TypeError)

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = rnn(4, 8, num_layers=2, batch_first=True)
            self.proj = nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(torch.relu(self.proj(self.rnn(x)[0])))

    model = Tagger()
    assert eligible_names(model) == ["proj"]


def test_parametrized_and_lazy_layers_are_not_candidates():
    model = nn.Sequential(
        nn.utils.parametrizations.weight_norm(nn.Linear(6, 6)),
        nn.LazyLinear(6),
        nn.Linear(6, 6),
        nn.Linear(6, 2),
    )
    assert eligible_names(model) == ["2"]
    with pytest.raises(ConversionError, match=r"'0'.*parametrization"):
        to_low_rank(model, names=["0"])
    with pytest.raises(ConversionError, match=r"'1'.*lazy module"):
        to_low_rank(model, names=["1"])


# --------------------------------------------------------------------------------------------------
# scaling (issue 9 defect 10): one pass over the modules per call
# --------------------------------------------------------------------------------------------------
def test_conversion_visits_each_module_a_bounded_number_of_times(monkeypatch):
    # counts, not timings: the old scan compared every module name with every converted prefix
    calls = {"n": 0}
    original = nn.Module.named_modules

    def counting(self, *args, **kwargs):
        for item in original(self, *args, **kwargs):
            calls["n"] += 1
            yield item

    def visits(layers):
        model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(layers)])
        names = eligible_names(model)
        calls["n"] = 0
        to_low_rank(model, names=names)
        return calls["n"]

    def switch_visits(layers):
        from lowrank_torch.oialr import OIALR, OIALRConfig

        model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(layers)])
        ctrl = OIALR(model, torch.optim.SGD(model.parameters(), lr=0.1), OIALRConfig(switch_step=1))
        calls["n"] = 0
        ctrl.step()  # switches every eligible layer
        assert len(ctrl.switched) == layers - 1
        return calls["n"]

    monkeypatch.setattr(nn.Module, "named_modules", counting)
    small, large = visits(50), visits(200)
    assert large <= 4.5 * small  # linear (x4 layers), with room for constant overhead
    small, large = switch_visits(50), switch_visits(200)
    assert large <= 4.5 * small  # OIALR's switch: one conversion pass, not one per layer


def test_oialr_keeps_every_use_of_shared_weights_trained():
    from lowrank_torch.oialr import OIALR, OIALRConfig

    torch.manual_seed(12)
    shared = nn.Linear(6, 6)
    a, b = nn.Linear(6, 6), nn.Linear(6, 6)
    b.weight = a.weight  # a Parameter shared by two modules: stays dense
    model = nn.Sequential(
        nn.Linear(4, 6), shared, nn.Tanh(), shared, a, nn.Tanh(), b, nn.Linear(6, 2)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ctrl = OIALR(model, opt, OIALRConfig(switch_step=1, update_every=1000))
    assert ctrl.eligible == ["0", "1"]
    x, y = torch.randn(16, 4), torch.randn(16, 2)

    def step():
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctrl.step()

    step()  # the switch
    assert model[1] is model[3] and isinstance(model[1], LowRankLinear)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in held for p in model.parameters() if p.requires_grad)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step()
    for n, p in model.named_parameters():
        assert not torch.equal(p, before[n]), n  # every parameter, shared ones included, moved


# --------------------------------------------------------------------------------------------------
# NumPy integer ranks; models on the meta device
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [2, np.int64(2), np.int32(2)], ids=["int", "np.int64", "np.int32"])
def test_rank_may_be_a_numpy_integer(rank):
    """Every int argument takes NumPy integer scalars (as LowRankLinear.from_dense always did)."""
    model = mlp()
    to_low_rank(model, rank=rank)
    ranks = {m.rank for m in model.modules() if isinstance(m, LowRankLayer)}
    assert ranks == {2}


def test_rank_zero_d_array_is_refused_like_everywhere():
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(lc.RankError, match="0-d"):
        to_low_rank(model, rank=np.array(2))
    assert not any(isinstance(m, LowRankLayer) for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def _meta_mlp():
    with torch.device("meta"):
        return nn.Sequential(
            nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)
        )


@pytest.mark.parametrize(
    "call",
    [
        lambda m: to_low_rank(m, rank=2),
        lambda m: low_rank_model(m, 0.5),
        lambda m: LowRankLinear.from_dense(m[2], rank=2),
    ],
    ids=["to_low_rank", "low_rank_model", "from_dense"],
)
def test_meta_models_are_refused_before_anything_changes(call):
    """A model built on torch's meta device (shapes only) cannot be factorized: a clear error naming
    the device, and the model is left as it was (no layer replaced)."""
    model = _meta_mlp()
    layers = list(model)
    with pytest.raises(lc.DeviceError, match="meta"):
        call(model)
    assert list(model) == layers
    assert not any(isinstance(m, LowRankLayer) for m in model.modules())


def _meta_tensor_calls():
    import lowrank_torch as lt
    import lowrank_torch.optim_state
    from lowrank_torch.cmd import CMDTracker
    from lowrank_torch.dldr import SnapshotRecorder

    def meta(*shape):
        return torch.zeros(*shape, dtype=F64, device="meta")

    return {
        "LowRankLinear(U)": lambda: LowRankLinear(
            meta(6, 2), torch.eye(2, dtype=F64), torch.ones(5, 2, dtype=F64)
        ),
        "LowRankLinear(bias)": lambda: LowRankLinear(
            torch.ones(6, 2, dtype=F64),
            torch.eye(2, dtype=F64),
            torch.ones(5, 2, dtype=F64),
            bias=meta(6),
        ),
        "init_low_rank_layer_": lambda: lt.init_low_rank_layer_(
            LowRankLinear.from_dense(nn.Linear(5, 6).to(F64), 2), meta(6, 5)
        ),
        "CMDTracker": lambda: CMDTracker(_meta_mlp()),
        "SnapshotRecorder": lambda: SnapshotRecorder(_meta_mlp()),
        "rotate_sigma_state": lambda: lt.optim_state.rotate_sigma_state(
            torch.optim.SGD([sigma := nn.Parameter(torch.eye(3, dtype=F64))], lr=0.1),
            sigma,
            meta(3, 3),
            torch.eye(3, dtype=F64),
        ),
    }


@pytest.mark.parametrize(
    "name",
    [
        "LowRankLinear(U)",
        "LowRankLinear(bias)",
        "init_low_rank_layer_",
        "CMDTracker",
        "SnapshotRecorder",
        "rotate_sigma_state",
    ],
)
def test_meta_tensors_of_the_integration_are_refused(name):
    """Tensors and models on the meta device get the core's DeviceError, naming the device."""
    with pytest.raises(lc.DeviceError, match="meta"):
        _meta_tensor_calls()[name]()
