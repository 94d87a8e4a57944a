"""LowRankLinear's cost model against the matmuls that actually run, and the training-aware auto rule."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from lowrank_torch.layers import LowRankLinear, LowRankTransformersConv1D  # noqa: E402

CASES = [  # (out, in, rank, tokens): tall, wide, square; thin (T <= min) and merged paths
    (48, 16, 5, 8), (48, 16, 12, 64), (16, 48, 7, 40), (16, 48, 16, 10), (24, 24, 24, 100),
    (24, 24, 3, 24),
]  # fmt: skip


def _counted(layer, x: torch.Tensor, mode: str, backward: bool) -> int:
    """Multiply-accumulates of the matmuls torch runs (FlopCounterMode counts 2 per MAC)."""
    layer.forward_mode = mode
    x = x.detach().requires_grad_(backward)
    with FlopCounterMode(display=False) as counter:
        y = layer(x)
        if backward:
            y.sum().backward()
    return counter.get_total_flops() // 2


@pytest.mark.parametrize(("m", "n", "r", "T"), CASES)
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
def test_flops_count_what_runs(m, n, r, T, backward):
    torch.manual_seed(0)
    layer = LowRankLinear.from_dense(nn.Linear(n, m).double(), r)
    x = torch.randn(T, n, dtype=torch.float64)
    cost = layer.flops(T, backward=backward)
    for mode in ("factorized", "dense"):
        assert _counted(layer, x, mode, backward) == cost[mode], mode


@pytest.mark.parametrize(("m", "n", "r", "T"), CASES)
def test_conv1d_flops_count_what_runs(m, n, r, T):
    """transformers' Conv1D layout (weight (in, out)): the same counts, forward and backward."""
    torch.manual_seed(0)
    lin = LowRankLinear.from_dense(nn.Linear(n, m).double(), r)
    # Conv1D with in = n, out = m from the same factors, transposed
    layer = LowRankTransformersConv1D(lin.V, lin.sigma.detach().mT, lin.U, lin.bias.detach())
    x = torch.randn(T, n, dtype=torch.float64)
    for backward in (False, True):
        cost = layer.flops(T, backward=backward)
        for mode in ("factorized", "dense"):
            assert _counted(layer, x, mode, backward) == cost[mode], (mode, backward)


def test_auto_counts_the_backward_when_training():
    """384 x 128 at rank 115, 1024 tokens: the forwards tie (dense a little cheaper), but the dense
    path's backward also forms dL/dW and projects it: training takes the factorized path."""
    torch.manual_seed(0)
    layer = LowRankLinear.from_dense(nn.Linear(128, 384), 115)
    T = 1024
    fwd, both = layer.flops(T), layer.flops(T, backward=True)
    assert fwd["dense"] < fwd["factorized"]
    assert both["factorized"] < both["dense"]
    assert layer.resolved_mode(T) == "dense"
    assert layer.resolved_mode(T, backward=True) == "factorized"
    x = torch.randn(T, 128)
    seen: list[str] = []
    fact, dense = layer._forward_factorized, layer._forward_dense

    def spy_fact(x):
        seen.append("factorized")
        return fact(x)

    def spy_dense(x):
        seen.append("dense")
        return dense(x)

    layer._forward_factorized, layer._forward_dense = spy_fact, spy_dense
    layer(x)  # grad enabled, sigma trainable: training
    with torch.no_grad():
        layer(x)  # inference: forward cost only
    layer.sigma.requires_grad_(False)
    layer(x)  # nothing to train
    assert seen == ["factorized", "dense", "dense"]
