"""Bad input raises the specific error class, with a message naming the problem, and changes nothing."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from _helpers import assert_unchanged, snapshot

import lowrank_core as lc
import lowrank_core.errors as errors

# Functions that need one (or two same-shaped) matrices, called on a single array.
MATRIX_CALLS = {
    "svd": lambda a, **kw: lc.svd(a, **kw),
    "qr": lambda a, **kw: lc.qr(a, **kw),
    "polar": lambda a, **kw: lc.polar(a, **kw),
    "orthogonal_factor": lambda a, **kw: lc.orthogonal_factor(a, **kw),
    "factorize": lambda a, **kw: lc.factorize(a, **kw),
    "basis_stability": lambda a, **kw: lc.basis_stability(a, a, **kw),
    "principal_angle_cosines": lambda a, **kw: lc.principal_angle_cosines(a, a, **kw),
    "projector_distance": lambda a, **kw: lc.projector_distance(a, a, **kw),
}
MATRIX_IDS = sorted(MATRIX_CALLS)

# the same functions, plus the factor functions, called with (U, Sigma, V)-like inputs built from `a`
ALL_CALLS = {
    **MATRIX_CALLS,
    "reconstruct": lambda a, **kw: lc.reconstruct(a, a, a, **kw),
    "rediagonalize": lambda a, **kw: lc.rediagonalize(a, a, a, **kw),
}
ALL_IDS = sorted(ALL_CALLS)


def _square(backend, dtype="float64", n=4):
    rng = np.random.default_rng(0)
    return backend.asarray(rng.standard_normal((n, n)), dtype)


def test_error_hierarchy():
    assert errors.LowRankError is lc.LowRankError
    for name, bases in {
        "ArrayTypeError": (TypeError,),
        "DTypeError": (TypeError,),
        "ShapeError": (ValueError,),
        "NonFiniteError": (ValueError,),
        "DeviceMismatchError": (ValueError,),
        "RankError": (ValueError,),
    }.items():
        cls = getattr(errors, name)
        assert getattr(lc, name) is cls
        assert issubclass(cls, errors.LowRankError), name
        for b in bases:
            assert issubclass(cls, b), f"{name} is not a {b.__name__}"


@pytest.mark.parametrize("name", ["svd", "qr", "polar", "factorize", "basis_stability",
                                  "principal_angle_cosines", "projector_distance", "rediagonalize"])  # fmt: skip
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite(backend, name, bad):
    a_np = np.random.default_rng(0).standard_normal((2, 4, 4))
    a_np[1, 2, 3] = bad
    a = backend.asarray(a_np, "float64")
    before = snapshot(backend, a)
    with pytest.raises(lc.NonFiniteError, match=r"(?i)(nan|inf|finite)"):
        ALL_CALLS[name](a)
    np.testing.assert_array_equal(backend.to_numpy(a), before[0])  # NaN compares equal here


def test_non_finite_message_names_the_argument(backend):
    good = _square(backend)
    bad_np = np.eye(4)
    bad_np[0, 0] = np.nan
    bad = backend.asarray(bad_np, "float64")
    with pytest.raises(lc.NonFiniteError, match="current"):
        lc.basis_stability(good, bad)
    with pytest.raises(lc.NonFiniteError, match="previous"):
        lc.basis_stability(bad, good)


@pytest.mark.parametrize("name", ALL_IDS)
@pytest.mark.parametrize("shape", [(4,), ()], ids=["1-D", "0-D"])
def test_not_a_matrix(backend, name, shape):
    a = backend.asarray(np.ones(shape), "float64")
    before = snapshot(backend, a)
    with pytest.raises(lc.ShapeError, match=r"(?i)(dim|matrix|shape|2-?d)"):
        ALL_CALLS[name](a)
    assert_unchanged(backend, before, a)


@pytest.mark.parametrize("name", ALL_IDS)
@pytest.mark.parametrize("dtype", ["int64", "int32", "bool"])
def test_integer_or_bool_dtype(backend, name, dtype):
    a = backend.asarray(np.eye(3).astype(dtype), dtype)
    with pytest.raises(lc.DTypeError, match=r"(?i)(dtype|float|int|bool)"):
        ALL_CALLS[name](a)


@pytest.mark.parametrize("name", MATRIX_IDS)
def test_complex_dtype(backend, name):
    if backend.name == "numpy":
        a = np.eye(3, dtype=np.complex128)
    elif backend.name == "array_api_strict":
        a = backend.xp.asarray(np.eye(3, dtype=np.complex128))
    elif backend.name.startswith("torch"):
        a = backend.native.eye(3, dtype=backend.native.complex128, device=backend.device)
    else:
        a = backend.native.eye(3, dtype=backend.native.complex128)
    with pytest.raises(lc.DTypeError, match=r"(?i)(dtype|complex|float)"):
        MATRIX_CALLS[name](a)


@pytest.mark.parametrize("name", ALL_IDS)
@pytest.mark.parametrize(
    "value", [[[1.0, 2.0], [3.0, 4.0]], 3.0, None, "abc"], ids=["list", "float", "None", "str"]
)
def test_not_an_array(name, value):
    with pytest.raises(lc.ArrayTypeError, match=r"(?i)(array|list|float|None|str|type)"):
        ALL_CALLS[name](value)


def test_rank_rule_rejects_a_list():
    with pytest.raises(lc.ArrayTypeError):
        lc.SigmaCutoff()([3.0, 2.0, 1.0])


def _mixed_pairs():
    have = {m for m in ("array_api_strict", "torch") if importlib.util.find_spec(m) is not None}
    pairs = [("numpy", "array_api_strict"), ("numpy", "torch"), ("array_api_strict", "torch")]
    return [p for p in pairs if set(p) - {"numpy"} <= have]


def _make(lib, a):
    if lib == "numpy":
        return np.array(a)
    if lib == "array_api_strict":
        import array_api_strict

        return array_api_strict.asarray(a)
    import torch

    return torch.from_numpy(np.array(a))


@pytest.mark.parametrize(("lib1", "lib2"), _mixed_pairs(), ids=lambda x: x)
def test_two_libraries(lib1, lib2):
    rng = np.random.default_rng(0)
    a_np = rng.standard_normal((4, 3))
    s_np = rng.standard_normal((3, 3))
    a1, a2 = _make(lib1, a_np), _make(lib2, a_np)
    with pytest.raises(lc.ArrayTypeError, match=r"(?i)(librar|namespace|mix|type)"):
        lc.basis_stability(a1, a2)
    with pytest.raises(lc.ArrayTypeError, match=r"(?i)(librar|namespace|mix|type)"):
        lc.principal_angle_cosines(a1, a2)
    with pytest.raises(lc.ArrayTypeError, match=r"(?i)(librar|namespace|mix|type)"):
        lc.reconstruct(a1, _make(lib2, s_np), a1)
    with pytest.raises(lc.ArrayTypeError, match=r"(?i)(librar|namespace|mix|type)"):
        lc.rotate_sigma(_make(lib1, s_np), _make(lib2, s_np), _make(lib1, s_np))
    np.testing.assert_array_equal(np.asarray(a1), a_np)


def _two_devices(backend):
    """Two arrays of the backend's library on two different devices, or skip."""
    rng = np.random.default_rng(0)
    a_np = rng.standard_normal((4, 3))
    if backend.name == "array_api_strict":
        xp = backend.xp
        return xp.asarray(a_np), xp.asarray(a_np, device=xp.Device("device1"))
    if backend.name == "torch_cuda":
        import torch

        return torch.from_numpy(a_np), torch.from_numpy(a_np).to(backend.device)
    pytest.skip(f"{backend.name}: no second device to mix with")


