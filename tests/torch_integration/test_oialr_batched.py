"""OIALR's stability checks decompose all same-shape weights in one batched call, same values."""

from __future__ import annotations

import pytest

import lowrank_core as lc

torch = pytest.importorskip("torch")
nn = torch.nn

import lowrank_torch.oialr as oialr_mod  # noqa: E402
from lowrank_torch.oialr import OIALR, OIALRConfig  # noqa: E402


class _Spy:
    """A backend that counts SVD calls and delegates to the torch backend."""

    name = "spy"

    def __init__(self, inner) -> None:
        self.inner = inner
        self.shapes: list[tuple[int, ...]] = []

    def svd(self, a):
        self.shapes.append(tuple(a.shape))
        return self.inner.svd(a)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # four 24x24 Linears, one 24x16, one 16x24, one MultiheadAttention (packed 72x24 + 24x24 out_proj);
    # the last Linear (the head) is kept dense by default
    return nn.ModuleDict(
        {
            "a": nn.Linear(24, 24), "b": nn.Linear(24, 24), "c": nn.Linear(24, 24),
            "d": nn.Linear(24, 24), "e": nn.Linear(24, 16), "f": nn.Linear(16, 24),
            "att": nn.MultiheadAttention(24, 4), "head": nn.Linear(24, 3),
        }
    ).double()  # fmt: skip


