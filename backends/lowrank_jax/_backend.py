"""What the array API standard lacks, done the JAX way.

- **SVD / eigh**: ``jax.numpy.linalg.svd(full_matrices=False)`` and ``jax.numpy.linalg.eigh`` (batched,
  differentiable, usable under ``jax.jit`` and ``jax.vmap``; on CPU they call LAPACK's ``gesdd`` /
  ``syevd``, on GPU cuSOLVER, which picks a batched Jacobi solver for stacks of small matrices itself).
- **Random numbers** come from explicit ``jax.random`` keys, never from global state: ``seed=s`` (an int)
  draws from ``jax.random.key(s)``, so ``random_normal(shape, seed=0)`` equals
  ``jax.random.normal(jax.random.key(0), shape)``; a JAX PRNG key (new-style ``jax.random.key`` or a
  legacy ``jax.random.PRNGKey``) is accepted as ``seed`` too; ``seed=None`` takes fresh OS entropy.
- **Devices**: results stay on the input's device (JAX places an operation's output on its committed
  inputs' device); random numbers are drawn on the requested device.
- **Finiteness**: ``all_finite`` is one reduction (``isfinite(max |x|)``) and one host read; the core only
  calls it when ``check_finite=True``, so ``check_finite=False`` costs no host synchronisation at all.
  Under ``jax.jit`` / ``jax.vmap`` (any tracer) a Python ``bool`` of the data does not exist, so the check
  raises :class:`TracedFiniteCheckError` (a ``LowRankError`` and a ``TypeError``) that says to pass
  ``check_finite=False`` (and, for a checked jitted function, to use ``jax.experimental.checkify`` around
  it, or to check the inputs eagerly before calling it).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_core.backend import StandardBackend
from lowrank_core.errors import ArrayTypeError, LowRankError, ParameterError, ParameterTypeError

__all__ = ["JaxBackend", "TracedFiniteCheckError", "as_key", "is_traced"]


class TracedFiniteCheckError(LowRankError, TypeError):
    """A finiteness check (``check_finite=True``) was asked for on a traced value (inside ``jax.jit``,
    ``jax.vmap``, ``jax.grad``, ...), where it cannot produce a Python ``bool``."""


def is_traced(x: Any) -> bool:
    """Whether ``x`` is a JAX tracer (an abstract value inside a transformation), not a concrete array."""
    return isinstance(x, jax.core.Tracer)


def as_key(seed: Any) -> jax.Array:
    """A typed JAX PRNG key from ``seed``: an int (``jax.random.key(seed)``), a key (returned as a typed
    key), or ``None`` (fresh OS entropy)."""
    if seed is None:
        return jax.random.key(int.from_bytes(os.urandom(4), "little"))
    if isinstance(seed, jax.Array | np.ndarray):
        if jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
            return jnp.asarray(seed)
        if seed.dtype == jnp.uint32 and seed.shape == (2,):  # legacy jax.random.PRNGKey
            key: jax.Array = jax.random.wrap_key_data(jnp.asarray(seed))
            return key
        raise ParameterTypeError(
            f"`seed` must be an int, None or a JAX PRNG key, got an array of dtype {seed.dtype} and "
            f"shape {tuple(seed.shape)}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ParameterTypeError(
            f"`seed` must be an int, None or a JAX PRNG key, got {type(seed).__name__}"
        )
    value = int(seed)
    if not -(2**63) <= value < 2**64:
        raise ParameterError(f"`seed` must fit in 64 bits, got {value}")
    if value >= 2**63:  # jax.random.key takes int64; keep every uint64 seed distinct
        value -= 2**64
    return jax.random.key(value)


class JaxBackend(StandardBackend):
    """Backend for ``jax.Array`` (and tracers of it, inside ``jit`` / ``vmap`` / ``grad``)."""

    name = "jax"

    def __init__(self) -> None:
        super().__init__(jnp)

    def svd(self, a: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        U, S, Vh = jnp.linalg.svd(a, full_matrices=False)
        return U, S, Vh

    def eigh(self, a: jax.Array) -> tuple[jax.Array, jax.Array]:
        w, V = jnp.linalg.eigh(a)
        return w, V

    def all_finite(self, x: jax.Array) -> bool:
        if is_traced(x):
            raise TracedFiniteCheckError(
                "check_finite=True needs the values of the array on the host, but it is traced (inside "
                "jax.jit, jax.vmap or another JAX transformation); pass check_finite=False inside "
                "traced code (check the inputs eagerly before, or wrap the function in "
                "jax.experimental.checkify to check it on the device)"
            )
        if x.size == 0:
            return True
        # max(|x|) propagates NaN and is Inf iff an entry is: one reduction, then one host read
        return bool(jnp.isfinite(jnp.max(jnp.abs(x))))

    def random_normal(
        self,
        shape: tuple[int, ...],
        *,
        dtype: Any = None,
        device: Any = None,
        seed: Any = None,
    ) -> jax.Array:
        dt = jnp.dtype(jnp.result_type(float) if dtype is None else dtype)  # float32 unless x64
        key = as_key(seed)
        draw_dt = dt if dt in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)) else jnp.float32
        if device is None:
            out = jax.random.normal(key, tuple(shape), dtype=draw_dt)
        else:
            with jax.default_device(device):
                out = jax.random.normal(jax.device_put(key, device), tuple(shape), dtype=draw_dt)
        return out.astype(dt) if out.dtype != dt else out

    def synchronize(self, device: Any = None) -> None:
        # JAX dispatches asynchronously and executes in order per device: a tiny computation on each
        # device, waited for, is done only after the work queued before it.
        devices = jax.devices() if device is None else [device]
        for dev in devices:
            jax.device_put(jnp.zeros(()), dev).block_until_ready()

    def to_numpy(self, x: jax.Array) -> np.ndarray:
        if is_traced(x):
            raise ArrayTypeError(
                "a traced JAX value (inside jax.jit / jax.vmap) has no host copy; this step must run "
                "outside the transformation"
            )
        out = np.asarray(jax.device_get(x))
        if out.dtype.kind == "V" or str(out.dtype) == "bfloat16":
            out = out.astype(np.float32)
        return out
