"""CMD step 1: the stratified sample of parameters (:func:`sample_indices`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .._array import check_rank
from .._validate import check_int, check_seed, describe
from ..errors import ParameterError, ParameterTypeError

__all__ = ["sample_indices"]


def _sample_counts(n_seg: list[int], k: int) -> list[int]:
    """Per-segment sample sizes: the paper's formula, topped up to exactly ``k`` (``k < sum(n_seg)``)."""
    total = sum(n_seg)
    n_layers = len(n_seg)
    counts = [min(n, min(k // (2 * n_layers), n) + math.floor(n / total * k / 2)) for n in n_seg]
    short = k - sum(counts)
    if short > 0:
        cap = [n - c for n, c in zip(n_seg, counts, strict=True)]
        room = sum(cap)  # >= short because k < total
        num = [short * c for c in cap]
        extra = [v // room for v in num]
        left = short - sum(extra)
        # largest remainders first, ties to the lower segment (Hamilton's apportionment)
        order = sorted(range(n_layers), key=lambda i: (-(num[i] % room), i))
        for i in order[:left]:
            extra[i] += 1
        counts = [c + e for c, e in zip(counts, extra, strict=True)]
    return counts


def sample_indices(
    sizes: Sequence[int] | int, num_samples: int = 1000, *, seed: int | None = 0
) -> np.ndarray:
    """Flat indices of ``num_samples`` parameters, stratified over segments (tensors), sorted.

    ``sizes`` are the numbers of scalars of the ``L`` segments (tensors) that, concatenated, make the
    ``N`` rows of the trajectory (an int means one segment). Segment ``l`` (``n_l`` scalars) first gets
    the paper's ``min(n_l, min(floor(K/(2L)), n_l) + floor(n_l/N * K/2))`` indices; what flooring and
    small segments leave short of ``K`` is then shared among the segments in proportion to the scalars
    each has left (largest remainders first, ties to the lower segment), so exactly ``K`` distinct
    indices are drawn (uniformly without replacement within each segment). With ``K >= N`` every index is
    returned. Deterministic for a given ``seed`` (NumPy ``default_rng``; ``None`` draws fresh entropy).
    Returns a NumPy int64 array (host metadata).
    """
    if isinstance(sizes, (list, tuple)):
        seg: list[object] = list(sizes)
    elif isinstance(sizes, (int, np.integer)) and not isinstance(sizes, (bool, np.bool_)):
        seg = [sizes]
    else:
        raise ParameterTypeError(
            f"`sizes` must be an int or a non-empty list/tuple of ints, got {describe(sizes)}"
        )
    if not seg:
        raise ParameterError("`sizes` must name at least one segment, got an empty sequence")
    n_seg = [int(check_int(f"sizes[{i}]", n, min=0)) for i, n in enumerate(seg)]
    total = sum(n_seg)
    if total < 1:
        raise ParameterError(f"`sizes` must be >= 0 with a positive total, got {n_seg}")
    k = check_rank(num_samples, 2**62, name="num_samples", what="a huge bound")
    rng_seed = check_seed("seed", seed)
    if k >= total:
        return np.arange(total, dtype=np.int64)
    rng = np.random.default_rng(rng_seed)
    out: list[np.ndarray] = []
    offset = 0
    for n, take in zip(n_seg, _sample_counts(n_seg, k), strict=True):
        if take > 0:
            out.append(offset + np.sort(rng.choice(n, size=take, replace=False)).astype(np.int64))
        offset += n
    return np.concatenate(out)
