"""Helpers of the test suite: tolerances, comparisons, library/device/dtype checks.

Model: scipy's ``_lib/_array_api.py`` (``xp_assert_close`` with dtype-aware defaults, and a check that a
result did not silently turn into another library's array).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import array_api_compat
import numpy as np
from hypothesis import settings

#: the examples per property of the CI profile; tests that set their own count scale it by the active
#: profile's count over this (see :func:`examples`)
CI_EXAMPLES = 40


def examples(n: int) -> int:
    """``n`` examples under the CI profile; scaled down with the active profile's ``max_examples``
    (the JAX session's ``ci-jax`` profile: under JAX every new array shape compiles, so each example
    costs far more) and never below 2. Profiles with more examples (``thorough``, ``fuzz``) leave ``n``
    as it is."""
    scale = min(1.0, settings().max_examples / CI_EXAMPLES)
    return max(2, round(n * scale))


# Unit roundoff of each floating dtype (the distance from 1 to the next float, as numpy's finfo.eps).
EPS = {
    "float16": 2.0**-10,
    "bfloat16": 2.0**-7,
    "float32": 2.0**-23,
    "float64": 2.0**-52,
}


def dtype_name(x: Any) -> str:
    """'float32', 'float64', 'bfloat16', ... for an array of any library."""
    return str(x.dtype).rsplit(".", 1)[-1]


def eps(dtype: str) -> float:
    return EPS[dtype]


def batch_indices(batch_shape: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
    """Every index tuple of a batch shape (one empty tuple for no batch)."""
    return itertools.product(*(range(b) for b in batch_shape))


# --------------------------------------------------------------------------------------------------
# library / device / dtype
# --------------------------------------------------------------------------------------------------
def assert_in_library(
    result: Any, like: Any, *, dtype: str | None = None, what: str = "result"
) -> None:
    """``result`` is an array of ``like``'s library, on its device, with dtype ``dtype`` (default: like's).

    NumPy reductions to 0-D may return a NumPy scalar (``np.generic``): that is accepted for 0-D results.
    """
    want_dtype = dtype_name(like) if dtype is None else dtype
    if isinstance(like, np.ndarray) and isinstance(result, np.generic):
        assert np.ndim(result) == 0
    else:
        assert type(result) is type(like), (
            f"{what}: type {type(result).__module__}.{type(result).__name__} is not the input's "
            f"{type(like).__module__}.{type(like).__name__}"
        )
        assert array_api_compat.array_namespace(result) is array_api_compat.array_namespace(like), (
            f"{what}: namespace changed"
        )
        assert array_api_compat.device(result) == array_api_compat.device(like), (
            f"{what}: device {array_api_compat.device(result)} != {array_api_compat.device(like)}"
        )
    assert dtype_name(result) == want_dtype, f"{what}: dtype {dtype_name(result)} != {want_dtype}"


def assert_python_int(r: Any, what: str = "rank") -> None:
    assert isinstance(r, int), f"{what} is {type(r).__name__}, not int"
    assert not isinstance(r, bool), f"{what} is a bool"


def assert_int64_array(r: Any, shape: tuple[int, ...], what: str = "ranks") -> None:
    assert isinstance(r, np.ndarray), f"{what} is {type(r).__name__}, not a NumPy array"
    assert r.dtype == np.int64, f"{what} has dtype {r.dtype}, not int64"
    assert r.shape == shape, f"{what} has shape {r.shape}, not {shape}"


# --------------------------------------------------------------------------------------------------
# numerical comparisons
# --------------------------------------------------------------------------------------------------
def assert_close(
    actual: np.ndarray, desired: np.ndarray, *, atol: float, rtol: float = 0.0, err_msg: str = ""
) -> None:
    actual = np.asarray(actual, dtype=np.float64)
    desired = np.asarray(desired, dtype=np.float64)
    assert actual.shape == desired.shape, f"shape {actual.shape} != {desired.shape}. {err_msg}"
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=atol, err_msg=err_msg)


def matmul_t(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b^T over the last two axes."""
    return a @ np.swapaxes(b, -1, -2)


def product(U: np.ndarray, S: np.ndarray, V: np.ndarray) -> np.ndarray:
    """U diag(S) V^T (S 1-D spectrum) or U S V^T (S a matrix), batched."""
    if S.ndim == U.ndim - 1:
        return (U * S[..., None, :]) @ np.swapaxes(V, -1, -2)
    return U @ S @ np.swapaxes(V, -1, -2)


def orthonormality_error(Q: np.ndarray) -> float:
    """max |Q^T Q - I| (columns orthonormal)."""
    Q = np.asarray(Q, dtype=np.float64)
    k = Q.shape[-1]
    if Q.size == 0:
        return 0.0
    return float(np.max(np.abs(np.swapaxes(Q, -1, -2) @ Q - np.eye(k))))


def projector(Q: np.ndarray) -> np.ndarray:
    """Q Q^T of orthonormal columns: the sign-invariant form of a basis."""
    return Q @ np.swapaxes(Q, -1, -2)


