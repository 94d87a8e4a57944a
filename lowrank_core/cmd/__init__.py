"""CMD: Correlation Mode Decomposition of a training trajectory (Brokman et al., ICLR 2024).

A trajectory is an ``(N, T)`` array: one row per scalar parameter, one column per epoch end. CMD groups
the parameters into ``M`` *modes* of strongly correlated dynamics and models every parameter as an affine
function of its mode's *profile* (the trajectory of one reference parameter)::

    w_n(t) ~ a_n * r_{mode(n)}(t) + b_n

so the whole trajectory is stored as ``M`` profiles plus ``2 N`` coefficients.

Pipeline (post-hoc, :func:`fit_cmd`):

1. :func:`sample_indices`: ``K`` parameters, stratified over tensors (segments), deterministic for a seed;
2. :func:`abs_correlation`: ``C = |corrcoef|`` of the sampled rows (``K x K``; 0 for a constant row);
3. :func:`cluster`: complete-linkage agglomerative clustering into at most ``M`` clusters, on the
   Euclidean distance between rows of ``C`` (the paper's choice, the default) or on ``1 - C``;
   the same partition as ``scipy.cluster.hierarchy.linkage(method='complete')`` followed by
   ``fcluster(criterion='maxclust')`` on the same distance matrix (when no two merges tie; ties below);
4. :func:`find_modes`: the reference of a cluster is its member with the largest summed ``|corr|`` to the
   other members; the profiles are the references' rows;
5. :func:`assign_modes` / :func:`fit_coefficients`: every parameter joins the mode whose profile it
   correlates with most (in ``|pearson|``) and gets its least-squares ``(a_n, b_n)``; processed in row
   chunks, so nothing of size ``N x T`` is allocated beyond one chunk;
6. :func:`reconstruct_trajectory`, :func:`relative_error`.

Constant parameters. Real networks hold parameters that never move (weights on always-zero inputs, dead
units). A row counts as *constant* when its motion is at the level of rounding: its centred norm is at most
``8 eps sqrt(T) (|x_0| + rms_t(x_t - x_0))`` (``eps`` of the trajectory's dtype; the bracket lies between
``max_t |x_t| / sqrt(T)`` and ``3 max_t |x_t|``). A constant row correlates 0 with everything
(itself included), is kept out of the clustering (its sample label is ``-1``), never serves as a
reference, joins mode 0 and gets ``a = 0``, ``b =`` its mean (so it is reconstructed exactly). When
every sampled row is constant, the model has one mode whose reference is the first sampled row (every
``a`` is 0). Correlations are true Pearson correlations of the centred rows, clipped to ``[-1, 1]``.

Scale. Rows are shifted by their first value (exact for rows that move little) and, when their motion is so
large or small that squares would overflow or underflow, divided by a power of two (exact), so every fit is
invariant to the trajectory's scale: ``fit_cmd(c * x)`` has the same modes and assignment, the same ``a``
and ``c`` times the ``b`` of ``fit_cmd(x)`` (for powers of two ``c`` exactly; otherwise up to rounding).

Beyond the paper, :func:`choose_num_modes` picks the smallest ``M`` whose relative reconstruction error on
the sample stays under a tolerance (one linkage, cut at every ``M``).

Online CMD (:class:`OnlineCMD`): modes, references and assignment are fitted once on a warm-up trajectory,
then every new epoch updates each ``(a_n, b_n)`` so that it equals the batch least-squares fit over all
epochs seen, in ``O(2 N + M t)`` memory (Welford-style running means and co-moments, see the class).
:func:`select_embedding` chooses the parameters that embedded CMD replaces by their model.

Arrays of the caller's library are never written in place (every result is built with ``concat``,
``where``, ``take``), so immutable arrays (JAX) work; the ``K x K`` linkage runs on a private NumPy copy
of the distances.

Ties (documented, deterministic): the clustering merges, among equally close pairs of clusters, the pair
whose (smaller slot, larger slot) comes first in row-major order, where a cluster's slot is the smallest
original index among its members; when the ``M``-cluster cut falls on a height shared by several merges,
all of them are applied (as ``fcluster`` does), which can leave fewer than ``M`` clusters. Clusters are
numbered by decreasing size, equal sizes by their smallest member. A reference tie goes to the member with
the smallest sample index, an assignment tie to the lowest mode number (a constant parameter joins mode 0
with ``a = 0``). Mode ids are int64 in fits and int32 in the online state (no limit such as 256 modes).

Modules (re-exported here; import from ``lowrank_core.cmd``): :mod:`~lowrank_core.cmd.validation`
(constants, checks), :mod:`~lowrank_core.cmd.sampling` (step 1), :mod:`~lowrank_core.cmd.correlation`
(step 2), :mod:`~lowrank_core.cmd.linkage` (step 3), :mod:`~lowrank_core.cmd.modes` (step 4),
:mod:`~lowrank_core.cmd.least_squares` (step 5 and the model's rows), :mod:`~lowrank_core.cmd.fit` (the
pipeline, the error, automatic ``M``), :mod:`~lowrank_core.cmd.online` (online CMD),
:mod:`~lowrank_core.cmd.embedding` (embedded CMD) and :mod:`~lowrank_core.cmd.readahead` (the only file
I/O: a read-ahead hint for memmapped trajectories).
"""

from __future__ import annotations

from .correlation import abs_correlation
from .embedding import select_embedding
from .fit import CMDFit, choose_num_modes, fit_cmd, fit_cmd_shard, relative_error
from .least_squares import assign_modes, fit_coefficients, reconstruct_trajectory
from .linkage import cluster
from .modes import Modes, find_modes
from .online import PROFILES, OnlineCMD
from .sampling import sample_indices
from .validation import CONSTANT_TOLERANCE, DEFAULT_CHUNK_SIZE, DEFAULT_METRIC
from .validation import METRICS as METRICS
from .validation import Metric as Metric

__all__ = [
    "CONSTANT_TOLERANCE",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_METRIC",
    "PROFILES",
    "CMDFit",
    "Modes",
    "OnlineCMD",
    "abs_correlation",
    "assign_modes",
    "choose_num_modes",
    "cluster",
    "find_modes",
    "fit_cmd",
    "fit_cmd_shard",
    "fit_coefficients",
    "reconstruct_trajectory",
    "relative_error",
    "sample_indices",
    "select_embedding",
]
