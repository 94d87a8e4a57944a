"""The prepared GPU run: tests, core and layer benchmarks, SVD drivers and a short realistic workload.

    bash benchmarks/gpu.sh                      # on the GPU machine, in one call (writes $OUT or results/)
    python benchmarks/gpu_suite.py --dry-run    # here, on CPU: every part at tiny sizes, same JSON

One JSON file of results (``gpu_suite.json``) and one printed table per part. Every part runs in its
own time budget, so that the whole run ends well within 8 minutes; a part that fails or runs out of
time is recorded as such and the others still run. Nothing is installed and nothing is downloaded:
the source tree is put on ``sys.path`` (``gpu.sh`` first installs a carried ``array-api-compat`` wheel
from ``.whl/`` if the machine lacks it).

Parts:
1. ``tests``: pytest over the GPU backends (``LOWRANK_TEST_BACKENDS=torch_cuda,cupy``, the ``gpu`` nox
   session's selection), the core property suite under the derandomized CI profile.
2. ``core``: svd, orthogonal_factor, basis_stability, factorize, rediagonalize: lowrank-core vs the
   same math written directly in torch, on the device (ratios in one interleaved run), and CuPy.
3. ``layers``: factored vs dense Linear forward+backward at ranks 10/25/50%, float32 and bfloat16.
4. ``svd_drivers``: torch.linalg.svd's cuSOLVER drivers (gesvd, gesvdj, gesvda) and the default, single
   and batched, for the shapes OIALR meets (square and wide Linear weights, stacks of Sigmas).
5. ``lm``: a short run of ``bench_lm.py`` (dense vs OIALR) on the device.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(HERE), str(ROOT), str(ROOT / "backends"), str(ROOT / "reference")):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402
from _common import Table, compare  # noqa: E402
from torch import nn  # noqa: E402

import lowrank_core as lc  # noqa: E402


def _device(dry_run: bool) -> torch.device:
    if dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run to check the script on CPU")
    return torch.device("cuda")


def _sync_for(device: torch.device) -> Callable[[], None] | None:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


# --- 1. tests ------------------------------------------------------------------------------------
def part_tests(device: torch.device, dry_run: bool, budget: float) -> tuple[Table, dict[str, Any]]:
    backends = "numpy" if dry_run else "torch_cuda,cupy"
    files = ["tests/test_linalg.py", "tests/test_factors.py"] if dry_run else ["tests"]
    ignore = [] if dry_run else ["--ignore=tests/torch_integration"]
    env = dict(os.environ, LOWRANK_TEST_BACKENDS=backends, CI="true", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(ROOT / "backends"), str(ROOT / "reference")]
    )
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, *ignore]
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=budget, check=False
        )
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        rc = "timeout"
    summary = [line for line in out.splitlines() if " passed" in line or " failed" in line]
    table = Table(title=f"(1) tests on {backends}", columns=["result", "exit", "seconds"])
    table.rows.append(
        [
            summary[-1] if summary else "(no summary line)",
            str(rc),
            f"{time.perf_counter() - start:.0f}",
        ]
    )
    failed = [line for line in out.splitlines() if line.startswith("FAILED")][:20]
    table.notes += failed
    return table, {
        "backends": backends,
        "exit": rc,
        "summary": summary[-1:] or None,
        "failed": failed,
    }


# --- 2. core ------------------------------------------------------------------------------------
def _torch_svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(a, full_matrices=False)
    sign = torch.sign(torch.gather(U, -2, U.abs().argmax(dim=-2, keepdim=True)))
    return U * sign, S, Vh * sign.mT


def _torch_polar(a: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(a, full_matrices=False)
    return U @ Vh


def _core_cases(
    a: torch.Tensor, b: torch.Tensor, f: Any, sigma: torch.Tensor
) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """op -> (lowrank-core call, the same math in plain torch)."""
    return {
        "svd": (lambda: lc.svd(a), lambda: _torch_svd(a)),
        "orthogonal_factor": (lambda: lc.orthogonal_factor(a), lambda: _torch_polar(a)),
        "basis_stability": (lambda: lc.basis_stability(a, b), lambda: (_torch_polar(a) * _torch_polar(b)).sum(0)),
        "rediagonalize": (lambda: lc.rediagonalize(f.U, sigma, f.V), lambda: torch.linalg.svd(sigma)),
    }  # fmt: skip


def part_core(device: torch.device, dry_run: bool, budget: float) -> tuple[Table, dict[str, Any]]:
    shapes = [(128, 64)] if dry_run else [(1024, 1024), (3072, 768), (4096, 4096)]
    repeat = 3 if dry_run else 7
    sync = _sync_for(device)
    table = Table(
        title=f"(2) lowrank-core vs plain torch on {device}",
        columns=["op", "shape", "core", "torch", "core/torch"],
    )
    rows: list[dict[str, Any]] = []
    deadline = time.perf_counter() + budget
    for m, n in shapes:
        if time.perf_counter() > deadline:
            table.notes.append(f"stopped before {m}x{n}: out of time")
            break
        g = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(m, n, generator=g).to(device)
        b = a + 1e-3 * torch.randn(m, n, generator=g).to(device)
        f = lc.factorize(a)
        sigma = f.Sigma + 1e-3 * torch.randn_like(f.Sigma)
        cases = _core_cases(a, b, f, sigma)
        for op, (core, ref) in cases.items():
            t = compare({"core": core, "torch": ref}, repeat=repeat, warmup=1, sync=sync)
            table.rows.append(
                [
                    op,
                    f"{m}x{n}",
                    f"{t['core'] * 1e3:.2f} ms",
                    f"{t['torch'] * 1e3:.2f} ms",
                    f"{t['core'] / t['torch']:.3f}",
                ]
            )
            rows.append({"op": op, "shape": [m, n], **t})
    try:
        import cupy

        if not dry_run:
            a = cupy.random.standard_normal((1024, 1024), dtype=cupy.float32)
            t = compare(
                {"core": lambda: lc.svd(a), "cupy": lambda: cupy.linalg.svd(a, full_matrices=False)},
                repeat=repeat, warmup=1, sync=cupy.cuda.Device().synchronize,
            )  # fmt: skip
            table.rows.append(
                [
                    "svd (cupy)",
                    "1024x1024",
                    f"{t['core'] * 1e3:.2f} ms",
                    f"{t['cupy'] * 1e3:.2f} ms",
                    f"{t['core'] / t['cupy']:.3f}",
                ]
            )
            rows.append({"op": "svd (cupy)", "shape": [1024, 1024], **t})
    except ImportError:
        table.notes.append("cupy not importable: its row is missing")
    table.notes.append(
        "torch columns: the same math written directly in torch (sign fix included for svd)"
    )
    return table, {"rows": rows}


# --- 3. layers ----------------------------------------------------------------------------------
def _fwd_bwd(layer: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def go() -> None:
        layer(x).sum().backward()

    return go


def part_layers(device: torch.device, dry_run: bool, budget: float) -> tuple[Table, dict[str, Any]]:
    from lowrank_torch.layers import LowRankLinear

    m = n = 256 if dry_run else 4096
    tokens = 512 if dry_run else 16384
    repeat = 3 if dry_run else 10
    sync = _sync_for(device)
    dtypes = [torch.float32] if dry_run else [torch.float32, torch.bfloat16]
    table = Table(
        title=f"(3) factored vs dense Linear {n}->{m}, {tokens} tokens, forward+backward, {device}",
        columns=["dtype", "rank", "dense", "factored", "factored/dense"],
    )
    rows: list[dict[str, Any]] = []
    deadline = time.perf_counter() + budget
    for dtype in dtypes:
        dense = nn.Linear(n, m).to(device=device, dtype=dtype)
        x = torch.randn(tokens, n, device=device, dtype=dtype, requires_grad=True)

        for frac in (0.1, 0.25, 0.5):
            if time.perf_counter() > deadline:
                table.notes.append("stopped early: out of time")
                break
            r = max(1, int(frac * min(m, n)))
            f = lc.factorize(dense.weight.detach().float(), rank=r)
            low = LowRankLinear(
                f.U.to(dtype), f.Sigma.to(dtype), f.V.to(dtype), bias=dense.bias.detach().clone()
            )
            low = low.to(device)
            t = compare(
                {"dense": _fwd_bwd(dense, x), "factored": _fwd_bwd(low, x)},
                repeat=repeat,
                warmup=2,
                sync=sync,
            )
            table.rows.append(
                [
                    str(dtype).removeprefix("torch."),
                    f"{int(frac * 100)}% ({r})",
                    f"{t['dense'] * 1e3:.2f} ms",
                    f"{t['factored'] * 1e3:.2f} ms",
                    f"{t['factored'] / t['dense']:.3f}",
                ]
            )
            rows.append({"dtype": str(dtype), "rank": r, **t})
    return table, {"rows": rows}


# --- 4. SVD drivers -----------------------------------------------------------------------------
def part_svd_drivers(
    device: torch.device, dry_run: bool, budget: float
) -> tuple[Table, dict[str, Any]]:
    drivers: list[str | None] = (
        [None] if device.type != "cuda" else [None, "gesvd", "gesvdj", "gesvda"]
    )
    cases = [((64, 64), 1), ((64, 64), 8)] if dry_run else [
        ((768, 768), 1), ((3072, 768), 1), ((4096, 4096), 1), ((256, 256), 64), ((64, 64), 512),
    ]  # fmt: skip
    repeat = 3 if dry_run else 5
    sync = _sync_for(device)
    table = Table(
        title=f"(4) torch.linalg.svd drivers on {device} (float32, thin)",
        columns=[
            "shape",
            "batch",
            *[d or "default" for d in drivers],
            "max |A - U S Vh| / |A| (worst driver)",
        ],
    )
    rows: list[dict[str, Any]] = []
    deadline = time.perf_counter() + budget
    for (m, n), batch in cases:
        if time.perf_counter() > deadline:
            table.notes.append(f"stopped before {m}x{n} x{batch}: out of time")
            break
        a = (
            torch.randn(batch, m, n, device=device)
            if batch > 1
            else torch.randn(m, n, device=device)
        )
        fns: dict[str, Callable[[], Any]] = {}
        for d in drivers:
            fns[d or "default"] = lambda d=d, a=a: torch.linalg.svd(
                a, full_matrices=False, driver=d
            )
        t = compare(fns, repeat=repeat, warmup=1, sync=sync)
        worst = 0.0
        for d in drivers:
            U, S, Vh = torch.linalg.svd(a, full_matrices=False, driver=d)
            err = float(
                torch.linalg.matrix_norm((U * S[..., None, :]) @ Vh - a).max()
                / torch.linalg.matrix_norm(a).max()
            )
            worst = max(worst, err)
        table.rows.append(
            [
                f"{m}x{n}",
                str(batch),
                *[f"{t[d or 'default'] * 1e3:.2f} ms" for d in drivers],
                f"{worst:.1e}",
            ]
        )
        rows.append({"shape": [m, n], "batch": batch, **t, "worst_rel_error": worst})
    table.notes.append(
        "the fastest accurate driver per shape is what lowrank_torch's backend should pick"
    )
    return table, {"rows": rows}


# --- 5. the realistic workload ------------------------------------------------------------------
def part_lm(device: torch.device, dry_run: bool, budget: float) -> tuple[Table, dict[str, Any]]:
    from dataclasses import replace

    import bench_lm

    if dry_run:
        cfg = replace(bench_lm.QUICK, steps=30, check_every=10, device=str(device))
    else:
        cfg = replace(
            bench_lm.LMConfig(),
            d_model=512,
            layers=6,
            context=256,
            batch=32,
            steps=600,
            device=str(device),
        )
    table, data = bench_lm.measure(cfg)
    return table, data


PARTS: dict[
    str, tuple[Callable[[torch.device, bool, float], tuple[Table, dict[str, Any]]], float]
] = {
    "tests": (part_tests, 210.0),
    "core": (part_core, 45.0),
    "layers": (part_layers, 40.0),
    "svd_drivers": (part_svd_drivers, 45.0),
    "lm": (part_lm, 120.0),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--dry-run", action="store_true", help="CPU, tiny sizes: check the script itself"
    )
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or HERE / "results"))
    p.add_argument("--only", default="", help="comma list of parts (default: all)")
    args = p.parse_args(argv)
    device = _device(args.dry_run)
    chosen = [x for x in args.only.split(",") if x] or list(PARTS)
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "dry_run": args.dry_run,
    }
    results: dict[str, Any] = {"environment": env, "parts": {}}
    print(
        f"gpu_suite on {env['device']} (torch {env['torch']}, Python {env['python']})", flush=True
    )
    ok = True
    for name in chosen:
        fn, budget = PARTS[name]
        start = time.perf_counter()
        try:
            table, data = fn(device, args.dry_run, budget)
            print(table.render(), flush=True)
            status = "ok"
        except Exception:
            data = {"error": traceback.format_exc()}
            print(f"({name}) FAILED\n{data['error']}", flush=True)
            status = "failed"
            ok = False
        results["parts"][name] = {"status": status, "seconds": time.perf_counter() - start, **data}
        print(f"[{name}: {status}, {time.perf_counter() - start:.0f} s]\n", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_suite.json").write_text(json.dumps(results, indent=1, default=str))
    tests = results["parts"].get("tests", {})
    if tests and tests.get("exit") not in (0, None):
        ok = False
    print(f"wrote {args.out / 'gpu_suite.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
