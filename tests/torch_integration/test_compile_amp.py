"""OIALR under torch.compile and mixed precision (CPU): graph breaks, recompilations, autocast, GradScaler.

Compile tests count dynamo's frame compilations with ``torch._dynamo.testing.CompileCounter`` (a
backend that runs the captured graph as it is): whether a guard fails and a frame is recompiled is
decided by dynamo before any backend runs, so the counts are the ones inductor sees, at a fraction of
the cost. One test compiles with the default inductor backend itself (forward and backward).
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")

import torch._dynamo as dynamo  # noqa: E402
import torch._inductor.config as inductor_config  # noqa: E402
from torch import nn  # noqa: E402
from torch._dynamo.testing import CompileCounter  # noqa: E402

from lowrank_torch import LowRankLayer, to_low_rank  # noqa: E402
from lowrank_torch.amp import SkippedStepMonitor, full_precision  # noqa: E402
from lowrank_torch.oialr import OIALR, OIALRConfig  # noqa: E402


class DropOne:
    """Rank rule: one less than the current rank at every update (a shape change every time)."""

    def __call__(self, s: Any, *, shape: Any = None) -> int:
        return max(1, int(s.shape[-1]) - 1)


class Net(nn.Module):
    """Conv, attention and Linear layers (all eligible) and a dense head, on 4x4 images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).flatten(2).transpose(1, 2)  # (B, 16 tokens, 8)
        h = h + self.att(h, h, h, need_weights=False)[0]
        out: torch.Tensor = self.head(torch.relu(self.fc(h.mean(1))))
        return out


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 4, 4, generator=g), torch.randint(0, 4, (8,), generator=g)


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Any:
    dynamo.reset()
    yield
    dynamo.reset()


