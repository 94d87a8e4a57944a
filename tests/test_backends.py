"""The Backend protocol: lazy discovery, names, random numbers, registration."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from _helpers import assert_in_library
from hypothesis import given
from hypothesis import strategies as st

import lowrank_core as lc


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=120,
        check=False,
    )


def test_import_does_not_import_frameworks():
    proc = _run(
        """
        import sys
        import lowrank_core
        bad = sorted(m for m in ("torch", "cupy", "jax", "lowrank_torch", "lowrank_cupy")
                     if m in sys.modules)
        assert not bad, bad
        """
    )
    assert proc.returncode == 0, proc.stderr


def test_numpy_work_does_not_import_frameworks():
    """Using the core on NumPy / array_api_strict arrays must not load the torch or cupy backends
    (their entry points import the framework)."""
    proc = _run(
        """
        import sys
        import numpy as np
        import lowrank_core as lc
        a = np.random.default_rng(0).standard_normal((6, 4))
        lc.svd(a); lc.factorize(a, rank=2); lc.basis_stability(a, a)
        lc.SigmaCutoff()(lc.svd(a).S)
        lc.get_backend(a).random_normal((3,), dtype=np.float64, seed=0)
        try:
            import array_api_strict as xps
        except ImportError:
            pass
        else:
            b = xps.asarray(a)
            lc.svd(b); lc.get_backend(b)
        bad = sorted(m for m in ("torch", "cupy", "lowrank_torch", "lowrank_cupy") if m in sys.modules)
        assert not bad, bad
        """
    )
    assert proc.returncode == 0, proc.stderr


def test_torch_backend_after_importing_torch():
    pytest.importorskip("torch")
    proc = _run(
        """
        import lowrank_core as lc
        import torch
        b = lc.get_backend(torch.zeros(1))
        assert b.name == "torch", b.name
        """
    )
    assert proc.returncode == 0, proc.stderr


def test_get_backend_names(backend):
    x = backend.asarray(np.zeros((2, 2)), "float64")
    b = lc.get_backend(x)
    assert isinstance(b.name, str)
    assert b.name
    if backend.name.startswith("torch"):
        assert b.name == "torch"
    elif backend.name == "cupy":
        assert b.name == "cupy"
    else:
        assert b.name not in ("torch", "cupy")


def test_numpy_and_strict_share_the_fallback():
    xps = pytest.importorskip("array_api_strict")
    b_np = lc.get_backend(np.zeros(2))
    b_strict = lc.get_backend(xps.zeros(2))
    assert type(b_np) is type(b_strict)
    assert b_np.name == b_strict.name


def test_random_normal(backend, dtype):
    x = backend.asarray(np.zeros(1), dtype)
    b = lc.get_backend(x)
    dt = backend.dtype(dtype)
    r1 = b.random_normal((200, 50), dtype=dt, device=backend.device, seed=1234)
    assert_in_library(r1, x, what="random_normal")
    assert tuple(r1.shape) == (200, 50)
    r2 = b.random_normal((200, 50), dtype=dt, device=backend.device, seed=1234)
    r3 = b.random_normal((200, 50), dtype=dt, device=backend.device, seed=4321)
    n1, n2, n3 = (backend.to_numpy(r) for r in (r1, r2, r3))
    np.testing.assert_array_equal(n1, n2)
    assert not np.array_equal(n1, n3)
    # standard normal: mean 0, variance 1 (10_000 samples: 5-sigma bands)
    assert abs(float(np.mean(n1))) < 0.05
    assert abs(float(np.std(n1)) - 1.0) < 0.04
    # the default device
    r4 = b.random_normal((3, 2), dtype=dt, seed=0)
    assert_in_library(r4, x, what="random_normal (default device)")


def test_synchronize_and_to_numpy(backend):
    x = backend.asarray(np.arange(6.0).reshape(2, 3), "float64")
    b = lc.get_backend(x)
    b.synchronize()
    b.synchronize(backend.device)
    out = b.to_numpy(x)
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, np.arange(6.0).reshape(2, 3))


@given(
    shape=st.tuples(st.integers(1, 5), st.integers(1, 6)),
    where=st.integers(0, 29),
    bad=st.sampled_from([np.nan, np.inf, -np.inf]),
    scale=st.sampled_from([1e-3, 1.0, 1e30]),
)
def test_all_finite_finds_every_non_finite_entry(backend, shape, where, bad, scale):
    # The torch/cupy backends use one max(|x|) reduction instead of all(isfinite(x)): it must still
    # see a NaN or an infinity wherever it sits, also next to larger finite values.
    base = np.linspace(-1.0, 1.0, shape[0] * shape[1]).reshape(shape) * scale
    b = lc.get_backend(backend.asarray(base, "float64"))
    assert b.all_finite(backend.asarray(base, "float64")) is True
    corrupt = base.copy()
    corrupt.flat[where % corrupt.size] = bad
    for dtype in ("float32", "float64"):
        assert b.all_finite(backend.asarray(corrupt, dtype)) is False


class _CustomBackend:
    name = "custom-test-backend"

    def random_normal(self, shape, *, dtype, device=None, seed=None):
        return np.full(shape, 7.0, dtype=dtype)

    def synchronize(self, device=None):
        return None

    def to_numpy(self, x):
        return np.asarray(x)


_FakeArray = type("FakeArray", (np.ndarray,), {"__module__": "lowrank_fake_array_lib._core"})


def test_register_backend_for_a_new_library():
    x = np.zeros(3).view(_FakeArray)
    assert type(x).__module__.split(".")[0] == "lowrank_fake_array_lib"
    custom = _CustomBackend()
    lc.register_backend("lowrank_fake_array_lib", custom)
    try:
        b = lc.get_backend(x)
        assert b.name == custom.name
        # the custom methods are the ones used ...
        assert float(b.random_normal((2,), dtype=np.float64)[0]) == 7.0
        # ... and what the duck-typed backend lacks comes from the standard fallback
        assert b.all_finite(x) is True
        assert b.all_finite(np.array([0.0, np.nan]).view(_FakeArray)) is False
        # plain numpy arrays are not affected
        assert lc.get_backend(np.zeros(3)).name == "standard"
    finally:
        lc.register_backend("lowrank_fake_array_lib", None)
    assert lc.get_backend(x).name == "standard", "unregistering must take effect"


def test_register_backend_overrides_and_restores():
    a = np.zeros(3)
    old = lc.get_backend(a)
    custom = _CustomBackend()
    lc.register_backend("numpy", custom)
    try:
        b = lc.get_backend(a)
        assert b.name == custom.name, "a registered backend must take effect after a cached lookup"
        assert float(b.random_normal((2,), dtype=np.float64)[0]) == 7.0
    finally:
        lc.register_backend("numpy", old)
    assert lc.get_backend(a) is old


def test_entry_point_backend_is_found(tmp_path):
    """A third party plugs a backend in through the ``lowrank_core.backends`` entry point group, keyed by
    the array library's top-level module name; it is loaded only when such an array is seen."""
    site = tmp_path / "site"
    (site / "lowrank_fake_ep_lib").mkdir(parents=True)
    (site / "lowrank_fake_ep_lib" / "__init__.py").write_text(
        "import numpy as np\n"
        "class FakeArray(np.ndarray):\n"
        "    pass\n"
        "FakeArray.__module__ = 'lowrank_fake_ep_lib'\n"
    )
    (site / "lowrank_fake_ep_backend.py").write_text(
        "import sys\n"
        "sys.modules[__name__].LOADED = True\n"
        "class FakeBackend:\n"
        "    name = 'fake-entry-point'\n"
        "    def random_normal(self, shape, *, dtype, device=None, seed=None):\n"
        "        raise NotImplementedError\n"
        "    def synchronize(self, device=None):\n"
        "        pass\n"
        "    def to_numpy(self, x):\n"
        "        import numpy as np\n"
        "        return np.asarray(x)\n"
    )
    dist = site / "lowrank_fake_ep-0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lowrank-fake-ep\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text(
        "[lowrank_core.backends]\nlowrank_fake_ep_lib = lowrank_fake_ep_backend:FakeBackend\n"
    )
    code = """
        import sys
        import numpy as np
        import lowrank_core as lc
        lc.get_backend(np.zeros(2))
        assert "lowrank_fake_ep_backend" not in sys.modules, "loaded before it was needed"
        from lowrank_fake_ep_lib import FakeArray
        b = lc.get_backend(np.zeros(2).view(FakeArray))
        assert b.name == "fake-entry-point", b
        """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("value", [[1.0], 1.0, "x", None, (1, 2)])
