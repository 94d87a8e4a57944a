"""Low-rank initialization: spectral, nonlinear (ReLU function-approximating) and random factors.

A rank-``r`` weight is held either *balanced*, ``W ~ left @ right.mT`` with ``left (..., m, r)`` and
``right (..., n, r)`` of equal Gram matrices (the two-factor layout of from-scratch low-rank training), or in
OIALR's form ``U @ Sigma @ V.mT`` (:class:`~lowrank_core.factors.LowRankFactors`: ``U``, ``V`` orthonormal,
``Sigma`` diagonal). Every initializer exists in both forms.

- **Spectral** (Khodak et al., ICLR 2021): the best rank-``r`` approximation of a (dense-initialized) weight,
  ``W = A S B^T`` (thin SVD) -> ``left = A_r S_r^{1/2}``, ``right = B_r S_r^{1/2}``.
- **Nonlinear** (after Vodrahalli et al., arXiv 2202.00834): the rank-``r`` ``M`` that makes ``ReLU(M x)``
  close to ``ReLU(W x)`` for ``x ~ N(0, I)``, in the closed form of :func:`relu_function_error`. For a
  fixed ``r``-dimensional row subspace ``S`` the optimal row ``m_i`` is ``P_S w_i`` rescaled to the norm
  ``||w_i|| J(theta_i) / pi`` (``theta_i`` = angle between ``w_i`` and ``S``), with loss
  ``||w_i||^2 / 2 (1 - J(theta_i)^2 / pi^2)``. ``S`` starts as the top-``r`` right singular subspace of ``W``
  (so the result is never worse than spectral init); ``refine_steps > 0`` then descends the loss over the
  subspace itself (Riemannian gradient steps on the Grassmannian with backtracking, the rows re-optimized in
  closed form after every step), accepting a step only when it lowers the loss.
- **Random**: Gaussian factors whose product has the variance of the dense default initialization.
- **Frobenius decay**: the penalty ``coefficient / 2 * ||left @ right.mT||_F^2`` and its gradients, the
  regularizer that replaces weight decay on the factors in from-scratch low-rank training.

Conv kernels: :func:`init_weight_factors` takes a weight tensor ``(out, *rest)`` and works on its matrix view
(:func:`lowrank_core.views.weight_to_matrix`, one matrix per group).

All functions take matrices ``(..., m, n)`` (leading batch dimensions allowed), get the namespace from their
inputs, compute in at least float32 and return the input's library, device and floating dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import array_api_compat
import numpy as np

from ._array import (
    Array,
    Namespace,
    cast_to,
    check_floating,
    check_matrix,
    check_rank,
    compute_dtype,
    diag_embed,
    namespace,
    power_of_two_near,
    result_dtype,
    upcast,
)
from ._validate import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_seed,
    check_shape,
)
from .backend import get_backend
from .errors import ShapeError
from .factors import LowRankFactors
from .linalg import _canonical_signs, _qr, _svd
from .views import weight_to_matrix

__all__ = [
    "INIT_METHODS",
    "BalancedFactors",
    "balanced_to_factors",
    "default_init_std",
    "factors_to_balanced",
    "frobenius_decay",
    "frobenius_decay_grad",
    "init_weight_factors",
    "nonlinear_factors",
    "nonlinear_init",
    "random_factors",
    "random_init",
    "relu_function_error",
    "spectral_factors",
    "spectral_init",
]

INIT_METHODS = ("spectral", "nonlinear", "random")
"""The initializers :func:`init_weight_factors` accepts."""


class BalancedFactors(NamedTuple):
    """``left (..., m, r)``, ``right (..., n, r)``: the matrix ``left @ right.mT``.

    The initializers return them *balanced*: ``left.mT @ left == right.mT @ right`` (both ``diag(s)`` for the
    singular values ``s`` of the product), the split gradient descent on two factors keeps.
    """

    left: Array
    right: Array


# --------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------
def _safe_div(xp: Namespace, x: Array, y: Array) -> Array:
    """``x / y`` where ``y > 0``, else 0 (element-wise, no warnings)."""
    pos = y > 0
    return xp.where(pos, x / xp.where(pos, y, xp.ones_like(y)), xp.zeros_like(x))


def _row_norms(xp: Namespace, a: Array) -> Array:
    return xp.sqrt(xp.sum(a * a, axis=-1))


def _arc_cosine(xp: Namespace, cos: Array) -> tuple[Array, Array]:
    """``(theta, J(theta))`` for ``cos = cos(theta)``: ``J = sin(theta) + (pi - theta) cos(theta)``."""
    c = xp.clip(cos, -1.0, 1.0)
    theta = xp.acos(c)
    sin = xp.sqrt(xp.clip(1.0 - c * c, 0.0, 1.0))
    return theta, sin + (math.pi - theta) * c


def _check_input(a: Array, name: str, check: bool) -> Namespace:
    xp = namespace(**{name: a})
    check_matrix(xp, a, name, finite=check_bool("check_finite", check))
    return xp


def _max_abs(xp: Namespace, x: Array) -> Array:
    """``max |x|`` over the last two axes, shape ``(..., 1, 1)``; 1 where ``x`` is all zero.

    The closed forms below are homogeneous in the weights; computing them on ``x / max|x|`` keeps
    the squared norms of extreme but finite weights (``1e154``, ``1e-170``) from over- or
    underflowing.
    """
    top = xp.max(xp.max(xp.abs(x), axis=-1, keepdims=True), axis=-2, keepdims=True)
    return xp.where(top > 0, top, xp.ones_like(top))


def _rank_of(a: Array, rank: object) -> int:
    return check_rank(rank, min(int(a.shape[-2]), int(a.shape[-1])))


def _oialr_from(xp: Namespace, left0: Array, Q: Array) -> tuple[Array, Array, Array]:
    """OIALR form ``(U, s, V)`` of ``left0 @ Q.mT`` when ``Q`` has orthonormal columns.

    One thin SVD of the ``(m, r)`` matrix ``left0 = P diag(s) R^T``: ``U = P`` (sign-canonical), ``V = Q R``.
    """
    P, s, R = _svd(xp, left0)
    return P, s, Q @ R


def _finish_balanced(xp: Namespace, U: Array, s: Array, V: Array, dtype: Any) -> BalancedFactors:
    root = xp.sqrt(s)[..., None, :]
    return BalancedFactors(cast_to(xp, U * root, dtype), cast_to(xp, V * root, dtype))


def _finish_factors(xp: Namespace, U: Array, s: Array, V: Array, dtype: Any) -> LowRankFactors:
    return LowRankFactors(
        cast_to(xp, U, dtype), cast_to(xp, diag_embed(xp, s), dtype), cast_to(xp, V, dtype)
    )


# --------------------------------------------------------------------------------------------------
# closed-form function error
# --------------------------------------------------------------------------------------------------
def _relu_error_rows(xp: Namespace, w: Array, m: Array) -> Array:
    """Per-row ``E (ReLU(w_i.x) - ReLU(m_i.x))^2``, shape ``(..., rows)``, free of cancellation.

    ``|w|^2/2 + |m|^2/2 - |w||m| J/pi`` is rewritten as ``(|w| - |m|)^2/2 + |w||m| (pi - J)/pi`` with
    ``pi - J(theta) = (pi - theta)(1 - cos theta) + (theta - sin theta)``, and the angle is taken from
    the unit rows' distance ``|u - v| = 2 sin(theta/2)`` (``1 - cos theta = |u - v|^2 / 2``): every term
    is non-negative and small differences are not lost, so ``w == m`` gives exactly 0 (the subtracted
    form leaves a residue of ``eps |w|^2``, which is what the result is at ``w == m``, and overflows
    when ``|w|^2`` does).
    """
    nw = _row_norms(xp, w)
    nm = _row_norms(xp, m)
    u = _safe_div(xp, w, nw[..., None])
    v = _safe_div(xp, m, nm[..., None])
    dist = _row_norms(xp, u - v)  # 2 sin(theta / 2), in [0, 2]
    theta = 2.0 * xp.asin(xp.clip(dist / 2.0, 0.0, 1.0))
    deficit = (math.pi - theta) * (dist * dist / 2.0) + xp.clip(theta - xp.sin(theta), 0.0, None)
    gap = nw - nm
    return 0.5 * gap * gap + nw * nm * (deficit / math.pi)


def relu_function_error(
    a: Array, b: Array, *, relative: bool = False, check_finite: bool = True
) -> Array:
    """Closed-form ``E_x ||ReLU(a x) - ReLU(b x)||^2`` for ``x ~ N(0, I_n)``; shape ``(...)``.

    ``a`` and ``b`` are ``(..., m, n)`` (batch dimensions broadcast). With the degree-1 arc-cosine kernel
    ``E[ReLU(u.x) ReLU(v.x)] = ||u|| ||v|| J(theta) / (2 pi)``, ``J(theta) = sin(theta) + (pi - theta)
    cos(theta)``, each row contributes ``||a_i||^2 / 2 + ||b_i||^2 / 2 - ||a_i|| ||b_i|| J(theta_i) / pi``
    (a zero row has ``theta`` = pi/2, which does not matter since it multiplies 0).
    ``relative=True`` divides by ``E ||ReLU(a x)||^2 = ||a||_F^2 / 2`` (inf or NaN when ``a`` is zero).
    Scale-invariant: computed on ``(a, b) / max(|a|, |b|)`` in a form without cancellation, so
    ``relu_function_error(c a, c b) = c^2 relu_function_error(a, b)`` (exactly 0 for ``a == b``) at
    every scale whose result is representable.
    """
    xp = namespace(a=a, b=b)
    check_finite = check_bool("check_finite", check_finite)
    relative = check_bool("relative", relative)
    check_matrix(xp, a, "a", finite=check_finite)
    check_matrix(xp, b, "b", finite=check_finite)
    if tuple(a.shape[-2:]) != tuple(b.shape[-2:]):
        raise ShapeError(
            f"`a` {tuple(a.shape)} and `b` {tuple(b.shape)} must have the same (m, n) in the last two "
            "dimensions"
        )
    try:
        np.broadcast_shapes(tuple(a.shape[:-2]), tuple(b.shape[:-2]))
    except ValueError:
        raise ShapeError(
            f"batch dimensions of `a` {tuple(a.shape)} and `b` {tuple(b.shape)} do not broadcast"
        ) from None
    dt = result_dtype(xp, a, b)
    ac, bc = upcast(xp, cast_to(xp, a, dt)), upcast(xp, cast_to(xp, b, dt))
    # The error is homogeneous of degree 2: evaluate it on (a, b) / c with c the power of two near
    # max(|a|, |b|) (exact scaling; its reciprocal is a normal number, see power_of_two_near)
    c = power_of_two_near(xp, xp.maximum(_max_abs(xp, ac), _max_abs(xp, bc)))
    ac, bc = ac / c, bc / c
    err = xp.sum(_relu_error_rows(xp, ac, bc), axis=-1)
    if relative:
        err = err / (0.5 * xp.sum(xp.sum(ac * ac, axis=-1), axis=-1))
    else:
        scale = c[..., 0, 0]
        err = (err * scale) * scale  # inf only when the true error exceeds the dtype's range
    return cast_to(xp, err, dt)


# --------------------------------------------------------------------------------------------------
# spectral
# --------------------------------------------------------------------------------------------------
def _spectral(xp: Namespace, a: Array, r: int) -> tuple[Array, Array, Array]:
    U, S, V = _svd(xp, a)
    return U[..., :r], S[..., :r], V[..., :r]


def spectral_init(a: Array, rank: int, *, check_finite: bool = True) -> BalancedFactors:
    """Balanced best rank-``rank`` factors: ``left = U_r S_r^{1/2}``, ``right = V_r S_r^{1/2}``.

    ``left @ right.mT`` is the truncated SVD of ``a`` (Eckart-Young: the closest rank-``rank`` matrix in
    Frobenius and spectral norm). Raises ``RankError`` unless ``1 <= rank <= min(m, n)``.
    """
    xp = _check_input(a, "a", check_finite)
    r = _rank_of(a, rank)
    U, s, V = _spectral(xp, a, r)
    return _finish_balanced(xp, U, s, V, a.dtype)


def spectral_factors(a: Array, rank: int, *, check_finite: bool = True) -> LowRankFactors:
    """Spectral init in OIALR form ``(U_r, diag(S_r), V_r)`` (the same as :func:`factorize`)."""
    xp = _check_input(a, "a", check_finite)
    r = _rank_of(a, rank)
    U, s, V = _spectral(xp, a, r)
    return _finish_factors(xp, U, s, V, a.dtype)


# --------------------------------------------------------------------------------------------------
# nonlinear
# --------------------------------------------------------------------------------------------------
class _RowStats(NamedTuple):
    Z: Array  # W Q: coordinates of the projected rows, (..., m, r)
    zn: Array  # ||P_S w_i|| = ||z_i||, (..., m)
    theta: Array  # angle between w_i and S
    J: Array  # J(theta)
    loss: Array  # sum_i ||w_i||^2 / 2 (1 - J^2 / pi^2), shape (...)


def _subspace_stats(xp: Namespace, W: Array, wn: Array, Q: Array) -> _RowStats:
    """Closed-form loss of the best rows within span(Q) (``Q`` orthonormal columns)."""
    Z = W @ Q
    zn = _row_norms(xp, Z)
    cos = _safe_div(xp, zn, wn)
    theta, J = _arc_cosine(xp, cos)
    per_row = 0.5 * wn * wn * (1.0 - (J / math.pi) ** 2)
    return _RowStats(Z, zn, theta, J, xp.sum(xp.clip(per_row, 0.0, None), axis=-1))


def _fro(xp: Namespace, x: Array) -> Array:
    return xp.sqrt(xp.sum(xp.sum(x * x, axis=-1), axis=-1))


def _refine_subspace(
    xp: Namespace, W: Array, wn: Array, Q: Array, stats: _RowStats, steps: int
) -> tuple[Array, _RowStats]:
    """Monotone Riemannian gradient descent of the closed-form loss over span(Q).

    Gradient: ``dL/dQ = -W^T diag(alpha) Z``, ``alpha_i = ||w_i|| J_i (pi - theta_i) / (pi^2 ||z_i||)``
    (from ``dJ/dcos(theta) = pi - theta``), projected onto the tangent space (``G - Q Q^T G``). A step
    ``Q <- qr(Q - eta G / ||G||_F)`` is accepted per batch element only if the loss drops; ``eta`` halves on
    rejection (up to 12 times per step) and doubles (capped at 1) after an accepted step.
    """
    dt = W.dtype
    device = array_api_compat.device(W)
    batch = tuple(W.shape[:-2])
    eta = xp.full(batch, 0.5, dtype=dt, device=device)
    loss = stats.loss
    Z, zn, theta, J = stats.Z, stats.zn, stats.theta, stats.J
    for _ in range(steps):
        alpha = _safe_div(xp, wn * J * (math.pi - theta), (math.pi**2) * zn)
        G = -(xp.matrix_transpose(W) @ (alpha[..., None] * Z))
        G = G - Q @ (xp.matrix_transpose(Q) @ G)
        D = _safe_div(xp, G, _fro(xp, G)[..., None, None])
        accepted = xp.zeros(batch, dtype=xp.bool, device=device)
        for _ in range(12):
            Qt, _ = _qr(xp, Q - eta[..., None, None] * D)
            trial = _subspace_stats(xp, W, wn, Qt)
            ok = xp.logical_and(trial.loss < loss, xp.logical_not(accepted))
            ok2, ok3 = ok[..., None], ok[..., None, None]
            Q = xp.where(ok3, Qt, Q)
            Z = xp.where(ok3, trial.Z, Z)
            zn, theta, J = (
                xp.where(ok2, t, o) for t, o in ((trial.zn, zn), (trial.theta, theta), (trial.J, J))
            )
            loss = xp.where(ok, trial.loss, loss)
            accepted = xp.logical_or(accepted, ok)
            if bool(xp.all(accepted)):
                break
            eta = xp.where(accepted, eta, eta * 0.5)
        if not bool(xp.any(accepted)):
            break  # no batch element can improve along its gradient: converged
        eta = xp.where(accepted, xp.clip(eta * 2.0, None, 1.0), eta)
    return Q, _RowStats(Z, zn, theta, J, loss)


def _nonlinear(xp: Namespace, a: Array, r: int, refine_steps: int) -> tuple[Array, Array, Array]:
    """``(U, s, V)`` of the nonlinear init, in the compute dtype.

    The result is homogeneous of degree 1 in ``a`` (the subspace does not depend on the scale, the rows
    scale with it), so it is computed for ``a / max|a|`` and the singular values are scaled back.
    """
    W = upcast(xp, a)
    c = _max_abs(xp, W)
    W = W / c
    _, _, Vfull = _svd(xp, W)
    Q = Vfull[..., :r]
    wn = _row_norms(xp, W)
    stats = _subspace_stats(xp, W, wn, Q)
    if refine_steps:
        Q, stats = _refine_subspace(xp, W, wn, Q, stats, refine_steps)
    # m_i = (||w_i|| J_i / pi) * P_S w_i / ||P_S w_i||  ->  M = diag(scale) Z Q^T
    scale = _safe_div(xp, wn * stats.J / math.pi, stats.zn)
    left0 = scale[..., None] * stats.Z
    U, s, V = _oialr_from(xp, left0, Q)
    return U, s * c[..., 0], V


def _check_steps(refine_steps: object) -> int:
    steps: int = check_int("refine_steps", refine_steps, min=0)
    return steps


def nonlinear_init(
    a: Array, rank: int, *, refine_steps: int = 0, check_finite: bool = True
) -> BalancedFactors:
    """Balanced rank-``rank`` factors minimizing ``E ||ReLU(a x) - ReLU(left right^T x)||^2`` (module doc).

    With ``refine_steps=0`` the row subspace is the top-``rank`` right singular subspace of ``a`` and each
    projected row is rescaled optimally; its :func:`relu_function_error` is never above spectral init's.
    ``refine_steps > 0`` then takes up to that many monotone gradient steps on the subspace, so the error
    only goes down. Raises ``RankError`` unless ``1 <= rank <= min(m, n)``.
    """
    xp = _check_input(a, "a", check_finite)
    r = _rank_of(a, rank)
    U, s, V = _nonlinear(xp, a, r, _check_steps(refine_steps))
    return _finish_balanced(xp, U, s, V, a.dtype)


def nonlinear_factors(
    a: Array, rank: int, *, refine_steps: int = 0, check_finite: bool = True
) -> LowRankFactors:
    """:func:`nonlinear_init` in OIALR form ``(U, diag(s), V)``: orthonormal bases, sign-canonical ``U``."""
    xp = _check_input(a, "a", check_finite)
    r = _rank_of(a, rank)
    U, s, V = _nonlinear(xp, a, r, _check_steps(refine_steps))
    return _finish_factors(xp, U, s, V, a.dtype)


# --------------------------------------------------------------------------------------------------
# random
# --------------------------------------------------------------------------------------------------
def default_init_std(fan_in: int) -> float:
    """Standard deviation of PyTorch's default Linear/ConvNd weight init: ``1 / sqrt(3 fan_in)``.

    (``kaiming_uniform_(a=sqrt(5))`` draws from ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.)
    """
    n: int = check_int("fan_in", fan_in, min=1)
    return 1.0 / math.sqrt(3.0 * n)


def _random_shape(like: Array, shape: Sequence[int] | None) -> tuple[int, ...]:
    if shape is None:
        s = tuple(int(d) for d in like.shape)
        if len(s) < 2 or min(s) < 1:
            raise ShapeError(
                f"`like` must have shape (..., m, n) with every dimension >= 1 (or pass `shape`), "
                f"got {s}"
            )
        return s
    return check_shape("shape", shape, min_ndim=2)


def random_init(
    like: Array,
    rank: int,
    *,
    shape: Sequence[int] | None = None,
    std: float | None = None,
    seed: int | None = None,
) -> BalancedFactors:
    """Gaussian factors whose product has entries of variance ``std^2`` (variance-preserving).

    ``like`` supplies the library, device and dtype (and the shape ``(..., m, n)`` unless ``shape`` is
    given; its values are not read). ``left`` and ``right`` have i.i.d. ``N(0, std / sqrt(rank))`` entries,
    so ``(left @ right.mT)_ij`` has mean 0 and variance ``rank * (std / sqrt(rank))^2 = std^2``.
    ``std=None`` takes :func:`default_init_std` of ``fan_in = n``. Numbers come from the array's backend
    (``StandardBackend.random_normal``), reproducible for a given ``seed``.
    """
    xp = namespace(like=like)
    check_floating(xp, like, "like")
    s = _random_shape(like, shape)
    m, n = s[-2], s[-1]
    r = check_rank(rank, min(m, n))
    seed = check_seed("seed", seed)
    sd_given = check_float("std", std, min=0.0, optional=True)
    sd = default_init_std(n) if sd_given is None else sd_given
    dt = compute_dtype(xp, like.dtype)
    noise = get_backend(like).random_normal(
        (*s[:-2], m + n, r), dtype=dt, device=array_api_compat.device(like), seed=seed
    )
    factor = math.sqrt(sd / math.sqrt(r))
    noise = noise * factor
    return BalancedFactors(
        cast_to(xp, noise[..., :m, :], like.dtype), cast_to(xp, noise[..., m:, :], like.dtype)
    )


def random_factors(
    like: Array,
    rank: int,
    *,
    shape: Sequence[int] | None = None,
    std: float | None = None,
    seed: int | None = None,
) -> LowRankFactors:
    """:func:`random_init` in OIALR form (the same product for the same ``seed``)."""
    f = random_init(like, rank, shape=shape, std=std, seed=seed)
    return balanced_to_factors(f.left, f.right, check_finite=False)


# --------------------------------------------------------------------------------------------------
# conversions between the two forms
# --------------------------------------------------------------------------------------------------
def _check_pair(left: Array, right: Array, check: bool) -> Namespace:
    xp = namespace(left=left, right=right)
    check = check_bool("check_finite", check)
    check_matrix(xp, left, "left", finite=check)
    check_matrix(xp, right, "right", finite=check)
    if left.shape[-1] != right.shape[-1]:
        raise ShapeError(
            f"`left` {tuple(left.shape)} and `right` {tuple(right.shape)} need the same number of "
            "columns r: (..., m, r) and (..., n, r)"
        )
    try:
        np.broadcast_shapes(tuple(left.shape[:-2]), tuple(right.shape[:-2]))
    except ValueError:
        raise ShapeError(
            f"batch dimensions of `left` {tuple(left.shape)} and `right` {tuple(right.shape)} do not "
            "broadcast"
        ) from None
    return xp


def balanced_to_factors(left: Array, right: Array, *, check_finite: bool = True) -> LowRankFactors:
    """``left @ right.mT`` as ``U diag(s) V^T`` (orthonormal ``U``, ``V``; sign-canonical ``U``).

    Two QRs and an ``r x r`` SVD: ``left = Q1 R1``, ``right = Q2 R2``, ``R1 R2^T = P diag(s) T^T``,
    ``U = Q1 P``, ``V = Q2 T``. Needs ``r <= min(m, n)``.
    """
    xp = _check_pair(left, right, check_finite)
    r = int(left.shape[-1])
    if r > min(int(left.shape[-2]), int(right.shape[-2])):
        raise ShapeError(
            f"the rank r={r} of `left` {tuple(left.shape)} / `right` {tuple(right.shape)} exceeds min(m, n)"
        )
    dt = result_dtype(xp, left, right)
    L, R = upcast(xp, cast_to(xp, left, dt)), upcast(xp, cast_to(xp, right, dt))
    # R1 R2^T of two large factors overflows: factor the normalized ones, scale s back at the end
    cl, cr = _max_abs(xp, L), _max_abs(xp, R)
    Q1, R1 = _qr(xp, L / cl)
    Q2, R2 = _qr(xp, R / cr)
    P, s, T = _svd(xp, R1 @ xp.matrix_transpose(R2))
    U, V = _canonical_signs(xp, Q1 @ P, Q2 @ T)
    s = (s * cl[..., 0]) * cr[..., 0]  # inf only where the true singular value exceeds the range
    return _finish_factors(xp, U, s, V, dt)


def factors_to_balanced(
    U: Array, Sigma: Array, V: Array, *, check_finite: bool = True
) -> BalancedFactors:
    """``U Sigma V^T`` as balanced factors ``(U P sqrt(s), V T sqrt(s))`` with ``Sigma = P diag(s) T^T``.

    Balanced (``left^T left = right^T right = diag(s)``) when ``U`` and ``V`` have orthonormal columns.
    """
    xp = namespace(U=U, Sigma=Sigma, V=V)
    check_finite = check_bool("check_finite", check_finite)
    for name, x in (("U", U), ("Sigma", Sigma), ("V", V)):
        check_matrix(xp, x, name, finite=check_finite)
    r = int(Sigma.shape[-1])
    if Sigma.shape[-2] != r or U.shape[-1] != r or V.shape[-1] != r:
        raise ShapeError(
            f"factors do not fit together: U {tuple(U.shape)}, Sigma {tuple(Sigma.shape)}, "
            f"V {tuple(V.shape)} (need U (..., m, r), Sigma (..., r, r), V (..., n, r))"
        )
    dt = result_dtype(xp, U, Sigma, V)
    Uc, Sc, Vc = (upcast(xp, cast_to(xp, x, dt)) for x in (U, Sigma, V))
    P, s, T = _svd(xp, Sc)
    return _finish_balanced(xp, Uc @ P, s, Vc @ T, dt)


# --------------------------------------------------------------------------------------------------
# weights (Linear and conv kernels)
# --------------------------------------------------------------------------------------------------
def init_weight_factors(
    weight: Array,
    rank: int,
    *,
    method: str = "spectral",
    groups: int = 1,
    balanced: bool = False,
    refine_steps: int = 0,
    std: float | None = None,
    seed: int | None = None,
    check_finite: bool = True,
) -> LowRankFactors:
    """Rank-``rank`` factors of a weight tensor ``(out, *rest)`` in its matrix view (one per group).

    The matrix is :func:`~lowrank_core.views.weight_to_matrix` ``(weight, groups=groups)``: ``(out, cols)``
    or ``(groups, out/groups, cols)`` for a grouped conv, ``cols = prod(rest)`` (``in/groups * kernel``).
    ``method`` is ``"spectral"``, ``"nonlinear"`` or ``"random"`` (``weight`` then only gives the shape,
    library, device and dtype; ``std`` defaults to PyTorch's default for ``fan_in = cols``). Returns
    ``LowRankFactors(U, Sigma, V)``: OIALR form by default, or with ``balanced=True`` the balanced factors
    as ``(left, I_r, right)``, the layout for training all factors from scratch.
    """
    method = check_choice("method", method, INIT_METHODS)
    balanced = check_bool("balanced", balanced)
    check_finite = check_bool("check_finite", check_finite)
    refine_steps = _check_steps(refine_steps)
    # validated whatever the method (a bad value must not pass unnoticed because it is unused)
    std = check_float("std", std, min=0.0, optional=True)
    seed = check_seed("seed", seed)
    xp = namespace(weight=weight)
    check_floating(xp, weight, "weight")
    check_finite_random = method != "random" and check_finite
    matrix = weight_to_matrix(weight, groups=groups, check_finite=check_finite_random)
    if method == "random":
        bal = random_init(matrix, rank, std=std, seed=seed)
    else:
        if method == "spectral":
            bal = spectral_init(matrix, rank, check_finite=False)
        else:
            bal = nonlinear_init(matrix, rank, refine_steps=refine_steps, check_finite=False)
    if not balanced:
        return balanced_to_factors(bal.left, bal.right, check_finite=False)
    r = int(bal.left.shape[-1])
    eye = xp.eye(r, dtype=weight.dtype, device=array_api_compat.device(weight))
    eye = xp.broadcast_to(eye, (*bal.left.shape[:-2], r, r))
    return LowRankFactors(bal.left, xp.asarray(eye, copy=True), bal.right)


# --------------------------------------------------------------------------------------------------
# Frobenius decay
# --------------------------------------------------------------------------------------------------
def frobenius_decay(
    left: Array, right: Array, *, coefficient: float = 1.0, check_finite: bool = True
) -> Array:
    """``coefficient / 2 * ||left @ right.mT||_F^2``, shape ``(...)``, without forming the product.

    Computed as ``coefficient / 2 * sum((left^T left) * (right^T right))``: ``O((m + n) r^2)``.
    """
    xp = _check_pair(left, right, check_finite)
    c = check_float("coefficient", coefficient, min=0.0)
    dt = result_dtype(xp, left, right)
    L, R = upcast(xp, cast_to(xp, left, dt)), upcast(xp, cast_to(xp, right, dt))
    # Homogeneous in each factor: the Gram matrices of left / max|left| cannot overflow.
    cl, cr = _max_abs(xp, L), _max_abs(xp, R)
    L, R = L / cl, R / cr
    gl = xp.matrix_transpose(L) @ L
    gr = xp.matrix_transpose(R) @ R
    scale = cl[..., 0, 0] * cr[..., 0, 0]
    value = ((0.5 * c) * xp.sum(xp.sum(gl * gr, axis=-1), axis=-1) * scale) * scale
    return cast_to(xp, value, dt)


def frobenius_decay_grad(
    left: Array, right: Array, *, coefficient: float = 1.0, check_finite: bool = True
) -> tuple[Array, Array]:
    """Gradients of :func:`frobenius_decay`: ``(c left (right^T right), c right (left^T left))``."""
    xp = _check_pair(left, right, check_finite)
    c = check_float("coefficient", coefficient, min=0.0)
    dt = result_dtype(xp, left, right)
    L, R = upcast(xp, cast_to(xp, left, dt)), upcast(xp, cast_to(xp, right, dt))
    cl, cr = _max_abs(xp, L), _max_abs(xp, R)
    L, R = L / cl, R / cr
    gl = xp.matrix_transpose(L) @ L
    gr = xp.matrix_transpose(R) @ R
    # c * left (right^T right) = c * cl * cr^2 * L1 (R1^T R1), and symmetrically.
    grad_left = (((c * (L @ gr)) * cl) * cr) * cr
    grad_right = (((c * (R @ gl)) * cr) * cl) * cl
    return cast_to(xp, grad_left, dt), cast_to(xp, grad_right, dt)