def test_two_devices(backend):
    a1, a2 = _two_devices(backend)
    with pytest.raises(lc.DeviceMismatchError, match=r"(?i)device"):
        lc.basis_stability(a1, a2)
    with pytest.raises(lc.DeviceMismatchError, match=r"(?i)device"):
        lc.projector_distance(a1, a2)
    u = a1
    s = a2[:3, :3]
    with pytest.raises(lc.DeviceMismatchError, match=r"(?i)device"):
        lc.reconstruct(u, s, a1)


def test_results_stay_on_a_second_device():
    xps = pytest.importorskip("array_api_strict")
    dev = xps.Device("device1")
    a = xps.asarray(np.random.default_rng(0).standard_normal((5, 3)), device=dev)
    for x in lc.svd(a):
        assert x.device == dev
    for x in lc.factorize(a, rank=2):
        assert x.device == dev
    assert lc.basis_stability(a, a).device == dev
    assert lc.orthogonal_factor(a).device == dev
    for x in lc.polar(a):
        assert x.device == dev


@pytest.mark.parametrize("rank", [0, -1, True, False, 2.0, 5, 100], ids=str)
def test_factorize_bad_rank(backend, rank):
    a = backend.asarray(np.random.default_rng(0).standard_normal((4, 6)), "float64")
    before = snapshot(backend, a)
    with pytest.raises(lc.RankError, match=r"(?i)rank"):
        lc.factorize(a, rank=rank)
    assert_unchanged(backend, before, a)