def test_get_backend_refuses_non_arrays(value):
    with pytest.raises(lc.ArrayTypeError, match="must be an array"):
        lc.get_backend(value)


@pytest.mark.parametrize(
    ("module_name", "backend", "error"),
    [(3, None, lc.ParameterTypeError), ("a.b", None, lc.ParameterError),
     ("", None, lc.ParameterError), ("mylib", 3, lc.ParameterTypeError)],
)  # fmt: skip
def test_register_backend_validates(module_name, backend, error):
    with pytest.raises(error):
        lc.register_backend(module_name, backend)


@pytest.mark.parametrize("xp", [3, "numpy", None, np.ones(3)])
def test_standard_backend_needs_a_namespace(xp):
    with pytest.raises(lc.ParameterTypeError, match="`xp`"):
        lc.StandardBackend(xp)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [({"shape": (8.5, 2)}, lc.ParameterTypeError), ({"shape": (-1, 2)}, lc.ShapeError),
     ({"shape": 5}, lc.ParameterTypeError), ({"shape": (2, 2), "seed": -1}, lc.ParameterError),
     ({"shape": (2, 2), "seed": 1.5}, lc.ParameterTypeError)],
)  # fmt: skip
def test_standard_random_normal_validates(kwargs, error):
    backend = lc.get_backend(np.zeros(1))
    with pytest.raises(error):
        backend.random_normal(**kwargs)
    assert backend.random_normal((0, 3), seed=np.int64(1)).shape == (0, 3)
