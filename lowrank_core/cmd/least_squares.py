"""CMD step 5: assignment and least-squares coefficients, chunk by chunk; the model's rows."""

from __future__ import annotations

import math

from .._array import Array, Namespace, namespace
from .._validate import check_bool, check_int
from ..errors import ParameterError, ShapeError
from .correlation import _Rows, _rows, _unit
from .validation import (
    DEFAULT_CHUNK_SIZE,
    _check_chunk,
    _check_finite,
    _check_modes_index,
    _check_trajectory,
    _check_vector,
    _eps,
    _index_dtype,
)

__all__ = ["assign_modes", "fit_coefficients", "reconstruct_trajectory"]


class _Profiles:
    """Per-mode quantities of the profiles needed by every chunk (compute dtype)."""

    def __init__(self, xp: Namespace, profiles: Array, eps: float) -> None:
        rows = _rows(xp, profiles, eps)[0]
        self.mean = rows.mean
        self.unit = _unit(xp, rows)  # (M, T), 0 for a constant profile
        # <d - mean(d), u> = <d, u - mean(u)> for any row d: the shifted rows need not be centred if
        # the profiles are re-centred (the unit rows are centred up to rounding; this removes what
        # rounding left, at one rounding per entry, the order of the GEMM's own rounding)
        t = int(self.unit.shape[1])
        recentred = self.unit - xp.sum(self.unit, axis=1)[:, None] / t
        # [U'^T | 1] (T, M + 1), contiguous: one GEMM per chunk gives <d - d̄, u_m> and the row sums
        ones = xp.matrix_transpose(xp.ones_like(self.unit[:1, :]))
        self.against = xp.concat([xp.matrix_transpose(recentred), ones], axis=1)
        self.norm = rows.norm
        self.scale = rows.scale
        self.constant = rows.constant
        self.dtype = rows.mean.dtype

    def m2(self, xp: Namespace, unit: float = 1.0) -> Array:
        """Centred sums of squares in units of ``unit**2`` (a power of two: the online state's unit)."""
        length = (self.scale / unit) * self.norm
        return xp.where(self.constant, xp.zeros_like(length), length * length)

    def unit_for_state(self, xp: Namespace) -> float:
        """A power of two near the largest profile's motion, so the online co-moments neither overflow
        nor underflow at any scale of the trajectory (1 when every profile is constant)."""
        moving = ~self.constant
        if not bool(xp.any(moving)):
            return 1.0
        logs = xp.log2(xp.where(moving, self.scale, xp.ones_like(self.scale))) + xp.log2(
            xp.where(moving, self.norm, xp.ones_like(self.norm))
        )
        top = float(xp.max(xp.where(moving, logs, xp.full_like(logs, -float("inf")))))
        return 2.0 ** max(-1000, min(1000, math.floor(top)))


def _chunk_stats(
    xp: Namespace,
    w: Array,
    prof: _Profiles,
    assignment: Array | None,
    eps: float,
    *,
    want_cov: bool = False,
    cov_unit: float = 1.0,
    finite_name: str | None = None,
) -> tuple[Array, Array, Array, Array | None]:
    """For a chunk ``w`` (c, T): mode (given or by max |corr|), mean, ``a`` and the co-moment.

    The co-moment ``sum_t (w - w̄)(r - r̄)`` with the mode's profile is returned in data units (it is the
    online state; it may overflow at extreme scales, ``a`` never does).
    """
    rows, prod = _rows(
        xp,
        xp.astype(w, prof.dtype) if w.dtype != prof.dtype else w,
        eps,
        finite_name=finite_name,
        against=prof.against,
    )
    assert prod is not None
    # (c, M): <w - w̄, unit profile> (scaled units), from the shifted rows without centring them
    g = prod[:, :-1]

    mode = _assign(xp, rows, g) if assignment is None else assignment
    mode = xp.astype(mode, _index_dtype(xp, w))
    gm = xp.take_along_axis(g, mode[:, None], axis=1)[:, 0]
    p_norm = xp.take(prof.norm, mode)
    p_scale = xp.take(prof.scale, mode)
    degenerate = rows.constant | xp.take(prof.constant, mode)
    safe_norm = xp.where(degenerate, xp.ones_like(p_norm), p_norm)
    a = xp.where(degenerate, xp.zeros_like(gm), (gm / safe_norm) * (rows.scale / p_scale))
    cov = None
    if want_cov:
        ratio = (rows.scale / cov_unit) * (p_scale / cov_unit)  # powers of two: exact
        cov = xp.where(degenerate, xp.zeros_like(gm), (gm * p_norm) * ratio)
    return mode, rows.mean, a, cov


def _check_profiles(xp: Namespace, trajectory: Array, profiles: Array, check_finite: bool) -> None:
    _check_trajectory(xp, profiles, "profiles")
    if profiles.shape[1] != trajectory.shape[1]:
        raise ShapeError(
            f"`profiles` {tuple(profiles.shape)} and `trajectory` {tuple(trajectory.shape)} "
            "must have the same number of epochs (columns)"
        )
    if check_finite:
        _check_finite(profiles, "profiles")


