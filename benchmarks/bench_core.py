"""lowrank_core on torch CPU tensors vs the same math hand-written in plain torch.

(a) svd, polar, basis_stability, factorize, rediagonalize: time of the core, time of the
    plain-torch version, ratio core/torch (goal <= 1.05: the array-API layer and its input checks
    should cost next to nothing).
(b) rediagonalize of a stack of Sigmas in one batched call vs a Python loop over the stack.
(c) wide matrices (m < n, e.g. a 768 x 3072 MLP weight): orthogonal_factor and basis_stability of the
    wide matrix vs of its (contiguous) tall transpose, and vs plain torch on the wide matrix (an SVD
    of the wide layout, as the published code does). The core decomposes a wide matrix as its
    transpose, so wide/tall should be ~1.

float32, torch's default thread count, median of repeated runs after warm-up, all in one process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from _common import Config, Report, Table, compare, fmt_seconds

import lowrank_core as lc

DESCRIPTION = "core functions vs plain torch (CPU float32); batched vs looped rediagonalize"
GOAL_RATIO = 1.05
DTYPE = torch.float32


# --- the same math, written directly in torch (the baselines) -------------------------------


def torch_svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U, S, V), sign-canonical: the largest-|.| entry of each U column is positive."""
    U, S, Vh = torch.linalg.svd(a, full_matrices=False)
    V = Vh.mT
    pivot = torch.gather(U, -2, U.abs().argmax(dim=-2, keepdim=True))  # (..., 1, k)
    sign = 1.0 - 2.0 * (pivot < 0).to(U.dtype)
    return U * sign, S, V * sign


