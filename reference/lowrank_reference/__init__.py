"""lowrank_reference: an independent, plain-NumPy float64 oracle for lowrank-core.

Every function handles a single matrix or a single 1-D spectrum (weight views handle weight tensors)
and follows docs/SPEC.md literally; invalid arguments raise ``ValueError``.
"""

from __future__ import annotations

from . import cmd, dldr, init  # DLDR, CMD and low-rank initialization, by module
from .factors import factorize, reconstruct, rediagonalize, rotate_sigma, truncate
from .linalg import orthogonal_factor, polar, qr, svd
from .rank import (
    effective_rank_rule,
    energy_rank,
    fixed_rank,
    optimal_hard_threshold_rank,
    sigma_cutoff_rank,
    stable_rank_rule,
    tail_norm_rank,
)
from .spectrum import effective_rank, stable_rank
from .subspace import basis_stability, principal_angle_cosines, projector_distance
from .weights import matrix_to_weight, weight_to_matrix

__all__ = [
    "basis_stability",
    "cmd",
    "dldr",
    "effective_rank",
    "effective_rank_rule",
    "energy_rank",
    "factorize",
    "fixed_rank",
    "init",
    "matrix_to_weight",
    "optimal_hard_threshold_rank",
    "orthogonal_factor",
    "polar",
    "principal_angle_cosines",
    "projector_distance",
    "qr",
    "reconstruct",
    "rediagonalize",
    "rotate_sigma",
    "sigma_cutoff_rank",
    "stable_rank",
    "stable_rank_rule",
    "svd",
    "tail_norm_rank",
    "truncate",
    "weight_to_matrix",
]
