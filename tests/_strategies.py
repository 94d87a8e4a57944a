"""Hypothesis strategies: shapes, seeds and, above all, spectra.

Matrices are built in NumPy float64 as ``U diag(s) V^T`` from Haar-random orthonormal factors and a drawn
spectrum, so that the true singular values, singular vectors, rank and condition number are known. Where a
basis is compared, consecutive singular values are separated by a relative gap (``s_i / s_{i+1} >= gap``), and
the condition number is bounded (per dtype) so that the tolerances stay meaningful.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from _helpers import random_orthogonal
from hypothesis import strategies as st

MAX_SIDE = 24
# Largest condition number drawn, per dtype.
MAX_COND = {"float16": 1e1, "bfloat16": 1e1, "float32": 1e3, "float64": 1e6}

seeds = st.integers(min_value=0, max_value=2**32 - 1)
batch_shapes = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)


@dataclass
class MatrixCase:
    """A (batch of) matrices with known SVD. Everything is float64 NumPy."""

    a: np.ndarray  # (*batch, m, n)
    U: np.ndarray  # (*batch, m, k)
    s: np.ndarray  # (*batch, k), descending
    V: np.ndarray  # (*batch, n, k)
    cond: float  # the largest s[0] / s[-1] over the batch (inf when rank deficient)

    @property
    def batch(self) -> tuple[int, ...]:
        return self.a.shape[:-2]

    @property
    def m(self) -> int:
        return self.a.shape[-2]

    @property
    def n(self) -> int:
        return self.a.shape[-1]

    @property
    def k(self) -> int:
        return min(self.m, self.n)


def gapped_spectrum(
    rng: np.random.Generator, k: int, *, max_cond: float, gap: float | None, scale: float
) -> np.ndarray:
    """k descending positive values, s[0] = scale, s[0]/s[-1] <= max_cond, s[i]/s[i+1] >= gap."""
    if k == 1:
        return np.array([scale])
    total = math.log(max_cond)
    lg = math.log(gap) if gap is not None else 0.0
    if (k - 1) * lg > total:
        raise ValueError(f"cannot fit {k} values with gap {gap} under condition number {max_cond}")
    extra = (total - (k - 1) * lg) / (k - 1)
    d = lg + rng.uniform(0.0, 1.0, size=k - 1) * extra
    if gap is None:
        # no gap asked for: allow (near) ties too
        ties = rng.uniform(size=k - 1) < 0.2
        d = np.where(ties, 0.0, d)
    return scale * np.exp(-np.concatenate([[0.0], np.cumsum(d)]))


def build_case(
    rng: np.random.Generator,
    batch: tuple[int, ...],
    m: int,
    n: int,
    *,
    max_cond: float,
    gap: float | None,
    scale: float,
    zero_tail: int = 0,
) -> MatrixCase:
    k = min(m, n)
    size = int(np.prod(batch, dtype=np.int64))
    As, Us, ss, Vs = [], [], [], []
    cond = 1.0
    for _ in range(size):
        s = gapped_spectrum(rng, k, max_cond=max_cond, gap=gap, scale=scale)
        if zero_tail:
            s[k - zero_tail :] = 0.0
        U = random_orthogonal(rng, m, k)
        V = random_orthogonal(rng, n, k)
        As.append((U * s) @ V.T)
        Us.append(U)
        ss.append(s)
        Vs.append(V)
        cond = max(cond, float(s[0] / s[-1]) if s[-1] > 0 else math.inf)
    return MatrixCase(
        a=np.stack(As).reshape((*batch, m, n)),
        U=np.stack(Us).reshape((*batch, m, k)),
        s=np.stack(ss).reshape((*batch, k)),
        V=np.stack(Vs).reshape((*batch, n, k)),
        cond=cond,
    )


@st.composite
def matrix_cases(
    draw: st.DrawFn,
    dtype: str = "float64",
    *,
    min_side: int = 1,
    max_side: int = MAX_SIDE,
    batch: bool = True,
    gap: float | None = 1.1,
    orientation: str = "any",  # "any", "tall" (m >= n), "wide" (m < n), "square"
    rank_deficient: bool = False,
    max_cond: float | None = None,
) -> MatrixCase:
    """Matrices with a known SVD; see the module docstring."""
    bshape = draw(batch_shapes) if batch else ()
    m = draw(st.integers(min_side, max_side))
    if orientation == "tall":
        n = draw(st.integers(min_side, m))
    elif orientation == "wide":
        m = min(m, max_side - 1)
        n = draw(st.integers(max(m + 1, min_side), max_side))
    elif orientation == "square":
        n = m
    else:
        n = draw(st.integers(min_side, max_side))
    k = min(m, n)
    cond_cap = MAX_COND[dtype] if max_cond is None else max_cond
    if gap is not None:
        cond_cap = max(cond_cap, gap ** (k - 1) * 1.01)
    log_cond = draw(st.floats(0.0, math.log10(cond_cap)))
    cond = max(10.0**log_cond, (gap ** (k - 1) * 1.001) if gap is not None else 1.0)
    scale = 10.0 ** draw(st.floats(-2.0, 2.0))
    zero_tail = draw(st.integers(1, k - 1)) if (rank_deficient and k >= 2) else 0
    seed = draw(seeds)
    return build_case(
        np.random.default_rng(seed),
        bshape,
        m,
        n,
        max_cond=cond,
        gap=gap,
        scale=scale,
        zero_tail=zero_tail,
    )


# --------------------------------------------------------------------------------------------------
# spectra for rank rules and spectrum measures
# --------------------------------------------------------------------------------------------------
_spectrum_values = st.one_of(
    st.just(0.0),
    st.sampled_from([1.0, 0.5, 0.1, 2.0, 10.0, 0.01]),  # ties and round numbers: boundary cases
    st.floats(1e-3, 1e3, allow_nan=False, allow_infinity=False),
)


@st.composite
def spectra(
    draw: st.DrawFn,
    *,
    min_k: int = 1,
    max_k: int = MAX_SIDE,
    batch: bool = False,
    nonzero: bool = False,
) -> np.ndarray:
    """Non-negative, non-increasing spectra of shape (*batch, k), float64, exactly representable in
    float32 (so that every dtype sees the same numbers)."""
    bshape = draw(batch_shapes) if batch else ()
    k = draw(st.integers(min_k, max_k))
    size = int(np.prod(bshape, dtype=np.int64))
    rows = []
    for _ in range(size):
        vals = draw(st.lists(_spectrum_values, min_size=k, max_size=k))
        s = np.sort(np.asarray(vals, dtype=np.float32).astype(np.float64))[::-1]
        if nonzero and s[0] == 0.0:
            s[0] = 1.0
        rows.append(s)
    return np.stack(rows).reshape((*bshape, k))


@st.composite
def full_shapes(draw: st.DrawFn, k: int) -> tuple[int, int] | None:
    """A full weight shape (m, n) with min(m, n) >= k, or None (the rule's default (k, k))."""
    if draw(st.booleans()):
        return None
    m = k + draw(st.integers(0, 300))
    n = k + draw(st.integers(0, 300))
    return (m, n)


@st.composite
def rank_bounds(draw: st.DrawFn, max_value: int = 30) -> tuple[int | None, int | None]:
    """(min_rank, max_rank), each None or a positive int, with min_rank <= max_rank."""
    lo = draw(st.one_of(st.none(), st.integers(1, max_value)))
    hi = draw(st.one_of(st.none(), st.integers(lo or 1, max_value)))
    return lo, hi