# ------------------------------------------------------------------------------------- compile
def test_converted_model_compiles_without_graph_breaks() -> None:
    torch.manual_seed(0)
    model = Net()
    to_low_rank(model, keep_last=False, rank=4)
    # both forward paths of each layer kind inside one graph
    modes = {"conv": "factorized", "fc": "factorized", "att.out_proj": "dense", "head": "dense"}
    for name, mode in modes.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, LowRankLayer)
        layer.forward_mode = mode
    x, _ = _data()
    explained = dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_rank_updates_cost_one_recompilation_each() -> None:
    """Warm-up, switch, three rank updates (every layer's shape changes at each): 5 compilations."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ctrl = OIALR(model, opt, OIALRConfig(switch_step=2, update_every=2, rule=DropOne()))
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    x, y = _data()
    frames: list[int] = []
    changed_layers = 0
    for _ in range(9):
        before = ctrl.ranks()
        loss = nn.functional.cross_entropy(compiled(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ctrl.step()
        frames.append(counter.frame_count)
        if before:
            changed_layers += sum(before[k] != v for k, v in ctrl.ranks().items())
    updates = [e for e in ctrl.events("rank") if e["new"] < e["old"]]
    assert len({e["step"] for e in updates}) == 3  # three rank updates, each shrinking every layer
    assert changed_layers == 3 * len(ctrl.layers)
    # one compilation for the dense model, one after the switch, one after each of the 3 updates:
    # a rank update recompiles the graph once, however many layers changed shape (<= 1 per layer)
    assert frames[-1] == 1 + 1 + 3
    assert frames == [1, 1, 2, 2, 3, 3, 4, 4, 5]
    assert counter.frame_count <= 2 + changed_layers


def test_inductor_forward_backward_matches_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = Net()
    to_low_rank(model, keep_last=False, rank=4)
    x, y = _data()
    grads_eager = torch.autograd.grad(
        nn.functional.cross_entropy(model(x), y), list(model.parameters())
    )
    dynamo.utils.counters.clear()
    # no pool of compile workers to start on a 2-core CI machine
    monkeypatch.setattr(inductor_config, "compile_threads", 1)
    compiled = torch.compile(model)  # the default backend: inductor
    loss = nn.functional.cross_entropy(compiled(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert not dynamo.utils.counters["graph_break"]
    # float32, a few hundred MACs per entry, differently fused: 1e-4 relative is ample
    for g, e in zip(grads, grads_eager, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------- autocast
def _orthonormality_error(layer: LowRankLayer) -> float:
    U = layer.U.double()
    return float((U.mT @ U - torch.eye(U.shape[-1], dtype=torch.float64)).abs().max())


def test_switch_and_rank_update_inside_bfloat16_autocast_run_in_float32() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ctrl = OIALR(model, opt, OIALRConfig(switch_step=1, update_every=2, rule=DropOne()))
    x = torch.randn(16, 32)
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ctrl.step()  # called inside the autocast region on purpose
    assert [e["new"] for e in ctrl.events("rank")] == [31, 31]
    for layer in ctrl.layers.values():
        assert layer.U.dtype == layer.sigma.dtype == torch.float32
        # bfloat16 products would leave errors ~1e-2; float32 SVD / rotation stays ~1e-6
        assert _orthonormality_error(layer) < 1e-5


def test_full_precision_turns_autocast_off_and_back_on() -> None:
    a = torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with full_precision(nn.Linear(2, 2)):
            assert (a @ a).dtype == torch.float32
        assert (a @ a).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parameters_switch_and_update(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 24), nn.Linear(24, 4)).to(dtype)
    dense = model[0].weight.detach().float().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ctrl = OIALR(model, opt, OIALRConfig(switch_step=1, update_every=1, rule=DropOne()))
    ctrl.step()  # switch at full rank
    layer = ctrl.layers["0"]
    assert layer.sigma.dtype == layer.U.dtype == dtype
    # the SVD ran in float32; what is left is the rounding of the factors to the half type
    eps = torch.finfo(dtype).eps
    err = float((layer.weight.detach().float() - dense).norm() / dense.norm())
    assert err < 8 * eps
    x = torch.randn(8, 24).to(dtype)
    model(x).float().pow(2).mean().backward()
    opt.step()
    ctrl.step()  # rank update
    assert layer.rank == 23 and layer.sigma.dtype == dtype
    assert torch.isfinite(layer.U.float()).all() and torch.isfinite(layer.sigma.float()).all()


# ------------------------------------------------------------------------------------- GradScaler
def test_float16_autocast_with_grad_scaler_skips_overflowed_steps() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ctrl = OIALR(model, opt, OIALRConfig(switch_step=3, update_every=2, rule=DropOne()))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    monitor = SkippedStepMonitor(scaler)
    x, target = torch.randn(8, 16), torch.randn(8, 4)
    overflow_at = {2, 5}  # optimizer steps whose gradients are poisoned with inf
    calls, weights_moved = 0, []
    for i in range(8):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.mse_loss(model(x).float(), target)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if i in overflow_at:
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float(
                "inf"
            )
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        weights_moved.append(
            any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
        )
        if not monitor.step_skipped():
            ctrl.step()
            calls += 1
    assert [not moved for moved in weights_moved] == [i in overflow_at for i in range(8)]
    assert monitor.skipped == 2
    assert ctrl.step_count == calls == 6  # only applied steps count
    # the switch came at the 3rd applied step (optimizer step 3, as step 2 was skipped)
    switch_steps = {e["step"] for e in ctrl.events("switch")}
    assert switch_steps == {3}
    # rank updates at applied steps 4 and 6, none from the skipped optimizer step 5
    assert sorted({e["step"] for e in ctrl.events("rank")}) == [4, 6]
    for layer in ctrl.layers.values():
        assert layer.sigma.dtype == torch.float32
        assert torch.isfinite(layer.sigma).all()


def test_disabled_or_missing_scaler_never_skips() -> None:
    assert not SkippedStepMonitor(None).step_skipped()
    off = torch.amp.GradScaler("cpu", enabled=False)
    assert not SkippedStepMonitor(off).step_skipped()


# ------------------------------------------------------------------------------------- accumulation
def test_gradient_accumulation_and_set_to_none_across_the_switch() -> None:
    """Two micro-batches per step; the switch at step 2; zero_grad(set_to_none=True) every step.

    After the switch the accumulated gradient of sigma over the two halves equals the gradient of
    the whole batch (sums of the same terms in another order: float32 tolerance), and sigma trains.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 12), nn.Linear(12, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ctrl = OIALR(model, opt, OIALRConfig(switch_step=2, update_every=100))
    x, y = torch.randn(16, 12), torch.randn(16, 3)
    halves = [(x[:8], y[:8]), (x[8:], y[8:])]
    sigma_values = []
    for step in range(4):
        opt.zero_grad(set_to_none=True)
        for xb, yb in halves:
            (nn.functional.mse_loss(model(xb), yb) / 2).backward()
        if step >= 2:  # after the switch: compare with the whole batch's gradient
            layer = ctrl.layers["0"]
            (whole,) = torch.autograd.grad(nn.functional.mse_loss(model(x), y), [layer.sigma])
            torch.testing.assert_close(layer.sigma.grad, whole, rtol=1e-5, atol=1e-7)
            sigma_values.append(layer.sigma.detach().clone())
        opt.step()
        ctrl.step()
    assert set(ctrl.switched) == {"0", "2"}
    layer = ctrl.layers["0"]
    assert not torch.equal(sigma_values[0], layer.sigma.detach())  # sigma keeps training
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(layer.sigma) in in_opt
    assert all(p.grad is None or p.requires_grad for p in model.parameters())


def test_set_to_none_rank_update_replaces_sigma_without_stale_gradient() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ctrl = OIALR(model, opt, OIALRConfig(switch_step=1, update_every=1, rule=DropOne()))
    x = torch.randn(6, 10)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        model(x).pow(2).mean().backward()
        opt.step()
        ctrl.step()
        layer = ctrl.layers["0"]
        # a new (smaller) sigma has no gradient yet; its Adam state was truncated to its shape
        assert layer.sigma.grad is None
        state = opt.state[layer.sigma]
        assert state["exp_avg"].shape == layer.sigma.shape
    assert ctrl.layers["0"].rank == 8
