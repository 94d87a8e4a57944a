"""Pluggable backends: the few things the array API standard does not offer.

The core is written against the standard alone. A *backend* adds what the standard lacks (random
numbers, a faster SVD driver, device synchronisation, a host copy) for one array library. Backends are
found lazily, from the type of the array at hand, so the core never imports a framework the user has
not imported already:

1. an explicit :func:`register_backend` call;
2. an entry point in the group ``lowrank_core.backends`` whose *name* is the array library's top-level
   module (``torch``, ``cupy``, ...) and whose *value* is a backend class or instance;
3. the built-in backends of this distribution (``lowrank_torch``, ``lowrank_cupy``, ``lowrank_jax``), for source trees
   that are on ``sys.path`` without being installed;
4. :class:`StandardBackend`, which uses nothing but the standard (and NumPy for random numbers).

Every backend method has a standard-only implementation in :class:`StandardBackend`, so a third-party
backend can subclass it and override only what it speeds up.
"""

from __future__ import annotations

import importlib
import threading
import warnings
from importlib import metadata
from typing import Any

import array_api_compat
import numpy as np

from ._array import Array, Namespace
from ._validate import check_seed, check_shape
from .errors import ArrayTypeError, ParameterError, ParameterTypeError

__all__ = ["StandardBackend", "get_backend", "register_backend"]

ENTRY_POINT_GROUP = "lowrank_core.backends"
_BUILTIN = {
    "torch": "lowrank_torch:TorchBackend",
    "cupy": "lowrank_cupy:CupyBackend",
    # jax.Array's concrete type lives in jaxlib, its tracers (under jit / vmap) in jax
    "jax": "lowrank_jax:JaxBackend",
    "jaxlib": "lowrank_jax:JaxBackend",
}


class StandardBackend:
    """The standard-only backend; also the base class for library-specific backends.

    ``xp`` is the array namespace this instance serves. Library backends pass their own namespace.
    """

    name: str = "standard"

    def __init__(self, xp: Namespace) -> None:
        if not all(hasattr(xp, attr) for attr in ("asarray", "linalg", "isdtype")):
            raise ParameterTypeError(
                "`xp` must be an array API namespace (such as array_api_compat.numpy), "
                f"got {type(xp).__name__}"
            )
        self.xp = xp

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, xp={getattr(self.xp, '__name__', self.xp)})"
        )

    def svd(self, a: Array) -> tuple[Array, Array, Array]:
        """Thin SVD ``(U, S, Vh)`` of a stack of matrices, in ``a``'s dtype (float32 or float64)."""
        U, S, Vh = self.xp.linalg.svd(a, full_matrices=False)
        return U, S, Vh

    def eigh(self, a: Array) -> tuple[Array, Array]:
        """Eigen-decomposition ``(w, V)`` of a stack of symmetric matrices, ascending ``w``."""
        w, V = self.xp.linalg.eigh(a)
        return w, V

    def all_finite(self, x: Array) -> bool:
        """Whether ``x`` holds no NaN and no infinity (one host synchronisation)."""
        return bool(self.xp.all(self.xp.isfinite(x)))

    def random_normal(
        self,
        shape: tuple[int, ...],
        *,
        dtype: Any = None,
        device: Any = None,
        seed: int | None = None,
    ) -> Array:
        """Standard normal samples of this backend's library (drawn by NumPy, then moved).

        ``shape`` is a tuple of non-negative integers, ``seed`` None or a non-negative integer.
        """
        shape = check_shape("shape", shape, min=0)
        seed = check_seed("seed", seed)
        xp = self.xp
        if dtype is None:
            dtype = xp.__array_namespace_info__().default_dtypes(device=device)["real floating"]
        values = np.random.default_rng(seed).standard_normal(tuple(shape))
        out = xp.asarray(values, device=device) if device is not None else xp.asarray(values)
        return xp.astype(out, dtype)

    def synchronize(self, device: Any = None) -> None:
        """Wait until queued work on ``device`` has finished (a no-op for synchronous libraries)."""

    def to_numpy(self, x: Array) -> np.ndarray:
        """A NumPy copy (or view) of ``x`` on the host."""
        try:
            return np.from_dlpack(x)
        except (TypeError, BufferError, RuntimeError, AttributeError):
            return np.asarray(x)


