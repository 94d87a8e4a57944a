"""lowrank-core: low-rank training of neural networks, written once against the Python array API.

The functions here take arrays of any array-API-compatible library (NumPy, PyTorch, CuPy,
array_api_strict, ...) and return arrays of the same library, device and floating dtype.
See ``docs/spec.md`` (the documentation site's "Semantics" page) for the exact semantics of each function.
"""

from __future__ import annotations

from . import checkpoint, cmd, dldr, errors, init, oialr
from .backend import StandardBackend, get_backend, register_backend

# DLDR (lowrank_core.dldr), CMD (lowrank_core.cmd), low-rank initialization (lowrank_core.init): the
# main entry points here, everything else in the submodules.
from .cmd import CMDFit, Modes, OnlineCMD, choose_num_modes, fit_cmd
from .dldr import SnapshotStore, Subspace, fit_subspace
from .errors import (
    ArrayTypeError,
    CheckpointError,
    DeviceError,
    DeviceMismatchError,
    DTypeError,
    IntegrationError,
    LowRankError,
    NonFiniteError,
    ParameterError,
    ParameterTypeError,
    RankError,
    ShapeError,
    SnapshotStoreError,
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
from .init import (
    init_weight_factors,
    nonlinear_init,
    random_init,
    relu_function_error,
    spectral_init,
)
from .linalg import PolarResult, QRResult, SVDResult, orthogonal_factor, polar, qr, svd
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
from .stability import (
    basis_stability,
    polar_stability,
    principal_angle_cosines,
    projector_distance,
)
from .views import matrix_shape, matrix_to_weight, weight_to_matrix

__version__ = "0.1.0"

__all__ = [
    "ArrayTypeError",
    "CMDFit",
    "CheckpointError",
    "DTypeError",
    "DeviceError",
    "DeviceMismatchError",
    "EffectiveRank",
    "Energy",
    "FixedRank",
    "IntegrationError",
    "LowRankError",
    "LowRankFactors",
    "Modes",
    "NonFiniteError",
    "OnlineCMD",
    "OptimalHardThreshold",
    "ParameterError",
    "ParameterTypeError",
    "PolarResult",
    "QRResult",
    "RankError",
    "RankRule",
    "RankRuleBase",
    "RankUpdate",
    "Rediagonalized",
    "SVDResult",
    "ShapeError",
    "SigmaCutoff",
    "SnapshotStore",
    "SnapshotStoreError",
    "SpectrumError",
    "StableRank",
    "StandardBackend",
    "Subspace",
    "TailNorm",
    "__version__",
    "basis_stability",
    "checkpoint",
    "choose_num_modes",
    "cmd",
    "dldr",
    "effective_rank",
    "errors",
    "factorize",
    "fit_cmd",
    "fit_subspace",
    "get_backend",
    "init",
    "init_weight_factors",
    "matrix_shape",
    "matrix_to_weight",
    "nonlinear_init",
    "oialr",
    "orthogonal_factor",
    "polar",
    "polar_stability",
    "principal_angle_cosines",
    "projector_distance",
    "qr",
    "random_init",
    "reconstruct",
    "rediagonalize",
    "register_backend",
    "relu_function_error",
    "rotate_sigma",
    "spectral_init",
    "stable_rank",
    "svd",
    "truncate",
    "update_rank",
    "weight_to_matrix",
]