def test_reconstruct_shape_mismatch(backend):
    rng = np.random.default_rng(0)
    U = backend.asarray(rng.standard_normal((5, 3)), "float64")
    S = backend.asarray(rng.standard_normal((3, 3)), "float64")
    S4 = backend.asarray(rng.standard_normal((4, 4)), "float64")
    S_rect = backend.asarray(rng.standard_normal((3, 4)), "float64")
    V = backend.asarray(rng.standard_normal((4, 3)), "float64")
    V2 = backend.asarray(rng.standard_normal((4, 2)), "float64")
    before = snapshot(backend, U, S, S4, V, V2)
    with pytest.raises(lc.ShapeError, match=r"(?i)(sigma|shape)"):
        lc.reconstruct(U, S4, V)
    with pytest.raises(lc.ShapeError, match=r"(?i)(shape|V)"):
        lc.reconstruct(U, S, V2)
    with pytest.raises(lc.ShapeError, match=r"(?i)(sigma|shape|square)"):
        lc.rediagonalize(U, S_rect, V)
    with pytest.raises(lc.ShapeError, match=r"(?i)(sigma|shape)"):
        lc.rediagonalize(U, S4, V)
    assert_unchanged(backend, before, U, S, S4, V, V2)


def test_basis_stability_shape_mismatch(backend):
    rng = np.random.default_rng(0)
    a = backend.asarray(rng.standard_normal((3, 4)), "float64")
    b = backend.asarray(rng.standard_normal((4, 3)), "float64")
    c = backend.asarray(rng.standard_normal((2, 3, 4)), "float64")
    before = snapshot(backend, a, b, c)
    with pytest.raises(lc.ShapeError, match=r"(?i)shape"):
        lc.basis_stability(a, b)
    with pytest.raises(lc.ShapeError, match=r"(?i)shape"):
        lc.basis_stability(a, c)
    assert_unchanged(backend, before, a, b, c)


def test_principal_angles_row_mismatch(backend):
    rng = np.random.default_rng(0)
    a = backend.asarray(rng.standard_normal((5, 2)), "float64")
    b = backend.asarray(rng.standard_normal((6, 2)), "float64")
    with pytest.raises(lc.ShapeError, match=r"(?i)(shape|rows|dim)"):
        lc.principal_angle_cosines(a, b)
    with pytest.raises(lc.ShapeError, match=r"(?i)(shape|rows|dim)"):
        lc.projector_distance(a, b)


def _meta_calls():
    """Public calls of the core, each given one tensor on PyTorch's ``meta`` device (no values)."""
    torch = pytest.importorskip("torch")
    import lowrank_core.dldr as dl

    rng = np.random.default_rng(0)
    snaps = np.cumsum(rng.standard_normal((6, 10)), axis=0)
    gram = snaps @ snaps.T

    def meta(a):
        return torch.from_numpy(np.array(a)).to("meta")

    def rows():
        return iter([(0, snaps)])

    store = lc.SnapshotStore()
    store.add(snaps[0])
    return {
        "svd": lambda: lc.svd(meta(rng.standard_normal((4, 3)))),
        "factorize": lambda: lc.factorize(meta(rng.standard_normal((4, 3))), 2),
        "effective_rank": lambda: lc.effective_rank(meta([3.0, 2.0, 1.0])),
        "fit_subspace": lambda: lc.fit_subspace(meta(snaps), 2),
        "fit_cmd": lambda: lc.fit_cmd(meta(snaps.T), 2),
        "subspace_from_gram(gram)": lambda: dl.subspace_from_gram(
            meta(gram), 2, rows, centre=snaps.mean(axis=0)
        ),
        "subspace_from_gram(centre)": lambda: dl.subspace_from_gram(
            gram, 2, rows, centre=meta(snaps.mean(axis=0))
        ),
        "SnapshotStore.add": lambda: store.add(meta(snaps[1])),
    }


@pytest.mark.parametrize(
    "name",
    ["svd", "factorize", "effective_rank", "fit_subspace", "fit_cmd", "subspace_from_gram(gram)",
     "subspace_from_gram(centre)", "SnapshotStore.add"],
)  # fmt: skip
def test_meta_device_is_refused_naming_the_device(name):
    """A tensor on torch's ``meta`` device (shapes, no values) cannot be computed with: a clear error
    naming the device, not PyTorch's NotImplementedError / RuntimeError from deep inside."""
    calls = _meta_calls()
    with pytest.raises(errors.DeviceError, match=r"meta"):
        calls[name]()
