"""Spectrum measures and rank rules.

A rank rule looks at singular values ``s`` (``(..., k)``, non-negative, descending; ``k`` is the current
rank) and the shape ``(m, n)`` of the full weight matrix, and returns the rank to keep: a Python ``int``
for one spectrum, a NumPy ``int64`` array of shape ``(...)`` for a stack. The spectrum is checked with
the array's library (on its device); the rule's decision is then computed in NumPy on a host copy of the
``k`` values, in their dtype, so every backend gives the same rank for the same spectrum whatever its
device's arithmetic (XLA's CPU backend, for one, flushes subnormal numbers to zero). The copy is as small
as the answer, and the answer has to reach the host anyway: a rule costs one transfer either way.

Every rule takes keyword-only ``min_rank`` / ``max_rank`` bounds; its raw rank ``r`` is clipped to
``[lo, hi]`` with ``hi = min(max_rank or k, k)`` and ``lo = min(min_rank or 1, hi)``: a rule never
returns more than ``k`` (ranks never grow) nor less than 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any, Protocol, runtime_checkable

import array_api_compat
import numpy as np

from ._array import Array, Namespace, check_finite, check_floating, namespace
from ._validate import check_float, check_int, check_shape_pair
from .backend import get_backend
from .errors import ParameterError, RankError, ShapeError, SpectrumError

__all__ = [
    "EffectiveRank",
    "Energy",
    "FixedRank",
    "OptimalHardThreshold",
    "RankRule",
    "RankRuleBase",
    "SigmaCutoff",
    "StableRank",
    "TailNorm",
    "effective_rank",
    "stable_rank",
]


# --------------------------------------------------------------------------- spectrum measures
def _check_spectrum(xp: Namespace, s: Array, *, descending: bool, values: bool = True) -> None:
    """Shape and dtype of a spectrum; with ``values`` also its values (finite, >= 0, order: host reads)."""
    if s.ndim < 1 or any(int(d) == 0 for d in s.shape):
        raise ShapeError(
            f"`s` must be a non-empty spectrum (or stack of spectra) of shape (..., k), "
            f"got shape {tuple(s.shape)}"
        )
    check_floating(xp, s, "s")
    if not values:
        return
    check_finite(xp, s, "s")
    if bool(xp.any(s < 0)):
        raise SpectrumError("`s` must be non-negative (singular values)")
    if descending and s.shape[-1] > 1 and bool(xp.any(s[..., 1:] > s[..., :-1])):
        raise SpectrumError(
            "`s` must be non-increasing along its last axis (singular values in descending order)"
        )


def _normalized(xp: Namespace, s: Array) -> tuple[Array, Array]:
    """``(s / max(s), max(s) > 0)`` along the last axis (``s`` itself where the spectrum is all zero).

    Every measure and rule is a ratio of sums (or a comparison with a multiple of ``s[0]``), so
    dividing by the largest value first changes nothing mathematically; it keeps the squares of
    extreme but finite spectra (``1e200``, ``1e-200``, float32 ``2e19``) from over- or underflowing.
    """
    top = xp.max(s, axis=-1, keepdims=True)
    nonzero = top > 0
    return s / xp.where(nonzero, top, xp.ones_like(top)), nonzero[..., 0]


def _effective_rank(xp: Namespace, s: Array) -> Array:
    s, _ = _normalized(xp, s)
    total = xp.sum(s, axis=-1, keepdims=True)
    nonzero = total > 0
    p = s / xp.where(nonzero, total, xp.ones_like(total))
    positive = p > 0
    plogp = xp.where(positive, p * xp.log(xp.where(positive, p, xp.ones_like(p))), xp.zeros_like(p))
    erank = xp.exp(-xp.sum(plogp, axis=-1))
    return xp.where(nonzero[..., 0], erank, xp.zeros_like(erank))


def _stable_rank(xp: Namespace, s: Array) -> Array:
    scaled, nonzero = _normalized(xp, s)
    ratio = xp.sum(scaled * scaled, axis=-1)
    return xp.where(nonzero, ratio, xp.zeros_like(ratio))


def effective_rank(s: Array, *, check_finite: bool = True) -> Array:
    """Effective rank (Roy & Vetterli 2007): ``exp`` of the entropy of ``s / sum(s)``; 0 if ``s == 0``.

    ``s``: singular values ``(..., k)``. Returns shape ``(...)``, a real number in ``[1, k]`` otherwise.
    ``check_finite=False`` skips the checks of the values (finite, non-negative), which read the data on
    the host: the form for traced code (``jax.jit``, ``jax.vmap``); shape and dtype are still checked.
    """
    xp = namespace(s=s)
    _check_spectrum(xp, s, descending=False, values=check_finite)
    return _effective_rank(xp, s)


def stable_rank(s: Array, *, check_finite: bool = True) -> Array:
    """Stable rank ``||A||_F^2 / ||A||_2^2 = sum(s^2) / max(s)^2``; 0 if ``s == 0``. Shape ``(...)``.

    ``check_finite=False`` skips the value checks, as in :func:`effective_rank`.
    """
    xp = namespace(s=s)
    _check_spectrum(xp, s, descending=False, values=check_finite)
    return _stable_rank(xp, s)


# --------------------------------------------------------------------------- rules
@runtime_checkable
class RankRule(Protocol):
    """Anything called as ``rule(s, *, shape=None)`` returning an ``int`` (or an int array for a stack)."""

    def __call__(self, s: Array, *, shape: Sequence[int] | None = None) -> Any: ...


def _set(rule: object, name: str, value: object) -> None:
    """Store a validated, canonical value on a frozen dataclass."""
    object.__setattr__(rule, name, value)


def _check_bound(rule: object, name: str) -> None:
    value = check_int(
        name, getattr(rule, name), min=1, optional=True, error=RankError, type_error=RankError
    )
    _set(rule, name, value)


def _check_unit_interval(rule: object, name: str, *, open_low: bool) -> None:
    value = check_float(name, getattr(rule, name), min=0.0, max=1.0, min_open=open_low)
    _set(rule, name, value)


@dataclass(frozen=True)
class RankRuleBase:
    """Shared machinery of the built-in rules: validation, bounds, conversion to host integers."""

    _: KW_ONLY
    min_rank: int | None = None
    max_rank: int | None = None

    def __post_init__(self) -> None:
        _check_bound(self, "min_rank")
        _check_bound(self, "max_rank")
        if (
            self.min_rank is not None
            and self.max_rank is not None
            and self.min_rank > self.max_rank
        ):
            raise RankError(
                f"`min_rank` ({self.min_rank}) must not exceed `max_rank` ({self.max_rank})"
            )

    def _raw(self, xp: Namespace, s: Array, k: int, m: int, n: int) -> Array:
        raise NotImplementedError

    def __call__(self, s: Array, *, shape: Sequence[int] | None = None) -> Any:
        xp = namespace(s=s)
        _check_spectrum(xp, s, descending=True)
        k = int(s.shape[-1])
        if shape is None:
            m, n = k, k
        else:
            dims = check_shape_pair("shape", shape)
            m, n = dims
            if min(m, n) < k:
                raise ShapeError(
                    f"`shape` {dims} has min(m, n) = {min(m, n)} < k = {k}, the length of the spectrum"
                )
        # the decision on a host copy (see the module docstring): the same rank on every backend
        hs = np.asarray(get_backend(s).to_numpy(s))
        host = np.asarray(self._raw(namespace(s=hs), hs, k, m, n), dtype=np.int64)
        hi = min(self.max_rank or k, k)
        lo = min(self.min_rank or 1, hi)
        ranks = np.clip(host, lo, hi).astype(np.int64)
        if s.ndim == 1:
            return int(ranks.reshape(()))
        return ranks.reshape(tuple(s.shape[:-1]))


def _int(xp: Namespace) -> Any:
    """The library's default integer dtype (int64; int32 for JAX without x64, where int64 is unavailable).

    Ranks are small, and the host copy is int64 either way."""
    return xp.__array_namespace_info__().default_dtypes()["integral"]


def _count(xp: Namespace, mask: Array) -> Array:
    return xp.sum(xp.astype(mask, _int(xp)), axis=-1)


def _full_like(xp: Namespace, ref: Array, value: int) -> Array:
    return xp.full(tuple(ref.shape), value, dtype=_int(xp), device=array_api_compat.device(ref))


@dataclass(frozen=True)
class SigmaCutoff(RankRuleBase):
    """OIALR's rule: drop singular values below ``fraction * s[0]``, at most halving the rank per call.

    ``j`` = number of values ``>= fraction * s[0]``, ``floor = max(1, int(floor_fraction * min(m, n)))``:
    ``j == k`` keeps ``k``; ``j < k/2`` (with ``k/2 > floor``) gives ``k // 2``; ``j < floor`` gives
    ``floor``; otherwise ``j``.
    """

    fraction: float = 0.1
    floor_fraction: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_unit_interval(self, "fraction", open_low=False)
        _check_unit_interval(self, "floor_fraction", open_low=False)

    def _raw(self, xp: Namespace, s: Array, k: int, m: int, n: int) -> Array:
        scaled, _ = _normalized(xp, s)  # s / s[0]: no underflow of fraction * s[0]
        j = _count(xp, scaled >= self.fraction * scaled[..., :1])
        floor = max(1, int(self.floor_fraction * min(m, n)))
        if k > 2 * floor:  # k / 2 > floor
            below = xp.where(
                2 * j < k,  # j < k / 2
                _full_like(xp, j, k // 2),
                j,
            )
        else:
            below = xp.where(j < floor, _full_like(xp, j, floor), j)
        return xp.where(j == k, _full_like(xp, j, k), below)


@dataclass(frozen=True)
class TailNorm(RankRuleBase):
    """DLRT's rule: the smallest ``r`` with ``||s[r:]||_2 < tol * ||s||_2`` (1 for a zero spectrum)."""

    tol: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_unit_interval(self, "tol", open_low=True)

    def _raw(self, xp: Namespace, s: Array, k: int, m: int, n: int) -> Array:
        scaled, _ = _normalized(xp, s)
        sq = scaled * scaled
        tail = xp.flip(
            xp.cumulative_sum(xp.flip(sq, axis=-1), axis=-1), axis=-1
        )  # tail[r] = sum_{i>=r}
        total = tail[..., :1]
        too_big = tail[..., 1:] >= (self.tol * self.tol) * total  # r = 1..k-1 failing the test
        r = 1 + _count(xp, too_big)
        return xp.where(total[..., 0] > 0, r, _full_like(xp, r, 1))


