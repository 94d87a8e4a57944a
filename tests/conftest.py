"""Shared fixtures for the lowrank-core test suite.

The ``backend`` fixture is parametrized over the array namespaces named in the environment variable
``LOWRANK_TEST_BACKENDS`` (comma list of ``numpy``, ``array_api_strict``, ``torch``, ``jax``,
``torch_cuda``, ``cupy``). When it is unset, every CPU namespace that can be imported is used. A backend
that was asked for but cannot run here (library missing, no CUDA device) is skipped with the reason, never an error.

Hypothesis profiles: ``ci`` (chosen when ``CI`` is set: derandomized, so every CI run draws the same
examples and a failure reproduces on any machine), ``ci-jax`` (the same with a tenth of the
examples, for the JAX session: every new shape compiles), ``dev`` (otherwise), ``thorough`` (300 examples) and
``fuzz`` (random seeds, more examples, no example database; used by ``nox -s fuzz``: it explores what
the fixed CI examples do not); ``HYPOTHESIS_PROFILE`` overrides the choice.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# --------------------------------------------------------------------------------------------------
# Hypothesis profiles
# --------------------------------------------------------------------------------------------------
_HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    suppress_health_check=_HEALTH,
    print_blob=True,
    derandomize=True,
    database=None,
)
# the JAX session (``nox -s "tests(jax)"``): the whole suite, derandomized like ``ci``, with a tenth of
# the examples: under JAX every new array shape compiles each operation (measured on the 2-core CI
# machine: ~135 compilations of ~0.1 s for one CMD assignment example, 10-20 s, against 0.1-0.4 s for
# the same call once compiled; tests/test_cmd.py took 12 min at 40 examples). The JAX-specific failure
# modes (writes into immutable arrays, dtype promotion, device placement, tracing) show on the first
# examples; ``-- --hypothesis-profile=ci`` runs CI's count.
settings.register_profile("ci-jax", parent=settings.get_profile("ci"), max_examples=4)
settings.register_profile(
    "dev",
    max_examples=50,
    deadline=None,
    suppress_health_check=_HEALTH,
    print_blob=True,
)
settings.register_profile(
    "thorough",
    max_examples=300,
    deadline=None,
    suppress_health_check=_HEALTH,
    print_blob=True,
)
# ``nox -s fuzz``: random seeds (the session passes --hypothesis-seed and prints it), more examples,
# no example database (every run explores afresh).
settings.register_profile(
    "fuzz",
    max_examples=150,
    deadline=None,
    suppress_health_check=_HEALTH,
    print_blob=True,
    derandomize=False,
    database=None,
)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
)

# --------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------
ALL_BACKENDS = ("numpy", "array_api_strict", "torch", "jax", "torch_cuda", "cupy")
CPU_BACKENDS = ("numpy", "array_api_strict", "torch", "jax")
GPU_BACKENDS = ("torch_cuda", "cupy")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def selected_backends() -> list[str]:
    raw = os.environ.get("LOWRANK_TEST_BACKENDS", "").strip()
    if not raw:
        return [b for b in CPU_BACKENDS if _importable(b)]
    names = [s.strip() for s in raw.split(",") if s.strip()]
    unknown = sorted(set(names) - set(ALL_BACKENDS))
    if unknown:
        raise pytest.UsageError(
            f"LOWRANK_TEST_BACKENDS names unknown backends {unknown}; known: {list(ALL_BACKENDS)}"
        )
    return names


@dataclass
class BackendCase:
    """One array library (and device) under test."""

    name: str
    xp: Any  # the array_api_compat namespace, or array_api_strict itself
    device: Any
    module_name: str  # top-level module of the library's array type
    array_type: type
    float_dtypes: tuple[str, ...] = ("float32", "float64")
    native: Any = field(default=None, repr=False)  # the library module itself (numpy, torch, ...)

    def dtype(self, name: str) -> Any:
        return getattr(self.xp, name)

    def asarray(self, a: Any, dtype: str = "float64") -> Any:
        """Build in NumPy, move to this library, on this device, with dtype ``dtype``."""
        a = np.asarray(a)
        if self.name == "numpy":
            return np.array(a, dtype=np.dtype(dtype), copy=True)
        if self.name == "array_api_strict":
            if dtype in ("bool",):
                return self.xp.asarray(a.astype(bool), device=self.device)
            return self.xp.asarray(a, dtype=self.dtype(dtype), device=self.device)
        if self.name.startswith("torch"):
            torch = self.native
            t = torch.from_numpy(np.array(a, copy=True))
            return t.to(device=self.device, dtype=getattr(torch, dtype))
        if self.name == "cupy":
            cp = self.native
            return cp.asarray(np.asarray(a, dtype=np.dtype(dtype)))
        if self.name == "jax":
            jax = importlib.import_module("jax")
            jnp = self.native
            return jax.device_put(jnp.asarray(a, dtype=getattr(jnp, dtype)), self.device)
        raise AssertionError(self.name)

    def to_numpy(self, x: Any) -> np.ndarray:
        """A NumPy copy of ``x`` (half precision is widened to float32 on the way)."""
        if isinstance(x, np.ndarray | np.generic):
            return np.array(x, copy=True)
        mod = type(x).__module__.split(".")[0]
        if mod == "torch":
            torch = importlib.import_module("torch")
            x = x.detach().to("cpu")
            if x.dtype in (torch.float16, torch.bfloat16):
                x = x.to(torch.float32)
            return x.numpy().copy()
        if mod == "cupy":
            return x.get()
        if mod == "array_api_strict":
            return np.array(np.from_dlpack(x), copy=True)
        if mod in ("jax", "jaxlib"):
            out = np.array(x, copy=True)
            return out.astype(np.float32) if str(out.dtype) == "bfloat16" else out
        return np.asarray(x)


def _make_backend(name: str) -> BackendCase:
    import array_api_compat

    if name == "numpy":
        return BackendCase(
            name="numpy",
            xp=array_api_compat.array_namespace(np.empty(0)),
            device="cpu",
            module_name="numpy",
            array_type=np.ndarray,
            native=np,
        )
    if name == "array_api_strict":
        try:
            import array_api_strict as xps
        except ImportError as exc:
            pytest.skip(f"array_api_strict is not installed: {exc}")
        return BackendCase(
            name="array_api_strict",
            xp=xps,
            device=xps.asarray(0.0).device,
            module_name="array_api_strict",
            array_type=type(xps.asarray(0.0)),
            native=xps,
        )
    if name in ("torch", "torch_cuda"):
        try:
            import torch
        except ImportError as exc:
            pytest.skip(f"torch is not installed: {exc}")
        if name == "torch_cuda":
            if not torch.cuda.is_available():
                pytest.skip("torch_cuda requested but torch.cuda.is_available() is False")
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        return BackendCase(
            name=name,
            xp=array_api_compat.array_namespace(torch.empty(0)),
            device=device,
            module_name="torch",
            array_type=torch.Tensor,
            native=torch,
        )
    if name == "cupy":
        try:
            import cupy
        except ImportError as exc:
            pytest.skip(f"cupy is not installed: {exc}")
        try:
            n_dev = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # no driver / no device
            pytest.skip(f"cupy requested but no CUDA device is usable: {exc}")
        if n_dev == 0:
            pytest.skip("cupy requested but no CUDA device is present")
        return BackendCase(
            name="cupy",
            xp=array_api_compat.array_namespace(cupy.empty(0)),
            device=cupy.cuda.Device(0),
            module_name="cupy",
            array_type=cupy.ndarray,
            native=cupy,
        )
    if name == "jax":
        try:
            import jax
        except ImportError as exc:
            pytest.skip(f"jax is not installed: {exc}")
        # float64 cases need x64; float32 arrays stay float32 (every case builds its dtype explicitly,
        # and the dtype checks of the suite fail if a result is silently promoted)
        jax.config.update("jax_enable_x64", True)
        jnp = jax.numpy
        return BackendCase(
            name="jax",
            xp=array_api_compat.array_namespace(jnp.zeros(0)),
            device=jax.devices("cpu")[0],
            module_name="jaxlib",
            array_type=type(jnp.zeros(0)),
            native=jnp,
        )
    raise AssertionError(name)


# JAX compiles every operation anew for every new shape (tens of milliseconds each on a busy 2-core
# runner), so one Hypothesis example costs JAX 10-100 times what it costs the other libraries. When JAX
# is the only backend under test and no profile was named, each property test runs at most
# LOWRANK_JAX_MAX_EXAMPLES (default 10) generated examples; the explicit examples always run. XLA's CPU
# backend is also told to compile quickly (fewer LLVM passes: the same operations, rounded within the
# suite's tolerances), unless XLA_FLAGS is set already.
if selected_backends() == ["jax"]:
    os.environ.setdefault(
        "XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    )
    if not os.environ.get("HYPOTHESIS_PROFILE"):
        _jax_examples = int(os.environ.get("LOWRANK_JAX_MAX_EXAMPLES", "10"))
        settings.register_profile(
            "jax", parent=settings(), max_examples=min(settings().max_examples, _jax_examples)
        )
        settings.load_profile("jax")

_BACKEND_PARAMS = [
    pytest.param(b, id=b, marks=[pytest.mark.gpu] if b in GPU_BACKENDS else [])
    for b in selected_backends()
]


@pytest.fixture(scope="session", params=_BACKEND_PARAMS)
def backend(request: pytest.FixtureRequest) -> BackendCase:
    """The array library under test (see module docstring)."""
    return _make_backend(request.param)


@pytest.fixture(params=["float32", "float64"])
def dtype(request: pytest.FixtureRequest, backend: BackendCase) -> str:
    """A floating dtype name that ``backend`` supports."""
    if request.param not in backend.float_dtypes:
        pytest.skip(f"{backend.name} does not support {request.param}")
    return request.param
