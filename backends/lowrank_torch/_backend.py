"""What the array API standard lacks, done the PyTorch way."""

from __future__ import annotations

from typing import Any

import array_api_compat.torch as torch_xp
import numpy as np
import torch

from lowrank_core._validate import check_seed, check_shape
from lowrank_core.backend import StandardBackend

__all__ = ["TorchBackend"]

# Matrices up to this size (both dimensions) go to cuSOLVER's batched Jacobi SVD on CUDA, which is
# much faster than the default driver for large stacks of small matrices.
_JACOBI_MAX = 32


class TorchBackend(StandardBackend):
    """Backend for ``torch.Tensor`` (CPU and CUDA)."""

    name = "torch"

    def __init__(self) -> None:
        super().__init__(torch_xp)

    def svd(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        driver = None
        if a.is_cuda and a.ndim > 2 and max(a.shape[-2], a.shape[-1]) <= _JACOBI_MAX:
            driver = "gesvdj"
        U, S, Vh = torch.linalg.svd(a, full_matrices=False, driver=driver)
        return U, S, Vh

    def all_finite(self, x: torch.Tensor) -> bool:
        # max(|x|) propagates NaN and is Inf iff an entry is: one reduction instead of an
        # element-wise isfinite pass plus a reduction (4-9x faster on CPU), and it cannot overflow.
        if x.numel() == 0:
            return True
        return bool(torch.isfinite(x.detach().abs().amax()))

    def eigh(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, V = torch.linalg.eigh(a)
        return w, V

    def random_normal(
        self,
        shape: tuple[int, ...],
        *,
        dtype: Any = None,
        device: Any = None,
        seed: int | None = None,
    ) -> torch.Tensor:
        shape = check_shape("shape", shape, min=0)  # the same rule as the base backend
        seed = check_seed("seed", seed)
        dev = torch.device("cpu") if device is None else torch.device(device)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=dev)
            generator.manual_seed(int(seed))
        return torch.randn(
            tuple(shape), generator=generator, dtype=dtype or torch.get_default_dtype(), device=dev
        )

    def synchronize(self, device: Any = None) -> None:
        if torch.cuda.is_available():
            dev = torch.device("cuda") if device is None else torch.device(device)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

    def to_numpy(self, x: torch.Tensor) -> np.ndarray:
        t = x.detach()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return np.asarray(t.cpu().numpy())