_METHODS = ("svd", "eigh", "all_finite", "random_normal", "synchronize", "to_numpy")
_lock = threading.Lock()
_registered: dict[str, StandardBackend | type[StandardBackend] | Any] = {}
_by_type: dict[type, StandardBackend] = {}


def register_backend(module_name: str, backend: Any) -> None:
    """Use ``backend`` for every array whose type comes from the top-level module ``module_name``.

    ``backend`` is a :class:`StandardBackend` subclass (instantiated on first use) or an instance.
    Registration overrides entry points and built-ins; ``backend=None`` removes a registration.
    """
    if not isinstance(module_name, str):
        raise ParameterTypeError(
            f"`module_name` must be a top-level module name such as 'torch', got {module_name!r}"
        )
    if not module_name or "." in module_name or not module_name.isidentifier():
        raise ParameterError(
            f"`module_name` must be a top-level module name such as 'torch', got {module_name!r}"
        )
    if backend is not None and not (
        isinstance(backend, type) or any(callable(getattr(backend, m, None)) for m in _METHODS)
    ):
        raise ParameterTypeError(
            "`backend` must be a backend class, an instance with backend methods "
            f"({', '.join(_METHODS)}) or None, got {type(backend).__name__}"
        )
    with _lock:
        if backend is None:
            _registered.pop(module_name, None)
        else:
            _registered[module_name] = backend
        _by_type.clear()


def _instantiate(obj: Any, x: Array) -> StandardBackend:
    """A ready backend from a registered class or instance.

    Objects that do not subclass :class:`StandardBackend` are accepted too (duck typing): whatever
    method they lack falls back to the standard-only implementation for ``x``'s namespace.
    """
    if isinstance(obj, type):
        try:
            obj = obj()
        except TypeError:
            obj = obj(array_api_compat.array_namespace(x))
    if isinstance(obj, StandardBackend):
        return obj
    adapted = StandardBackend(array_api_compat.array_namespace(x))
    adapted.name = str(getattr(obj, "name", type(obj).__name__))
    for method in _METHODS:
        if hasattr(obj, method):
            setattr(adapted, method, getattr(obj, method))
    return adapted


def _from_entry_points(module_name: str) -> Any | None:
    try:
        eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
    except Exception:  # pragma: no cover - broken metadata must not break the core
        return None
    for ep in eps:
        if ep.name == module_name:
            try:
                return ep.load()
            except Exception as exc:
                warnings.warn(
                    f"lowrank-core: could not load backend entry point {ep.value!r} for "
                    f"{module_name!r} ({exc}); using the standard-only backend",
                    RuntimeWarning,
                    stacklevel=4,
                )
                return None
    return None


def _from_builtin(module_name: str) -> Any | None:
    target = _BUILTIN.get(module_name)
    if target is None:
        return None
    mod_name, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError):
        return None


def get_backend(x: Array) -> StandardBackend:
    """The backend serving arrays of ``x``'s type (cached per type).

    Raises ``ArrayTypeError`` when ``x`` is not an array of an array-API-compatible library.
    """
    t = type(x)
    backend = _by_type.get(t)
    if backend is not None:
        return backend
    if not array_api_compat.is_array_api_obj(x) or t in (bool, int, float, complex):
        raise ArrayTypeError(
            f"`x` must be an array (NumPy, PyTorch, CuPy, ...) to find its backend, "
            f"got {type(x).__name__}"
        )
    module_name = t.__module__.split(".")[0]
    with _lock:
        found = _registered.get(module_name)
    if found is None:
        found = _from_entry_points(module_name) or _from_builtin(module_name)
    if found is None:
        backend = StandardBackend(array_api_compat.array_namespace(x))
    else:
        backend = _instantiate(found, x)
    with _lock:
        _by_type[t] = backend
    return backend
