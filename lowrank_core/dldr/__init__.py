"""DLDR: low-dimensional trajectory subspaces and the P-SGD / P-BFGS math (Li et al., TPAMI 2022).

Training snapshots ``w_1 .. w_t`` (flattened trainable parameters, length ``D``) are collected one at a
time in a :class:`SnapshotStore` (in memory, or memory-mapped on disk). The store keeps the ``t x t``
Gram matrix up to date as each snapshot arrives (the new row is the dot products of the new snapshot
with the stored ones), so fitting the subspace afterwards needs one ``t x t`` eigendecomposition and
one pass over the snapshots. :func:`fit_subspace` (a ``(t, D)`` matrix at hand) takes the same route:
one pass for the Gram matrix, one for the basis. No ``D x D`` (nor a second ``t x D``) matrix is ever
formed: the peak memory of a fit is the snapshot storage, plus the ``d x D`` result *twice* (its column
pieces and the joined result exist together for a moment), plus ``3 D`` entries (the centre and its
pieces), plus one column chunk of scratch, ``O(t^2 + (t + d) W)`` (``W`` = :data:`CHUNK` = 65,536
columns; ``benchmarks/bench_dldr.py`` measures the peak against exactly this bound).

The :class:`Subspace` (centre, orthonormal basis rows ``P``, explained variance) maps weights to
coordinates ``c = P (w - origin)`` and back ``w = origin + P^T c``. :func:`bfgs_update`,
:func:`curvature_ok`, :func:`armijo_condition` and :func:`armijo_backtracking` are the P-BFGS math as
pure functions of (small, ``d``-dimensional) arrays.

Numerics (improvements on the published code):

* the Gram matrix is that of *shifted* snapshots ``y_i = w_i - w_1`` (``shift=True``, the default):
  centring is shift invariant, and trajectory snapshots share a large common part, so the uncentred
  Gram of raw weights would lose the small differences to cancellation, notably in float32;
* every long reduction (Gram entries, ``P P^T``) runs over column chunks of ``W`` entries and sums the
  chunks in float64; the Gram entries are computed in float64 from the stored vectors, so the Gram is
  that of the stored (float32 or float64) vectors to float64 accuracy, on every library;
* the small eigenproblem is solved in float64 on the host (NumPy) whatever the library: it is
  deterministic and identical on every device and every DDP rank;
* "zero variance" is decided by what the stored data can resolve (see :func:`subspace_from_gram`), not
  by the accuracy of a float32 Gram;
* the basis rows are re-orthonormalized (symmetric, Loewdin: ``P <- (P P^T)^{-1/2} P``, which keeps the
  directions closest to the computed ones) so ``P P^T = I`` holds to working precision even in float32;
* the BFGS curvature guard is scale invariant: a pair is skipped when ``s.y <= eps |s| |y|``.

No function writes into an array in place (JAX arrays are immutable): results are assembled from
pieces with ``concat``.

Modules (re-exported here; import from ``lowrank_core.dldr``): :mod:`~lowrank_core.dldr.chunked` (the
shared float64 chunked numerics and checks), :mod:`~lowrank_core.dldr.gram` (Gram matrices, eigenpairs),
:mod:`~lowrank_core.dldr.subspace` (:class:`Subspace`), :mod:`~lowrank_core.dldr.pca` (the fits),
:mod:`~lowrank_core.dldr.store` (:class:`SnapshotStore`) with its file I/O in
:mod:`~lowrank_core.dldr.store_file`, :mod:`~lowrank_core.dldr.bfgs` (the P-BFGS math) and
:mod:`~lowrank_core.dldr.pbfgs` (the P-BFGS step policy of every framework).
"""

from __future__ import annotations

from .bfgs import (
    LineSearchResult,
    armijo_backtracking,
    armijo_condition,
    bfgs_direction,
    bfgs_update,
    curvature_ok,
)
from .chunked import CHUNK as CHUNK
from .chunked import PCAMethod as PCAMethod
from .chunked import ShardReduce as ShardReduce
from .chunked import Slabs as Slabs
from .gram import centred_gram, gram_matrix
from .pbfgs import BFGSDirection, BFGSState, bfgs_step_direction, bfgs_step_finish
from .pca import fit_subspace, subspace_from_gram
from .store import SnapshotStore
from .subspace import Subspace

__all__ = [
    "BFGSDirection",
    "BFGSState",
    "LineSearchResult",
    "SnapshotStore",
    "Subspace",
    "armijo_backtracking",
    "armijo_condition",
    "bfgs_direction",
    "bfgs_step_direction",
    "bfgs_step_finish",
    "bfgs_update",
    "centred_gram",
    "curvature_ok",
    "fit_subspace",
    "gram_matrix",
    "subspace_from_gram",
]
