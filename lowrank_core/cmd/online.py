"""Online CMD (:class:`OnlineCMD`): modes fitted once, then exact recursive least squares per epoch."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import array_api_compat
import numpy as np

from .._array import Array, Namespace, check_floating, namespace, upcast
from .._validate import check_bool, check_choice, check_float, check_int, describe
from ..backend import get_backend
from ..errors import (
    CheckpointError,
    DTypeError,
    LowRankError,
    NonFiniteError,
    ParameterError,
    ParameterTypeError,
    ShapeError,
)
from .correlation import _rows, _unit
from .fit import CMDFit, _check_fit, fit_cmd
from .least_squares import _chunk_stats, _join, _Profiles, _run_chunks, reconstruct_trajectory
from .validation import (
    CONSTANT_TOLERANCE,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_METRIC,
    Metric,
    _check_chunk,
    _check_finite,
    _check_modes_index,
    _check_trajectory,
    _check_vector,
    _device,
    _eps,
    _host_indices,
    _index_array,
    _to_host,
)

__all__ = ["OnlineCMD"]


_STATE_KEYS = ("references", "assignment", "profiles", "r_mean", "r_m2", "w_mean", "c_wr", "unit")
#: the state of ``profile='centroid'`` only (absent from a published-method state)
_MIX_KEYS = ("mix_rows", "mix", "mix_offset")
PROFILES = ("reference", "centroid")


class OnlineCMD:
    """Online CMD: modes fitted once on a warm-up trajectory, then exact recursive least squares.

    State (all in the warm-up trajectory's library/device/dtype, half precision kept in float32):
    ``references`` (M,) flat indices; ``assignment`` (N,) int32 (fixed after warm-up; int32 rather than
    the published uint8, which caps M at 256, or int64, which doubles its bytes); ``profiles`` (M, t) the references'
    values at every epoch seen (the only part that grows: ``M`` numbers per epoch); per mode the running
    mean ``r_mean`` and centered sum of squares ``r_m2`` of its profile; per parameter the running mean
    ``w_mean`` and co-moment ``c_wr = sum_tau (w(tau) - w_mean)(r(tau) - r_mean)``. That is ``2 N + M t``
    numbers plus ``O(M)`` and the int32 assignment.

    :meth:`update` adds one epoch with Welford's updates, so that at every ``t``::

        a = c_wr / r_m2[mode],   b = w_mean - a * r_mean[mode]

    equal (up to rounding) the batch least-squares fit over all ``t`` epochs. This is the same recursion as
    ``A_t = (A_{t-1} G_{t-1} + w r~^T) G_t^{-1}`` with ``G_t = sum r~ r~^T``, written in centered
    coordinates: it never forms ``sum r^2`` and ``(sum r)^2`` (whose difference cancels catastrophically
    in float32 when weights move little) and never multiplies by ``G`` and ``G^{-1}`` in turn. The
    sums of squares and co-moments are kept in units of ``unit**2``, ``unit`` a power of two near the
    profiles' motion (chosen at the fit), so the state neither overflows nor underflows at any scale of
    the weights (``a`` and ``b`` do not depend on it). A profile
    whose ``r_m2`` is at rounding level (``<= (8 eps)^2 t r_mean^2``) counts as constant: its parameters
    get ``a = 0``, ``b = w_mean``.

    Profiles (``profile`` of :meth:`from_fit`): ``'reference'`` (default, the published method) reads
    mode ``m``'s profile value at each epoch from its reference parameter, ``r_m = w[references[m]]``.
    ``'centroid'`` makes it a fixed linear function of the warm-up sample's clustered parameters,
    ``r = mix @ (w[mix_rows] - mix_offset)`` (``mix`` ``(M, K')``, ``mix_rows`` ``(K',)``,
    ``mix_offset`` ``(K',)``): each cluster's mean of its members' trajectories, standardised by their
    warm-up mean and centred norm and signed by their warm-up correlation with the cluster's reference.
    One parameter's later quirks then move the profile by ``1/K_m`` of the mode, not all of it. The
    update, the coefficients and their exactness are the same for both: the profiles are whatever
    values were fed, and ``(a, b)`` is the least-squares fit on them.

    The constructor validates the whole state (types, shapes, dtypes, finiteness, index ranges) and raises
    a :class:`~lowrank_core.errors.LowRankError` naming the first problem; no array is copied or written.
    """

    def __init__(
        self,
        *,
        references: np.ndarray,
        assignment: Array,
        profiles: Array,
        r_mean: Array,
        r_m2: Array,
        w_mean: Array,
        c_wr: Array,
        unit: float = 1.0,
        mix_rows: object = None,
        mix: Array | None = None,
        mix_offset: Array | None = None,
        check_finite: bool = True,
    ) -> None:
        """``check_finite=False`` skips the checks that read values on the host (finite, ``r_m2 >= 0``,
        assignment in range): the form for rebuilding a state inside traced code (``jax.jit`` of
        :meth:`update`); shapes and dtypes are still checked. ``mix_rows``, ``mix`` and ``mix_offset``
        (all three or none) are the centroid profiles' state (see the class)."""
        unit = check_float("unit", unit, min=0.0, min_open=True)
        if 2.0 ** math.floor(math.log2(unit)) != unit:
            raise ParameterError(f"`unit` must be a power of two, got {unit!r}")
        xp = namespace(
            assignment=assignment,
            profiles=profiles,
            r_mean=r_mean,
            r_m2=r_m2,
            w_mean=w_mean,
            c_wr=c_wr,
        )
        if profiles.ndim != 2 or profiles.shape[0] < 1 or profiles.shape[1] < 1:
            raise ShapeError(
                f"`profiles` must be (M, t) with M, t >= 1, got shape {tuple(profiles.shape)}"
            )
        check_floating(xp, profiles, "profiles")
        n_modes, _ = int(profiles.shape[0]), int(profiles.shape[1])
        if w_mean.ndim != 1 or w_mean.shape[0] < 1:
            raise ShapeError(f"`w_mean` must be (N,) with N >= 1, got shape {tuple(w_mean.shape)}")
        n = int(w_mean.shape[0])
        for name, v, size in (
            ("r_mean", r_mean, n_modes),
            ("r_m2", r_m2, n_modes),
            ("w_mean", w_mean, n),
            ("c_wr", c_wr, n),
        ):
            _check_vector(xp, v, name, size, finite=False)
            if v.dtype != profiles.dtype:
                raise DTypeError(
                    f"`{name}` has dtype {v.dtype}, the profiles {profiles.dtype}: the state has one dtype"
                )
        for name, v in (
            ("profiles", profiles),
            ("r_mean", r_mean),
            ("r_m2", r_m2),
            ("w_mean", w_mean),
            ("c_wr", c_wr),
        ):
            if check_finite:
                _check_finite(v, name)
        if check_finite and bool(xp.any(r_m2 < 0)):
            raise ParameterError("`r_m2` (sums of squares) must be >= 0")
        _check_modes_index(xp, assignment, "assignment", n, n_modes, values=check_finite)
        # global row numbers: a shard's state (fit_cmd_shard) may name rows beyond its own N
        refs = _host_indices(references, "references", None)
        if refs.size != n_modes:
            raise ShapeError(
                f"`references` names {refs.size} parameters, the profiles have {n_modes} modes"
            )
        mixing = (mix_rows, mix, mix_offset)
        if any(v is not None for v in mixing) and any(v is None for v in mixing):
            raise ParameterError("give all of `mix_rows`, `mix`, `mix_offset` or none of them")
        self.mix_rows: np.ndarray | None = None
        self.mix: Array | None = None
        self.mix_offset: Array | None = None
        self._mix_idx: Array | None = None
        if mix is not None and mix_offset is not None:
            rows = _host_indices(mix_rows, "mix_rows", None)
            namespace(mix=mix, mix_offset=mix_offset, w_mean=w_mean)
            if mix.ndim != 2 or tuple(mix.shape) != (n_modes, rows.size):
                raise ShapeError(
                    f"`mix` must have shape ({n_modes}, {rows.size}) (modes, mix rows), got "
                    f"{tuple(mix.shape)}"
                )
            _check_vector(xp, mix_offset, "mix_offset", rows.size, finite=False)
            for name, v in (("mix", mix), ("mix_offset", mix_offset)):
                if v.dtype != profiles.dtype:
                    raise DTypeError(
                        f"`{name}` has dtype {v.dtype}, the profiles {profiles.dtype}: the state "
                        "has one dtype"
                    )
                if check_finite:
                    _check_finite(v, name)
            self.mix_rows, self.mix, self.mix_offset = rows, mix, mix_offset
            self._mix_idx = _index_array(xp, rows, w_mean)
        self.references = refs
        self.assignment = assignment
        self.profiles = profiles
        self.r_mean = r_mean
        self.r_m2 = r_m2
        self.w_mean = w_mean
        self.c_wr = c_wr
        self.unit = unit
        self._xp = xp
        self._ref_idx = _index_array(xp, self.references, w_mean)

    # ----------------------------------------------------------------------------------- building
    @classmethod
    def from_trajectory(
        cls,
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
        profile: str = "reference",
    ) -> OnlineCMD:
        """Fit modes on the warm-up ``trajectory`` ``(N, F)`` (see :func:`fit_cmd`) and start the sums.

        ``profile``: ``'reference'`` (the published method) or ``'centroid'`` (see :meth:`from_fit`).
        """
        fit = fit_cmd(
            trajectory,
            max_modes,
            tol=tol,
            sizes=sizes,
            num_samples=num_samples,
            seed=seed,
            metric=metric,
            chunk_size=chunk_size,
            check_finite=check_finite,
        )
        return cls.from_fit(trajectory, fit, chunk_size=chunk_size, profile=profile)

    @classmethod
    def from_fit(
        cls,
        trajectory: Array,
        fit: CMDFit,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        profile: str = "reference",
    ) -> OnlineCMD:
        """Start from a post-hoc ``fit`` of ``trajectory``.

        ``profile='reference'`` (default; the published method): the fit's modes, references,
        profiles and assignment are kept. ``'centroid'``: the fit's clusters of the sample are kept,
        each mode's profile becomes its sampled members' centroid (see the class; constant members,
        label ``-1``, take no part) and every parameter is re-assigned to the centroid profile it
        correlates with most over ``trajectory``; ``references`` stay the clusters' references (for
        information, and so that embedding never picks them).
        """
        if not isinstance(fit, CMDFit):
            raise ParameterTypeError(f"`fit` must be a CMDFit (from fit_cmd), got {describe(fit)}")
        kind = check_choice("profile", profile, PROFILES)
        xp = namespace(trajectory=trajectory, profiles=fit.profiles)
        _check_trajectory(xp, trajectory, "trajectory")
        _check_fit(xp, fit, trajectory)
        chunk = _check_chunk(chunk_size)
        eps = _eps(xp, trajectory.dtype)
        profiles, assignment = fit.profiles, fit.assignment
        mixing: dict[str, Any] = {}
        if kind == "centroid":
            rows, mix, offset = _centroid_mixing(xp, trajectory, fit, eps)
            sampled = upcast(xp, xp.take(trajectory, _index_array(xp, rows, trajectory), axis=0))
            profiles = mix @ (sampled - offset[:, None])
            assignment = _run_chunks(trajectory, profiles, None, chunk, False, "assign")[0]
            mixing = {"mix_rows": rows, "mix": mix, "mix_offset": offset}
        prof = _Profiles(xp, profiles, eps)
        unit = prof.unit_for_state(xp)
        n = int(trajectory.shape[0])
        means: list[Array] = []
        covs: list[Array] = []
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            with np.errstate(over="ignore"):
                _, mean, _, cov = _chunk_stats(
                    xp,
                    trajectory[s:e, :],
                    prof,
                    assignment[s:e],
                    eps,
                    want_cov=True,
                    cov_unit=unit,
                )
            assert cov is not None
            means.append(mean)
            covs.append(cov)
        w_mean, c_wr = _join(xp, means), _join(xp, covs)
        with np.errstate(over="ignore"):
            r_m2 = prof.m2(xp, unit)
        if not (get_backend(c_wr).all_finite(c_wr) and get_backend(r_m2).all_finite(r_m2)):
            raise NonFiniteError(
                "the online CMD co-moments overflow: the parameters' scales span too many orders of "
                "magnitude for one state unit"
            )
        if mixing:
            mixing["mix"] = xp.astype(mixing["mix"], prof.dtype)
            mixing["mix_offset"] = xp.astype(mixing["mix_offset"], prof.dtype)
        return cls(
            references=fit.references,
            assignment=xp.astype(assignment, xp.int32),  # half the bytes; 2**31 modes is plenty
            profiles=xp.astype(profiles, prof.dtype),
            r_mean=prof.mean,
            r_m2=r_m2,
            w_mean=w_mean,
            c_wr=c_wr,
            unit=unit,
            **mixing,
        )

    # ----------------------------------------------------------------------------------- properties
    @property
    def num_params(self) -> int:
        return int(self.w_mean.shape[0])

    @property
    def num_modes(self) -> int:
        return int(self.references.shape[0])

    @property
    def profile(self) -> str:
        """``'reference'`` (the published method) or ``'centroid'`` (see the class)."""
        return "reference" if self.mix is None else "centroid"

    @property
    def epochs(self) -> int:
        """Time points seen so far (warm-up included): epochs, or whatever cadence fed the updates."""
        return int(self.profiles.shape[1])

    @property
    def dtype(self) -> Any:
        return self.w_mean.dtype

    def nbytes(self) -> int:
        """Bytes held by the state arrays (the assignment included)."""
        arrays = [self.assignment, self.profiles, self.r_mean, self.r_m2, self.w_mean, self.c_wr]
        extra = self.references.nbytes
        if self.mix is not None and self.mix_offset is not None and self.mix_rows is not None:
            arrays += [self.mix, self.mix_offset]
            extra += self.mix_rows.nbytes
        return sum(int(math.prod(x.shape)) * _itemsize(x) for x in arrays) + extra

    def protected(self) -> np.ndarray:
        """Parameters the profiles are read from (NumPy int64, sorted): the references, and with
        ``profile='centroid'`` every mix row too; embedding must never overwrite them."""
        if self.mix_rows is None:
            return np.unique(self.references)
        return np.union1d(self.references, self.mix_rows)

    def profile_values(self, weights: Array) -> Array:
        """The modes' profile values ``(M,)`` at the parameter values ``weights`` ``(N,)`` (state
        dtype): ``weights[references]``, or ``mix @ (weights[mix_rows] - mix_offset)``."""
        xp = self._xp
        w = xp.astype(weights, self.dtype) if weights.dtype != self.dtype else weights
        if self.mix is None or self.mix_offset is None or self._mix_idx is None:
            return xp.take(w, self._ref_idx)
        return self.mix @ (xp.take(w, self._mix_idx) - self.mix_offset)

    # ----------------------------------------------------------------------------------- updates
    def update(
        self, weights: Array, *, check_finite: bool = True, reference_values: Array | None = None
    ) -> None:
        """Add one epoch: ``weights`` ``(N,)`` are every parameter's value at this epoch's end.

        ``reference_values`` ``(M,)``: the profiles' values at this epoch (the references' values, or
        :meth:`profile_values` of the whole weights), for a sharded state (:func:`fit_cmd_shard`)
        whose ``weights`` are one shard's and need not hold the rows they are read from (``None``: read
        from ``weights``, see :meth:`profile_values`).
        """
        xp = self._xp
        namespace(weights=weights, w_mean=self.w_mean)
        if weights.ndim != 1 or weights.shape[0] != self.num_params:
            raise ShapeError(
                f"`weights` must have shape ({self.num_params},), got {tuple(weights.shape)}"
            )
        check_floating(xp, weights, "weights")
        if check_bool("check_finite", check_finite):
            _check_finite(weights, "weights")
        w = xp.astype(weights, self.dtype) if weights.dtype != self.dtype else weights
        if reference_values is None:
            if int(self.protected().max()) >= self.num_params:
                raise ParameterError(
                    f"the profiles are read from rows beyond these {self.num_params} weights (a "
                    "shard's state): pass `reference_values`"
                )
            r = self.profile_values(w)
        else:
            namespace(reference_values=reference_values, w_mean=self.w_mean)
            if reference_values.shape != (self.num_modes,):
                raise ShapeError(
                    f"`reference_values` must have shape ({self.num_modes},), got "
                    f"{tuple(reference_values.shape)}"
                )
            check_floating(xp, reference_values, "reference_values")
            if check_finite:
                _check_finite(reference_values, "reference_values")
            r = reference_values
            if r.dtype != self.dtype:
                r = xp.astype(r, self.dtype)
        t = self.epochs + 1
        dr = r - self.r_mean
        r_mean = self.r_mean + dr / t
        u = self.unit  # a power of two: dividing by it is exact
        dr_new = (r - r_mean) / u
        r_m2 = self.r_m2 + (dr / u) * dr_new
        dw = w - self.w_mean
        w_mean = self.w_mean + dw / t
        c_wr = self.c_wr + (dw / u) * xp.take(dr_new, self.assignment)
        profiles = xp.concat([self.profiles, r[:, None]], axis=1)
        # every new value computed first, then all assigned (a failure above leaves the state as it was)
        self.r_mean, self.r_m2, self.w_mean, self.c_wr, self.profiles = (
            r_mean,
            r_m2,
            w_mean,
            c_wr,
            profiles,
        )

    def coefficients(self) -> tuple[Array, Array]:
        """``(a, b)``, each ``(N,)``: the least-squares fit over every epoch seen."""
        xp = self._xp
        eps = _eps(xp, self.dtype)
        r_mean = xp.take(self.r_mean, self.assignment)
        m2 = xp.take(self.r_m2, self.assignment)
        level = r_mean / self.unit
        floor = (CONSTANT_TOLERANCE * eps) ** 2 * self.epochs * (level * level)
        pos = m2 > floor
        a = xp.where(pos, self.c_wr / xp.where(pos, m2, xp.ones_like(m2)), xp.zeros_like(m2))
        b = self.w_mean - a * r_mean
        return a, b

    def weights(self, epoch: int = -1) -> Array:
        """The CMD weights ``a r(epoch) + b`` (``(N,)``) at a seen epoch (default: the latest).

        ``epoch`` is an integer in ``-t .. t-1`` (negative counts from the latest), else
        ``ParameterError``.
        """
        xp = self._xp
        t = self.epochs
        ep = check_int("epoch", epoch)
        e = ep + t if ep < 0 else ep
        if not 0 <= e < t:
            raise ParameterError(f"`epoch` {ep} out of range for {t} epochs seen (-{t}..{t - 1})")
        a, _ = self.coefficients()
        dr = self.profiles[:, e] - self.r_mean
        return self.w_mean + a * xp.take(dr, self.assignment)

    def reconstruct(self, start: int = 0, stop: int | None = None) -> Array:
        """Rows ``start:stop`` of the modelled trajectory over every epoch seen."""
        a, b = self.coefficients()
        return reconstruct_trajectory(self.profiles, self.assignment, a, b, start=start, stop=stop)

    # ----------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Arrays of the state (library arrays) plus the references (NumPy); see :meth:`from_state_dict`.

        With ``profile='centroid'`` also ``mix_rows`` (NumPy), ``mix`` and ``mix_offset``."""
        out: dict[str, Any] = {
            "references": self.references.copy(),
            "assignment": self.assignment,
            "profiles": self.profiles,
            "r_mean": self.r_mean,
            "r_m2": self.r_m2,
            "w_mean": self.w_mean,
            "c_wr": self.c_wr,
            "unit": self.unit,
        }
        if self.mix_rows is not None:  # profile='centroid' only: a published state is unchanged
            out.update(mix_rows=self.mix_rows.copy(), mix=self.mix, mix_offset=self.mix_offset)
        return out

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> OnlineCMD:
        """Rebuild from :meth:`state_dict` (the arrays may have been moved to another device).

        The state must hold exactly the keys of :meth:`state_dict` (the three centroid keys together or
        not at all); every entry is validated (see the
        class), errors name the key. ``state`` is not modified.
        """
        if not isinstance(state, Mapping):
            raise ParameterTypeError(f"the CMD state must be a dict, got {describe(state)}")
        keys = set(state)
        if "unit" not in keys:  # states saved before the unit existed: data units
            state = {**state, "unit": 1.0}
            keys.add("unit")
        missing = sorted(set(_STATE_KEYS) - keys)
        if missing:
            raise ParameterError(f"the CMD state is missing {missing}")
        extra = sorted(str(k) for k in keys - set(_STATE_KEYS) - set(_MIX_KEYS))
        if extra:
            raise ParameterError(f"the CMD state has unexpected keys {extra}")
        mixing = [k for k in _MIX_KEYS if k in keys]
        if mixing and len(mixing) != len(_MIX_KEYS):
            raise ParameterError(
                f"the CMD state has {mixing} but not {sorted(set(_MIX_KEYS) - set(mixing))}"
            )
        return cls(**{k: state[k] for k in (*_STATE_KEYS, *mixing)})

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace this state by a :meth:`state_dict` (validate, then apply).

        The whole state is validated first, as by :meth:`from_state_dict`; a state that does not fit
        raises :class:`~lowrank_core.errors.CheckpointError` naming the problem and this object is
        left exactly as it was.
        """
        try:
            new = type(self).from_state_dict(state)
        except CheckpointError:
            raise
        except LowRankError as exc:
            raise CheckpointError(f"the CMD state does not fit: {exc}") from exc
        self.__dict__.update(new.__dict__)


def _centroid_mixing(
    xp: Namespace, trajectory: Array, fit: CMDFit, eps: float
) -> tuple[np.ndarray, Array, Array]:
    """``(mix_rows, mix, mix_offset)`` of the centroid profiles of ``fit``'s sample clusters.

    ``mix[m, j] = s_j / (K_m * ||w_j - mean(w_j)||)`` for the ``K_m`` moving sampled rows ``j`` of
    cluster ``m`` (``s_j`` the sign of their correlation with the cluster's reference, ``+1`` for 0),
    ``mix_offset[j] = mean(w_j)``, all over ``trajectory``'s epochs (compute dtype).
    """
    labels = _to_host(fit.labels).astype(np.int64)
    members = np.flatnonzero(labels >= 0)
    rows = np.asarray(fit.sample, dtype=np.int64)[members]
    n = int(trajectory.shape[0])
    if (rows.size and int(rows.max()) >= n) or int(fit.references.max()) >= n:
        raise ParameterError(
            f"profile='centroid' reads the sampled rows from `trajectory`, but the fit's sample "
            f"names rows beyond its {n} (a shard's fit): use profile='reference'"
        )
    m = int(fit.num_modes)
    x = xp.take(trajectory, _index_array(xp, rows, trajectory), axis=0)
    ref = xp.take(trajectory, _index_array(xp, fit.references, trajectory), axis=0)
    stats = _rows(xp, x, eps)[0]
    unit = _unit(xp, stats)
    ref_unit = _unit(xp, _rows(xp, ref, eps)[0])
    lab = labels[members]
    lab_idx = _index_array(xp, lab, x)
    corr = xp.take_along_axis(unit @ xp.matrix_transpose(ref_unit), lab_idx[:, None], axis=1)[:, 0]
    sign = xp.where(corr < 0, -xp.ones_like(corr), xp.ones_like(corr))
    dtype = stats.mean.dtype
    counts = np.bincount(lab, minlength=m).astype(np.float64)
    count = xp.astype(xp.asarray(counts[lab], device=_device(x)), dtype)
    # a constant member (rounding-level motion) gets weight 0, as it got no cluster
    length = stats.scale * stats.norm
    safe = xp.where(stats.constant, xp.ones_like(length), length)
    coef = xp.where(stats.constant, xp.zeros_like(length), sign / (count * safe))
    onehot = xp.astype(
        xp.asarray((np.arange(m)[:, None] == lab[None, :]).astype(np.float64), device=_device(x)),
        dtype,
    )
    return rows, onehot * coef[None, :], stats.mean


def _itemsize(x: Array) -> int:
    xp = array_api_compat.array_namespace(x)
    if xp.isdtype(x.dtype, "bool"):
        return 1
    if xp.isdtype(x.dtype, "integral"):
        return int(xp.iinfo(x.dtype).bits) // 8
    return int(xp.finfo(x.dtype).bits) // 8