def torch_polar(a: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(a, full_matrices=False)
    return U @ Vh


def torch_basis_stability(previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    qp, qc = torch_polar(previous), torch_polar(current)
    m, n = previous.shape[-2:]
    dim = -2 if m >= n else -1  # compare columns if m >= n, else rows
    dot = (qp * qc).sum(dim=dim)
    norms = torch.linalg.vector_norm(qp, dim=dim) * torch.linalg.vector_norm(qc, dim=dim)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    cos = torch.where(norms > 0, dot / safe, torch.zeros_like(dot))
    return cos.mean(dim=-1)


def torch_factorize(a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    U, S, V = torch_svd(a)
    return U[..., :rank], torch.diag_embed(S[..., :rank]), V[..., :rank]


def torch_rediagonalize(
    U: torch.Tensor, Sigma: torch.Tensor, V: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    P, sig, Q = torch_svd(Sigma)
    return U @ P, torch.diag_embed(sig), V @ Q, sig, P, Q


# --- inputs -----------------------------------------------------------------------------------


def _orthonormal(gen: torch.Generator, *shape: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(*shape, generator=gen, dtype=torch.float64))
    return q.to(DTYPE)


def _max_abs_diff(core_out: Any, torch_out: Any) -> float:
    """Largest |core - torch| over all returned arrays (a check that the two compute the same)."""
    if isinstance(core_out, torch.Tensor):
        core_out, torch_out = (core_out,), (torch_out,)
    worst = 0.0
    for x, y in zip(core_out, torch_out, strict=True):
        worst = max(worst, float((x - y).abs().max()))
    return worst


def _cases(
    m: int, n: int, gen: torch.Generator
) -> list[tuple[str, Callable[[], Any], Callable[[], Any]]]:
    a = torch.randn(m, n, generator=gen, dtype=DTYPE)
    a_next = a + 1e-2 * torch.randn(m, n, generator=gen, dtype=DTYPE)
    k = min(m, n)
    rank = max(1, k // 4)
    U = _orthonormal(gen, m, k)
    V = _orthonormal(gen, n, k)
    Sigma = torch.randn(k, k, generator=gen, dtype=DTYPE)
    return [
        ("svd", lambda: lc.svd(a), lambda: torch_svd(a)),
        ("orthogonal_factor", lambda: lc.orthogonal_factor(a), lambda: torch_polar(a)),
        (
            "basis_stability",
            lambda: lc.basis_stability(a, a_next),
            lambda: torch_basis_stability(a, a_next),
        ),
        (f"factorize r={rank}", lambda: lc.factorize(a, rank), lambda: torch_factorize(a, rank)),
        (
            f"rediagonalize r={k}",
            lambda: lc.rediagonalize(U, Sigma, V),
            lambda: torch_rediagonalize(U, Sigma, V),
        ),
    ]


# --- the benchmark ----------------------------------------------------------------------------


def run(config: Config) -> Report:
    gen = torch.Generator().manual_seed(0)
    sizes = [(64, 64), (128, 64)] if config.quick else [(256, 256), (1024, 512)]
    repeat, warmup = config.repeats(11), config.warmups(2)

    # (a) core vs plain torch
    table_a = Table(
        title=f"(a) lowrank_core vs plain torch, {str(DTYPE).removeprefix('torch.')}, CPU",
        columns=["op", "shape", "core", "torch", "core/torch", "goal", "max|core-torch|"],
    )
    rows_a: list[dict[str, Any]] = []
    for m, n in sizes:
        for op, core_fn, torch_fn in _cases(m, n, gen):
            diff = _max_abs_diff(core_fn(), torch_fn())
            t = compare({"core": core_fn, "torch": torch_fn}, repeat=repeat, warmup=warmup)
            ratio = t["core"] / t["torch"]
            ok = ratio <= GOAL_RATIO
            table_a.rows.append(
                [
                    op,
                    f"{m}x{n}",
                    fmt_seconds(t["core"]),
                    fmt_seconds(t["torch"]),
                    f"{ratio:.3f}",
                    "ok" if ok else "SLOWER",
                    f"{diff:.1e}",
                ]
            )
            rows_a.append(
                {
                    "op": op,
                    "shape": [m, n],
                    "core_s": t["core"],
                    "torch_s": t["torch"],
                    "ratio": ratio,
                    "meets_goal": ok,
                    "max_abs_diff": diff,
                }
            )
    table_a.notes.append(
        f"median of {repeat} interleaved runs after {warmup} warm-up(s); "
        f"goal: core/torch <= {GOAL_RATIO}"
    )

    # (b) batched rediagonalize vs a Python loop over the same stack
    batch, r = (8, 32) if config.quick else (64, 256)
    Us = _orthonormal(gen, batch, r, r)
    Vs = _orthonormal(gen, batch, r, r)
    Sigmas = torch.randn(batch, r, r, generator=gen, dtype=DTYPE)

    def batched() -> Any:
        return lc.rediagonalize(Us, Sigmas, Vs)

    def looped() -> Any:
        return [lc.rediagonalize(Us[i], Sigmas[i], Vs[i]) for i in range(batch)]

    def torch_batched() -> Any:
        return torch_rediagonalize(Us, Sigmas, Vs)

    repeat_b, warmup_b = config.repeats(5), config.warmups(1)
    tb = compare(
        {"batched": batched, "loop": looped, "torch_batched": torch_batched},
        repeat=repeat_b,
        warmup=warmup_b,
    )
    speedup = tb["loop"] / tb["batched"]
    table_b = Table(
        title=f"(b) rediagonalize of {batch} Sigmas of {r}x{r} (U, V: {r}x{r} each)",
        columns=["how", "time", "vs core batched"],
        rows=[
            ["core, one batched call", fmt_seconds(tb["batched"]), "1.00"],
            [
                f"core, Python loop of {batch} calls",
                fmt_seconds(tb["loop"]),
                f"{tb['loop'] / tb['batched']:.2f}",
            ],
            [
                "plain torch, batched (reference)",
                fmt_seconds(tb["torch_batched"]),
                f"{tb['torch_batched'] / tb['batched']:.2f}",
            ],
        ],
        notes=[
            f"speed-up of the batched call over the loop: {speedup:.2f}x",
            f"median of {repeat_b} interleaved runs after {warmup_b} warm-up(s)",
        ],
    )

    table_c, rows_c = _wide_vs_tall(config, gen)

    data = {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "dtype": str(DTYPE),
        "goal_ratio": GOAL_RATIO,
        "repeat": repeat,
        "warmup": warmup,
        "core_vs_torch": rows_a,
        "batched_rediagonalize": {
            "batch": batch,
            "shape": [r, r],
            "repeat": repeat_b,
            "warmup": warmup_b,
            "batched_s": tb["batched"],
            "loop_s": tb["loop"],
            "torch_batched_s": tb["torch_batched"],
            "speedup": speedup,
        },
        "wide_vs_tall": rows_c,
    }
    return Report(tables=[table_a, table_b, table_c], data=data)


def _wide_vs_tall(config: Config, gen: torch.Generator) -> tuple[Table, list[dict[str, Any]]]:
    """(c): the core on a wide matrix vs on its tall transpose vs plain torch on the wide one."""
    m, n = (96, 384) if config.quick else (768, 3072)
    repeat, warmup = config.repeats(5), config.warmups(1)
    a = torch.randn(m, n, generator=gen, dtype=DTYPE)
    b = a + 1e-2 * torch.randn(m, n, generator=gen, dtype=DTYPE)
    at, bt = a.mT.contiguous(), b.mT.contiguous()
    cases: list[tuple[str, dict[str, Callable[[], Any]]]] = [
        (
            "orthogonal_factor",
            {
                "wide": lambda: lc.orthogonal_factor(a),
                "tall": lambda: lc.orthogonal_factor(at),
                "torch_wide": lambda: torch_polar(a),
            },
        ),
        (
            "basis_stability",
            {
                "wide": lambda: lc.basis_stability(a, b),
                "tall": lambda: lc.basis_stability(at, bt),
                "torch_wide": lambda: torch_basis_stability(a, b),
            },
        ),
    ]
    table = Table(
        title=f"(c) wide {m}x{n} vs its tall transpose {n}x{m}, {str(DTYPE).removeprefix('torch.')}",
        columns=["op", "core wide", "core tall", "wide/tall", "torch wide", "core wide/torch wide"],
    )
    rows: list[dict[str, Any]] = []
    for op, fns in cases:
        t = compare(fns, repeat=repeat, warmup=warmup)
        table.rows.append(
            [
                op,
                fmt_seconds(t["wide"]),
                fmt_seconds(t["tall"]),
                f"{t['wide'] / t['tall']:.2f}",
                fmt_seconds(t["torch_wide"]),
                f"{t['wide'] / t['torch_wide']:.2f}",
            ]
        )
        rows.append(
            {
                "op": op,
                "shape": [m, n],
                "wide_s": t["wide"],
                "tall_s": t["tall"],
                "torch_wide_s": t["torch_wide"],
                "wide_over_tall": t["wide"] / t["tall"],
            }
        )
    table.notes.append(
        f"median of {repeat} interleaved runs after {warmup} warm-up(s); the core transposes a wide "
        "matrix to tall before its SVD (same result), plain torch on the wide layout does not"
    )
    return table, rows