def spectral_gaps(s: np.ndarray, m: int, n: int) -> np.ndarray:
    """For each singular value s_j, its distance to the rest of the spectrum of the (m, n) matrix.

    For a non-square matrix the thin factors also have to be separated from the zero singular values of
    the complement, so the gap includes s_j itself then.
    """
    s = np.asarray(s, dtype=np.float64)
    k = s.shape[-1]
    diff = np.abs(s[..., :, None] - s[..., None, :])
    diff = diff + np.where(np.eye(k, dtype=bool), np.inf, 0.0)
    gap = np.min(diff, axis=-1) if k > 1 else np.full(s.shape, np.inf)
    if m != n:
        gap = np.minimum(gap, s)
    return gap


def vector_tolerances(
    s: np.ndarray, m: int, n: int, dtype: str, factor: float = 20.0
) -> np.ndarray:
    """Tolerance on each singular vector's entries: eps ||A|| sqrt(max(m, n)) / gap_j (capped at 2)."""
    s = np.asarray(s, dtype=np.float64)
    smax = s[..., :1] if s.shape[-1] else np.ones((*s.shape[:-1], 1))
    gap = spectral_gaps(s, m, n)
    with np.errstate(divide="ignore"):
        tol = factor * eps(dtype) * smax * np.sqrt(max(m, n)) / gap
    return np.minimum(tol, 2.0)


def value_tolerance(
    smax: float | np.ndarray, m: int, n: int, dtype: str, factor: float = 20.0
) -> Any:
    """Tolerance on quantities of the size of the matrix: eps ||A|| sqrt(max(m, n))."""
    return factor * eps(dtype) * np.asarray(smax, dtype=np.float64) * np.sqrt(max(m, n, 1))


def assert_columns_match(
    actual: np.ndarray,
    desired: np.ndarray,
    tol: np.ndarray,
    *,
    allow_flip: np.ndarray | None = None,
    err_msg: str = "",
) -> np.ndarray:
    """Compare the columns of two (m, k) matrices; column j within tol[j].

    Where ``allow_flip[j]`` is True the column may also equal ``-desired[:, j]``. Returns the signs used.
    """
    k = desired.shape[-1]
    signs = np.ones(k)
    for j in range(k):
        a, d = actual[:, j], desired[:, j]
        if allow_flip is not None and allow_flip[j] and np.dot(a, d) < 0:
            signs[j] = -1.0
        err = np.max(np.abs(a - signs[j] * d)) if a.size else 0.0
        assert err <= tol[j], (
            f"column {j}: max error {err:.3g} > tol {tol[j]:.3g} "
            f"(sign {'flipped' if signs[j] < 0 else 'kept'}). {err_msg}\nactual={a}\ndesired={d}"
        )
    return signs


def sign_is_ambiguous(U_ref: np.ndarray, tol: np.ndarray) -> np.ndarray:
    """Columns whose largest-|entry| index could change under a perturbation of size tol.

    The canonical sign rule makes the entry of largest absolute value positive; when two entries are within
    the perturbation of each other in absolute value, a correct implementation in lower precision may pick
    the other one, so the sign of that column is not determined by the contract.
    """
    k = U_ref.shape[-1]
    out = np.zeros(k, dtype=bool)
    for j in range(k):
        a = np.sort(np.abs(U_ref[:, j]))[::-1]
        if a.size >= 2 and a[0] - a[1] <= 4 * tol[j] + 1e-12:
            out[j] = True
    return out


def assert_sign_canonical(U: np.ndarray, err_msg: str = "") -> None:
    """For each column: the entry of largest |value| (first on ties) is positive. Batched."""
    U = np.asarray(U)
    flat = U.reshape((-1, *U.shape[-2:]))
    for b, Ub in enumerate(flat):
        for j in range(Ub.shape[-1]):
            i = int(np.argmax(np.abs(Ub[:, j])))
            assert Ub[i, j] > 0, (
                f"batch item {b}, column {j}: the largest-|.| entry U[{i}, {j}] = {Ub[i, j]} is not "
                f"positive. {err_msg}\ncolumn={Ub[:, j]}"
            )


def random_orthogonal(rng: np.random.Generator, m: int, k: int) -> np.ndarray:
    """An (m, k) matrix with Haar-distributed orthonormal columns (k <= m)."""
    g = rng.standard_normal((m, max(k, 1)))
    q, r = np.linalg.qr(g)
    q = q * np.sign(np.where(np.diag(r) == 0, 1.0, np.diag(r)))
    return q[:, :k]


def rotation_in_plane(m: int, x: np.ndarray, rng: np.random.Generator, theta: float) -> np.ndarray:
    """An (m, m) rotation by ``theta`` in the plane of unit vector x and a random unit vector w _|_ x."""
    x = x / np.linalg.norm(x)
    w = rng.standard_normal(m)
    w = w - np.dot(w, x) * x
    w = w / np.linalg.norm(w)
    c, s = np.cos(theta), np.sin(theta)
    R = (
        np.eye(m)
        + (c - 1.0) * (np.outer(x, x) + np.outer(w, w))
        + s * (np.outer(w, x) - np.outer(x, w))
    )
    return R


def snapshot(backend: Any, *arrays: Any) -> list[np.ndarray]:
    """NumPy copies of the arrays, to check later that a call did not modify its inputs."""
    return [backend.to_numpy(a) for a in arrays]


def assert_unchanged(backend: Any, before: list[np.ndarray], *arrays: Any) -> None:
    for i, (b, a) in enumerate(zip(before, arrays, strict=True)):
        np.testing.assert_array_equal(backend.to_numpy(a), b, err_msg=f"input {i} was modified")
