"""The JAX backend of lowrank-core, and the JAX training integration.

Importing this package imports jax (nothing else: optax and flax are imported only by the integration
modules that need them). lowrank-core finds the backend on its own (entry points ``jax`` / ``jaxlib`` in
the group ``lowrank_core.backends``) the first time it meets a JAX array or tracer; nothing needs to be
registered by hand.

The core under JAX: every function whose output shape does not depend on the data (``svd``, ``qr``,
``polar``, ``orthogonal_factor``, ``basis_stability``, ``polar_stability``, the subspace similarities,
``factorize`` at a given rank, ``rediagonalize``, ``rotate_sigma``, ``reconstruct``, the spectrum measures,
``OnlineCMD.update``, the BFGS update and direction, the init functions at a given rank) works inside
``jax.jit`` and ``jax.vmap`` with ``check_finite=False``. Rank selection and truncation change shapes and
run outside ``jit``.

Integration (imported on first use): :mod:`lowrank_jax.oialr` (OIALR over parameter pytrees with optax),
:mod:`lowrank_jax.dldr` (snapshots, subspace SGD as an optax transformation, subspace BFGS),
:mod:`lowrank_jax.cmd` (online CMD over a pytree), :mod:`lowrank_jax.checkpoint` (one checked ``.npz``
file for parameters, optax state and every controller, loaded all or nothing; each controller also has
``state_dict`` / ``load_state_dict``).
"""

from __future__ import annotations

import importlib
from typing import Any

from ._backend import JaxBackend, TracedFiniteCheckError, as_key, is_traced

__all__ = ["JaxBackend", "TracedFiniteCheckError", "as_key", "is_traced"]

_SUBMODULES = ("checkpoint", "cmd", "dldr", "oialr", "optim_state")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