def _run_chunks(
    trajectory: Array,
    profiles: Array,
    assignment: Array | None,
    chunk_size: int,
    check_finite: bool,
    want: str,
) -> tuple[Array, ...]:
    names: dict[str, Array] = {"trajectory": trajectory, "profiles": profiles}
    if assignment is not None:
        names["assignment"] = assignment
    xp = namespace(**names)
    _check_trajectory(xp, trajectory, "trajectory")
    finite = check_bool("check_finite", check_finite)
    _check_profiles(xp, trajectory, profiles, finite)
    chunk = _check_chunk(chunk_size)
    n = int(trajectory.shape[0])
    if assignment is not None:
        _check_modes_index(xp, assignment, "assignment", n, int(profiles.shape[0]))
    eps = _eps(xp, trajectory.dtype)
    prof = _Profiles(xp, profiles, eps)
    modes: list[Array] = []
    a_parts: list[Array] = []
    b_parts: list[Array] = []
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        w = trajectory[s:e, :]
        given = None if assignment is None else assignment[s:e]
        name = "trajectory" if finite else None  # checked on the way, at no extra pass
        mode, mean, a, _ = _chunk_stats(xp, w, prof, given, eps, finite_name=name)
        modes.append(mode)
        if want != "assign":
            b = mean - a * xp.take(prof.mean, mode)
            a_parts.append(xp.astype(a, trajectory.dtype))
            b_parts.append(xp.astype(b, trajectory.dtype))
    out_mode = _join(xp, modes)
    if want == "assign":
        return (out_mode,)
    a_all, b_all = _join(xp, a_parts), _join(xp, b_parts)
    if want == "fit":
        return a_all, b_all
    return out_mode, a_all, b_all


def _join(xp: Namespace, parts: list[Array]) -> Array:
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)


def assign_modes(
    trajectory: Array,
    profiles: Array,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    check_finite: bool = True,
) -> Array:
    """Mode of every parameter: ``argmax_m |pearson(trajectory[n], profiles[m])|`` (int64 ``(N,)``).

    Processed ``chunk_size`` rows at a time (temporaries ``chunk_size x T`` and ``chunk_size x M``).
    A constant row (or profile, see the module docstring) correlates 0 with everything; a constant row
    joins mode 0; ties go to the lowest mode.
    """
    return _run_chunks(trajectory, profiles, None, chunk_size, check_finite, "assign")[0]


def fit_coefficients(
    trajectory: Array,
    profiles: Array,
    assignment: Array,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    check_finite: bool = True,
) -> tuple[Array, Array]:
    """Least-squares ``(a, b)`` (each ``(N,)``) of ``trajectory[n] ~ a_n profiles[mode_n] + b_n``.

    Computed from centred rows (``a = sum (w - w̄)(r - r̄) / sum (r - r̄)^2``, ``b = w̄ - a r̄``), chunked
    and scale-invariant. For a constant row or profile (see the module docstring) ``a = 0`` and
    ``b = mean(w)``.
    """
    namespace(trajectory=trajectory, assignment=assignment)  # an array, not None
    return _run_chunks(trajectory, profiles, assignment, chunk_size, check_finite, "fit")


def reconstruct_trajectory(
    profiles: Array,
    assignment: Array,
    a: Array,
    b: Array,
    *,
    start: int = 0,
    stop: int | None = None,
    check_finite: bool = True,
) -> Array:
    """Rows ``start:stop`` of the CMD model ``a_n profiles[mode_n] + b_n`` (``(stop-start, T)``).

    ``profiles`` ``(M, T)`` and ``a``, ``b`` ``(N,)`` are real floating (finite unless
    ``check_finite=False``), ``assignment`` ``(N,)`` integer mode ids in ``0 .. M-1``;
    ``0 <= start <= stop <= N`` (integers).
    """
    xp = namespace(profiles=profiles, assignment=assignment, a=a, b=b)
    _check_trajectory(xp, profiles, "profiles", min_epochs=1)
    if a.ndim != 1:
        raise ShapeError(f"`a` must be 1-D, got shape {tuple(a.shape)}")
    n = int(a.shape[0])
    finite = check_bool("check_finite", check_finite)
    _check_vector(xp, a, "a", n, finite=finite)
    _check_vector(xp, b, "b", n, finite=finite)
    _check_modes_index(xp, assignment, "assignment", n, int(profiles.shape[0]))
    if finite:
        _check_finite(profiles, "profiles")
    first = check_int("start", start, min=0)
    last = n if stop is None else check_int("stop", stop, min=0)
    if not first <= last <= n:
        raise ParameterError(f"need 0 <= start <= stop <= {n}, got start={start}, stop={stop}")
    rows = xp.take(profiles, assignment[first:last], axis=0)
    return a[first:last, None] * rows + b[first:last, None]


def _assign(xp: Namespace, rows: _Rows, g: Array) -> Array:
    """Mode of each row: the largest |pearson| with a profile (0 for constant rows; first on ties).

    ``g`` holds ``<w - w̄, unit profile>`` (0 for a constant profile), i.e. the correlations times the
    row's positive norm, which does not change the argmax: the true correlations are compared without
    forming them (``abs_correlation`` reports them clipped to ``[0, 1]``).
    """
    mode = xp.astype(xp.argmax(xp.abs(g), axis=1), _index_dtype(xp, g))
    return xp.where(rows.constant, xp.zeros_like(mode), mode)