def _perturb(model: nn.Module, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _expected(model: nn.Module, before: dict[str, list[torch.Tensor]], name: str) -> float:
    """The per-layer value computed one matrix at a time with lc.basis_stability."""
    mats = oialr_mod._weight_matrices(model.get_submodule(name))
    vals = [
        float(torch.mean(lc.basis_stability(p, q))) for p, q in zip(before[name], mats, strict=True)
    ]
    return sum(vals) / len(vals)


@pytest.fixture(params=[True, False], ids=["batched", "looped"])
def batch_on_cpu(request, monkeypatch):
    """Both ways of the check on the CPU: batched by shape (what accelerators do) and per matrix."""
    monkeypatch.setattr(oialr_mod, "_BATCH_ON_CPU", request.param)
    return request.param


@pytest.mark.parametrize("scale", [0.0, 1e-3, 0.3])
def test_batched_check_gives_the_per_layer_values(scale, batch_on_cpu):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ctrl = OIALR(model, opt, OIALRConfig(switch_step=None, stability_threshold=0.99))
    assert ctrl.pending == ["a", "b", "c", "d", "e", "f", "att"]
    before = {n: [m.clone() for m in oialr_mod._weight_matrices(model.get_submodule(n))]
              for n in ctrl.pending}  # fmt: skip
    assert ctrl._check_stability(1) == []  # the first check only takes snapshots
    _perturb(model, scale, seed=1)
    ready = ctrl._check_stability(2)
    got = {e["layer"]: e["value"] for e in ctrl.events("stability")}
    assert list(got) == ["a", "b", "c", "d", "e", "f", "att"]
    for name, value in got.items():
        # float64; the batched and the single SVD differ only by rounding
        assert value == pytest.approx(_expected(model, before, name), abs=1e-10), name
    assert ready == [n for n, v in got.items() if v >= 0.99]
    if scale == 0.0:
        assert ready == list(got)
    # the snapshots are this check's polar factors, one per matrix, of the matrix's shape
    for name in got:
        mats = oialr_mod._weight_matrices(model.get_submodule(name))
        snaps = ctrl.warmup[name]
        assert [tuple(s.shape) for s in snaps] == [tuple(m.shape) for m in mats]
        for s, m in zip(snaps, mats, strict=True):
            torch.testing.assert_close(s, lc.orthogonal_factor(m), rtol=0, atol=1e-10)


def test_one_svd_call_per_shape(monkeypatch):
    monkeypatch.setattr(oialr_mod, "_BATCH_ON_CPU", True)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ctrl = OIALR(model, opt, OIALRConfig(switch_step=None, stability_threshold=0.99))
    x = torch.zeros(2, 2, dtype=torch.float64)
    spy = _Spy(lc.get_backend(x))
    lc.register_backend("torch", spy)
    try:
        ctrl._check_stability(1)
    finally:
        lc.register_backend("torch", None)
    # shapes: 24x24 (a, b, c, d, att.out_proj), 24x16, 16x24 (transposed: 24x16), 72x24
    assert sorted(spy.shapes) == sorted([(5, 24, 24), (1, 24, 16), (1, 24, 16), (1, 72, 24)])


def test_cpu_default_is_one_call_per_matrix():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ctrl = OIALR(model, opt, OIALRConfig(switch_step=None, stability_threshold=0.99))
    spy = _Spy(lc.get_backend(torch.zeros(2, 2)))
    lc.register_backend("torch", spy)
    try:
        ctrl._check_stability(1)
    finally:
        lc.register_backend("torch", None)
    assert len(spy.shapes) == 8 and all(s[0] == 1 for s in spy.shapes)


def test_chunks_bound_the_stacked_entries(monkeypatch):
    monkeypatch.setattr(oialr_mod, "_BATCH_ON_CPU", True)
    monkeypatch.setattr(oialr_mod, "_BATCH_ELEMENTS", 2 * 24 * 24)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ctrl = OIALR(model, opt, OIALRConfig(switch_step=None, stability_threshold=0.99))
    ctrl._check_stability(1)
    _perturb(model, 1e-2, seed=2)
    before = {n: list(s) for n, s in ctrl.warmup.items()}
    ctrl._check_stability(2)
    for e in ctrl.events("stability"):
        mats = oialr_mod._weight_matrices(model.get_submodule(e["layer"]))
        vals = [float(torch.mean(lc.polar_stability(p, lc.orthogonal_factor(q))))
                for p, q in zip(before[e["layer"]], mats, strict=True)]  # fmt: skip
        assert e["value"] == pytest.approx(sum(vals) / len(vals), abs=1e-10)


def test_a_layer_without_a_snapshot_in_a_batch_gets_one(batch_on_cpu):
    """A restored controller can hold snapshots for some layers of a shape and not for others."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ctrl = OIALR(model, opt, OIALRConfig(switch_step=None, stability_threshold=0.99))
    ctrl._check_stability(1)
    del ctrl.warmup["b"], ctrl.warmup["att"]
    ctrl._check_stability(2)
    layers = [e["layer"] for e in ctrl.events("stability")]
    assert layers == ["a", "c", "d", "e", "f"]
    assert set(ctrl.warmup) == {"a", "b", "c", "d", "e", "f", "att"}


def test_a_nan_in_a_batch_names_its_layer_and_changes_nothing(monkeypatch):
    monkeypatch.setattr(oialr_mod, "_BATCH_ON_CPU", True)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ctrl = OIALR(
        model, opt, OIALRConfig(switch_step=None, stability_threshold=0.99, stability_every=1)
    )
    ctrl.step()
    snaps = {n: [s.clone() for s in v] for n, v in ctrl.warmup.items()}
    with torch.no_grad():
        model["c"].weight[1, 2] = float("nan")  # "c" is decomposed together with a, b, d
    with pytest.raises(lc.NonFiniteError, match="layer 'c'"):
        ctrl.step()
    assert ctrl.step_count == 1 and not ctrl.events("stability")
    assert set(ctrl.warmup) == set(snaps)
    for n, v in snaps.items():
        for a, b in zip(ctrl.warmup[n], v, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("which", ["U", "sigma", "V", "left", "right"])
def test_a_non_finite_rank_update_names_the_tensor_and_changes_nothing(monkeypatch, which):
    """The five finiteness checks of a planned rank update share one host transfer; each still names
    its tensor and the layer."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ctrl = OIALR(model, opt, OIALRConfig(switch_step=1, update_every=2))
    ctrl.step()  # the switch
    real = lc.update_rank

    def poisoned(*args, **kwargs):
        upd = real(*args, **kwargs)
        rd = upd.rediagonalized
        bad = {"U": upd.factors.U, "sigma": upd.factors.Sigma, "V": upd.factors.V,
               "left": rd.left, "right": rd.right}[which]  # fmt: skip
        bad[..., 0, 0] = float("nan")
        return upd

    monkeypatch.setattr(lc, "update_rank", poisoned)
    before = {n: layer.sigma.detach().clone() for n, layer in ctrl.layers.items()}
    with pytest.raises(lc.NonFiniteError, match=rf"rank update of layer 'a' .*`{which}`"):
        ctrl.step()
    assert ctrl.step_count == 1
    for n, layer in ctrl.layers.items():
        torch.testing.assert_close(layer.sigma.detach(), before[n], rtol=0, atol=0)
