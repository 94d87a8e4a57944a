"""lowrank_torch.convert: to_low_rank eligibility, function preservation, trainable counts."""

from __future__ import annotations

import copy

import pytest

import lowrank_core as lc

torch = pytest.importorskip("torch")
nn = torch.nn

from lowrank_torch.convert import count_trainable, to_low_rank, trainable_share  # noqa: E402
from lowrank_torch.layers import (  # noqa: E402
    LowRankConv1d,
    LowRankLayer,
    LowRankLinear,
    LowRankWeight,
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
        (dict(exclude_names=("fc*",)), []),
        (dict(exclude_names=("fc?", "nothing")), []),
        (dict(exclude_names="fc0"), ["fc1", "fc3"]),
        (dict(include=(nn.Conv1d,)), []),
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


def test_cnn_unsupported_padding_mode_raises_and_leaves_model_untouched():
    model = cnn()
    model.insert(1, nn.Conv1d(8, 8, 3, padding=1, padding_mode="circular").to(F64))
    before = [type(m) for m in model]
    with pytest.raises(NotImplementedError, match="padding_mode"):
        to_low_rank(model)
    assert [type(m) for m in model] == before
    result = to_low_rank(model, exclude_names=("1",))
    assert "1" not in result
    assert type(model[1]) is nn.Conv1d


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
    with pytest.raises(TypeError, match="model itself"):
        to_low_rank(nn.Linear(4, 4), keep_last=False)
    model = mlp()
    assert to_low_rank(model, include=()) == {}