@dataclass(frozen=True)
class Energy(RankRuleBase):
    """The smallest ``r`` keeping a share ``energy`` of ``sum(s^2)`` (1 for a zero spectrum)."""

    energy: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_unit_interval(self, "energy", open_low=True)

    def _raw(self, xp: Namespace, s: Array, k: int, m: int, n: int) -> Array:
        scaled, _ = _normalized(xp, s)
        cum = xp.cumulative_sum(scaled * scaled, axis=-1)
        total = cum[..., -1:]
        short = cum[..., :-1] < self.energy * total  # r = 1..k-1 keeping too little
        return 1 + _count(xp, short)


@dataclass(frozen=True)
class OptimalHardThreshold(RankRuleBase):
    """Gavish & Donoho's optimal hard threshold for unknown noise: keep ``s > scale * omega(beta) * median(s)``.

    ``beta = min(m, n) / max(m, n)``, ``omega(beta) ~ 0.56 beta^3 - 0.95 beta^2 + 1.82 beta + 1.43``.
    Pass the full spectrum of the matrix (the median is taken over ``s``).
    """

    scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _set(self, "scale", check_float("scale", self.scale, min=0.0, min_open=True))

    def _raw(self, xp: Namespace, s: Array, k: int, m: int, n: int) -> Array:
        s, _ = _normalized(xp, s)
        beta = min(m, n) / max(m, n)
        omega = 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43
        if k % 2:
            median = s[..., k // 2 : k // 2 + 1]
        else:
            median = (s[..., k // 2 - 1 : k // 2] + s[..., k // 2 : k // 2 + 1]) / 2
        return _count(xp, s > (self.scale * omega) * median)


def _round_half_up(xp: Namespace, x: Array) -> Array:
    return xp.astype(xp.floor(x + 0.5), _int(xp))


@dataclass(frozen=True)
class EffectiveRank(RankRuleBase):
    """Keep ``round(effective_rank(s))`` values (halves round up)."""

    def _raw(self, xp: Namespace, s: Array, k: int, m: int, n: int) -> Array:
        return _round_half_up(xp, _effective_rank(xp, s))


@dataclass(frozen=True)
class StableRank(RankRuleBase):
    """Keep ``round(stable_rank(s))`` values (halves round up)."""

    def _raw(self, xp: Namespace, s: Array, k: int, m: int, n: int) -> Array:
        return _round_half_up(xp, _stable_rank(xp, s))


@dataclass(frozen=True)
class FixedRank(RankRuleBase):
    """A fixed ``rank``, or ``round(fraction * min(m, n))`` (exactly one of the two must be given)."""

    rank: int | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.rank is None) == (self.fraction is None):
            raise ParameterError("FixedRank needs exactly one of `rank` and `fraction`")
        if self.rank is not None:
            _check_bound(self, "rank")
        if self.fraction is not None:
            _check_unit_interval(self, "fraction", open_low=True)

    def _raw(self, xp: Namespace, s: Array, k: int, m: int, n: int) -> Array:
        if self.rank is not None:
            value = int(self.rank)
        else:
            assert self.fraction is not None
            value = max(1, math.floor(self.fraction * min(m, n) + 0.5))
        return _full_like(xp, s[..., 0], value)
