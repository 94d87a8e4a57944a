"""What the array API standard lacks, done the CuPy way."""

from __future__ import annotations

from typing import Any

import array_api_compat.cupy as cupy_xp
import cupy
import numpy as np

from lowrank_core.backend import StandardBackend

__all__ = ["CupyBackend"]


class CupyBackend(StandardBackend):
    """Backend for ``cupy.ndarray``."""

    name = "cupy"

    def __init__(self) -> None:
        super().__init__(cupy_xp)

    def svd(self, a: Any) -> tuple[Any, Any, Any]:
        # cupy.linalg.svd handles stacks (batched gesvdj for small matrices); full_matrices=False is
        # the thin SVD the core needs.
        with cupy.cuda.Device(a.device.id):
            U, S, Vh = cupy.linalg.svd(a, full_matrices=False)
        return U, S, Vh

    def all_finite(self, x: Any) -> bool:
        if x.size == 0:
            return True
        return bool(cupy.isfinite(cupy.abs(x).max()))

    def random_normal(
        self,
        shape: tuple[int, ...],
        *,
        dtype: Any = None,
        device: Any = None,
        seed: int | None = None,
    ) -> Any:
        dt = cupy.float64 if dtype is None else dtype
        dev_id = 0 if device is None else getattr(device, "id", device)
        with cupy.cuda.Device(dev_id):
            rng = cupy.random.default_rng(seed)
            if dt in (cupy.float32, cupy.float64):
                return rng.standard_normal(tuple(shape), dtype=dt)
            return rng.standard_normal(tuple(shape), dtype=cupy.float32).astype(dt)

    def synchronize(self, device: Any = None) -> None:
        dev_id = 0 if device is None else getattr(device, "id", device)
        cupy.cuda.Device(dev_id).synchronize()

    def to_numpy(self, x: Any) -> np.ndarray:
        return cupy.asnumpy(x)  # type: ignore[no-any-return]
