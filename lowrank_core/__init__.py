"""lowrank-core: low-rank training of neural networks, written once against the Python array API.

The functions here take arrays of any array-API-compatible library (NumPy, PyTorch, CuPy,
array_api_strict, ...) and return arrays of the same library, device and floating dtype.
See ``docs/SPEC.md`` for the exact semantics of each function.
"""

from __future__ import annotations

from . import errors
from .backend import Backend, StandardBackend, get_backend, register_backend
from .errors import (
    ArrayTypeError,
    DeviceMismatchError,
    DTypeError,
    LowRankError,
    NonFiniteError,
    RankError,
    ShapeError,
    SpectrumError,
)
from .factors import (
    LowRankFactors,
    RankUpdate,
    Rediagonalized,
    factorize,
    reconstruct,
    rediagonalize,
    rotate_sigma,
    truncate,
    update_rank,
)
from .linalg import QRResult, SVDResult, polar, qr, svd
from .rank import (
    EffectiveRank,
    Energy,
    FixedRank,
    OptimalHardThreshold,
    RankRule,
    RankRuleBase,
    SigmaCutoff,
    StableRank,
    TailNorm,
    effective_rank,
    stable_rank,
)
from .stability import basis_stability, principal_angle_cosines, projector_distance
from .views import matrix_shape, matrix_to_weight, weight_to_matrix

__version__ = "0.1.0.dev0"

__all__ = [
    "ArrayTypeError",
    "Backend",
    "DTypeError",
    "DeviceMismatchError",
    "EffectiveRank",
    "Energy",
    "FixedRank",
    "LowRankError",
    "LowRankFactors",
    "NonFiniteError",
    "OptimalHardThreshold",
    "QRResult",
    "RankError",
    "RankRule",
    "RankRuleBase",
    "RankUpdate",
    "Rediagonalized",
    "SVDResult",
    "ShapeError",
    "SigmaCutoff",
    "SpectrumError",
    "StableRank",
    "StandardBackend",
    "TailNorm",
    "__version__",
    "basis_stability",
    "effective_rank",
    "errors",
    "factorize",
    "get_backend",
    "matrix_shape",
    "matrix_to_weight",
    "polar",
    "principal_angle_cosines",
    "projector_distance",
    "qr",
    "reconstruct",
    "rediagonalize",
    "register_backend",
    "rotate_sigma",
    "stable_rank",
    "svd",
    "truncate",
    "update_rank",
    "weight_to_matrix",
]
