"""The whole post-hoc CMD pipeline: :func:`fit_cmd`, :func:`fit_cmd_shard`, the error, automatic ``M``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .._array import Array, Namespace, check_rank, namespace, upcast
from .._validate import check_bool, check_int, describe
from ..errors import DTypeError, NonFiniteError, ParameterError, ParameterTypeError, ShapeError
from .correlation import _rows
from .least_squares import _assign, _Profiles, _run_chunks, reconstruct_trajectory
from .modes import _cluster_sample, find_modes
from .readahead import _advise_rows
from .sampling import sample_indices
from .validation import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_METRIC,
    Metric,
    _check_chunk,
    _check_finite,
    _check_fraction,
    _check_metric,
    _check_trajectory,
    _eps,
    _index_array,
)

__all__ = ["CMDFit", "choose_num_modes", "fit_cmd", "fit_cmd_shard", "relative_error"]


@dataclass(frozen=True)
class CMDFit:
    """A post-hoc CMD model of an ``(N, T)`` trajectory.

    ``sample``: NumPy int64 ``(K,)`` rows that were clustered; ``labels``: int64 ``(K,)`` their clusters
    (``-1`` for constant rows, kept out of the clustering); ``references``: NumPy int64 ``(M,)`` rows (of
    the whole trajectory) whose trajectories are the profiles; ``profiles``: ``(M, T)``; ``assignment``:
    int64 ``(N,)``; ``a``, ``b``: ``(N,)``.
    """

    sample: np.ndarray
    labels: Array
    references: np.ndarray
    profiles: Array
    assignment: Array
    a: Array
    b: Array

    @property
    def num_modes(self) -> int:
        return int(self.references.shape[0])

    def reconstruct(self, start: int = 0, stop: int | None = None) -> Array:
        """Rows ``start:stop`` of the modelled trajectory."""
        return reconstruct_trajectory(
            self.profiles, self.assignment, self.a, self.b, start=start, stop=stop
        )


def _check_fit(xp: Namespace, fit: object, trajectory: Array) -> CMDFit:
    if not isinstance(fit, CMDFit):
        raise ParameterTypeError(f"`fit` must be a CMDFit (from fit_cmd), got {describe(fit)}")
    n, t = int(trajectory.shape[0]), int(trajectory.shape[1])
    if fit.profiles.ndim != 2 or int(fit.profiles.shape[1]) != t:
        raise ShapeError(
            f"`fit` models {tuple(fit.profiles.shape)[1:]} epochs, `trajectory` has {t}"
        )
    if fit.assignment.ndim != 1 or int(fit.assignment.shape[0]) != n:
        raise ShapeError(
            f"`fit` models {tuple(fit.assignment.shape)} parameters, `trajectory` has {n} rows"
        )
    return fit


def _sample_rows(xp: Namespace, trajectory: Array, idx: np.ndarray) -> Array:
    return xp.take(trajectory, _index_array(xp, idx, trajectory), axis=0)


def _check_sizes(sizes: object, n: int) -> list[int] | None:
    if sizes is None:
        return None
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, (list, tuple)):
        raise ParameterTypeError(f"`sizes` must be a list or tuple of ints, got {describe(sizes)}")
    seg = [int(check_int(f"sizes[{i}]", s, min=0)) for i, s in enumerate(sizes)]
    if sum(seg) != n:
        raise ShapeError(f"`sizes` sum to {sum(seg)}, but `trajectory` has {n} rows")
    return seg


def fit_cmd(
    trajectory: Array,
    max_modes: int | None = None,
    *,
    tol: float | None = None,
    sizes: Sequence[int] | None = None,
    num_samples: int = 1000,
    seed: int | None = 0,
    metric: Metric = DEFAULT_METRIC,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    check_finite: bool = True,
) -> CMDFit:
    """Post-hoc CMD of ``trajectory`` ``(N, T)``: sample, cluster, references, assignment, (a, b).

    Exactly one of ``max_modes`` (the paper's ``M``) and ``tol`` (automatic ``M``: the smallest whose
    relative error on the sample is ``<= tol``, see :func:`choose_num_modes`, up to ``min(K, 32)``) may be
    given; neither means ``max_modes=10``. ``sizes`` splits the rows into tensors for stratified sampling
    (default one segment). The trajectory is only read in ``chunk_size``-row slices (a NumPy memmap works).
    Constant parameters are handled as in the module docstring; the fit is scale-invariant.
    """
    xp = namespace(trajectory=trajectory)
    _check_trajectory(xp, trajectory, "trajectory")
    n = int(trajectory.shape[0])
    seg = _check_sizes(sizes, n)
    finite = check_bool("check_finite", check_finite)
    idx = sample_indices(n if seg is None else seg, num_samples, seed=seed)
    _advise_rows(trajectory, idx)
    sample = _sample_rows(xp, trajectory, idx)
    _check_shard_options(max_modes, tol, metric, chunk_size, int(idx.size))
    if finite:
        _check_finite(sample, "trajectory")
    return fit_cmd_shard(
        trajectory,
        sample,
        idx,
        max_modes,
        tol=tol,
        metric=metric,
        chunk_size=chunk_size,
        check_finite=finite,
    )


def _check_shard_options(
    max_modes: object, tol: object, metric: object, chunk_size: object, k: int
) -> Metric:
    met = _check_metric(metric)
    _check_chunk(chunk_size)
    if max_modes is not None and tol is not None:
        raise ParameterError("give `max_modes` or `tol`, not both")
    if tol is not None:
        _check_fraction(tol, "tol", open_low=False)
    if max_modes is not None:
        check_rank(max_modes, k, name="max_modes", what="the number of sampled rows K")
    return met


def fit_cmd_shard(
    shard: Array,
    sample: Array,
    sample_index: np.ndarray | Sequence[int],
    max_modes: int | None = None,
    *,
    tol: float | None = None,
    metric: Metric = DEFAULT_METRIC,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    check_finite: bool = True,
) -> CMDFit:
    """CMD of one shard of a trajectory whose rows are spread over several processes.

    ``sample`` ``(K, T)`` are the rows ``sample_index`` (global row numbers, e.g. from
    :func:`sample_indices` of the whole trajectory's ``sizes``) of the *whole* trajectory, gathered
    from the shards that hold them: the same array on every process, so every process finds the same
    modes, references (global row numbers) and profiles. Then the shard's own rows ``shard``
    ``(N_shard, T)`` are assigned and fitted; ``assignment``, ``a`` and ``b`` are the shard's. With
    ``shard`` the whole trajectory this is the second half of :func:`fit_cmd` (which calls it).
    ``sample`` is checked for finiteness by the caller; ``shard`` is checked in chunks.
    """
    xp = namespace(shard=shard, sample=sample)
    _check_trajectory(xp, shard, "shard")
    _check_trajectory(xp, sample, "sample")
    if isinstance(sample_index, (str, bytes)) or sample_index is None:
        raise ParameterTypeError(
            f"`sample_index` must be a 1-D array of integer row numbers, got {describe(sample_index)}"
        )
    raw = np.asarray(sample_index)
    if raw.size and raw.dtype.kind not in "iu":
        raise DTypeError(f"`sample_index` must hold integers, got dtype {raw.dtype}")
    idx = raw.astype(np.int64)
    if idx.shape != (int(sample.shape[0]),) or sample.shape[1] != shard.shape[1]:
        raise ShapeError(
            f"`sample` {tuple(sample.shape)} must hold one row per `sample_index` entry "
            f"({idx.shape[0] if idx.ndim else 0}) and as many epochs as `shard` {tuple(shard.shape)}"
        )
    if idx.size and int(idx.min()) < 0:
        raise ParameterError("`sample_index` must hold non-negative row numbers")
    finite = check_bool("check_finite", check_finite)
    met = _check_shard_options(max_modes, tol, metric, chunk_size, int(idx.size))
    if tol is not None:
        max_modes = choose_num_modes(
            sample, tol, max_modes=min(int(idx.size), 32), metric=met, check_finite=False
        )
    modes = find_modes(
        sample, 10 if max_modes is None else max_modes, metric=met, check_finite=False
    )
    # the profiles are rows of the trajectory itself (same dtype), so chunked fitting matches the sample's
    assignment, a, b = _run_chunks(shard, modes.profiles, None, chunk_size, finite, "both")
    return CMDFit(
        sample=idx,
        labels=modes.labels,
        references=idx[modes.references],
        profiles=modes.profiles,
        assignment=assignment,
        a=a,
        b=b,
    )


class _SumSquares:
    """A sum of squares kept as ``scale**2 * value`` (no overflow or underflow at any finite scale)."""

    def __init__(self) -> None:
        self.scale = 0.0
        self.value = 0.0

    def add(self, xp: Namespace, v: Array) -> None:
        top = float(xp.max(xp.abs(v))) if math.prod(v.shape) else 0.0
        if top == 0.0:
            return
        if not math.isfinite(top):
            raise NonFiniteError("the CMD model of the trajectory is not finite (NaN or Inf)")
        p = 2.0 ** math.floor(math.log2(top))
        u = v / p
        q = float(xp.sum(u * u))
        if p > self.scale:
            self.value = self.value * (self.scale / p) ** 2 + q
            self.scale = p
        else:
            self.value += q * (p / self.scale) ** 2

    def ratio(self, other: _SumSquares) -> float:
        """``sqrt(self / other)``."""
        if other.value == 0.0:
            return 0.0 if self.value == 0.0 else math.inf
        return (self.scale / other.scale) * math.sqrt(self.value / other.value)


def relative_error(
    trajectory: Array,
    fit: CMDFit,
    *,
    centered: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> float:
    """``||trajectory - model||_F / ||trajectory - row means||_F`` (``centered=False``: ``/ ||trajectory||_F``).

    The centered form measures how much of the *motion* CMD misses; the plain form is dominated by the
    weights' offsets, which ``b`` captures exactly, and looks small for any model. When the denominator
    is 0 it is 0 for an exact model and ``inf`` otherwise. Computed in chunks, scale-invariant (no
    overflow at any finite scale). A trajectory holding NaN or Inf raises ``NonFiniteError``.
    """
    if not isinstance(fit, CMDFit):
        raise ParameterTypeError(f"`fit` must be a CMDFit (from fit_cmd), got {describe(fit)}")
    xp = namespace(trajectory=trajectory, profiles=fit.profiles)
    _check_trajectory(xp, trajectory, "trajectory", min_epochs=1)
    _check_fit(xp, fit, trajectory)
    cen = check_bool("centered", centered)
    chunk = _check_chunk(chunk_size)
    eps = _eps(xp, trajectory.dtype)
    n = int(trajectory.shape[0])
    num, den = _SumSquares(), _SumSquares()
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        w = upcast(xp, trajectory[s:e, :])
        _check_finite(w, "trajectory")
        model = fit.reconstruct(s, e)
        num.add(xp, w - xp.astype(model, w.dtype))
        den.add(xp, w - _rows(xp, w, eps)[0].mean[:, None] if cen else w)
    return num.ratio(den)


def choose_num_modes(
    sample: Array,
    tol: float,
    *,
    max_modes: int | None = None,
    metric: Metric = DEFAULT_METRIC,
    check_finite: bool = True,
) -> int:
    """The smallest ``M`` whose CMD model of ``sample`` ``(K, T)`` has centered relative error ``<= tol``.

    One linkage is computed and cut at ``M = 1, 2, ...``; for each cut the references are chosen, every
    sampled row is assigned and fitted as in :func:`fit_cmd`, and the error
    ``||X - X_hat||_F / ||X - row means||_F`` is measured. Returns ``max_modes`` (default ``K``; at most
    the number of moving rows) when no ``M`` reaches ``tol``. Non-increasing in ``tol`` by construction (a
    minimum over a set that grows with ``tol``). ``tol`` in [0, 1]. Scale-invariant.
    """
    xp = namespace(sample=sample)
    _check_trajectory(xp, sample, "sample")
    if check_bool("check_finite", check_finite):
        _check_finite(sample, "sample")
    t = _check_fraction(tol, "tol", open_low=False)
    k = int(sample.shape[0])
    upper = k if max_modes is None else check_rank(max_modes, k, name="max_modes", what="K")
    met = _check_metric(metric)
    cl = _cluster_sample(xp, sample, met)
    if cl.keep.size == 0:
        return 1
    upper = min(upper, int(cl.keep.size))
    rows = cl.rows
    # rows weighted by their scale (relative to the largest, powers of two: exact); constant rows, whose
    # motion is at rounding level by definition, are left out of both sums
    zero = xp.zeros_like(rows.scale)
    top = float(xp.max(xp.where(rows.constant, zero, rows.scale)))
    weight = xp.where(rows.constant, zero, rows.scale / top)
    weight = weight * weight
    den = float(xp.sum(weight * rows.norm * rows.norm))
    if den == 0.0:
        return 1
    eps = _eps(xp, sample.dtype)
    centred = rows.centred(xp)
    for m in range(1, upper + 1):
        _, refs = cl.labels_and_refs(m, k)
        prof = _Profiles(xp, xp.take(sample, _index_array(xp, refs, sample), axis=0), eps)
        g = centred @ xp.matrix_transpose(prof.unit)
        mode = _assign(xp, rows, g)
        gm = xp.take_along_axis(g, mode[:, None], axis=1)[:, 0]
        degenerate = rows.constant | xp.take(prof.constant, mode)
        gm = xp.where(degenerate, xp.zeros_like(gm), gm)
        res = centred - gm[:, None] * xp.take(prof.unit, mode, axis=0)
        num = float(xp.sum(weight * xp.sum(res * res, axis=1)))
        if math.sqrt(num / den) <= t:
            return m
    return upper
